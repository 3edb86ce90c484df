"""Data loading shared by all tasks."""
