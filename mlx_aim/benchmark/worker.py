"""Benchmark worker: one implementation and one task in a process of its own.

Run as ``python -m mlx_aim.benchmark.worker SPEC.json`` by ``suite.run_worker``. A torch worker
must not load MLX and an MLX worker must not load torch, because ``libtorch_cpu`` exports
``sgemm_`` and whichever BLAS comes first in a process serves the other library's matmuls too.
Importing ``mlx_aim`` loads neither (its ``__init__`` only picks MLX's BLAS, which the suite turns
off for torch workers with ``MLX_AIM_BLAS=off``), and this module imports each library only inside
the functions of its backend.

The spec (JSON, written by ``suite``) names ``impl``, ``task`` and the settings; the result
goes to ``spec["out"]`` as JSON. Memory (Linux): the process's resident-set high-water mark is reset
(``/proc/self/clear_refs``) once the model and inputs are in memory, and ``rss_peak_delta_bytes`` is
how far it rose during warm-up and timed steps (optimizer state, gradients, activations, allocator
caches), measured the same way for every implementation. MLX workers add MLX's own allocator peak.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from ..io import write_text

GEMM_SIZE = 2048
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.05


# ---- memory and timing ------------------------------------------------------------------------


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class RssWindow:
    """Rise of the resident-set high-water mark over a window (Linux; None elsewhere)."""

    def __init__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
            self.baseline = _status_bytes("VmRSS")
        except OSError:
            self.baseline = None

    def delta(self) -> int | None:
        peak = _status_bytes("VmHWM")
        return None if self.baseline is None or peak is None else peak - self.baseline


def _time_steps(step, warmup: int, steps: int) -> dict[str, Any]:
    """Run ``step()`` (which must block until done) ``warmup`` + ``steps`` times."""
    first = None
    for i in range(warmup):
        start = time.perf_counter()
        step()
        if i == 0:
            first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"first_step_s": first, "step_times_s": times}


# ---- MLX ---------------------------------------------------------------------------------------


def _mlx_start(impl: str) -> dict[str, Any]:
    """Versions and the BLAS that ``import mlx_aim`` chose (none with ``MLX_AIM_BLAS=off``); the
    mlx-aim column reuses freed CPU buffers as every mlx-aim command does (plain MLX: MLX's 32 MiB)."""
    import mlx.core as mx

    from ..cpu.blas import blas_info
    from ..cpu.memory import reuse_freed_buffers

    info = blas_info()
    cache_limit = reuse_freed_buffers() if impl == "mlx-aim" else None
    return {
        "mlx_version": mx.__version__,
        "device": str(mx.default_device()),
        "blas": str(info) if info else "bundled (the MLX wheel's own BLAS)",
        "cpu_cache_limit": cache_limit,
    }


def _mlx_gemm_gflops(seconds: float) -> float:
    import mlx.core as mx

    a = mx.random.normal((GEMM_SIZE, GEMM_SIZE), key=mx.random.key(0))
    b = mx.random.normal((GEMM_SIZE, GEMM_SIZE), key=mx.random.key(1))
    mx.eval(a, b, a @ b)
    best, spent = 0.0, 0.0
    while spent < seconds:
        start = time.perf_counter()
        mx.eval(a @ b)
        dt = time.perf_counter() - start
        spent += dt
        best = max(best, 2 * GEMM_SIZE**3 / dt / 1e9)
    return best


def _mlx_model(spec: dict, embed: bool):
    """(model, loss function) of the MLX implementation named in the spec, with shared weights."""
    from ..models import build_model
    from ..objectives.next_patch import next_patch_loss
    from ..reference import plain_mlx

    config = spec["config"]
    pretrain = config["model_type"] == "aim_pretrain"
    if spec["impl"] == "mlx-aim":
        model = build_model(config)
        loss = next_patch_loss
    else:
        model = (plain_mlx.AIMForPretraining if pretrain else plain_mlx.Encoder)(config)
        loss = plain_mlx.pretraining_loss
    if spec.get("weights"):
        model.load_weights(spec["weights"])
    if pretrain and spec.get("grad_checkpoint"):
        model.set_grad_checkpoint(True)
    if embed and pretrain:
        model = model.encoder
    return model, loss


def _mlx_inputs(spec: dict):
    import mlx.core as mx

    from ..objectives.next_patch import sample_paired_prefix_lengths

    if spec.get("inputs"):
        data = mx.load(spec["inputs"])
        return data["images"], data["prefix_lengths"]
    enc = spec["config"].get("encoder", spec["config"])
    size, b = enc["image_size"], spec["batch"]
    k = (size // enc["patch_size"]) ** 2
    key = mx.random.key(spec.get("seed", 0))
    images = mx.random.normal((b, size, size, enc.get("num_channels", 3)), key=key)
    return images, sample_paired_prefix_lengths(b, k, key=key)


def _mlx_train_step(spec: dict, model, loss_fn):
    """``step(images, prefix) -> loss``: forward, backward, clip to norm 1, AdamW.

    mlx-aim runs the library's own compiled step (``mlx_aim.train.step``), which draws the prefix
    lengths itself; plain-MLX spells the same update out, uncompiled.
    """
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    if spec["impl"] == "mlx-aim":
        from ..train.optim import build_optimizer, warmup_cosine
        from ..train.step import make_train_step

        schedule = warmup_cosine(LEARNING_RATE, 10, 1000, 0.0)
        optimizer = build_optimizer(model, schedule, weight_decay=WEIGHT_DECAY)
        train_step = make_train_step(model, optimizer, global_batch=spec["batch"], grad_clip=1.0)
        return lambda images, prefix: train_step([images])[0]

    patch = spec["config"]["encoder"]["patch_size"]
    optimizer = optim.AdamW(learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    optimizer.init(model.trainable_parameters())
    loss_and_grad = nn.value_and_grad(
        model, lambda m, images, prefix: loss_fn(m(images, prefix), images, prefix, patch)
    )

    def step(images, prefix):
        loss, grads = loss_and_grad(model, images, prefix)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        mx.eval(loss, model.parameters(), optimizer.state)
        return loss

    return step


def _mlx_initial_loss(spec: dict, model, loss_fn, images, prefix) -> float:
    """The loss on the shared inputs before any update (the cross-implementation check)."""
    patch = spec["config"]["encoder"]["patch_size"]
    return loss_fn(model(images, prefix), images, prefix, patch).item()


def mlx_train(spec: dict, result: dict) -> None:
    import mlx.core as mx

    model, loss_fn = _mlx_model(spec, embed=False)
    images, prefix = _mlx_inputs(spec)
    mx.eval(model.parameters(), images, prefix)
    result["loss_at_init"] = _mlx_initial_loss(spec, model, loss_fn, images, prefix)
    mx.clear_cache()
    resident = mx.get_active_memory()
    mx.reset_peak_memory()
    window = RssWindow()  # before the optimizer state exists, as in the torch workers
    step = _mlx_train_step(spec, model, loss_fn)

    def run():
        step(images, prefix).item()

    result.update(_time_steps(run, spec["warmup"], spec["steps"]))
    result["rss_peak_delta_bytes"] = window.delta()
    result["alloc_peak_bytes"] = mx.get_peak_memory()
    result["alloc_resident_bytes"] = resident


def mlx_embed(spec: dict, result: dict) -> None:
    import mlx.core as mx
    import numpy as np

    model, _ = _mlx_model(spec, embed=True)
    model.eval()
    images, _ = _mlx_inputs(spec)
    if spec["impl"] == "mlx-aim":  # what mlx-aim embed runs: compiled, split over CPU streams
        from ..tasks.features import BatchRunner

        forward = BatchRunner(model.encode, images.shape[0], model.state)
        result["cpu_streams"] = max(1, len(forward.run.streams))
    else:
        forward = model
    mx.eval(model.parameters(), images)
    mx.clear_cache()
    resident = mx.get_active_memory()
    outputs = []

    def run():
        out = forward(images)
        mx.eval(out)
        if not outputs:
            outputs.append(np.array(out))

    mx.reset_peak_memory()
    window = RssWindow()
    result.update(_time_steps(run, spec["warmup"], spec["steps"]))
    result["rss_peak_delta_bytes"] = window.delta()
    result["alloc_peak_bytes"] = mx.get_peak_memory()
    result["alloc_resident_bytes"] = resident
    if spec.get("dump"):
        np.save(spec["dump"], outputs[0])


def mlx_growth(spec: dict, result: dict) -> None:
    cells = []
    for cell in spec["cells"]:
        sub = {**spec, "config": cell["config"], "weights": None, "inputs": None}
        model, loss_fn = _mlx_model(sub, embed=False)
        images, prefix = _mlx_inputs(sub)
        step = _mlx_train_step(sub, model, loss_fn)

        def run(step=step, images=images, prefix=prefix):
            step(images, prefix).item()

        cells.append({**cell, **_time_steps(run, spec["warmup"], spec["steps"])})
    result["cells"] = cells


def mlx_loader(spec: dict, result: dict) -> None:
    """Loader throughput alone, then the compiled mlx-aim step fed by the loader."""
    import mlx.core as mx
    import numpy as np
    from PIL import Image

    from ..data.loader import ImageLoader, measure_throughput
    from ..data.transforms import TrainTransform

    enc = spec["config"]["encoder"]
    size, batch = enc["image_size"], spec["batch"]
    folder = Path(spec["image_dir"])
    paths = sorted(folder.glob("*.jpg"))  # a folder of photos given, else small made-up ones
    if not paths:
        rng = np.random.default_rng(0)
        side = max(64, size * 8 // 7 + 8)
        for i in range(spec["num_images"]):
            low = rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)
            image = Image.fromarray(low).resize((side, side), Image.Resampling.BILINEAR)
            path = folder / f"{i:05d}.jpg"
            image.save(path, quality=90)
            paths.append(path)

    def loader():
        return ImageLoader(paths, TrainTransform(size), batch, seed=0, num_workers=spec["workers"])

    result["loader_images_per_s"] = measure_throughput(loader(), spec["loader_batches"])
    model, loss_fn = _mlx_model({**spec, "impl": "mlx-aim"}, embed=False)
    step = _mlx_train_step({**spec, "impl": "mlx-aim"}, model, loss_fn)
    batches = iter(loader())
    waits, steps = [], []
    for i in range(spec["warmup"] + spec["steps"]):
        start = time.perf_counter()
        images = mx.array(next(batches)["images"])
        fetched = time.perf_counter()
        step(images, None).item()  # mlx-aim's step draws its own prefix lengths
        done = time.perf_counter()
        if i >= spec["warmup"]:
            waits.append(fetched - start)
            steps.append(done - fetched)
    batches.close()
    result["fed_wait_s"] = waits
    result["fed_step_s"] = steps


# ---- torch -------------------------------------------------------------------------------------


def _torch_start() -> dict[str, Any]:
    import torch

    return {
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "blas": "torch's own (" + torch.backends.cpu.get_cpu_capability() + ")",
    }


def _torch_gemm_gflops(seconds: float) -> float:
    import torch

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(GEMM_SIZE, GEMM_SIZE, generator=gen)
    b = torch.randn(GEMM_SIZE, GEMM_SIZE, generator=gen)
    a @ b
    best, spent = 0.0, 0.0
    while spent < seconds:
        start = time.perf_counter()
        a @ b
        dt = time.perf_counter() - start
        spent += dt
        best = max(best, 2 * GEMM_SIZE**3 / dt / 1e9)
    return best


def _torch_encoder(ref, config: dict):
    common = {
        "image_size": config["image_size"],
        "patch_size": config["patch_size"],
        "embed_dim": config["embed_dim"],
        "num_blocks": config["num_blocks"],
        "num_heads": config["num_heads"],
        "num_channels": config.get("num_channels", 3),
    }
    if config["model_type"] == "aim_v2":
        return ref.AIMv2VisionTorch(
            mlp_hidden_dim=config["mlp_hidden_dim"],
            pos_embed_type=config.get("pos_embed_type", "absolute"),
            **common,
        )
    return ref.AIMv1Torch(mlp_ratio=config.get("mlp_ratio", 4.0), **common)


def _torch_model(spec: dict, embed: bool):
    from safetensors.torch import load_file

    from ..reference import torch_aim as ref

    config = spec["config"]
    pretrain = config["model_type"] == "aim_pretrain"
    if pretrain:
        model = ref.AIMForPretrainingTorch(
            _torch_encoder(ref, config["encoder"]),
            config.get("head_blocks", 12),
            config.get("head_width", 2048),
            config.get("head_mlp_ratio", 4.0),
        )
    else:
        model = _torch_encoder(ref, config)
    if spec.get("weights"):
        weights = load_file(spec["weights"])
        for key, value in weights.items():
            if key.endswith("patchifier.proj.weight"):
                weights[key] = value.permute(0, 3, 1, 2).contiguous()
        model.load_state_dict(weights, strict=True)
    if embed and pretrain:
        model = model.encoder
    return ref, model


def _torch_inputs(spec: dict):
    import torch
    from safetensors.torch import load_file

    if spec.get("inputs"):
        data = load_file(spec["inputs"])
        images, prefix = data["images"], data["prefix_lengths"]
    else:
        enc = spec["config"].get("encoder", spec["config"])
        size, b = enc["image_size"], spec["batch"]
        gen = torch.Generator().manual_seed(spec.get("seed", 0))
        images = torch.randn(b, size, size, enc.get("num_channels", 3), generator=gen)
        k = (size // enc["patch_size"]) ** 2
        half = torch.randint(1, k, ((b + 1) // 2,), generator=gen)
        prefix = torch.stack([half, k - half], dim=1).reshape(-1)[:b]  # pairs, as mlx-aim draws
    return images.permute(0, 3, 1, 2).contiguous(), prefix.long()


def _torch_train_step(spec: dict, ref, model):
    import torch

    patch = spec["config"]["encoder"]["patch_size"]
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)

    def loss_of(images, prefix):  # the head only where the loss reads, as in mlx-aim's step
        predictions = model(images, prefix, loss_positions=True)
        return ref.aim_pretraining_loss_torch(predictions, images, prefix, patch)

    if spec["impl"] == "torch-compile":
        loss_of = torch.compile(loss_of)

    def step(images, prefix):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(images, prefix)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return loss.item()

    return step


def torch_train(spec: dict, result: dict) -> None:
    import torch

    ref, model = _torch_model(spec, embed=False)
    images, prefix = _torch_inputs(spec)
    patch = spec["config"]["encoder"]["patch_size"]
    with torch.no_grad():
        loss = ref.aim_pretraining_loss_torch(model(images, prefix), images, prefix, patch)
    result["loss_at_init"] = loss.item()
    window = RssWindow()
    step = _torch_train_step(spec, ref, model)
    result.update(_time_steps(lambda: step(images, prefix), spec["warmup"], spec["steps"]))
    result["rss_peak_delta_bytes"] = window.delta()


def torch_embed(spec: dict, result: dict) -> None:
    import numpy as np
    import torch

    _, model = _torch_model(spec, embed=True)
    model.eval()
    images, _ = _torch_inputs(spec)
    forward = torch.compile(model) if spec["impl"] == "torch-compile" else model
    outputs = []

    def run():
        with torch.inference_mode():
            out = forward(images)
        if not outputs:
            outputs.append(out.numpy().copy())

    window = RssWindow()
    result.update(_time_steps(run, spec["warmup"], spec["steps"]))
    result["rss_peak_delta_bytes"] = window.delta()
    if spec.get("dump"):
        np.save(spec["dump"], outputs[0])


def torch_growth(spec: dict, result: dict) -> None:
    cells = []
    for cell in spec["cells"]:
        sub = {**spec, "config": cell["config"], "weights": None, "inputs": None}
        ref, model = _torch_model(sub, embed=False)
        images, prefix = _torch_inputs(sub)
        step = _torch_train_step(sub, ref, model)
        timing = _time_steps(
            lambda s=step, x=images, p=prefix: s(x, p), spec["warmup"], spec["steps"]
        )
        cells.append({**cell, **timing})
    result["cells"] = cells


# ---- entry point -------------------------------------------------------------------------------

TASKS = {
    "mlx": {"train": mlx_train, "embed": mlx_embed, "growth": mlx_growth, "loader": mlx_loader},
    "torch": {"train": torch_train, "embed": torch_embed, "growth": torch_growth},
}


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    backend = "torch" if spec["impl"].startswith("torch") else "mlx"
    result: dict[str, Any] = {"impl": spec["impl"], "task": spec["task"]}
    if backend == "mlx":
        result.update(_mlx_start(spec["impl"]))
    else:
        result.update(_torch_start())
    if spec["task"] == "peak":
        gemm = _mlx_gemm_gflops if backend == "mlx" else _torch_gemm_gflops
        result["gemm_gflops"] = gemm(spec.get("gemm_seconds", 1.0))
    else:
        TASKS[backend][spec["task"]](spec, result)
    write_text(spec["out"], json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
