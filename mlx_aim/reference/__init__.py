"""Independent implementations the tests and the benchmark compare against: PyTorch (ml-aim
layout) and plain MLX (ml-aim's MLX style)."""
