"""The side-by-side benchmark (``mlx-aim bench``) and its baselines; not part of the library API.

- ``suite``: what to measure, one worker process per column, the JSON result;
- ``report``: the result as the markdown section of docs/performance.md;
- ``worker``: one implementation and one task in a process of its own;
The plain-MLX and PyTorch implementations it compares against live in ``mlx_aim.reference``
(they are the parity tests' oracles too).

Nothing here is imported by the package ``__init__``, and this ``__init__`` imports nothing, so a
torch worker never loads MLX.
"""
