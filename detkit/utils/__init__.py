"""The ground floor: helpers every package may use and that import nothing of detkit.

- `comm`: processes and ranks (rank, world size, barriers, gathers, the device choice, DDP
  unwrapping), usable by data, evaluation, vis and engine alike.
"""
