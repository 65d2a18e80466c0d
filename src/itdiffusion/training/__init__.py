"""Training with the information-theoretic objective: the loop, checkpoints, data-parallel helpers."""
