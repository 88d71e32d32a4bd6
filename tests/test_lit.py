"""AIMv2 LiT: parity with transformers' Aimv2Model, in its own layout and in ml-aim's AIMv2LiT one."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest
from clip_vocab import write_clip_vocab
from mlx.utils import tree_flatten
from mlx_aim_cli.main import app
from parity import assert_parity
from release_files import replace_registry_entry
from typer.testing import CliRunner

import mlx_aim
import mlx_aim.checkpoints.convert
from mlx_aim.checkpoints.convert import convert
from mlx_aim.checkpoints.registry import LIT_NAME, LIT_REVISION
from mlx_aim.checkpoints.weights import WeightsError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

VOCAB = 64
EOS = VOCAB - 1
CONTEXT = 12

# transformers Aimv2Model key -> ml-aim AIMv2LiT key (aim-recipe.md, section C), per tower.
TRUNK_KEYS = [
    ("embeddings.patch_embed.", "preprocessor.patchifier.proj."),
    ("embeddings.rms_norm.", "preprocessor.patchifier.norm."),
    ("attention.out_proj.", "attn.proj."),
    ("ffn.gate_proj.", "mlp.fc1."),
    ("ffn.up_proj.", "mlp.fc3."),
    ("ffn.down_proj.", "mlp.fc2."),
    ("rms_norm1.", "norm_1."),
    ("rms_norm2.", "norm_2."),
    ("encoder.layers.", "trunk.blocks."),
    ("head.k_proj.", "head.k."),
    ("head.v_proj.", "head.v."),
    ("head.output_proj.", "head.linear."),
]
TOP_KEYS = {
    "visual_projection.weight": "image_projector.weight",
    "text_projection.weight": "text_projector.weight",
    "logit_scale": "log_logit_scale",
    "vision_model.rms_norm.weight": "image_encoder.trunk.post_trunk_norm.weight",
    "text_model.rms_norm.weight": "text_encoder.trunk.post_trunk_norm.weight",
    "vision_model.embeddings.position_embedding.weight": "image_encoder.preprocessor.pos_embed",
    "text_model.embeddings.token_embedding.weight": "text_encoder.preprocessor.text_embedding.weight",
    "text_model.embeddings.position_embedding.weight": (
        "text_encoder.preprocessor.positional_embedding"
    ),
}


def ml_aim_state_dict(hf_state: dict) -> dict:
    """The ml-aim AIMv2LiT state dict of a transformers Aimv2Model (q, k, v fused into qkv)."""
    out = {}
    for key, value in hf_state.items():
        if key in TOP_KEYS:
            new = TOP_KEYS[key]
            value = value[None] if new.endswith("pos_embed") else value
        elif (
            key.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")) and "head" not in key
        ):
            if not key.endswith("q_proj.weight"):
                continue
            stem = key.removesuffix("q_proj.weight")
            value = torch.cat([hf_state[stem + p + "_proj.weight"] for p in "qkv"])
            new = key.replace("attention.q_proj.", "attn.qkv.")
        else:
            new = key
        for theirs, ours in TRUNK_KEYS:
            new = new.replace(theirs, ours)
        new = new.replace("vision_model.", "image_encoder.").replace("text_model.", "text_encoder.")
        out[new] = value.contiguous()
    return out


def random_hf_lit(folder, logit_scale: float = 2.5, vocab: int = VOCAB):
    """A small random transformers Aimv2Model saved in ``folder`` (every tensor random); its text
    tower has ``vocab`` tokens, the last one ending texts."""
    config = transformers.Aimv2Config(
        vision_config=dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=56,
            patch_size=14,
            use_head=True,
        ),
        text_config=dict(
            vocab_size=vocab,
            hidden_size=48,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=3,
            max_position_embeddings=CONTEXT,
            eos_token_id=vocab - 1,
        ),
        projection_dim=32,
    )
    torch.manual_seed(0)
    model = transformers.Aimv2Model(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.2 + (1.0 if param.ndim == 1 else 0.0))
        model.logit_scale.fill_(logit_scale)
    model.save_pretrained(folder)
    return model


def random_ids(batch: int, seed: int = 0) -> np.ndarray:
    """Token rows ``<ids> EOS <EOS padding>`` of varied lengths (no EOS before its place)."""
    rng = np.random.default_rng(seed)
    ids = np.full((batch, CONTEXT), EOS, dtype=np.int64)
    for row, length in enumerate(rng.integers(1, CONTEXT, size=batch)):
        ids[row, :length] = rng.integers(0, EOS, size=length)
    return ids


def reference_outputs(reference, pixels: np.ndarray, ids: np.ndarray):
    """transformers' image/text features and logits (causal text: attention_mask is given)."""
    mask = torch.from_numpy(np.cumsum(ids == EOS, axis=1) - (ids == EOS) == 0).long()
    with torch.no_grad():
        out = reference(
            input_ids=torch.from_numpy(ids),
            pixel_values=torch.from_numpy(pixels),
            attention_mask=mask,
        )
        image = reference.get_image_features(pixel_values=torch.from_numpy(pixels)).pooler_output
        text = reference.get_text_features(
            input_ids=torch.from_numpy(ids), attention_mask=mask
        ).pooler_output
    return image, text, out.logits_per_image, out.logits_per_text


