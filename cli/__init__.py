"""The ``mlx-aim`` command line (Typer)."""
