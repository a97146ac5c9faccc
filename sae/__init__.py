"""Sparse dictionary learning on language-model activations."""

from sae.dictionaries import Dictionary, build
from sae.saving import load, save_dictionary

__all__ = ["Dictionary", "build", "load", "save_dictionary"]
