"""Corpus-level metrics that torchmetrics lacks."""
