"""The NumPy backend: gpt-oss on any CPU, float32 math over memory-mapped checkpoint weights."""

from .kv_cache import KVCache
from .model import NumpyModel

__all__ = ["KVCache", "NumpyModel"]
