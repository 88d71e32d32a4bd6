"""The README for users: its quick commands run as written from any folder, and it stays short and
free of wording about how it was developed."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = "<!-- readme-test: quick commands -->"
# Added to the commands so that the test takes seconds, not minutes; everything else runs as
# written (the same data, models, output folders and order).
SHORTER = {
    "train": ["--steps", "2", "--val-images", "16", "--preview-every", "0"],
    "probe": ["--epochs", "1"],
}
SESSION_WORDS = ("this stop", "previous stop", "earlier stop", "this machine", "this session")


def quick_commands() -> list[list[str]]:
    """The commands of the fenced block that follows the README's marker, comments removed."""
    text = README.read_text(encoding="utf-8")
    assert text.count(MARKER) == 1
    block = text.split(MARKER, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def test_the_readme_marks_quick_commands_that_start_with_a_first_training_run():
    commands = quick_commands()
    assert len(commands) >= 5
    assert all(command[0] == "mlx-aim" for command in commands)
    assert commands[0][:2] == ["mlx-aim", "train"]


@pytest.mark.slow
def test_the_readme_quick_commands_run_as_written_from_any_folder(tmp_path):
    for command in quick_commands():
        args = command[1:] + SHORTER.get(command[1], [])
        result = subprocess.run(
            [sys.executable, "-m", "mlx_aim_cli.main", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, (command, result.stderr[-3000:])
        assert "Traceback" not in result.stderr, command


def test_the_readme_is_at_most_400_lines_and_the_docs_never_speak_of_development_sessions():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 400
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text(encoding="utf-8").lower()
        for words in SESSION_WORDS:
            assert words not in text, (page.name, words)


def test_every_docs_page_the_readme_links_exists():
    text = README.read_text(encoding="utf-8")
    links = {part.split(")", 1)[0].split("#", 1)[0] for part in text.split("](")[1:]}
    local = {link for link in links if link and not link.startswith("http")}
    missing = {link for link in local if not (ROOT / link).exists()}
    assert not missing
