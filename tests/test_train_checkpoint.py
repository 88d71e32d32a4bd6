"""Atomic checkpoints with integrity data, the output lock and the output preflight."""

import errno
import json
import os
import shutil
from collections import namedtuple

import mlx.core as mx
import pytest

from mlx_aim.train import checkpoint as ckpt
from mlx_aim.train.errors import BadInputError, OutputError


def arrays(value: float) -> dict:
    return {
        "model.safetensors": {"w": mx.full((4, 4), value), "b": mx.zeros((4,))},
        "optimizer.safetensors": {"states.0.step": mx.array(3, dtype=mx.uint64)},
    }


def save(output, step, keep=3):
    return ckpt.save_checkpoint(output, step, arrays(step), {"note": "x"}, keep)


def test_a_checkpoint_reads_back_with_its_state_and_integrity_data(tmp_path):
    path = save(tmp_path, 5)
    assert path == tmp_path / "checkpoints" / "step-00000005"
    integrity = json.loads((path / "checkpoint.json").read_text())
    assert set(integrity["files"]) == {"model.safetensors", "optimizer.safetensors", "state.json"}
    for name, info in integrity["files"].items():
        assert info["size"] == (path / name).stat().st_size and len(info["sha256"]) == 64
    loaded = ckpt.load_latest_checkpoint(tmp_path, log=print)
    assert loaded.step == 5 and loaded.state == {"note": "x", "step": 5}
    assert mx.array_equal(loaded.arrays["model.safetensors"]["w"], mx.full((4, 4), 5.0)).item()
    assert loaded.arrays["optimizer.safetensors"]["states.0.step"].dtype == mx.uint64


def test_only_the_last_k_checkpoints_are_kept_and_write_leftovers_go(tmp_path):
    (tmp_path / "checkpoints" / ".step-00000009.abc.tmp").mkdir(parents=True)  # a killed write
    for step in (1, 2, 3, 4):
        save(tmp_path, step, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 3]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-00000003", "step-00000004"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_integrity", "delete_file"])
def test_a_damaged_latest_checkpoint_is_named_and_the_previous_one_used(tmp_path, damage):
    save(tmp_path, 1)
    latest = save(tmp_path, 2)
    target = latest / "model.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-10])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "delete_integrity":
        (latest / "checkpoint.json").unlink()
    else:
        target.unlink()
    messages = []
    loaded = ckpt.load_latest_checkpoint(tmp_path, log=messages.append)
    assert loaded.step == 1
    (message,) = messages
    assert str(latest) in message and "damaged" in message


def test_when_every_checkpoint_is_damaged_the_error_says_what_to_do(tmp_path):
    for step in (1, 2):
        (save(tmp_path, step) / "state.json").write_text("{}")
    with pytest.raises(BadInputError, match="no usable checkpoint .* delete that folder"):
        ckpt.load_latest_checkpoint(tmp_path, log=lambda m: None)


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    save(tmp_path, 1)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mx, "save_safetensors", disk_full)
    with pytest.raises(OutputError, match="step 2 .* no space left on device; the earlier"):
        save(tmp_path, 2)
    assert os.listdir(tmp_path / "checkpoints") == ["step-00000001"]
    assert ckpt.load_latest_checkpoint(tmp_path, log=print).step == 1


def test_a_second_run_is_refused_while_the_first_holds_the_lock(tmp_path):
    with ckpt.OutputLock(tmp_path):
        owner = json.loads((tmp_path / "train.lock").read_text())
        assert owner["pid"] == os.getpid()
        with pytest.raises(
            OutputError, match=f"in use by another training run \\(pid {os.getpid()}"
        ):
            ckpt.OutputLock(tmp_path).acquire()
    lock = ckpt.OutputLock(tmp_path).acquire()  # free again once released
    assert lock.recovered == ""  # a clean release leaves no stale owner
    lock.release()


def test_a_stale_lock_of_a_dead_process_is_recovered(tmp_path):
    (tmp_path / "train.lock").write_text(json.dumps({"pid": 999999999, "host": "gone"}))
    lock = ckpt.OutputLock(tmp_path).acquire()
    assert lock.recovered == "pid 999999999 on gone"
    lock.release()


def test_preflight_rejects_an_output_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match="cannot create the output directory"):
        ckpt.preflight(blocker / "run", 1)


def test_preflight_rejects_an_unwritable_output(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(ckpt, "open", read_only, raising=False)
    with pytest.raises(OutputError, match="not writable: permission denied"):
        ckpt.preflight(tmp_path, 1)
    assert os.listdir(tmp_path) == []


def test_preflight_rejects_a_full_disk(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2**20, 2**20))
    with pytest.raises(OutputError, match=r"has 1\.0 MiB free; this run needs about 16\.0 MiB"):
        ckpt.preflight(tmp_path, 2**24)
    ckpt.preflight(tmp_path, 2**19)  # enough room: no error


def test_preflight_refuses_a_folder_holding_other_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    ckpt.preflight(tmp_path, 1, frozenset({"config.json"}))  # a run's own files are fine
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"already holds other files \(notes.txt\)"):
        ckpt.preflight(tmp_path, 1, frozenset({"config.json"}))


def test_preflight_accepts_temporary_files_left_by_a_killed_run(tmp_path):
    from mlx_aim.train.checkpoint import preflight

    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / ".loss.png.tmp").write_bytes(b"cut off")
    (tmp_path / ".config.json.k3j2.tmp").write_text("{")
    preflight(tmp_path, 0, frozenset({"metrics.jsonl", "loss.png", "config.json"}))
    (tmp_path / ".notes.txt.tmp").write_text("someone else's")
    with pytest.raises(Exception, match="already holds other files"):
        preflight(tmp_path, 0, frozenset({"metrics.jsonl", "loss.png", "config.json"}))
