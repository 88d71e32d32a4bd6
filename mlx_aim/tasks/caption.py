"""Captions from an AIMv2 pre-training run: its encoder and multimodal decoder, decoding tokens.

``Captioner.from_run(run)`` reads a ``mlx-aim train --objective aimv2`` output directory: the model
config and preprocessing from ``run.json``, the caption tokenizer from ``tokenizer.json`` and the
full pre-training model (encoder and decoder) from its newest intact checkpoint (the exported
trunk at the root has no decoder).

Decoding starts from ``[BOS]`` and stops at ``[EOS]`` or after ``max_tokens`` tokens (at most the
decoder's text positions), greedy (``temperature`` 0) or sampled from
``softmax(logits / temperature)``. The encoder runs with a prefix of K - 1 patches, the most
bidirectional attention it saw in training; every step re-runs the decoder over the whole
sequence (no KV cache: captions are short and the decoder small).

``score_captions`` measures a run against reference captions: the fraction of greedy captions
equal to their reference, and the teacher-forced next-token accuracy (the decoder reads
``[BOS]`` and the reference's tokens; each argmax is compared with the next reference token,
``[EOS]`` included, ``[PAD]`` not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..data.transforms import Preprocessing
from ..errors import InputError
from ..io import read_json
from ..models import build_model
from ..models.base import ConfigError
from ..models.layers import prefix_causal_mask
from ..text.caption_bpe import TOKENIZER_FILE, CaptionTokenizer
from ..train.checkpoint import list_checkpoints, verify_checkpoint

RUN_FILE = "run.json"
# Above this, sampling is uniform over the vocabulary to float32 precision: no caption left.
MAX_TEMPERATURE = 100.0


@dataclass
class Captioner:
    """An ``aimv2_pretrain`` model, its tokenizer and the images' preprocessing."""

    model: nn.Module
    tokenizer: CaptionTokenizer
    preprocess: Preprocessing

    @classmethod
    def from_run(cls, run: str | Path) -> Captioner:
        """Load the newest intact checkpoint of an AIMv2 training run (see the module docstring)."""
        run = Path(run).expanduser()
        if not (run / RUN_FILE).is_file():
            raise InputError(f"{run}: not an `mlx-aim train --objective aimv2` output directory")
        info = read_json(run / RUN_FILE)
        if not isinstance(info, dict) or not isinstance(info.get("model_config"), dict):
            raise InputError(f"{run / RUN_FILE}: no 'model_config' object")
        config = info["model_config"]
        if config.get("model_type") != "aimv2_pretrain":
            raise InputError(f"{run}: a run of another objective (captions need --objective aimv2)")
        if not isinstance(info.get("preprocessing"), dict):
            raise InputError(f"{run / RUN_FILE}: no 'preprocessing' object (image size, mean, std)")
        try:
            model = build_model(config)
            prep = Preprocessing.from_dict(info["preprocessing"])
        except (ConfigError, InputError) as e:
            raise InputError(f"{run / RUN_FILE}: {e}") from None
        tokenizer = CaptionTokenizer.load(run / TOKENIZER_FILE)
        tokenizer.check_ids(model.args.vocab_size, f"the vocabulary size of {run / RUN_FILE}")
        weights, checkpoint = _newest_weights(run)
        try:
            model.load_weights(list(weights.items()), strict=True)
        except ValueError as e:
            raise InputError(
                f"{checkpoint}: does not match the model_config of {run / RUN_FILE} ({e})"
            ) from None
        model.eval()
        size = model.encoder.args.image_size
        return cls(model, tokenizer, Preprocessing(size, size, prep.mean, prep.std))

    @property
    def max_tokens(self) -> int:
        """The most tokens a caption can have (the decoder's text positions)."""
        return self.model.args.max_text_tokens

    def generate(
        self,
        images: mx.array,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        key: mx.array | None = None,
    ) -> list[str]:
        """Captions of normalized NHWC images (see the module docstring)."""
        check_temperature(temperature)
        tk, model = self.tokenizer, self.model
        steps = min(max_tokens or self.max_tokens, self.max_tokens)
        features = self.features(images)
        tokens = mx.full((images.shape[0], 1), tk.bos, mx.int32)
        done = mx.zeros((images.shape[0],), mx.bool_)
        for _ in range(steps):
            _, logits = model.decoder(features, tokens)
            logits = logits[:, -1].astype(mx.float32)
            if temperature > 0:
                key, sub = mx.random.split(key) if key is not None else (None, None)
                token = mx.random.categorical(logits / temperature, key=sub)
            else:
                token = logits.argmax(axis=-1)
            token = mx.where(done, tk.pad, token).astype(mx.int32)
            tokens = mx.concatenate([tokens, token[:, None]], axis=1)
            done = done | (token == tk.eos)
            if done.all().item():
                break
        return [tk.decode(_until_eos(row, tk.eos)) for row in tokens[:, 1:].tolist()]

    def features(self, images: mx.array) -> mx.array:
        """The decoder's image input: encoder tokens with a prefix of K - 1 patches."""
        num_patches = self.model.encoder.args.num_patches
        mask = prefix_causal_mask(mx.full((images.shape[0],), num_patches - 1), num_patches)
        return self.model.encoder.trunk(self.model.encoder.preprocessor(images), mask)

    def next_token_hits(self, images: mx.array, captions: list[str]) -> tuple[int, int]:
        """Teacher-forced next-token predictions equal to the reference: (hits, target tokens)."""
        sequences = mx.array(self.tokenizer.sequences(captions, self.max_tokens))
        _, logits = self.model.decoder(self.features(images), sequences[:, :-1])
        targets = sequences[:, 1:]
        counted = targets != self.tokenizer.pad
        hits = ((logits.argmax(axis=-1) == targets) & counted).sum()
        return int(hits.item()), int(counted.sum().item())


