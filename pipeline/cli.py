"""The ``cropmap`` command.

Process-wide settings (logging, threads, GDAL) are set here, at the entry point, never at
import. Every error a user can fix is one line on stderr and a non-zero exit; tracebacks only
with ``--debug``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from .errors import CropmapError

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


@app.command()
def sites() -> None:
    """List the sites of regions/ with their source, label source and years."""
    _setup(_state["debug"])
    from .sites import list_site_names, load_site

    for name in list_site_names():
        try:
            s = load_site(name)
            typer.echo(f"{s.name:16s} source={s.source:6s} labels={s.label_source:14s} years={','.join(map(str, s.years))}  {s.title}")
        except CropmapError as exc:
            typer.echo(f"{name:16s} INVALID: {exc}")


@app.command()
def run(
    site: str = typer.Option(..., "--site", help="Site name (see `cropmap sites`)."),
    year: Optional[int] = typer.Option(None, "--year", help="Season year (default: the site's default year)."),
    out: Path = typer.Option(Path("runs"), "--out", help="Output root; the run goes to OUT/SITE/YEAR."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Override the site's training epochs."),
    force: bool = typer.Option(False, "--force", help="Rerun every stage even when unchanged."),
) -> None:
    """Run every stage for a site and year: ingest, labels, tensors, train, predict, evaluate, report."""
    _setup(_state["debug"])
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .runner import Runner
    from .sites import load_site
    from .workflow import build_stages

    t0 = time.perf_counter()
    _check_device(device)
    s = load_site(site)
    y = s.resolve_year(year)
    stages, _ = build_stages(s, y, device=None if device == "auto" else device, epochs=epochs)
    run_dir = out / s.name / str(y)
    console = _console()
    _threads()
    with Progress(TextColumn("  {task.description:<16}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:

        def make_progress(desc: str, total: int | None):
            task = progress.add_task(desc, total=total)
            return lambda n=1: progress.advance(task, n)

        def on_event(name: str, event: str, record: dict) -> None:
            if event == "skipped":
                console.print(f"[dim]- {name:<9} unchanged, skipped[/dim]")
            elif event == "done":
                console.print(f"[green]✓[/green] {name:<9} {record['seconds']:.1f} s")
                for note in record.get("report", {}).get("notes", []):
                    console.print(f"  [yellow]note:[/yellow] {note}")

        runner = Runner(run_dir, {"site": s.name, "year": y, "command": " ".join(["cropmap", *sys.argv[1:]])},
                        on_event=on_event, progress=make_progress, force=force)
        manifest = _run_stages(runner, stages, lambda done: {
            "map": done["predict"]["map"], "confidence": done["predict"]["confidence"], "preview": done["predict"]["preview"],
            "metrics": done["evaluate"]["metrics"], "model": done["train"]["model"], "report": done["report"]["report"],
            "samples": done["tensors"]["samples"],
        })
    metrics = json.loads((run_dir / manifest["outputs"]["metrics"]).read_text())
    b, cmp = metrics["baseline"], metrics["comparison"]
    console.print(f"\n[bold]{s.name} {y}[/bold] done in {time.perf_counter() - t0:.0f} s ({run_dir / 'run.json'})")
    console.print(f"  held-out parcels, {metrics['n_runs']} splits: {metrics['model']} OA {metrics['overall_accuracy']:.3f} ± {metrics['overall_accuracy_std']:.3f}, "
                  f"macro F1 {metrics['macro_f1']:.3f}; random forest OA {b['overall_accuracy']:.3f} ± {b['overall_accuracy_std']:.3f}, "
                  f"macro F1 {b['macro_f1']:.3f} (gain {cmp['overall_accuracy_gain']:+.3f})")
    for key in ("map", "confidence", "preview", "metrics", "model", "report"):
        console.print(f"  {key:<10} {run_dir / manifest['outputs'][key]}")


def _run_stages(runner, stages, outputs):
    """Run the stages; a user error names the stage it happened in."""
    try:
        return runner.run(stages, outputs)
    except CropmapError as exc:
        failed = next((n for n, st in runner.manifest["stages"].items() if st.get("status") == "failed"), None)
        if failed is None:
            raise
        raise type(exc)(f"stage {failed}: {exc.what}", fix=exc.fix) from None


def _check_device(device: str) -> None:
    if device not in ("auto", "cpu", "cuda"):
        raise CropmapError(f"unknown device {device!r}", fix="use --device auto, cpu or cuda")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CropmapError("--device cuda was asked for but torch sees no CUDA device",
                               fix="use --device cpu (or auto), or install a CUDA build of torch")


def _threads() -> None:
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))


@app.command()
def train(
    samples: Path = typer.Option(..., "--samples", help="Sample store directory or Parquet long table."),
    model: str = typer.Option("stnet", "--model", help="Model name."),
    out: Path = typer.Option(..., "--out", help="Model directory to write."),
    pretrained: Optional[Path] = typer.Option(None, "--pretrained", help="Initialise from this model directory."),
    label_fraction: Optional[float] = typer.Option(None, "--label-fraction", min=0.0, max=1.0, help="Keep this fraction of training labels per class."),
    labels_per_class: Optional[int] = typer.Option(None, "--labels-per-class", min=1, help="Keep at most N training labels per class."),
    epochs: int = typer.Option(20, "--epochs", min=1),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    max_len: int = typer.Option(48, "--max-len", min=4, help="Observations per series fed to the model."),
    batch_size: int = typer.Option(256, "--batch-size", min=2),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Training augmentations (the site defaults: time shift, band offsets, cloud/shadow noise, missing-band patterns)."),
) -> None:
    """Train a model on samples (validation: the `split` column, else a seeded parcel/sample draw)."""
    _setup(_state["debug"])
    if label_fraction is not None and labels_per_class is not None:
        raise CropmapError("--label-fraction and --labels-per-class are exclusive", fix="pass only one")
    if label_fraction is not None and label_fraction <= 0:
        raise CropmapError(f"--label-fraction must be > 0, got {label_fraction}", fix="use a value in (0, 1]")
    from cropmap.models.training import FitConfig

    from .samples import load_samples
    from .train import class_table, default_split, encode_labels, subsample_labels, train_model

    _check_device(device)
    _threads()
    data = load_samples(samples)
    tr, va = default_split(data, seed)
    if label_fraction is not None or labels_per_class is not None:
        y = encode_labels(data, class_table(data, tr))
        tr = subsample_labels(y, tr, seed, label_fraction, labels_per_class)
    console = _console()
    from cropmap.models.series import Augment

    from .sites import Training

    cfg = FitConfig(epochs=epochs, seed=seed, device=device, max_len=max_len, batch_size=batch_size,
                    augment=Training().augment() if augment else Augment())
    meta = train_model(data, tr, va, out, model_name=model, fit_config=cfg, pretrained=pretrained,
                       extra_meta={"samples": str(samples)},
                       on_epoch=lambda row: console.print(f"  epoch {row['epoch']:3d} loss {row['train_loss']:.4f}"
                                                          + (f" val macro F1 {row['val_macro_f1']:.3f}" if "val_macro_f1" in row else "")))
    console.print(f"model written to {out} ({len(meta['classes'])} classes, {meta['data']['n_train']} training samples, "
                  f"best epoch {meta['fit']['best_epoch']})")


@app.command()
def evaluate(
    model: Path = typer.Option(..., "--model", help="Model directory."),
    samples: Path = typer.Option(..., "--samples", help="Sample store directory or Parquet long table."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    device: str = typer.Option("auto", "--device"),
) -> None:
    """Evaluate a model on labelled samples (all samples passed)."""
    _setup(_state["debug"], quiet=as_json)
    from .evaluate import evaluate_model
    from .samples import load_samples

    _check_device(device)
    _threads()
    m = evaluate_model(model, load_samples(samples), None if device == "auto" else device)
    if as_json:
        typer.echo(json.dumps(m))
        return
    typer.echo(f"overall accuracy {m['overall_accuracy']:.4f}  kappa {m['kappa']:.4f}  macro F1 {m['macro_f1']:.4f}  "
               f"weighted F1 {m['weighted_f1']:.4f}  mIoU {m['miou']:.4f}  (n={m['n_samples']})")
    for name, v in m["per_class"].items():
        if v["support"]:
            typer.echo(f"  {name:<30s} F1 {v['f1']:.3f}  IoU {v['iou']:.3f}  n={v['support']}")


@app.command("export-samples")
def export_samples(
    samples: Path = typer.Argument(..., help="Sample store directory (e.g. runs/demo/2019/samples/pixels)."),
    out: Path = typer.Argument(..., help="Parquet file to write (long format, see DESIGN.md)."),
) -> None:
    """Export a sample store as the Parquet long table."""
    _setup(_state["debug"])
    from .samples import load_samples, write_long_table

    s = load_samples(samples)
    write_long_table(s, out)
    typer.echo(f"{len(s)} samples, {int(s.offsets[-1])} observations -> {out}")


auth_app = typer.Typer(no_args_is_help=True, help="Earth Engine credentials for `source: gee` sites.")
app.add_typer(auth_app, name="auth")


@auth_app.command("check")
def auth_check(
    site: Optional[str] = typer.Option(None, "--site", help="Use this site's gee.project."),
    connect: bool = typer.Option(False, "--connect", help="Also initialise Earth Engine and evaluate a constant (needs network)."),
) -> None:
    """Say which Cloud project and credentials Earth Engine stages would use, and what is missing."""
    _setup(_state["debug"])
    from .errors import AuthError
    from .ingest.gee.auth import check_auth, initialize

    project = None
    if site is not None:
        from .sites import load_site

        s = load_site(site)
        if s.gee is None:
            raise CropmapError(f"site {site!r} has source {s.source!r}, not 'gee'", fix="it needs no Earth Engine credentials")
        project = s.gee.project
    status = check_auth(project)
    for line in status.lines():
        typer.echo(line)
    if not status.ok:
        raise AuthError("Earth Engine is not set up: " + "; ".join(status.problems))
    if connect:
        import ee

        initialize(status)
        ee.Number(1).getInfo()
        typer.echo(f"connected: Earth Engine answered for project {status.project}")


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


if __name__ == "__main__":
    main()
