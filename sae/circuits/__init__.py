"""Studies of how dictionary features cause model behaviour: feature patching on prompt pairs and
circuit discovery over dictionaries at successive layers.

The pieces here are pure (token ids, tensors, callables in; numbers, tables and files out) so that they can be
tested without a language model; the LM session and the splice that run the interventions live in ``sae.lm``.
"""