@dataclass(frozen=True)
class CaptionScores:
    """How a run's captions match the references (see the module docstring)."""

    images: int
    exact_match: float  # fraction of greedy captions equal to their reference
    token_accuracy: float  # teacher-forced next-token accuracy over the reference tokens
    tokens: int  # reference tokens scored ([EOS] included)


def score_captions(
    captioner: Captioner, images: mx.array, references: list[str], batch_size: int = 64
) -> CaptionScores:
    """Greedy exact match and teacher-forced token accuracy of normalized NHWC ``images``
    against their ``references`` (whitespace-normalized before comparing)."""
    if not references:
        raise InputError("no reference captions to score")
    if len(references) != images.shape[0]:
        raise InputError(f"{images.shape[0]} images but {len(references)} reference captions")
    matches = hits = tokens = 0
    for start in range(0, len(references), batch_size):
        batch = images[start : start + batch_size]
        truth = [" ".join(r.split()) for r in references[start : start + batch_size]]
        generated = captioner.generate(batch)
        matches += sum(" ".join(g.split()) == t for g, t in zip(generated, truth, strict=True))
        batch_hits, batch_tokens = captioner.next_token_hits(batch, truth)
        hits, tokens = hits + batch_hits, tokens + batch_tokens
    return CaptionScores(len(references), matches / len(references), hits / tokens, tokens)


def _until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


def check_temperature(temperature: float) -> None:
    """InputError unless ``temperature`` is 0 (greedy) or a finite value in ``(0, MAX_TEMPERATURE]``."""
    if not (math.isfinite(temperature) and 0 <= temperature <= MAX_TEMPERATURE):
        raise InputError(
            f"--temperature must be 0 (greedy) or in (0, {MAX_TEMPERATURE:g}], not {temperature}"
        )


def _newest_weights(run: Path) -> tuple[dict[str, mx.array], Path]:
    for _, path in list_checkpoints(run):
        try:
            verify_checkpoint(path)
        except ValueError:
            continue
        return mx.load(str(path / "model.safetensors")), path / "model.safetensors"
    raise InputError(f"{run}: no intact checkpoint (the decoder is only in checkpoints/)")
