"""The scripts in scripts/ behave like the commands: a bad argument is one ``error:`` line with the
documented exit code (never a traceback), ``--help`` is complete, Ctrl-C exits with 130."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def script(name: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPTS / name), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


@pytest.mark.parametrize(
    "name, args, code, message",
    [
        ("study.py", ["--cells", "foo"], 1, "unknown cell 'foo'"),
        ("study.py", ["--steps", "0"], 2, "--steps: must be >= 1"),
        ("aimv2_evidence.py", ["--steps", "-1"], 2, "--steps: must be >= 1, got -1"),
        ("benchmark_objectives.py", ["--model", "aim-nano"], 2, "invalid choice: 'aim-nano'"),
        ("bench_native_ops.py", ["--config", "nope"], 1, "unknown model 'nope'"),
        ("benchmark.py", ["--config", "nope"], 1, "unknown model 'nope'"),
        ("convert.py", ["no-such-checkpoint", "out"], 1, "no-such-checkpoint"),
    ],
)
def test_a_bad_argument_is_one_error_line_with_the_documented_exit_code(
    name, args, code, message, tmp_path
):
    result = script(name, *args, cwd=tmp_path)
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize(
    "name, expected",
    [
        ("study.py", ["default: 150", "random-order", "resumes an interrupted one", "Exit codes"]),
        ("aimv2_evidence.py", ["default: 300", "score_captions", "Exit codes"]),
        ("benchmark_objectives.py", ["{aimv2-nano,aimv2-tiny}", "default: 32", "Exit codes"]),
        ("bench_native_ops.py", ["default: aim-tiny", "interleaved in this process", "Exit codes"]),
    ],
)
def test_help_gives_the_whole_description_every_default_and_the_exit_codes(name, expected):
    result = script(name, "--help")
    assert result.returncode == 0 and result.stderr == ""
    text = " ".join(result.stdout.split())
    for words in expected:
        assert words in text, words


@pytest.mark.parametrize("name", ["benchmark.py", "convert.py"])
def test_the_command_wrappers_name_only_themselves_in_their_usage_line(name):
    result = script(name, "--help")
    assert result.returncode == 0
    usage = next(line for line in result.stdout.splitlines() if "Usage:" in line)
    assert usage.split()[1:3] == [name, "[OPTIONS]"]


def test_ctrl_c_stops_a_script_with_exit_code_130():
    process = subprocess.Popen(
        [sys.executable, str(SCRIPTS / "benchmark_objectives.py"), "--steps", "100000"]
        + ["--batch-size", "2", "--warmup", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout.readline()  # the machine line: the script is at work
    time.sleep(1)
    os.kill(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["error: interrupted"]
