"""The output directory: the lock held for the life of a run and the checks before training."""

import errno
import json
import os
import shutil
from collections import namedtuple

import pytest

from mlx_aim.errors import OutputError
from mlx_aim.train import output
from mlx_aim.train.output import OutputLock, preflight

usage = namedtuple("usage", "total used free")


def test_a_second_run_is_refused_while_the_first_holds_the_lock(tmp_path):
    with OutputLock(tmp_path):
        owner = json.loads((tmp_path / "train.lock").read_text())
        assert owner["pid"] == os.getpid()
        with pytest.raises(
            OutputError, match=f"in use by another training run \\(pid {os.getpid()}"
        ):
            OutputLock(tmp_path).acquire()
    lock = OutputLock(tmp_path).acquire()  # free again once released
    assert lock.recovered == ""  # a clean release leaves no stale holder
    lock.release()


def test_deleting_the_lock_file_does_not_let_a_second_run_in(tmp_path):
    with OutputLock(tmp_path):
        (tmp_path / "train.lock").unlink()
        with pytest.raises(OutputError, match="in use by another training run .*was removed"):
            OutputLock(tmp_path).acquire()


def test_a_stale_lock_of_a_dead_process_is_recovered(tmp_path):
    (tmp_path / "train.lock").write_text(json.dumps({"pid": 999999999, "host": "gone"}))
    lock = OutputLock(tmp_path).acquire()
    assert lock.recovered == "pid 999999999 on gone"
    lock.release()


def test_preflight_rejects_an_output_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match="cannot create the output directory"):
        preflight(blocker / "run", 1)


def test_preflight_rejects_an_unwritable_output_and_leaves_no_folder(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(output, "open", read_only, raising=False)
    with pytest.raises(OutputError, match="not writable: read-only file system"):
        preflight(tmp_path / "run", 1)
    assert os.listdir(tmp_path) == []


def test_preflight_rejects_a_full_disk_before_creating_anything(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2**20, 2**20))
    with pytest.raises(OutputError, match=r"has 1\.0 MiB free; this run needs about 16\.0 MiB"):
        preflight(tmp_path / "run", 2**24)
    assert os.listdir(tmp_path) == []
    preflight(tmp_path / "run", 2**19)  # enough room: no error


def test_preflight_credits_the_space_the_run_already_holds(tmp_path, monkeypatch):
    """A resumed run replaces its own checkpoints and trunk: that space counts as free."""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2**20, 2**20))
    preflight(tmp_path, 2**24, reusable=2**24)
    with pytest.raises(OutputError, match=r"1\.0 MiB free \(\+ 8\.0 MiB its run will replace\)"):
        preflight(tmp_path, 2**24, reusable=2**23)


def test_preflight_refuses_a_folder_holding_other_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    preflight(tmp_path, 1, frozenset({"config.json"}))  # a run's own files are fine
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"already holds other files \(notes.txt\)"):
        preflight(tmp_path, 1, frozenset({"config.json"}))


def test_preflight_accepts_temporary_files_left_by_a_killed_run(tmp_path):
    own = frozenset({"metrics.jsonl", "loss.png", "config.json", "model.safetensors"})
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / ".loss.png.tmp").write_bytes(b"cut off")
    (tmp_path / ".config.json.k3j2.tmp").write_text("{")
    (tmp_path / "..model.safetensors.export.tmp.x1.tmp").mkdir()
    preflight(tmp_path, 0, own)
    (tmp_path / ".notes.txt.tmp").write_text("someone else's")
    with pytest.raises(OutputError, match="already holds other files"):
        preflight(tmp_path, 0, own)
