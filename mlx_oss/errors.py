"""Errors the user can act on. Front ends print them as one line; anything else is a bug."""


class MlxOssError(Exception):
    """Base class for every error that names a file, field or tensor the user can fix."""


class ConfigError(MlxOssError):
    """A checkpoint's config.json is missing, unreadable or describes something we cannot run."""


class CheckpointError(MlxOssError):
    """A checkpoint's weights are missing, truncated or do not match its config."""


class CheckpointChanged(CheckpointError):
    """A checkpoint file was cut short or rewritten after the model was loaded from it: the loaded model cannot
    run until it is loaded again. Not the fault of the request that met it, so a server answers it as its own."""
