"""k-sparse probing (``evaluate.py analysis=probing``): can a logistic regression that sees only the k most
informative latents of a dictionary (or of a baseline) tell a text task's classes apart?"""
