"""Shared by the training tests: the tiny pre-training config they all train."""

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
