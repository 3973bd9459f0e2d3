"""The ``cropmap`` command: :mod:`.app` holds the typer app and shared set-up; each command group is
one module (:mod:`.run`, :mod:`.models`, :mod:`.runs`, :mod:`.auth`). :func:`main` is the console entry
point: every error a user can fix is one line on stderr and a non-zero exit; tracebacks only with
``--debug``."""

from __future__ import annotations

import sys

import typer

from cropmap.pipeline.errors import CropmapError

from .app import app

# isort: off
# importing a command module registers its commands; this order is the order of `cropmap --help`
from . import run, models, runs, auth  # noqa: E402, F401
# isort: on

__all__ = ["app", "main"]


def main() -> None:
    """Console entry point: one-line errors, exit codes, tracebacks only with --debug."""
    debug = "--debug" in sys.argv[1:]
    try:
        app(standalone_mode=False)
    except CropmapError as exc:
        if debug:
            raise
        print(f"cropmap: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("cropmap: interrupted (completed stages are kept; rerun to resume)", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except SystemExit:
        raise
    except Exception as exc:  # click usage errors and bugs
        import click

        if isinstance(exc, click.exceptions.ClickException):
            print(f"cropmap: error: {exc.format_message()}", file=sys.stderr)
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        if debug:
            raise
        print(f"cropmap: internal error: {type(exc).__name__}: {exc} (rerun with --debug for a traceback and report it)", file=sys.stderr)
        sys.exit(1)
