"""Atomic checkpoints with integrity data, verified loading and pruning by what verifies."""

import errno
import json
import os
import shutil
from collections import namedtuple

import mlx.core as mx
import pytest

from mlx_aim.errors import InputError, OutputError
from mlx_aim.train import checkpoint as ckpt

STATE = {
    "config": {},
    "model_config": {},
    "world_size": 1,
    "random_state": [0, 7],
    "loaders": [[0, 12]],
}


def arrays(value: float) -> dict:
    return {
        "model.safetensors": {"w": mx.full((4, 4), value), "b": mx.zeros((4,))},
        "optimizer.safetensors": {"states.0.step": mx.array(3, dtype=mx.uint64)},
    }


def save(output, step, keep=3, state=STATE, log=print):
    store = ckpt.CheckpointStore(output, keep, log)
    return store.save(step, arrays(step), {"state.json": state, "data.json": {"files": []}})


def steps(output) -> list[int]:
    return [s for s, _ in ckpt.list_checkpoints(output)]


def damage(path):
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))


def test_a_checkpoint_reads_back_with_its_documents_and_integrity_data(tmp_path):
    path = save(tmp_path, 5)
    assert path == tmp_path / "checkpoints" / "step-00000005"
    integrity = json.loads((path / "checkpoint.json").read_text())
    assert set(integrity["files"]) == {
        "model.safetensors",
        "optimizer.safetensors",
        "state.json",
        "data.json",
    }
    for name, info in integrity["files"].items():
        assert info["size"] == (path / name).stat().st_size and len(info["sha256"]) == 64
    loaded = ckpt.CheckpointStore(tmp_path, 3, print).load_latest()
    assert loaded.step == 5 and loaded.state == {**STATE, "step": 5}
    assert loaded.documents["data.json"] == {"files": []}
    assert mx.array_equal(loaded.arrays["model.safetensors"]["w"], mx.full((4, 4), 5.0)).item()
    assert loaded.arrays["optimizer.safetensors"]["states.0.step"].dtype == mx.uint64


def test_only_the_last_k_checkpoints_are_kept_and_write_leftovers_go(tmp_path):
    root = tmp_path / "checkpoints"
    (root / ".step-00000009.abc.tmp").mkdir(parents=True)  # a killed write
    (root / ".step-00000001.old").mkdir()  # a killed directory swap
    for step in (1, 2, 3, 4):
        save(tmp_path, step, keep=2)
    assert steps(tmp_path) == [4, 3]
    assert sorted(os.listdir(root)) == ["step-00000003", "step-00000004"]


@pytest.mark.parametrize("kind", ["truncate", "flip", "delete_integrity", "delete_file"])
def test_a_damaged_latest_checkpoint_is_named_and_the_previous_one_used(tmp_path, kind):
    save(tmp_path, 1)
    latest = save(tmp_path, 2)
    target = latest / "model.safetensors"
    if kind == "truncate":
        target.write_bytes(target.read_bytes()[:-10])
    elif kind == "flip":
        damage(latest)
    elif kind == "delete_integrity":
        (latest / "checkpoint.json").unlink()
    else:
        target.unlink()
    messages = []
    loaded = ckpt.CheckpointStore(tmp_path, 3, messages.append).load_latest()
    assert loaded.step == 1
    (message,) = messages
    assert str(latest) in message and "damaged" in message and "\n" not in message


@pytest.mark.parametrize(
    "edit, reason",
    [
        (lambda c: {**c, "files": list(c["files"])}, "'files' must be an object"),
        (lambda c: {**c, "files": {**c["files"], "../x": c["files"]["state.json"]}}, "'../x'"),
        (lambda c: {**c, "files": {"state.json": {"size": "1"}}}, "needs a size and a sha256"),
        (lambda c: [c], "must hold a JSON object"),
    ],
)
def test_a_hand_edited_manifest_makes_the_checkpoint_damaged(tmp_path, edit, reason):
    save(tmp_path, 1)
    latest = save(tmp_path, 2)
    manifest = latest / "checkpoint.json"
    manifest.write_text(json.dumps(edit(json.loads(manifest.read_text()))))
    messages = []
    assert ckpt.CheckpointStore(tmp_path, 3, messages.append).load_latest().step == 1
    (message,) = messages
    assert reason in message and "\n" not in message


