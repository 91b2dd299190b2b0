"""mlx-oss: run OpenAI's gpt-oss models on your own computer, offline.

`import mlx_oss` stays light: backends (MLX, Qt, the NumPy model) are imported only when used.
"""

import os

# OpenBLAS's idle threads spin for about 0.1 s (2**28 cycles) after each call before they sleep. The NumPy backend
# runs its own threads between BLAS calls (experts in threads, the compiled kernels), which then shared the cores with
# spinning ones: a plain decoding step took 3.0 s instead of 2.0, a prompt on the kernels 14.7 instead of 19.9
# tokens/s. 2**16 cycles keeps back-to-back calls quick. OpenBLAS reads it when it loads (with NumPy), so this
# only acts if NumPy is not imported yet, and never over the user's own setting.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "16")

from .config import ModelConfig  # noqa: E402
from .errors import CheckpointError, ConfigError, MlxOssError  # noqa: E402
from .loading import load  # noqa: E402

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "MlxOssError", "ModelConfig", "load"]
