"""The ``cropmap`` command: :mod:`.app` holds the typer app and shared set-up; each command group is
one module (:mod:`.run`, :mod:`.models`, :mod:`.runs`, :mod:`.auth`). :func:`main` is the console entry
point: every error a user can fix is one line on stderr and a non-zero exit; tracebacks only with
``--debug``."""

from __future__ import annotations

import sys

import typer

from cropmap.pipeline.errors import CropmapError, usage_error

from .app import app

# isort: off
# importing a command module registers its commands; this order is the order of `cropmap --help`
from . import run, ingest, models, runs, auth  # noqa: E402, F401
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
        usage = usage_error(exc)  # typer raises its own copy of click's exceptions: matched by class name
        if usage is not None:
            print(f"cropmap: error: {usage[0]}", file=sys.stderr)
            sys.exit(usage[1])
        if type(exc).__name__ == "Abort":
            sys.exit(1)
        if debug:
            raise
        print(f"cropmap: internal error: {type(exc).__name__}: {exc} (rerun with --debug for a traceback and report it)", file=sys.stderr)
        sys.exit(1)
