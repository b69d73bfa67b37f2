"""Training loop, checkpoints, learning-rate schedules and distributed helpers."""
