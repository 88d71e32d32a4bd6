"""The tiny model configs the tests build, in one place.

A test that needs another size derives it from these (``{**TINY_V1, "embed_dim": 64}``), so the
keys it changes say what it depends on.
"""

# An AIMv1 trunk: 28 px, 16 patches of 7 px, 2 blocks of width 32 with 4 heads.
TINY_V1 = {
    "model_type": "aim_v1",
    "image_size": 28,
    "patch_size": 7,
    "embed_dim": 32,
    "num_blocks": 2,
    "num_heads": 4,
}

# An AIMv2 trunk: 28 px, 4 patches of 14 px, 2 SwiGLU blocks of width 32 with 2 heads.
TINY_V2 = {
    "model_type": "aim_v2",
    "image_size": 28,
    "patch_size": 14,
    "embed_dim": 32,
    "num_blocks": 2,
    "num_heads": 2,
    "mlp_hidden_dim": 48,
}

# The AIMv1 pre-training model the training tests train (trunk of 16 px, pixel head).

TINY_PRETRAIN = {
    "model_type": "aim_pretrain",
    "encoder": {
        "model_type": "aim_v1",
        "image_size": 16,
        "patch_size": 4,
        "embed_dim": 32,
        "num_blocks": 2,
        "num_heads": 2,
    },
    "head_blocks": 1,
    "head_width": 32,
}

# The tiny AIMv2 trunk of the AIMv2 (multimodal) pre-training tests.
TINY_AIMV2_TRUNK = {**TINY_V2, "image_size": 16, "patch_size": 4, "mlp_hidden_dim": 64}
