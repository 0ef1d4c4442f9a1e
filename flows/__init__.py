"""Prefect flows: `retrain` (the scheduled job) and `train-adapter` (training, deployable on a GPU pool)."""
