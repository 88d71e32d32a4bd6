"""The behaviour every ``mlx-aim`` command shares: wiring, help, exit codes, outputs, messages."""

import ast
import errno
import io
import os
import re
from pathlib import Path

import mlx.core as mx
import pytest
import typer
from mlx_aim_cli import errors as cli_errors
from mlx_aim_cli import progress
from mlx_aim_cli.main import COMMANDS, app, reflowed
from mlx_aim_cli.models import HEADER
from rich.console import Console
from typer.testing import CliRunner

import mlx_aim.checkpoints.hub as hub
from mlx_aim.checkpoints.registry import REGISTRY
from mlx_aim.checkpoints.weights import save_model
from mlx_aim.errors import ExitCode
from mlx_aim.messages import plural
from mlx_aim.models import build_model

CLI = Path(__file__).resolve().parents[1] / "cli"


def invoke(*args, **kwargs):
    return CliRunner().invoke(app, [str(a) for a in args], **kwargs)


def command_names() -> list[str]:
    return [c.name for c in typer.main.get_command(app).commands.values()]


# --- wiring and help ----------------------------------------------------------------------------


COMMAND_NAMES = [
    "models",
    "datasets",
    "convert",
    "train",
    "probe",
    "embed",
    "zero-shot",
    "caption",
    "index",
    "search",
    "bench",
    "build-kernels",
]


def test_every_command_module_registers_itself_without_importing_main():
    for module in COMMANDS:
        name = module.__name__.rpartition(".")[2]
        source = (CLI / f"{name}.py").read_text()
        imported = {
            node.module
            for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.ImportFrom) and node.module
        }
        assert not imported & {"main", "mlx_aim_cli.main"}, name
        fresh = typer.Typer()
        module.register(fresh)
        assert len(fresh.registered_commands) == 1, name
    assert command_names() == COMMAND_NAMES


PARTIAL_COMMANDS = {
    "probe",
    "embed",
    "zero-shot",
    "caption",
    "index",
}  # they skip unreadable images


@pytest.mark.parametrize("command", COMMAND_NAMES)
def test_every_help_ends_with_the_exit_codes_that_command_can_return(command):
    result = invoke(command, "--help", env={"COLUMNS": "250"})
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    codes = set(re.findall(r"\b(\d+)\b", text[text.index("Exit codes: 0 done") :]))
    assert {"0", "2"} <= codes <= {str(int(c)) for c in ExitCode}
    assert ("4" in codes) == (command in PARTIAL_COMMANDS)
    assert ("5" in codes) == ("143" in codes) == (command == "train")


def test_the_main_help_shows_the_whole_exit_code_table():
    result = invoke("--help", env={"COLUMNS": "120"})
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    for code in ("0", "1", "2", "3", "4", "5", "129/130/143"):
        assert any(line.split()[:1] == [code] for line in lines if line.strip()), code


def test_the_readme_documents_the_same_exit_codes():
    readme = (CLI.parent / "README.md").read_text()
    section = readme.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    for code in ("0", "1", "2", "3", "4", "5", "129", "130", "143"):
        assert f"| {code} " in section or f"{code} /" in section or f"/ {code}" in section, code


def test_progress_shows_on_a_terminal_only(monkeypatch):
    terminal = Console(file=io.StringIO(), force_terminal=True, width=80)
    monkeypatch.setattr(progress, "err_console", terminal)
    with progress.working("converting x"):
        pass
    with progress.progress_bars() as bar:
        advance = bar("embedding", 2)
        advance(2)
    shown = terminal.file.getvalue()
    assert "converting x" in shown and "embedding" in shown

    pipe = Console(file=io.StringIO())
    monkeypatch.setattr(progress, "err_console", pipe)
    with progress.working("converting x"):
        pass
    assert pipe.file.getvalue() == ""


def test_plural_counts_nouns():
    assert plural(1, "unreadable file") == "1 unreadable file"
    assert plural(0, "file") == "0 files"
    assert plural(3, "embedding") == "3 embeddings"
    assert plural(2, "child", "children") == "2 children"


# --- models -------------------------------------------------------------------------------------


def test_models_fits_80_columns_when_piped_and_names_stay_whole():
    result = invoke("models", env={"COLUMNS": "80"})
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == list(HEADER)
    assert max(len(line) for line in lines) <= 80
    assert [line.split()[0] for line in lines[1 : len(REGISTRY) + 1]] == list(REGISTRY)
    released = [n for n, e in REGISTRY.items() if e.checkpoint]
    assert [line.split()[-1] == "hub" for line in lines[1 : len(REGISTRY) + 1]] == [
        n in released for n in REGISTRY
    ]
    assert "apple/AIM" in lines[-1]


# --- the slow-BLAS warning ----------------------------------------------------------------------


@pytest.mark.parametrize("blas", [None, "OpenBLAS"])
def test_slow_blas_is_named_once_with_the_fix(monkeypatch, capsys, blas):
    monkeypatch.setattr("mlx_aim.cpu.blas.blas_info", lambda: blas)
    monkeypatch.setattr(cli_errors.sys, "platform", "linux")
    monkeypatch.setattr(cli_errors, "err_console", cli_errors.Console(stderr=True, width=300))
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.cpu))
    cli_errors.prepare_cpu_backend.cache_clear()
    cli_errors.prepare_cpu_backend()
    cli_errors.prepare_cpu_backend()
    cli_errors.prepare_cpu_backend.cache_clear()
    lines = capsys.readouterr().err.splitlines()
    if blas is None:
        assert len(lines) == 1 and lines[0].startswith("warning: ")
        assert "sudo apt-get install libopenblas0-pthread" in lines[0]
        assert "pip install 'mlx-aim[fast-cpu]'" in lines[0]
    else:
        assert lines == []


