"""Converters: synthetic checkpoints for tests and benchmarks (`python -m mlx_oss.converters synth`)."""
