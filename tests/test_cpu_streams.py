"""Batches split over CPU streams give the one-stream results."""

import ctypes

import mlx.core as mx
import numpy as np
import pytest

from mlx_aim.checkpoints.registry import pretrain_config
from mlx_aim.cpu.blas import blas_threads
from mlx_aim.cpu.streams import ENV_VAR, cpu_stream_count, usable_cores
from mlx_aim.models import build_model
from mlx_aim.tasks.features import BatchRunner


@pytest.mark.parametrize("rows", [5, 2])  # a full batch (padded to 6) and a short one
def test_streams_compute_what_one_stream_computes(rows):
    model = build_model(pretrain_config("aim-nano")).encoder
    model.eval()
    images = mx.random.normal((rows, 32, 32, 3), key=mx.random.key(0))
    one = BatchRunner(model.encode, 5, model.state, streams=1)
    three = BatchRunner(model.encode, 5, model.state, streams=3)
    assert three.batch_size == 6  # rounded up to equal chunks
    expected, split = np.array(one(images)), np.array(three(images))
    assert split.shape == expected.shape == (rows, 64, 128)
    np.testing.assert_allclose(split, expected, rtol=1e-5, atol=1e-5)


def test_stream_count_follows_the_setting_and_the_batch(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert 1 <= cpu_stream_count(64) <= min(usable_cores(), 8)
    assert cpu_stream_count(1) == 1
    monkeypatch.setenv(ENV_VAR, "3")
    assert cpu_stream_count(64) == 3 and cpu_stream_count(2) == 2
    monkeypatch.setenv(ENV_VAR, "many")
    with pytest.raises(ValueError, match=ENV_VAR):
        cpu_stream_count(8)
    monkeypatch.setenv(ENV_VAR, "0")
    with pytest.raises(ValueError, match=">= 1"):
        cpu_stream_count(8)


def test_blas_thread_limit_is_restored():
    process = ctypes.CDLL(None)
    if not hasattr(process, "openblas_get_num_threads"):
        pytest.skip("OpenBLAS is not the loaded BLAS")
    before = process.openblas_get_num_threads()
    with blas_threads(1):
        assert process.openblas_get_num_threads() == 1
    assert process.openblas_get_num_threads() == before