# --- convert ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    nano = build_model(REGISTRY["aim-nano"].config)  # convert recognizes registry shapes
    return save_model(nano, tmp_path_factory.mktemp("source") / "nano")


def test_convert_checks_the_destination_before_reading_the_source(tmp_path, monkeypatch):
    # chmod does not stop root (the suite may run as root): deny through os.access instead
    monkeypatch.setattr("mlx_aim.io.os.access", lambda path, mode: False)
    result = invoke("convert", tmp_path / "missing.pth", tmp_path / "out")
    assert result.exit_code == 3
    assert (
        result.stderr == f"error: cannot write {tmp_path / 'out'}: permission denied ({tmp_path})\n"
    )


def test_convert_onto_a_full_disk_is_one_line_and_leaves_nothing(model_dir, tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("mlx_aim.io.os.replace", full_disk)
    result = invoke("convert", model_dir, tmp_path / "out", "-q")
    assert result.exit_code == 3
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    assert result.output.endswith("no space left on the device\n")
    assert os.listdir(tmp_path) == []


def test_convert_quiet_prints_only_what_it_wrote(model_dir, tmp_path):
    result = invoke("convert", model_dir, tmp_path / "out", "--quiet")
    assert result.exit_code == 0 and result.output == f"wrote {tmp_path / 'out'}\n"
    assert invoke("convert", model_dir, tmp_path / "out").exit_code == 3


# --- bench --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "0"], "--steps >= 1"),
        (["--timeout", "0"], "--timeout must be > 0 seconds, not 0.0"),
        (["--growth-depth", "0"], "--growth-depth must be >= 1, not 0"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--impls", "numpy"], "unknown implementation"),
    ],
)
def test_bench_bad_numbers_are_one_line(args, message):
    result = invoke("bench", "--config", "aim-nano", *args)
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and message in result.output


def test_bench_refuses_an_existing_output_before_measuring(tmp_path, monkeypatch):
    (tmp_path / "b.json").write_text("{}")
    monkeypatch.setattr(
        "mlx_aim.benchmark.suite.run_benchmark", lambda options: pytest.fail("measured")
    )
    result = invoke("bench", "--config", "aim-nano", "--json", tmp_path / "b.json")
    assert result.exit_code == 3
    assert "already exists (use --force to replace it)" in result.stderr


# --- the Hugging Face Hub without a network -----------------------------------------------------


@pytest.fixture
def no_cache(monkeypatch):
    monkeypatch.setattr(hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(hub, "hf_hub_download", lambda *a, **k: pytest.fail("would retry"))
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)


def test_an_unreachable_hub_fails_at_once_naming_the_offline_switch(no_cache, monkeypatch):
    def unreachable(url, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(hub, "get_hf_file_metadata", unreachable)
    with pytest.raises(hub.HubError) as error:
        hub.fetch("apple/AIM", "w.pth", "abc")
    message = str(error.value)
    assert (
        "(ConnectionError)" in message and "`hf download apple/AIM w.pth --revision abc`" in message
    )
    assert "HF_HUB_OFFLINE=1" in message


def test_offline_mode_never_asks_the_network(no_cache, monkeypatch):
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "get_hf_file_metadata", lambda *a, **k: pytest.fail("asked"))
    with pytest.raises(hub.HubError, match="HF_HUB_OFFLINE is set"):
        hub.fetch("apple/AIM", "w.pth")


def test_a_cached_file_is_read_without_a_reachability_check(tmp_path, monkeypatch):
    cached = str(tmp_path / "w.pth")
    monkeypatch.setattr(hub, "try_to_load_from_cache", lambda *a, **k: cached)
    monkeypatch.setattr(hub, "get_hf_file_metadata", lambda *a, **k: pytest.fail("asked"))
    monkeypatch.setattr(hub, "hf_hub_download", lambda *a, **k: cached)
    assert hub.fetch("apple/AIM", "w.pth") == Path(cached)


def test_convert_of_a_broken_model_folder_is_one_line(model_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    result = invoke("convert", broken, tmp_path / "out")
    assert result.exit_code == 1
    assert result.output.startswith(f"error: {broken}") and result.output.count("\n") == 1


def test_datasets_prints_each_builtin_folder_and_one_folder_by_name():
    from mlx_aim.data.builtin import DATASETS, builtin_dataset

    result = invoke("datasets")
    assert result.exit_code == 0
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert [(r[0], r[1]) for r in rows] == [(n, str(builtin_dataset(n))) for n in DATASETS]
    result = invoke("datasets", "digits")
    assert result.exit_code == 0 and result.stdout == f"{builtin_dataset('digits')}\n"
    result = invoke("datasets", "nope")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: 'nope' is not a built-in dataset (digits, scenes)"
    ]


def test_help_prose_paragraphs_are_one_line_so_the_terminal_wraps_them_but_examples_keep_lines():
    doc = "Summary.\n\nA sentence cut\nin two.\n\nExamples:\n\n  mlx-aim a\n  mlx-aim b"
    assert (
        reflowed(doc)
        == "Summary.\n\nA sentence cut in two.\n\nExamples:\n\n  mlx-aim a\n  mlx-aim b"
    )
    for info in app.registered_commands:
        for paragraph in info.help.split("\n\n"):
            lines = paragraph.splitlines()
            assert len(lines) == 1 or any(line[:1].isspace() for line in lines), (info.name, lines)
    result = CliRunner().invoke(app, ["index", "--help"])
    assert result.exit_code == 0 and "Unreadable files" in result.output
