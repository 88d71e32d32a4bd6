"""Messages that name files: control characters in a name are shown escaped, never sent raw."""

from mlx_aim_cli.main import app
from test_zero_shot import lit_config
from typer.testing import CliRunner

from mlx_aim.checkpoints.weights import save_model
from mlx_aim.data.images import ImageError
from mlx_aim.errors import InputError
from mlx_aim.messages import printable
from mlx_aim.models import build_model

HOSTILE_NAME = "evil\x1b[2J\x1b]0;pwned\x07\u202egnp.png"


def test_printable_escapes_terminal_controls_and_reordering_marks():
    assert printable(HOSTILE_NAME) == "evil\\x1b[2J\\x1b]0;pwned\\x07\\u202egnp.png"
    assert printable("plain name, déjà vu.png") == "plain name, déjà vu.png"


def test_library_errors_escape_the_names_they_carry():
    for error in (InputError(f"{HOSTILE_NAME}: bad"), ImageError(HOSTILE_NAME, "not an image")):
        assert "\x1b" not in str(error) and "\\x1b[2J" in str(error)
        assert "\u202e" not in str(error) and "\x07" not in str(error)


def test_the_cli_never_prints_a_raw_escape_sequence(tmp_path):
    bad = tmp_path / HOSTILE_NAME
    bad.write_bytes(b"not an image")
    model = save_model(build_model(lit_config(10)["vision"]), tmp_path / "model")
    missing = tmp_path / HOSTILE_NAME.replace("evil", "gone")
    for args in (["embed", bad, missing, "-m", model], ["embed", bad, "-m", missing]):
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 1, result.output
        assert "\x1b" not in result.output and "\x07" not in result.output
        assert "\\x1b[2J" in result.stderr


def test_an_unknown_mlx_aim_native_value_is_warned_about_once(monkeypatch, caplog):
    from mlx_aim.cpu import toolchain

    toolchain._warn_unknown.cache_clear()
    monkeypatch.setenv("MLX_AIM_NATIVE", "garbage")
    with caplog.at_level("WARNING", logger="mlx_aim"):
        assert not toolchain.switched_off() and not toolchain.switched_off()
    assert caplog.text.count("MLX_AIM_NATIVE='garbage' is not a known value") == 1
    caplog.clear()
    for value, off in (("0", True), (" Off ", True), ("no", True), ("1", False), ("yes", False)):
        monkeypatch.setenv("MLX_AIM_NATIVE", value)
        assert toolchain.switched_off() is off
    assert not caplog.text
