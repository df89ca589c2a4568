"""Pure-PyTorch implementations of detkit's ops: the path without the compiled kernels, and the
benchmarks' baselines."""
