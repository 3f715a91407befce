"""CPU execution harness for the CUDA kernels of csrc/cuda (see README.md)."""
