"""One module per task: its DataModule (preprocessing) and LightningModule (head, loss, metrics)."""
