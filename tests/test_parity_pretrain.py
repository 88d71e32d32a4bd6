"""mlx-aim's pre-training model and loss match the PyTorch reference: outputs, loss and gradients."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from configs import TINY_V1
from mlx.utils import tree_flatten
from parity import PARITY_REL, relative_error
from release_files import images, nhwc

from mlx_aim.checkpoints.registry import pretrain_config
from mlx_aim.models import build_model
from mlx_aim.objectives.next_patch import next_patch_loss
from mlx_aim.reference.torch_aim import (
    AIMForPretrainingTorch,
    AIMv1Torch,
    AIMv2VisionTorch,
    aim_pretraining_loss_torch,
    init_random_,
)
from mlx_aim.train.step import packed_next_patch_loss

CONV = "encoder.preprocessor.patchifier.proj.weight"
TINY_V2 = {**TINY_V1, "model_type": "aim_v2", "mlp_hidden_dim": 64}


def _tiny(encoder: dict) -> dict:
    return {"model_type": "aim_pretrain", "encoder": encoder, "head_blocks": 2, "head_width": 48}


def _reference_encoder(config: dict):
    c = config["encoder"]
    args = (c["image_size"], c["patch_size"], c["embed_dim"], c["num_blocks"], c["num_heads"])
    if c["model_type"] == "aim_v1":
        return AIMv1Torch(*args)
    return AIMv2VisionTorch(*args, c["mlp_hidden_dim"], pos_embed_type=c["pos_embed_type"])


CONFIGS = {
    "aimv1": _tiny(TINY_V1),
    "aimv2-absolute": _tiny({**TINY_V2, "pos_embed_type": "absolute"}),
    "aimv2-sincos": _tiny({**TINY_V2, "pos_embed_type": "sincos"}),
    "aim-nano": pretrain_config("aim-nano", head_blocks=1, head_width=64),
}


def _pair(config: dict):
    """The MLX model and the reference, sharing the reference's random weights."""
    reference = AIMForPretrainingTorch(
        _reference_encoder(config), config["head_blocks"], config["head_width"]
    )
    init_random_(reference, seed=3, std=0.1)
    weights = {k: mx.array(v.numpy()) for k, v in reference.state_dict().items()}
    weights[CONV] = weights[CONV].transpose(0, 2, 3, 1)
    model = build_model(config)
    model.load_weights(list(weights.items()), strict=True)
    return model, reference


def _batch(config: dict, width_patches: int | None = None):
    c = config["encoder"]
    p, size = c["patch_size"], c["image_size"]
    width = size if width_patches is None else width_patches * p
    x = images(3, size, width, seed=5)
    k = (size // p) * (width // p)
    # a pair (plain causal, all but the last patch), then half on its own
    prefix = torch.tensor([1, k - 1, k // 2])
    return x, prefix, p


@pytest.mark.parametrize("packed", [False, True], ids=["every-position", "packed"])
@pytest.mark.parametrize("name", CONFIGS)
def test_predictions_loss_and_every_gradient_match(name, packed):
    config = CONFIGS[name]
    model, reference = _pair(config)
    x, prefix, p = _batch(config)
    pred = reference(x, prefix)
    loss = aim_pretraining_loss_torch(pred, x, prefix, p)
    loss.backward()

    images_mx, prefix_mx = nhwc(x), mx.array(prefix.numpy().astype(np.int32))

    def loss_fn(m):
        if packed:  # the training step's path: the head only where the loss reads
            return packed_next_patch_loss(m, images_mx, images_mx, prefix_mx)
        return next_patch_loss(m(images_mx, prefix_mx), images_mx, prefix_mx, p)

    ours, grads = nn.value_and_grad(model, loss_fn)(model)
    pred_diff = relative_error(model(images_mx, prefix_mx), pred)
    loss_rel = abs(ours.item() - loss.item()) / loss.item()

    grads = dict(tree_flatten(grads))
    expected = dict(reference.named_parameters())
    assert set(grads) == set(expected)
    worst_abs, worst_rel = 0.0, 0.0
    for key, param in expected.items():
        g = param.grad.numpy()
        g = g.transpose(0, 2, 3, 1) if key == CONV else g
        assert np.abs(g).max() > 0, f"{key}: zero reference gradient makes the check empty"
        diff = float(np.abs(np.array(grads[key]) - g).max())
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, relative_error(grads[key], g))
    print(
        f"pretrain {name} {'packed' if packed else 'full'}: pred {pred_diff:.1e} of scale, loss rel {loss_rel:.1e}, grads "
        f"{worst_abs:.1e} abs / {worst_rel:.1e} of each tensor's largest ({len(grads)} tensors)"
    )
    assert pred_diff <= PARITY_REL
    assert loss_rel <= 1e-5
    assert worst_rel <= 1e-4


@torch.no_grad()
def test_native_encoder_predicts_non_square_images():
    config = CONFIGS["aimv2-sincos"]
    model, reference = _pair(config)
    x, prefix, p = _batch(config, width_patches=6)  # 4 x 6 patches
    pred = reference(x, prefix)
    images_mx, prefix_mx = nhwc(x), mx.array(prefix.numpy().astype(np.int32))
    assert relative_error(model(images_mx, prefix_mx), pred) <= PARITY_REL
    ours = next_patch_loss(model(images_mx, prefix_mx), images_mx, prefix_mx, p).item()
    assert ours == pytest.approx(aim_pretraining_loss_torch(pred, x, prefix, p).item(), rel=1e-5)


@torch.no_grad()
def test_prefix_lengths_change_the_predictions():
    """Guards the parity above against a mask that ignores the prefix lengths."""
    model, _ = _pair(CONFIGS["aimv1"])
    x = nhwc(images(1, 28, 28))
    causal = model(x, mx.array([1]))
    prefix = model(x, mx.array([8]))
    assert np.abs(np.array(causal - prefix)).max() > 1e-3