@pytest.mark.parametrize(
    "state, reason",
    [
        ({k: v for k, v in STATE.items() if k != "loaders"}, "state.json has no 'loaders'"),
        ({**STATE, "loaders": [[0]]}, "an [epoch, cursor] per process"),
        ({**STATE, "random_state": [-1, 2]}, "two unsigned integers"),
        ({**STATE, "world_size": "1"}, "'world_size' must be a JSON int"),
    ],
)
def test_a_state_without_what_a_resume_needs_makes_the_checkpoint_damaged(tmp_path, state, reason):
    save(tmp_path, 1)
    save(tmp_path, 2, state=state)  # a consistent checkpoint.json around a bad state.json
    messages = []
    assert ckpt.CheckpointStore(tmp_path, 3, messages.append).load_latest().step == 1
    assert reason in messages[0]


def test_when_every_checkpoint_is_damaged_the_error_says_what_to_do(tmp_path):
    for step in (1, 2):
        damage(save(tmp_path, step))
    with pytest.raises(InputError, match="no usable checkpoint .* delete that folder"):
        ckpt.CheckpointStore(tmp_path, 3, lambda m: None).load_latest()


def test_pruning_never_deletes_the_newest_intact_checkpoint(tmp_path):
    """A damaged newest checkpoint and --keep-checkpoints 1: the resumed run keeps going."""
    for step in (35, 36, 37, 40):
        save(tmp_path, step, keep=4)
    damage(tmp_path / "checkpoints" / "step-00000040")
    messages = []
    store = ckpt.CheckpointStore(tmp_path, 1, messages.append)
    assert store.load_latest().step == 37
    store.prune()  # as a resumed run does: the damaged one goes, the intact one stays
    assert steps(tmp_path) == [37]
    assert any("removing the damaged checkpoint" in m and "step-00000040" in m for m in messages)
    store.save(38, arrays(38), {"state.json": STATE})
    assert steps(tmp_path) == [38]
    assert ckpt.CheckpointStore(tmp_path, 1, print).load_latest().step == 38


def test_pruning_counts_only_checkpoints_that_verify(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path, step, keep=3)
    damage(tmp_path / "checkpoints" / "step-00000002")
    save(tmp_path, 4, keep=2)  # keeps 4 and 3: the two newest intact ones
    assert steps(tmp_path) == [4, 3]
    damage(tmp_path / "checkpoints" / "step-00000004")
    store = ckpt.CheckpointStore(tmp_path, 2, print)
    assert store.newest_intact() == tmp_path / "checkpoints" / "step-00000003"


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    save(tmp_path, 1)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mx, "save_safetensors", disk_full)
    with pytest.raises(
        OutputError, match="step-00000002: no space left on the device; the earlier"
    ):
        save(tmp_path, 2)
    assert os.listdir(tmp_path / "checkpoints") == ["step-00000001"]
    assert ckpt.CheckpointStore(tmp_path, 3, print).load_latest().step == 1


def test_a_full_disk_reported_by_mlx_as_a_runtime_error_is_an_output_error(tmp_path, monkeypatch):
    """``mx.save_safetensors`` raises RuntimeError, not OSError, when the disk fills up."""
    save(tmp_path, 1)

    def disk_full(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise RuntimeError(f"[save_safetensors] Failed to write to {path}")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(mx, "save_safetensors", disk_full)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30, 0))
    with pytest.raises(OutputError) as e:
        save(tmp_path, 2)
    assert e.value.exit_code == 3 and "\n" not in str(e.value)
    assert "no space left on the device; the earlier checkpoints are intact" in str(e.value)
    assert os.listdir(tmp_path / "checkpoints") == ["step-00000001"]
