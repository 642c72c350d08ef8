"""The ``acecal`` command line (typer).

Each command group lives in its own module and registers itself on :data:`app`; heavy imports (torch, monai, the
server) happen inside the commands, so ``acecal models --server ...`` works from the light client install.
"""

from __future__ import annotations

import importlib
from typing import NoReturn

import typer

from acecal import __version__

app = typer.Typer(
    name="acecal",
    help="Calibrated segmentation: train, evaluate, serve and query mL1-ACE SegResNet models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

#: exit status of a command refused for bad input (typer's own usage errors exit with 2 too)
EXIT_BAD_INPUT = 2
#: exit status after Ctrl-C or a cancel (128 + SIGINT)
EXIT_INTERRUPTED = 130


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """Print ``error: message`` in red on stderr and exit with ``code``."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


# Modules that add commands to `app` when imported. Missing modules are skipped so a partial install still runs.
COMMAND_MODULES = (
    "acecal.cli.train",
    "acecal.cli.serve",
    "acecal.cli.remote",
    "acecal.cli.finetune",
    "acecal.cli.calibrate",
)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True)) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()


def _register() -> None:
    for name in COMMAND_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # a real missing dependency inside the module: surface it
                raise


def main() -> None:
    _register()
    app()


if __name__ == "__main__":  # pragma: no cover
    # `python -m acecal.cli.main` (and `torchrun -m acecal.cli.main`) runs this file as __main__; the command modules
    # register on the importable acecal.cli.main.app, so start that one, not this module's copy.
    from acecal.cli.main import main as _main

    _main()
