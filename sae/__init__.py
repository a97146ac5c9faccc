"""Sparse dictionary learning on language-model activations.

The package is laid out by role, each layer importing only the ones before it (``tests/test_architecture.py``
checks this): ``dictionaries`` and ``baselines`` (the decompositions) → ``io`` (files) → ``lm`` (the frozen model,
hooks, text, the activation reader, the session, the splice) → ``data`` (training streams, cache, toy data) →
``evaluation`` (metrics, baselines fitted, comparison, studies' dispatch) → ``training`` and ``features`` → the
studies (``autointerp``, ``circuits``).
"""

from sae.dictionaries import Dictionary, build
from sae.io.saving import load, save_dictionary

__all__ = ["Dictionary", "build", "load", "save_dictionary"]
