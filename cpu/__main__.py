"""`python -m mlx_oss.cpu`: compile the NumPy backend's kernels into numba's on-disk cache (or say why there are
none). `kernels.warm_up` runs it as a child process so that compiling never holds a busy process's GIL."""

import sys

from . import kernels

if kernels.available():
    kernels.warm_up()
    print(f"compiled: {kernels.description()}")
else:
    print(kernels.description())
    sys.exit(1)