def assert_matches_reference(model, reference, seed: int = 0):
    pixels = np.random.default_rng(seed).normal(size=(3, 3, 56, 56)).astype(np.float32)
    ids = random_ids(5, seed)
    image, text, per_image, per_text = reference_outputs(reference, pixels, ids)
    images = mx.array(pixels.transpose(0, 2, 3, 1))
    assert_parity(model.encode_image(images), image, name="encode_image")
    assert_parity(model.encode_text(mx.array(ids)), text, name="encode_text")
    ours_per_image, ours_per_text = model(images, mx.array(ids))
    assert_parity(ours_per_image, per_image, name="logits_per_image")
    assert_parity(ours_per_text, per_text, name="logits_per_text")


def test_transformers_layout_matches_aimv2model(tmp_path):
    reference = random_hf_lit(tmp_path / "hf")
    model = mlx_aim.load(tmp_path / "hf")
    assert model.args.model_type == "aim_v2_lit"
    assert model.args.projection_dim == 32 and model.args.vision["embed_dim"] == 64
    assert_matches_reference(model, reference)


def test_ml_aim_layout_matches_aimv2model(tmp_path):
    reference = random_hf_lit(tmp_path / "hf")
    folder = tmp_path / "ml-aim"
    folder.mkdir()
    (folder / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    state = ml_aim_state_dict(reference.state_dict())
    assert "image_encoder.trunk.blocks.1.attn.qkv.weight" in state
    safetensors_torch.save_file(state, folder / "model.safetensors")
    assert_matches_reference(mlx_aim.load(folder), reference, seed=1)


def test_logit_scale_is_clamped_like_the_reference(tmp_path):
    reference = random_hf_lit(tmp_path / "hf", logit_scale=6.0)  # exp(6) > max_logit_scale 100
    model = mlx_aim.load(tmp_path / "hf")
    assert float(model.logit_scale) == pytest.approx(100.0)
    assert_matches_reference(model, reference)


def test_text_feature_is_causal_and_read_at_the_first_eos(tmp_path):
    random_hf_lit(tmp_path / "hf")
    model = mlx_aim.load(tmp_path / "hf")
    ids = np.array([[5, 9, 17, EOS, 3, 4, EOS], [5, 9, 17, EOS, 8, 1, 2]])
    after_eos = np.array(model.encode_text(mx.array(ids)))
    scale = np.abs(after_eos[0]).max()  # float32 rounding differs by row; causality does not
    np.testing.assert_allclose(after_eos[0], after_eos[1], rtol=0, atol=1e-5 * scale)
    before_eos = np.array(model.encode_text(mx.array([[5, 10, 17, EOS]])))[0]
    assert np.abs(before_eos - after_eos[0]).max() > 1e-3


def test_too_many_tokens_is_a_clear_error(tmp_path):
    random_hf_lit(tmp_path / "hf")
    model = mlx_aim.load(tmp_path / "hf")
    with pytest.raises(ValueError, match=f"at most {CONTEXT} tokens"):
        model.encode_text(mx.zeros((1, CONTEXT + 1), dtype=mx.int32))


def test_converted_directory_round_trips(tmp_path):
    random_hf_lit(tmp_path / "hf")
    direct = mlx_aim.load(tmp_path / "hf")
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "hf"), str(tmp_path / "ours")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == (
        "aim_v2_lit"
    )
    again = mlx_aim.load(tmp_path / "ours")
    images, ids = mx.random.normal((2, 56, 56, 3)), mx.array(random_ids(3))
    for ours, theirs in zip(again(images, ids), direct(images, ids), strict=True):
        np.testing.assert_array_equal(np.array(ours), np.array(theirs))
    assert float(again.log_logit_scale) == pytest.approx(2.5)
    assert again.preprocessing.crop == 56


