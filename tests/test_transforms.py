"""Preprocessing and augmentation: shapes, geometry conventions, normalization, determinism."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mlx_aim.checkpoints.registry import aim_v1_preprocessing, aim_v2_preprocessing
from mlx_aim.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    NativeResolution,
    Preprocessing,
    RandomResizedCrop,
    TrainTransform,
    center_crop,
    denormalize,
    native_resolution,
    native_size,
    normalize,
    shortest_edge_size,
)
from mlx_aim.errors import InputError

UNIT = ((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255))  # normalization that keeps 0..255 values


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def column_index_image(width: int, height: int) -> Image.Image:
    """Red channel = column index: crops reveal their horizontal offset."""
    a = np.zeros((height, width, 3), np.uint8)
    a[..., 0] = np.arange(width)[None, :]
    return Image.fromarray(a)


def test_constants():
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)


def test_model_presets():
    assert aim_v1_preprocessing(224) == Preprocessing(256, 224, IMAGENET_MEAN, IMAGENET_STD)
    assert aim_v1_preprocessing(448).resize == 512
    v2 = aim_v2_preprocessing(336)
    assert (v2.resize, v2.crop, v2.mean, v2.std) == (336, 336, CLIP_MEAN, CLIP_STD)
    assert (v2.crop_offsets, v2.native) == ("floor", False)


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (257, 300), (1, 1), (2, 3000), (5000, 1)])
def test_preprocess_shape_dtype_and_normalization(size):
    x = aim_v1_preprocessing(224)(random_image(*size))
    assert x.shape == (224, 224, 3) and x.dtype == np.float32
    lo = (0 - np.array(IMAGENET_MEAN)) / IMAGENET_STD
    hi = (1 - np.array(IMAGENET_MEAN)) / IMAGENET_STD
    assert (x >= lo - 1e-6).all() and (x <= hi + 1e-6).all()


def test_shortest_edge_truncates_the_long_side():
    assert shortest_edge_size(300, 257, 224) == (261, 224)  # 300 * 224 / 257 = 261.5
    assert shortest_edge_size(259, 300, 224) == (224, 259)  # 259.46


def test_centre_crop_offsets_round_like_torchvision_or_floor_like_hugging_face():
    img = column_index_image(259, 224)  # 35 spare columns: offset 17.5
    assert np.asarray(center_crop(img, 224))[0, 0, 0] == 18
    assert np.asarray(center_crop(img, 224, "floor"))[0, 0, 0] == 17


@pytest.mark.slow  # importing transformers takes seconds
def test_aimv2_preset_matches_hugging_face_clip_processor():
    pil_clip = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
    processor = pil_clip.CLIPImageProcessorPil(
        size={"shortest_edge": 224},
        crop_size={"height": 224, "width": 224},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        resample=Image.Resampling.BICUBIC,
    )
    for size in [(300, 257), (259, 300), (225, 1000), (100, 77)]:
        img = random_image(*size)
        ref = processor(images=img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        np.testing.assert_allclose(aim_v2_preprocessing(224)(img), ref, atol=1e-5)


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"resize": 224, "crop": 256}, "crop <= resize"),
        ({"interpolation": "cubic"}, "'interpolation' must be one of"),
        ({"std": (0, 0, 0)}, "'std' must be 3 finite positive numbers"),
        ({"std": (0.2, float("nan"), 0.2)}, "'std' must be 3 finite positive numbers"),
        ({"mean": "abc"}, "'mean' must be 3 finite numbers"),
        ({"mean": (0.5, 0.5)}, "'mean' must be 3 finite numbers"),
        ({"resize": 10**9}, "'resize' must be in 1..4096"),
        ({"crop": 0}, "'crop' must be in 1..4096"),
        ({"crop": 22.5}, "'crop' must be an integer"),
        ({"crop_offsets": "ceil"}, "'crop_offsets' must be 'round' or 'floor'"),
    ],
)
def test_invalid_preprocessing_is_refused_naming_the_field(fields, message):
    with pytest.raises(InputError, match=message):
        Preprocessing(**{"resize": 256, "crop": 224, **fields})


def test_preprocessing_reads_back_what_it_writes_and_fills_absent_fields():
    spec = aim_v2_preprocessing(224, native=True)
    assert Preprocessing.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    old_file = {"resize": 224, "crop": 224, "mean": list(CLIP_MEAN), "std": list(CLIP_STD)}
    assert Preprocessing.from_dict(old_file, defaults=spec) == spec
    with pytest.raises(InputError, match=r"lacks field\(s\) \['std'\]"):
        Preprocessing.from_dict({"resize": 8, "crop": 8, "mean": [0, 0, 0]})
    with pytest.raises(InputError, match=r"unknown preprocessing field\(s\) \['size'\]"):
        Preprocessing.from_dict({**old_file, "size": 3})


def test_normalize_then_denormalize_round_trips():
    img = random_image(13, 7)
    x = normalize(img, CLIP_MEAN, CLIP_STD)
    np.testing.assert_array_equal(denormalize(x, CLIP_MEAN, CLIP_STD), np.asarray(img))
    batch = np.stack([x, x])
    assert denormalize(batch, CLIP_MEAN, CLIP_STD).shape == (2, 7, 13, 3)
    assert normalize(img.convert("L"), *UNIT).shape == (7, 13, 3)


def test_native_resolution_pads_with_zeros_after_normalization():
    img = random_image(30, 17)
    x = native_resolution(img, 8, CLIP_MEAN, CLIP_STD)
    assert x.shape == (24, 32, 3) and x.dtype == np.float32
    np.testing.assert_array_equal(x[:17, :30], normalize(img, CLIP_MEAN, CLIP_STD))
    assert (x[17:] == 0).all() and (x[:, 30:] == 0).all()
    assert native_resolution(random_image(1, 1), 14, *UNIT).shape == (14, 14, 3)
    assert np.array_equal(NativeResolution(8, CLIP_MEAN, CLIP_STD)(img, None), x)


def test_native_resolution_downscales_to_max_patches_keeping_aspect():
    x = native_resolution(random_image(400, 100), 16, *UNIT, max_patches=64)
    rows, cols = x.shape[0] // 16, x.shape[1] // 16
    assert rows * cols <= 64 and (rows, cols) == (4, 16)  # 256 x 64 keeps the 4:1 shape
    small = random_image(20, 10)
    assert native_resolution(small, 16, *UNIT, max_patches=64).shape == (16, 32, 3)  # no upscale


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 5000), st.integers(1, 5000), st.sampled_from([4, 8, 14, 16]), st.integers(1, 600)
)
def test_native_size_fits_the_patch_budget(width, height, patch, max_patches):
    w, h = native_size(width, height, patch, max_patches)
    assert 1 <= w <= width and 1 <= h <= height
    assert math.ceil(w / patch) * math.ceil(h / patch) <= max_patches
    if (w, h) != (width, height) and min(w, h) > 4 * patch:  # aspect kept when not degenerate
        assert abs(math.log((w / h) / (width / height))) < 0.25


@settings(max_examples=100, deadline=None)
@given(
    st.one_of(
        st.tuples(st.integers(1, 400), st.integers(1, 400)),
        st.sampled_from([(1, 1), (1, 5000), (5000, 1), (2, 3000)]),
    ),
    st.integers(1, 48),
    st.integers(0, 2**32 - 1),
)
def test_random_resized_crop_shape_and_bounds(size, out, seed):
    crop = RandomResizedCrop(out)
    top, left, h, w = crop.params(*size, np.random.default_rng(seed))
    assert 0 <= top and 0 <= left and 1 <= h and 1 <= w
    assert top + h <= size[1] and left + w <= size[0]
    img = Image.new("RGB", size)
    assert crop(img, np.random.default_rng(seed)).size == (out, out)


def test_random_resized_crop_area_and_ratio_follow_torchvision():
    crop = RandomResizedCrop(32, scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3))
    rng = np.random.default_rng(0)
    for _ in range(200):
        _, _, h, w = crop.params(1000, 1000, rng)
        assert 0.39 <= h * w / 1e6 <= 1.0 and 0.74 <= w / h <= 1.34
    # impossible shapes fall back to a centred crop with the ratio clamped
    assert crop.params(5000, 1, rng) == (0, 2499, 1, 1)
    assert crop.params(4, 100, rng) == (47, 0, 5, 4)


def test_train_transform_is_deterministic_per_generator_and_flips():
    img = random_image(64, 48)
    t = TrainTransform(32, CLIP_MEAN, CLIP_STD)
    a = t(img, np.random.default_rng(7))
    assert a.shape == (32, 32, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, t(img, np.random.default_rng(7)))
    assert not np.array_equal(a, t(img, np.random.default_rng(8)))
    never = TrainTransform(32, CLIP_MEAN, CLIP_STD, hflip=0.0)(img, np.random.default_rng(7))
    always = TrainTransform(32, CLIP_MEAN, CLIP_STD, hflip=1.0)(img, np.random.default_rng(7))
    np.testing.assert_array_equal(always, never[:, ::-1])
