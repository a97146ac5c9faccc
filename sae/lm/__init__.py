"""The frozen language model: loading, hook points, text to contexts, the activation reader, the session, the splice."""
