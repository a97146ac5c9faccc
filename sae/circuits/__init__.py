"""Studies of how dictionary features cause model behaviour: feature patching on prompt pairs (issue 14) and
circuit discovery over dictionaries at successive layers (issue 15).

The pieces here are pure (token ids, tensors, callables in; numbers, tables and files out) so that they can be
tested without a language model; the LM session and the splice that run the interventions live in ``sae.lm``.
"""
