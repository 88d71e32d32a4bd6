"""The AIMv2 objective's documented choices (mlx_aim/objectives/multimodal.py)."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_aim.objectives.multimodal import (
    IMAGE_LOSS_WEIGHT,
    caption_loss,
    caption_sequences,
    multimodal_loss,
)
from mlx_aim.objectives.next_patch import next_patch_loss

PAD, BOS, EOS = 0, 1, 2


def test_captions_become_bos_caption_eos_padded_or_cut():
    rows = caption_sequences([[7, 8], [3, 4, 5, 6], [9] * 10], 4, BOS, EOS, PAD)
    assert rows.dtype == np.int32 and rows.shape == (3, 5)
    assert rows[0].tolist() == [BOS, 7, 8, EOS, PAD]
    assert rows[1].tolist() == [BOS, 3, 4, 5, 6]  # cut: the caption loses its [EOS]
    assert rows[2].tolist() == [BOS, 9, 9, 9, 9]


def test_text_loss_is_the_mean_over_non_pad_target_tokens():
    vocab = 5
    logits = mx.random.normal((2, 3, vocab), key=mx.random.key(0))
    targets = mx.array([[3, 4, PAD], [2, PAD, PAD]])
    log_probs = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    expected = -np.mean([log_probs[0, 0, 3], log_probs[0, 1, 4], log_probs[1, 0, 2]])
    assert caption_loss(logits, targets, PAD).item() == pytest.approx(expected, rel=1e-6)


def test_uniform_logits_give_log_vocab():
    logits = mx.zeros((2, 4, 50))
    targets = mx.array([[5, 6, 7, PAD], [8, PAD, PAD, PAD]])
    assert caption_loss(logits, targets, PAD).item() == pytest.approx(math.log(50), rel=1e-6)


def test_total_is_text_plus_alpha_times_image_and_image_is_aimv1_loss():
    assert IMAGE_LOSS_WEIGHT == 0.4
    key = mx.random.key(1)
    images = mx.random.normal((2, 8, 8, 3), key=key)
    pixels = mx.random.normal((2, 4, 48), key=mx.random.key(2))
    logits = mx.random.normal((2, 3, 6), key=mx.random.key(3))
    prefix, targets = mx.array([1, 3]), mx.array([[1, 2, 3], [4, PAD, PAD]])
    total, image, text = multimodal_loss(
        pixels, logits, images, prefix, targets, patch_size=4, pad=PAD
    )
    assert image.item() == next_patch_loss(pixels, images, prefix, 4).item()
    assert text.item() == caption_loss(logits, targets, PAD).item()
    assert total.item() == pytest.approx(text.item() + 0.4 * image.item(), rel=1e-6)
    total_1, _, _ = multimodal_loss(
        pixels, logits, images, prefix, targets, patch_size=4, pad=PAD, alpha=1.0
    )
    assert total_1.item() == pytest.approx(text.item() + image.item(), rel=1e-6)
