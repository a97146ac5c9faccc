"""Training data: the resumable shuffled stream of activations, the on-disk activation cache, the datamodules, toy
data."""
