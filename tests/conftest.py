"""Test-wide settings: set before torch is imported anywhere."""

import os

# Spin-waiting OpenMP threads make small kernels ~40x slower on shared 2-core machines (design.md, Threads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# numpy's OpenBLAS threads spin while waiting as well; one thread is faster on a loaded machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
