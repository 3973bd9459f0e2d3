"""The ``cropmap`` typer app and what every command shares: logging/GDAL set-up, the device check,
thread settings, progress bars. Commands live in the sibling modules, one per command group.

Process-wide settings (logging, threads, GDAL) are set here, at the entry point, never at
import. Every error a user can fix is one line on stderr and a non-zero exit; tracebacks only
with ``--debug``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

import typer

from cropmap.pipeline.errors import CropmapError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  pretty_exceptions_show_locals=False, help="Crop-type maps of whole sites from Sentinel-1/2 time series.")
_state = {"debug": False}
log = logging.getLogger("cropmap")


def _setup(debug: bool, quiet: bool = False) -> None:
    _state["debug"] = debug
    level = logging.DEBUG if debug else (logging.ERROR if quiet else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("cropmap").setLevel(level)
    os.environ.setdefault("GDAL_CACHEMAX", "256")  # bounded GDAL block cache (MB)
    import warnings

    warnings.filterwarnings("ignore", module="zarr")
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs.")) -> None:
    _state["debug"] = debug


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _run_stages(runner, stages, outputs):
    """Run the stages; a user error names the stage it happened in."""
    try:
        return runner.run(stages, outputs)
    except CropmapError as exc:
        failed = next((n for n, st in runner.manifest["stages"].items() if st.get("status") == "failed"), None)
        if failed is None:
            raise
        raise type(exc)(f"stage {failed}: {exc.what}", fix=exc.fix) from None


def _check_device(device: str) -> str:
    """The concrete device (cpu or cuda) of a ``--device`` option: resolved once, here at the entry
    point, and passed as is to every level and command below."""
    from cropmap.pipeline.workflow import resolve_device

    return resolve_device(device)


def _threads() -> None:
    import torch

    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")) or 1)  # torchrun: share the cores
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, ranks)))


def _data_parallel(device: str):
    """Join the torchrun process group when launched by torchrun; returns (context, console): ranks other
    than 0 print nothing."""
    from rich.console import Console

    from cropmap.models import ddp

    ctx = ddp.init_from_env(device)
    return ctx, (_console() if ctx.is_main else Console(stderr=True, quiet=True))


def _epoch_progress(console, total_epochs: int, samples_per_epoch: int, describe: Callable[[dict], str]):
    """A rich progress bar over the samples of each epoch plus one printed line per epoch."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("  epoch {task.fields[epoch]:>3}/" + str(total_epochs)), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, transient=True)
    task = progress.add_task("train", total=samples_per_epoch, epoch=1)

    def on_batch(n: int) -> None:
        progress.advance(task, n)

    def on_epoch(row: dict) -> None:
        console.print("  " + describe(row))
        progress.reset(task, total=samples_per_epoch, epoch=row["epoch"] + 1)

    return progress, on_batch, on_epoch
