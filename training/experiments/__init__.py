"""Reproducible experiments behind docs/results.md: ``python -m training.experiments.<name>``."""
