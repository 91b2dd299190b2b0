"""The PySide6 desktop app (`python -m mlx_oss.app`): chat, model manager and settings.

Importing `mlx_oss` never imports this package (or Qt); it needs the `app` extra.
"""
