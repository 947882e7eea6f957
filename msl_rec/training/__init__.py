"""Training: the LightningModule, its optimiser and schedule, throughput logging."""
