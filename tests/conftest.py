# ruff: noqa: I001  (mlx_aim first: it picks the optimized BLAS before mlx.core loads)
import mlx_aim  # noqa: F401
import mlx.core as mx
import pytest


@pytest.fixture(autouse=True)
def _seed():
    mx.random.seed(0)
