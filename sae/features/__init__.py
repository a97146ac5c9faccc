"""Features: per-feature records, logit effects, monosemanticity scores and the dashboard (``analysis=features``)."""
