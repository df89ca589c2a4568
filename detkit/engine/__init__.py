"""Training machinery: checkpoints, the training loop, distributed helpers, logging."""
