"""``mlx-aim build-kernels``: compile the native CPU kernels (mlx_aim/cpu/native.py) now."""

from __future__ import annotations

import typer

from mlx_aim.errors import ExitCode, InputError, exit_codes_help

from .errors import reported_errors


def register(app: typer.Typer) -> None:
    """Add the ``build-kernels`` command to ``app``."""
    app.command(
        "build-kernels",
        epilog=exit_codes_help(
            ExitCode.OK, ExitCode.BAD_INPUT, ExitCode.USAGE, ExitCode.INTERRUPTED
        ),
    )(build_kernels_command)


def build_kernels_command(
    force: bool = typer.Option(False, "--force", help="Rebuild even if a build is cached."),
) -> None:
    """Compile mlx-aim's native CPU kernels into the user cache (Linux, MLX's CPU backend).

    They build on first use anyway; this builds them ahead of time, or retries a failed build.
    Needs cmake, nanobind and a C++ compiler: [bold]pip install 'mlx-aim\\[native]'[/bold].

    Example: [bold]mlx-aim build-kernels[/bold]
    """
    from mlx_aim.cpu import native

    with reported_errors():
        reason = native.unavailable_reason()
        if reason is not None:
            raise InputError(f"native CPU kernels do not apply here ({reason})")
        try:
            path = native.build_kernels(force=force)
        except native.NativeBuildError as error:
            raise InputError(f"native CPU kernels: {error}") from None
    typer.echo(f"native CPU kernels: {path}")
