"""Pre- and post-processing per task: pure functions on bytes and numpy arrays."""
