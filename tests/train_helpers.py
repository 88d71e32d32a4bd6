"""Shared by the training tests: the tiny configs they train."""

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
TINY_AIMV2_TRUNK = {
    "model_type": "aim_v2",
    "image_size": 16,
    "patch_size": 4,
    "embed_dim": 32,
    "num_blocks": 2,
    "num_heads": 2,
    "mlp_hidden_dim": 64,
}
