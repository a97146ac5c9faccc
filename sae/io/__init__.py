"""Files: dictionaries on disk (safetensors + JSON), training checkpoints, SAELens interop, atomic writes."""
