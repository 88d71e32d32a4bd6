"""The orders in which AIMv1 can predict the patches of a grid (the paper's Table 3b ablation).

Each order is a permutation of the raster indices ``row * width + col``: ``order[t]`` is the patch
at step t of the sequence. The paper (arXiv 2401.08541 §5.2, Table 3b) compares raster (its
default), spiral, checkerboard and a fixed random order; it draws them but does not define them
in words, so these are the definitions used here:

- ``raster``: row by row, left to right.
- ``spiral``: clockwise from the top-left corner inward, ring by ring.
- ``checkerboard``: the "black" squares ((row + col) even) in raster order, then the "white" ones.
- ``random``: one fixed random permutation per run, drawn from the run's seed (the paper's
  "fixed random"), the same for every image and every step.
"""

from __future__ import annotations

import numpy as np

PATCH_ORDERS = ("raster", "spiral", "checkerboard", "random")
_RANDOM_ORDER_STREAM = 11  # keeps the permutation independent of the seed's other uses


def raster_order(height: int, width: int) -> np.ndarray:
    """Row by row, left to right: ``0, 1, ..., height * width - 1``."""
    return np.arange(height * width)


def spiral_order(height: int, width: int) -> np.ndarray:
    """Clockwise from the top-left corner inward: top row, right column, bottom row (right to
    left), left column (bottom to top), then the same on the grid inside."""
    grid = np.arange(height * width).reshape(height, width)
    order = []
    while grid.size:
        order.extend(grid[0])
        grid = np.rot90(grid[1:])  # the rest, turned so that the next side is the top row
    return np.array(order, dtype=np.int64)


def checkerboard_order(height: int, width: int) -> np.ndarray:
    """The squares with (row + col) even in raster order, then those with (row + col) odd."""
    index = np.arange(height * width)
    colour = (index // width + index % width) % 2
    return np.concatenate([index[colour == 0], index[colour == 1]])


def random_order(height: int, width: int, seed: int) -> np.ndarray:
    """One fixed random permutation of the grid, determined by ``seed``."""
    rng = np.random.default_rng([seed, _RANDOM_ORDER_STREAM])
    return rng.permutation(height * width)


def patch_order(name: str, height: int, width: int, seed: int = 0) -> np.ndarray:
    """The permutation called ``name`` (one of ``PATCH_ORDERS``) of a height x width grid."""
    if name == "raster":
        return raster_order(height, width)
    if name == "spiral":
        return spiral_order(height, width)
    if name == "checkerboard":
        return checkerboard_order(height, width)
    if name == "random":
        return random_order(height, width, seed)
    raise ValueError(f"unknown patch order {name!r}; the orders are {', '.join(PATCH_ORDERS)}")
