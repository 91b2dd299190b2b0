"""Writing checkpoints: a downloaded gpt-oss converted to another layout (`layout`: MLX, NumPy, or unquantized experts
back to MXFP4) and synthetic ones of random weights for tests and benchmarks (`synthetic`); the command is
`python -m mlx_oss.converters`."""
