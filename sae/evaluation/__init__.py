"""Evaluation: finding and checking dictionaries, fitting baselines, held-out metrics, comparison, plots, studies."""
