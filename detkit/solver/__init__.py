"""The optimizer and the learning-rate schedule (`detkit.solver.optim`), the targets of a
schedule config's `optimizer` and `scheduler` nodes."""
