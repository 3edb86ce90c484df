"""Kept for the commands written before ``lightning_ft.pipelines``: importing it registers every task's pipeline."""

import lightning_ft.pipelines  # noqa: F401
