"""Pure-PyTorch (no compiled code) versions of detkit's ops: benchmark baselines and fallbacks."""
