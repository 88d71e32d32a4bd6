"""CPU-backend speed code of mlx-aim."""
