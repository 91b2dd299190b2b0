"""The PySide6 desktop app (`python -m mlx_oss.app`); see the README for its status."""