def test_import_is_strict(tmp_path):
    reference = random_hf_lit(tmp_path / "hf")
    state = {k: v for k, v in reference.state_dict().items() if k != "text_projection.weight"}
    safetensors_torch.save_file(
        {k: v.contiguous() for k, v in state.items()}, tmp_path / "hf" / "model.safetensors"
    )
    with pytest.raises(WeightsError, match="text_projector.weight"):
        mlx_aim.load(tmp_path / "hf")


def test_registry_architecture_has_the_released_layout():
    config = transformers.Aimv2Config(
        vision_config=dict(use_head=True), text_config=dict(), projection_dim=768
    )
    with torch.device("meta"):  # shapes only, no weight memory
        released = ml_aim_state_dict(transformers.Aimv2Model(config).state_dict())
    expected = {k: tuple(v.shape) for k, v in released.items()}
    proj = "image_encoder.preprocessor.patchifier.proj.weight"
    d, c, p, _ = expected[proj]
    expected[proj] = (d, p, p, c)  # MLX's conv layout
    model = mlx_aim.build_model(mlx_aim.REGISTRY[LIT_NAME].config)
    assert {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())} == expected


def test_registry_entry_is_the_released_architecture():
    entry = mlx_aim.REGISTRY["aimv2-large-patch14-224-lit"]
    assert entry.checkpoint.revision == "c2cd59a786c4c06f39d199c50d08cc2eab9f8605"
    model = mlx_aim.build_model(entry.config)
    args = model.args
    assert (args.text_embed_dim, args.text_num_blocks, args.text_num_heads) == (768, 12, 6)
    assert (args.text_mlp_hidden_dim, args.vocab_size, args.max_context_length) == (2048, 49408, 77)
    assert (args.eos_token_id, args.projection_dim) == (49407, 768)
    assert args.vision_args.embed_dim == 1024 and args.vision_args.num_blocks == 24
    assert model.image_encoder.head.linear.bias.shape == (1024,)
    assert math.isclose(float(model.logit_scale), 1 / 0.07, rel_tol=1e-5)


def test_registry_name_reads_the_pinned_release_and_its_tokenizer(tmp_path, monkeypatch):
    release = write_clip_vocab(tmp_path / "release")
    reference = random_hf_lit(
        tmp_path / "hf", vocab=len(json.loads((release / "vocab.json").read_text()))
    )
    state = ml_aim_state_dict(reference.state_dict())
    safetensors_torch.save_file(state, release / "mlx_model.safetensors")
    config = mlx_aim.load(tmp_path / "hf").args.to_dict()
    replace_registry_entry(monkeypatch, LIT_NAME, config)
    requested = []

    def fetch(repo, filename, revision=None):
        requested.append((repo, filename, revision))
        return release / filename

    monkeypatch.setattr(mlx_aim.checkpoints.convert, "fetch", fetch)
    model = mlx_aim.load(LIT_NAME)
    assert_matches_reference(model, reference, seed=2)
    assert model.tokenizer is not None and model.tokenizer.encode("a cat")[0][-1] == (
        model.tokenizer.eos_id
    )
    assert {r[1] for r in requested} == {"mlx_model.safetensors", "vocab.json", "merges.txt"}
    assert {(r[0], r[2]) for r in requested} == {(f"apple/{LIT_NAME}", LIT_REVISION)}

    convert(LIT_NAME, tmp_path / "out")
    assert (tmp_path / "out" / "vocab.json").read_bytes() == (release / "vocab.json").read_bytes()
    assert mlx_aim.load(tmp_path / "out").tokenizer is not None
