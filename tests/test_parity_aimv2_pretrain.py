"""The AIMv2 pre-training model and objective match a PyTorch reference: outputs, losses, gradients.

The reference decoder below is written independently with torch's own RMSNorm, embedding,
cross-entropy (``ignore_index``) and a lower-triangular SDPA mask; the encoder is the reference
AIMv2 trunk of ``mlx_aim.benchmark.torch_reference``. Every tensor starts random.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlx.utils import tree_flatten
from parity import assert_parity, relative_error
from release_files import images, nhwc

from mlx_aim.models import build_model
from mlx_aim.objectives.multimodal import IMAGE_LOSS_WEIGHT, caption_sequences, multimodal_loss
from mlx_aim.reference.torch_aim import (
    RMS_NORM_EPS,
    AIMv2VisionTorch,
    Attention,
    Block,
    SwiGLU,
    Trunk,
    aim_pretraining_loss_torch,
    init_random_,
    prefix_causal_mask,
)

CONV = "encoder.preprocessor.patchifier.proj.weight"
PAD, BOS, EOS = 0, 1, 2
ENCODER = dict(
    model_type="aim_v2",
    image_size=16,
    patch_size=4,
    embed_dim=32,
    num_blocks=2,
    num_heads=4,
    mlp_hidden_dim=48,
)
CONFIG = dict(
    model_type="aimv2_pretrain",
    encoder=ENCODER,
    vocab_size=37,
    max_text_tokens=7,
    decoder_width=24,
    decoder_depth=2,
    decoder_heads=3,
    decoder_mlp_ratio=2.0,
)


class MultimodalDecoderTorch(torch.nn.Module):
    def __init__(self, encoder_dim, width, depth, heads, hidden, vocab, positions, patch_dim):
        super().__init__()

        def norm():
            return torch.nn.RMSNorm(width, eps=RMS_NORM_EPS)

        self.image_proj = torch.nn.Linear(encoder_dim, width, bias=False)
        self.token_embed = torch.nn.Embedding(vocab, width)
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, positions, width))
        blocks = [
            Block(Attention(width, heads), SwiGLU(width, hidden), norm(), norm())
            for _ in range(depth)
        ]
        self.transformer = Trunk(blocks, norm())
        self.pixel_head = torch.nn.Linear(width, patch_dim, bias=True)
        self.text_head = torch.nn.Linear(width, vocab, bias=False)

    def forward(self, features, tokens):
        k = features.shape[1]
        x = torch.cat([self.image_proj(features), self.token_embed(tokens)], dim=1)
        n = x.shape[1]
        x = x + self.pos_embed[:, :n]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        x = self.transformer.post_trunk_norm(self.transformer(x, causal)[-1])
        return self.pixel_head(x[:, :k]), self.text_head(x[:, k:])


class AIMv2PretrainTorch(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        e = c["encoder"]
        self.encoder = AIMv2VisionTorch(
            e["image_size"], e["patch_size"], e["embed_dim"], e["num_blocks"], e["num_heads"],
            e["mlp_hidden_dim"],
        )  # fmt: skip
        width = c["decoder_width"]
        num_patches = (e["image_size"] // e["patch_size"]) ** 2
        self.decoder = MultimodalDecoderTorch(
            e["embed_dim"], width, c["decoder_depth"], c["decoder_heads"],
            int(c["decoder_mlp_ratio"] * width), c["vocab_size"],
            num_patches + c["max_text_tokens"], e["patch_size"] ** 2 * 3,
        )  # fmt: skip

    def forward(self, x, prefix, tokens):
        patches = self.encoder.preprocessor(x)
        mask = prefix_causal_mask(prefix, patches.shape[1])
        trunk = self.encoder.trunk
        return self.decoder(trunk.post_trunk_norm(trunk(patches, mask)[-1]), tokens)


def loss_torch(pixels, logits, x, prefix, targets, patch_size):
    image = aim_pretraining_loss_torch(pixels, x, prefix, patch_size)
    text = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=PAD)
    return text + IMAGE_LOSS_WEIGHT * image, image, text


def _pair():
    reference = init_random_(AIMv2PretrainTorch(CONFIG), seed=3, std=0.1)
    weights = {k: mx.array(v.numpy()) for k, v in reference.state_dict().items()}
    weights[CONV] = weights[CONV].transpose(0, 2, 3, 1)
    model = build_model(CONFIG)
    model.load_weights(list(weights.items()), strict=True)
    return model, reference


def _batch():
    x = images(3, 16, 16, seed=5)
    prefix = torch.tensor([1, 15, 7])  # plain causal, all but the last patch, half
    # a short caption (padded), one that fills the text positions exactly, one cut short
    rows = caption_sequences([[5, 9], [3, 4, 5, 6, 7, 8], list(range(10, 30))], 7, BOS, EOS, PAD)
    return x, prefix, torch.tensor(rows, dtype=torch.long)


def test_outputs_losses_and_every_gradient_match():
    model, reference = _pair()
    x, prefix, sequences = _batch()
    tokens, targets = sequences[:, :-1], sequences[:, 1:]
    pixels, logits = reference(x, prefix, tokens)
    expected = loss_torch(pixels, logits, x, prefix, targets, 4)
    expected[0].backward()

    x_mx, prefix_mx = nhwc(x), mx.array(prefix.numpy().astype(np.int32))
    tokens_mx, targets_mx = mx.array(tokens.numpy()), mx.array(targets.numpy())

    def loss_fn(m):
        out = m(x_mx, prefix_mx, tokens_mx)
        return multimodal_loss(*out, x_mx, prefix_mx, targets_mx, patch_size=4, pad=PAD)

    (ours, image, text), grads = nn.value_and_grad(model, loss_fn)(model)
    pixels_mx, logits_mx = model(x_mx, prefix_mx, tokens_mx)
    assert_parity(pixels_mx, pixels.detach(), name="pixels")
    assert_parity(logits_mx, logits.detach(), name="logits")
    for name, value, want in zip(
        ("total", "image", "text"), (ours, image, text), expected, strict=True
    ):
        assert value.item() == pytest.approx(want.item(), rel=1e-5), name

    grads = dict(tree_flatten(grads))
    params = dict(reference.named_parameters())
    assert set(grads) == set(params)
    worst = 0.0
    for key, param in params.items():
        g = param.grad.numpy()
        g = g.transpose(0, 2, 3, 1) if key == CONV else g
        assert np.abs(g).max() > 0, f"{key}: zero reference gradient makes the check empty"
        assert_parity(grads[key], g, rel=1e-4, name=key)
        worst = max(worst, relative_error(grads[key], g))
    print(f"aimv2 pretrain: {len(grads)} gradients, worst {worst:.1e} of each tensor's largest")
    assert worst <= 1e-4


@torch.no_grad()
def test_text_never_reads_later_tokens_and_images_never_read_text():
    """Guards the parity above against a decoder mask that is not causal."""
    model, _ = _pair()
    x, prefix, sequences = _batch()
    x_mx, prefix_mx = nhwc(x), mx.array(prefix.numpy().astype(np.int32))
    tokens = mx.array(sequences[:, :-1].numpy())
    changed = mx.concatenate([tokens[:, :3], mx.full((3, 4), 11, mx.int32)], axis=1)
    pixels, logits = model(x_mx, prefix_mx, tokens)
    pixels_2, logits_2 = model(x_mx, prefix_mx, changed)
    assert mx.array_equal(pixels, pixels_2)
    assert_parity(model(x_mx, prefix_mx), pixels, name="pixels without text")
    assert mx.array_equal(logits[:, :3], logits_2[:, :3])
    assert not mx.allclose(logits[:, 3:], logits_2[:, 3:])


def test_prefix_lengths_change_the_predictions():
    model, _ = _pair()
    x, _, sequences = _batch()
    x_mx, tokens = nhwc(x[:1]), mx.array(sequences[:1, :-1].numpy())
    causal, _ = model(x_mx, mx.array([1]), tokens)
    prefix, _ = model(x_mx, mx.array([8]), tokens)
    assert relative_error(causal, prefix) > 1e-3
