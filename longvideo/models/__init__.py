"""Pipelines: built-in tiny random-weight models (offline) and loading of local checkpoints."""
