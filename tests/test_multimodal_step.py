"""The compiled AIMv2 training step and the model it trains."""

import mlx.core as mx
import numpy as np
import pytest
from configs import TINY_AIMV2_TRUNK
from mlx.utils import tree_flatten, tree_map, tree_unflatten

import mlx_aim
from mlx_aim.checkpoints.registry import multimodal_pretrain_config
from mlx_aim.checkpoints.weights import save_model
from mlx_aim.models import build_model
from mlx_aim.models.base import ConfigError
from mlx_aim.objectives.multimodal import caption_sequences, multimodal_loss
from mlx_aim.objectives.next_patch import sample_prefix_lengths
from mlx_aim.train.multimodal_step import make_multimodal_train_step
from mlx_aim.train.optim import build_optimizer, warmup_cosine

PAD, BOS, EOS = 0, 1, 2
TINY = {
    "model_type": "aimv2_pretrain",
    "encoder": TINY_AIMV2_TRUNK,
    "vocab_size": 16,
    "max_text_tokens": 6,
    "decoder_width": 32,
    "decoder_depth": 1,
    "decoder_heads": 2,
}


def fixed_batch(n: int = 8, seed: int = 0) -> tuple[mx.array, mx.array]:
    """Blocky images whose caption names their mean colour: learnable from the image alone."""
    rng = np.random.default_rng(seed)
    blocks = np.kron(rng.normal(size=(n, 4, 4, 3)), np.ones((1, 4, 4, 1)))
    images = (blocks + 0.3 * rng.normal(size=(n, 16, 16, 3))).astype(np.float32)
    words = [[3 + int(np.argmax(img.mean(axis=(0, 1)))), 7, 8] for img in images]
    return mx.array(images), mx.array(caption_sequences(words, 6, BOS, EOS, PAD))


def setup(steps=100, restore=None, **kwargs):
    """A tiny model, its optimizer and compiled step, optionally restored from saved states."""
    mx.random.seed(0)
    model = build_model(TINY)
    optimizer = build_optimizer(model, warmup_cosine(3e-3, 10, steps, 1e-5), weight_decay=0.05)
    if restore is not None:  # before the step is built: it captures the state objects
        weights, optimizer_state, key = restore
        model.load_weights(list(weights.items()), strict=True)
        optimizer.state = tree_unflatten(list(optimizer_state.items()))
        mx.random.seed((key[0] << 32) | key[1])  # the key (k0, k1), as a checkpoint stores it
    return model, optimizer, make_multimodal_train_step(model, optimizer, pad=PAD, **kwargs)


def test_overfitting_a_fixed_batch_lowers_both_losses():
    _, _, step = setup(steps=80)
    batch = fixed_batch()
    parts = [np.array(step([batch])[2]) for _ in range(80)]
    first, last = parts[0], np.mean(parts[-5:], axis=0)
    assert last[0] < 0.7 * first[0] and last[1] < 0.3 * first[1], (first, last)


def test_loss_is_text_plus_alpha_image():
    _, _, step = setup(alpha=0.25)
    loss, norm, (image, text) = step([fixed_batch()])
    assert loss.item() == pytest.approx(text.item() + 0.25 * image.item(), rel=1e-5)
    assert norm.item() > 0


def test_restoring_the_three_states_continues_bit_for_bit():
    """Model, optimizer and random state (the prefix lengths) are all a resume needs."""
    model, optimizer, step = setup()
    batch = fixed_batch()
    for _ in range(3):
        step([batch])
    saved = (
        dict(tree_flatten(model.parameters())),
        dict(tree_flatten(optimizer.state)),
        np.array(mx.random.state[0]).tolist(),
    )
    expected = [step([batch])[0].item() for _ in range(3)]

    _, _, step_2 = setup(restore=saved)
    assert [step_2([batch])[0].item() for _ in range(3)] == expected


def _micro_batch_terms(model, images, sequences, prefix):
    """Loss, [image, text] losses and gradients of one micro-batch at given prefix lengths."""
    patch_size = model.encoder.args.patch_size

    def loss_fn(params):
        model.update(params)
        pixels, logits = model(images, prefix, sequences[:, :-1])
        loss, image, text = multimodal_loss(
            pixels, logits, images, prefix, sequences[:, 1:], patch_size=patch_size, pad=PAD
        )
        return loss, mx.stack([image, text])

    params = model.trainable_parameters()
    (loss, parts), grads = mx.value_and_grad(loss_fn)(params)
    model.update(params)
    return loss, parts, grads


def test_accumulated_micro_batches_average_their_losses_and_gradients():
    """Two accumulated micro-batches: the step's loss, loss parts and gradient norm are those of
    the mean of the two micro-batches' losses and gradients (each at the prefix lengths the step
    draws for it), not of their sum or of the last one alone."""
    model, _, step = setup()
    images, sequences = fixed_batch()
    halves = [(images[:4], sequences[:4]), (images[4:], sequences[4:])]
    num_patches = model.encoder.args.num_patches
    key = np.array(mx.random.state[0]).tolist()
    terms = [
        _micro_batch_terms(model, x, y, sample_prefix_lengths(len(x), num_patches))
        for x, y in halves
    ]
    mx.random.seed((key[0] << 32) | key[1])  # the step draws the same prefix lengths
    (loss_a, parts_a, grads_a), (loss_b, parts_b, grads_b) = terms
    assert abs(loss_a.item() - loss_b.item()) > 1e-3  # the average is not either one
    mean_grads = tree_map(lambda a, b: (a + b) / 2, grads_a, grads_b)
    expected_norm = np.sqrt(sum(np.sum(np.square(g)) for _, g in tree_flatten(mean_grads)))

    loss, norm, parts = step(halves)
    assert loss.item() == pytest.approx((loss_a.item() + loss_b.item()) / 2, rel=1e-5)
    np.testing.assert_allclose(parts, (parts_a + parts_b) / 2, rtol=1e-5)
    assert norm.item() == pytest.approx(float(expected_norm), rel=1e-4)


def test_bfloat16_keeps_float32_masters():
    model, _, step = setup(compute_dtype=mx.bfloat16)
    loss, _, _ = step([fixed_batch()])
    assert np.isfinite(loss.item())
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(model.parameters()))


def test_the_trained_encoder_exports_as_an_ordinary_aimv2_model(tmp_path):
    model, _, step = setup()
    step([fixed_batch()])
    save_model(model.encoder, tmp_path / "run")
    loaded = mlx_aim.load(str(tmp_path / "run"))
    assert loaded.args.model_type == "aim_v2"
    x = fixed_batch()[0][:2]
    assert mx.allclose(loaded(x), model.encoder(x), atol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"decoder_heads": 5}, "divisible"),
        ({"decoder_depth": 0}, "decoder_depth"),
        (
            {
                "encoder": {k: v for k, v in TINY["encoder"].items() if k != "mlp_hidden_dim"}
                | {"model_type": "aim_v1"}
            },
            "aim_v2",
        ),
        ({"encoder": {**TINY["encoder"], "pos_embed_type": "sincos"}}, "absolute"),
    ],
)
def test_config_errors_name_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        build_model({**TINY, **change})


def test_laptop_architectures_build():
    for name in ("aimv2-nano", "aimv2-tiny"):
        config = multimodal_pretrain_config(name, vocab_size=64)
        assert build_model(config).args.decoder_depth == config["decoder_depth"]
    with pytest.raises(KeyError, match="not an AIMv2"):
        multimodal_pretrain_config("aim-nano")
