"""A reader that stops early (``mlx-aim embed photos/ --json | head -1``) is not an error: the
command stops quietly with exit code 0, every time, through a real operating-system pipe."""

import subprocess
import sys

import pytest
from image_corpus import noise
from test_embed import tiny

from mlx_aim.checkpoints.weights import save_model

COMMAND = [sys.executable, "-m", "mlx_aim_cli.main"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Enough images that the output outlasts one pipe buffer long after the reader is gone."""
    root = tmp_path_factory.mktemp("photos")
    for i in range(40):
        noise(28, 28, seed=i).save(root / f"img{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model = tiny()
    return save_model(model, tmp_path_factory.mktemp("m") / "m", preprocessing=model.preprocessing)


def first_line_then_close(args: list[str]) -> tuple[str, int, str]:
    """Run ``mlx-aim ARGS``, read one line of its stdout, close the pipe as ``head -1`` does, and
    return the line, the exit code and stderr."""
    with subprocess.Popen(
        [*COMMAND, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        line = process.stdout.readline()
        process.stdout.close()
        _, stderr = process.communicate(timeout=120)
    return line, process.returncode, stderr


def test_embed_json_into_a_pipe_closed_after_one_line_exits_0_five_times_out_of_five(
    photos, model_dir
):
    for _ in range(5):
        line, code, stderr = first_line_then_close(
            ["embed", str(photos), "--model", str(model_dir), "--json", "-b", "1"]
        )
        assert line.startswith('{"path": ')
        assert code == 0, stderr
        assert "Traceback" not in stderr and "error" not in stderr.lower()


def test_models_listing_into_a_closed_pipe_exits_0():
    line, code, stderr = first_line_then_close(["models"])
    assert line.split()[0] == "name"
    assert code == 0 and stderr == ""
