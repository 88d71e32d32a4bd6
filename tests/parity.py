"""Parity judged relative to the reference's scale, so it holds with any BLAS (bundled, OpenBLAS, MKL).

Float32 results of the same math differ by rounding that grows with the magnitude of the values
and with the summation order a BLAS picks; an absolute bound fails on large activations and
passes anything on tiny ones. ``relative_error`` divides the largest absolute difference by the
reference's largest magnitude.
"""

from __future__ import annotations

import numpy as np

# float32 with O(100)-term reductions: ~1e-6 of the scale is typical, 3e-5 leaves room for BLAS
# kernels that block their sums differently, and still fails on any real mistake.
PARITY_REL = 3e-5


def to_numpy(x) -> np.ndarray:
    """An mx.array, torch tensor or array-like as a float64 numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def relative_error(ours, expected) -> float:
    """max |ours - expected| / max |expected| (shapes must agree)."""
    ours, expected = to_numpy(ours), to_numpy(expected)
    assert ours.shape == expected.shape, (ours.shape, expected.shape)
    scale = max(float(np.abs(expected).max(initial=0.0)), np.finfo(np.float32).tiny)
    return float(np.abs(ours - expected).max(initial=0.0)) / scale


def assert_parity(ours, expected, rel: float = PARITY_REL, name: str = "") -> None:
    """Fail when ``ours`` is further than ``rel`` times the reference's scale from ``expected``."""
    error = relative_error(ours, expected)
    assert error <= rel, f"{name or 'output'}: relative error {error:.2e} > {rel:.0e}"
