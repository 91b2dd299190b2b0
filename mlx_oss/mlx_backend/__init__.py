"""The MLX backend: gpt-oss on Apple silicon's GPU (Metal), or on the CPU wherever `mlx[cpu]` installs.

Importing this package imports MLX; `mlx_oss.load(..., backend="mlx")` does so only when asked.
"""

from .kv_cache import KVCache
from .model import MlxModel

__all__ = ["KVCache", "MlxModel"]
