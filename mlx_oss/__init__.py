"""mlx-oss: run OpenAI's gpt-oss models on your own computer, offline.

`import mlx_oss` stays light: backends (MLX, Qt, the NumPy model) are imported only when used.
"""

from .config import ModelConfig
from .errors import CheckpointError, ConfigError, MlxOssError
from .loading import load

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "MlxOssError", "ModelConfig", "load"]
