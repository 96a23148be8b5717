"""Training: a generic loop over task modules (optim/schedule, checkpoints, distributed, logging)."""
