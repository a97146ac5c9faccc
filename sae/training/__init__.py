"""Training: the run's plan and its validation, the LightningModule, the objective, resampling, the run itself."""
