"""The side-by-side benchmark (``mlx-aim bench``) and its baselines; not part of the library API.

- ``suite``: what to measure, one worker process per column, the JSON result;
- ``report``: the result as the README's markdown section;
- ``worker``: one implementation and one task in a process of its own;
- ``plain_mlx``: the plain-MLX baseline; ``torch_reference``: the independent PyTorch models
  (also the reference of the parity tests).

Nothing here is imported by the package ``__init__``, and this ``__init__`` imports nothing, so a
torch worker never loads MLX.
"""
