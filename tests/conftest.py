# ruff: noqa: I001  (mlx_aim first: it picks the optimized BLAS before mlx.core loads)
import mlx_aim  # noqa: F401
import mlx.core as mx
import pytest


@pytest.fixture(autouse=True)
def _seed():
    mx.random.seed(0)


@pytest.fixture(scope="module")
def kernels():
    """The native kernels module, built into the user cache once (skips where they cannot be had)."""
    from mlx_aim.cpu import native

    reason = native.unavailable_reason()
    missing = native.missing_build_tools()
    if reason or missing:
        pytest.skip(f"native kernels: {reason or 'need ' + ', '.join(missing)}")
    with mx.stream(mx.cpu):
        return native._load(native.build_kernels())
