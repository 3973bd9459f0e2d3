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
from collections.abc import Callable
from pathlib import Path

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
    year: str | None = typer.Option(None, "--year", help="Season year (default: the site's default year), or `auto`: the latest year whose inputs and labels are available (exit 75 when none is yet)."),
    out: Path = typer.Option(Path("runs"), "--out", help="Output root; the run goes to OUT/SITE/YEAR."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    epochs: int | None = typer.Option(None, "--epochs", help="Override the site's training epochs."),
    force: bool = typer.Option(False, "--force", help="Rerun every stage even when unchanged (as a new run version)."),
    until: str | None = typer.Option(None, "--until", help="Early season: cut every series at this day of its year (MM-DD)."),
    transfer: str | None = typer.Option(None, "--transfer", help="none or previous-year: start from last year's models (default: the site's training.transfer)."),
    level: str | None = typer.Option(None, "--level", help="pixel, parcel or patch (default: the site's level; parcel: PSE-TSA on parcels; patch: STCLN/U-TAE segmentation)."),
    workers: int | None = typer.Option(None, "--workers", help="Tiled stages (tensors, predict) on a local dask cluster of N worker processes (0 or unset: one process)."),
    scheduler: str | None = typer.Option(None, "--scheduler", help="Tiled stages on an existing dask cluster: its scheduler address (tcp://HOST:PORT); workers must see the run directory."),
) -> None:
    """Run every stage for a site and year: ingest, labels, tensors, train, predict, evaluate, report.

    Runs are versioned under OUT/SITE/YEAR/versions/ (OUT/SITE/YEAR/run.json describes the current one) and locked."""
    _setup(_state["debug"])
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from . import production
    from .runner import Runner
    from .sites import load_site
    from .workflow import build_stages

    t0 = time.perf_counter()
    _check_device(device)
    if level not in (None, "pixel", "parcel", "patch"):
        raise CropmapError(f"unknown --level {level!r}", fix="use --level pixel, parcel or patch")
    from .distributed import cluster_spec, probe

    cluster = cluster_spec(workers, scheduler)
    probe(cluster)
    s = load_site(site)
    if s.source == "gee":  # before credentials, network or any export: an unset/placeholder gee.bucket stops here
        from .ingest.gee.bucket import require_bucket

        require_bucket(s)
    console = _console()
    y, notes = production.resolve_year(s, year)
    for note in notes:
        console.print(f"  [yellow]note:[/yellow] {note}")
    opts = production.run_options(s, y, out, until=until, transfer=transfer, level=level)
    parcel_level = (level or s.level) == "parcel"
    patch_level = (level or s.level) == "patch"
    stages, _ = build_stages(s, y, device=None if device == "auto" else device, epochs=epochs, level=level, cluster=cluster, **opts.stage_args)
    for note in opts.notes:
        console.print(f"  [yellow]note:[/yellow] {note}")
    if (parcel_level or patch_level) and cluster.distributed:
        console.print(f"  [yellow]note:[/yellow] the {level or s.level} stages run in this process; --workers/--scheduler apply to pixel-level runs")
    run_dir = production.run_dir(out, s.name, y)
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

        with production.locked(run_dir) as versioned:
            plan, header = versioned(stages, {"site": s.name, "year": y, "command": " ".join(["cropmap", *sys.argv[1:]]), **opts.header}, force)
            runner = Runner(plan.dir, header, on_event=on_event, progress=make_progress, reuse_from=plan.reuse_from,
                            on_save=lambda doc: production.publish(plan, doc))
            from .parcel_workflow import parcel_outputs
            from .patch_workflow import patch_outputs

            manifest = _run_stages(runner, stages, parcel_outputs if parcel_level else patch_outputs if patch_level else lambda done: {
                "map": done["predict"]["map"], "confidence": done["predict"]["confidence"], "preview": done["predict"]["preview"],
                "metrics": done["evaluate"]["metrics"], "model": done["train"]["model"], "report": done["report"]["report"],
                "samples": done["tensors"]["samples"], **({"stac": done["predict"]["stac"]} if "stac" in done["predict"] else {}),
                **({"encoder": done["pretrain"]["encoder"]} if "pretrain" in done else {}),
                **({"transfer": done["transfer"]["transfer"]} if "transfer" in done else {}),
            })
    metrics = json.loads((plan.dir / manifest["outputs"]["metrics"]).read_text())
    b, cmp = metrics["baseline"], metrics["comparison"]
    reused = f", unchanged stages linked from {plan.reuse_from.name}" if plan.reuse_from else ""
    console.print(f"\n[bold]{s.name} {y}[/bold] done in {time.perf_counter() - t0:.0f} s ({run_dir / 'run.json'}; run version {plan.name}{reused})")
    console.print(f"  held-out {'blocks of patches' if patch_level else 'parcels'}, {metrics['n_runs']} splits: {metrics['model']} OA {metrics['overall_accuracy']:.3f} ± {metrics['overall_accuracy_std']:.3f}, "
                  f"macro F1 {metrics['macro_f1']:.3f}; random forest OA {b['overall_accuracy']:.3f} ± {b['overall_accuracy_std']:.3f}, "
                  f"macro F1 {b['macro_f1']:.3f} (gain {cmp['overall_accuracy_gain']:+.3f})")
    if "transfer" in manifest["outputs"]:
        g = json.loads((plan.dir / manifest["outputs"]["transfer"]).read_text()).get("mean_gain") or {}
        if g:
            console.print(f"  initialised from {y - 1}: OA {g['overall_accuracy']:+.3f}, macro F1 {g['macro_f1']:+.3f} vs training from scratch ({y} tiles' test pixels)")
    for key in ("map", "confidence", "preview", *(["parcel_map"] if parcel_level else []), "metrics", "model", "report"):
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


@app.command()
def train(
    samples: Path = typer.Option(..., "--samples", help="Sample store directory or Parquet long table."),
    model: str | None = typer.Option(None, "--model", help="Model name (default: stnet, or the --pretrained model)."),
    out: Path = typer.Option(..., "--out", help="Model directory to write."),
    pretrained: Path | None = typer.Option(None, "--pretrained", help="Initialise from this model or `cropmap pretrain` encoder directory."),
    freeze_encoder: bool = typer.Option(False, "--freeze-encoder", help="Train only the classifier head (with --pretrained: a frozen pre-trained encoder)."),
    label_fraction: float | None = typer.Option(None, "--label-fraction", min=0.0, max=1.0, help="Keep this fraction of training labels per class."),
    labels_per_class: int | None = typer.Option(None, "--labels-per-class", min=1, help="Keep at most N training labels per class."),
    epochs: int = typer.Option(20, "--epochs", min=1),
    patience: int = typer.Option(10, "--patience", min=1, help="Stop after this many epochs without validation improvement."),
    lr: float = typer.Option(1e-3, "--lr", min=0.0),
    loss: str = typer.Option("ce", "--loss", help="ce (cross-entropy) or focal."),
    class_weighting: str = typer.Option("sqrt", "--class-weighting", help="sqrt, balanced or none."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    max_len: int = typer.Option(48, "--max-len", min=4, help="Observations per series fed to the model."),
    batch_size: int = typer.Option(256, "--batch-size", min=2),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Training augmentations (the site defaults: time shift, band offsets, cloud/shadow noise, missing-band patterns)."),
    restart: bool = typer.Option(False, "--restart", help="Ignore the checkpoint of an interrupted training of the same --out and start again."),
    fusion: str = typer.Option("none", "--fusion", help="Parcel models: none, early, pse, tsa or decision (optical + radar fusion)."),
    sensors: str | None = typer.Option(None, "--sensors", help="Parcel models: s2, s1 or s1+s2 (default: s2 without fusion, s1+s2 with)."),
    alignment: str = typer.Option("nn", "--alignment", help="Parcel early/pse fusion: S1 on S2 dates by nn (nearest unused) or linear."),
    s2_date_fraction: float | None = typer.Option(None, "--s2-date-fraction", help="Parcel models: keep this seeded random fraction of each parcel's S2 dates."),
    until: str | None = typer.Option(None, "--until", help="Parcel models: early season, series end at this MM-DD of the season year."),
    background: str = typer.Option("void", "--background", help="Patch models: label 0 is void (ignored) or a background class."),
) -> None:
    """Train a model on samples (validation: the `split` column, else a seeded parcel/sample draw; patch stores: 15 % of the blocks).

    An interrupted training resumes from OUT.training/ (its checkpoint, history.csv and TensorBoard logs)."""
    _setup(_state["debug"])
    if label_fraction is not None and labels_per_class is not None:
        raise CropmapError("--label-fraction and --labels-per-class are exclusive", fix="pass only one")
    if label_fraction is not None and label_fraction <= 0:
        raise CropmapError(f"--label-fraction must be > 0, got {label_fraction}", fix="use a value in (0, 1]")
    if loss not in ("ce", "focal"):
        raise CropmapError(f"unknown --loss {loss!r}", fix="use --loss ce or --loss focal")
    if class_weighting not in ("sqrt", "balanced", "none"):
        raise CropmapError(f"unknown --class-weighting {class_weighting!r}", fix="use sqrt, balanced or none")
    from cropmap.models.series import Augment
    from cropmap.models.training import FitConfig

    from .samples import load_samples
    from .sites import Training
    from .train import class_table, default_split, encode_labels, pretrained_model_name, subsample_labels, train_model

    _check_device(device)
    _threads()
    dctx, console = _data_parallel(device)
    from .parcels import is_parcel_store
    from .patch_cli import train_patches, wants_patches

    if wants_patches(model, samples):
        console = _console()
        meta = train_patches(samples, out, model=model, pretrained=pretrained, label_fraction=label_fraction, epochs=epochs, lr=lr,
                             batch_size=batch_size if "--batch-size" in sys.argv else 4, seed=seed, device=device, background=background,
                             augment=augment, class_weighting=class_weighting,
                             on_epoch=lambda r: console.print(f"  epoch {r['epoch']:3d} loss {r['train_loss']:.4f}"
                                                              + (f"  val OA {r['val_overall_accuracy']:.3f}" if "val_overall_accuracy" in r else "")))
        console.print(f"patch model written to {out} ({meta['model']}, {len(meta['classes'])} classes, {meta['data']['n_train_patches']} training "
                      f"patches, best epoch {meta['fit']['best_epoch']} of {meta['fit']['epochs_run']})")
        return
    if model == "psetae" or is_parcel_store(samples):
        if model not in (None, "psetae"):
            raise CropmapError(f"{str(samples)!r} is a parcel store; model {model!r} is a pixel model", fix="use --model psetae, or pixel samples")
        if dctx.enabled:
            raise CropmapError(f"parcel models train on one process; torchrun started {dctx.world_size}", fix="run `cropmap train --model psetae` without torchrun")
        if pretrained is not None or label_fraction is not None or labels_per_class is not None or freeze_encoder:
            raise CropmapError("--pretrained, --freeze-encoder, --label-fraction and --labels-per-class apply to pixel models only",
                               fix="drop them for --model psetae")
        _train_parcels(samples, out, fusion=fusion, sensors=sensors or ("s2" if fusion == "none" else "s1+s2"), alignment=alignment,
                       s2_date_fraction=s2_date_fraction, until=until, epochs=epochs, patience=patience, lr=lr,
                       loss=loss if loss != "ce" or "--loss" in sys.argv else "focal", class_weighting=class_weighting,
                       batch_size=batch_size, seed=seed, device=device)
        return
    if fusion != "none" or sensors or s2_date_fraction is not None or until is not None:
        raise CropmapError("--fusion, --sensors, --s2-date-fraction and --until apply to parcel models",
                           fix="use --model psetae with a parcel store (runs/SITE/YEAR/samples/parcels)")
    name = model or (pretrained_model_name(pretrained) if pretrained else "stnet")
    data = load_samples(samples)
    tr, va = default_split(data, seed)
    if label_fraction is not None or labels_per_class is not None:
        y = encode_labels(data, class_table(data, tr))
        tr = subsample_labels(y, tr, seed, label_fraction, labels_per_class)
    cfg = FitConfig(epochs=epochs, seed=seed, device=device, max_len=max_len, batch_size=batch_size, patience=patience, lr=lr,
                    loss=loss, class_weighting=class_weighting, freeze_encoder=freeze_encoder,
                    augment=Training().augment() if augment else Augment())
    progress, on_batch, on_epoch = _epoch_progress(
        console, epochs, len(tr),
        lambda r: f"epoch {r['epoch']:3d} loss {r['train_loss']:.4f}" + (f"  val loss {r['val_loss']:.4f} macro F1 {r['val_macro_f1']:.3f}" if "val_macro_f1" in r else ""))
    with progress:
        meta = train_model(data, tr, va, out, model_name=name, fit_config=cfg, pretrained=pretrained, resume=not restart,
                           extra_meta={"samples": str(samples)}, on_epoch=on_epoch, on_batch=on_batch)
    resumed = f", resumed at epoch {meta['fit']['resumed_from_epoch']}" if meta["fit"].get("resumed_from_epoch") else ""
    resumed += f", {dctx.world_size} data-parallel ranks" if dctx.enabled else ""
    console.print(f"model written to {out} ({name}, {len(meta['classes'])} classes, {meta['data']['n_train']} training samples, "
                  f"best epoch {meta['fit']['best_epoch']} of {meta['fit']['epochs_run']}{resumed})")


def _train_parcels(samples: Path, out: Path, *, fusion: str, sensors: str, alignment: str, s2_date_fraction: float | None,
                   until: str | None, epochs: int, patience: int, lr: float, loss: str, class_weighting: str, batch_size: int,
                   seed: int, device: str) -> None:
    """`cropmap train --model psetae`: validation from the `split` column, else a seeded draw of parcels."""
    import numpy as np

    from cropmap.models.parcel_training import ParcelFitConfig

    from .parcel_train import ParcelOptions, train_parcel_model
    from .parcels import load_parcel_store
    from .train import default_split

    opts = ParcelOptions("psetae", fusion, sensors, alignment, s2_date_fraction, until)
    opts.check()
    data = load_parcel_store(samples)
    if "split" in data.table.columns:
        side = data.table["split"].astype(str).to_numpy()
        tr, va = np.nonzero(side == "train")[0], np.nonzero(side == "val")[0]
    else:
        tr, va = default_split(data, seed)
    cfg = ParcelFitConfig(epochs=epochs, batch_size=min(batch_size, 128), lr=lr, loss=loss, class_weighting=class_weighting,
                          patience=patience, seed=seed, device=device)
    console = _console()
    meta = train_parcel_model(data, tr, va, out, opts, cfg, extra_meta={"samples": str(samples)},
                              on_epoch=lambda r: console.print(f"  epoch {r['epoch']:3d} loss {r['train_loss']:.4f}"
                                                               + (f"  val mIoU {r['val_miou']:.3f}" if "val_miou" in r else "")))
    console.print(f"parcel model written to {out} (psetae, fusion {fusion}, sensors {sensors}, {len(meta['classes'])} classes, "
                  f"{meta['data']['n_train']} training parcels, best epoch {meta['fit']['best_epoch']} of {meta['fit']['epochs_run']})")


@app.command()
def pretrain(
    samples: Path = typer.Option(..., "--samples", help="Sample store directory or Parquet long table (labels are not needed and are ignored)."),
    out: Path = typer.Option(..., "--out", help="Encoder directory to write (for `cropmap train --pretrained`)."),
    method: str = typer.Option("moco", "--method", help="Pre-training method: moco (pixel series) or masked (STCLN, patches)."),
    model: str = typer.Option("stnet", "--model", help="Model whose encoder is pre-trained."),
    epochs: int = typer.Option(100, "--epochs", min=1),
    patience: int = typer.Option(10, "--patience", min=1, help="Stop after this many epochs without validation InfoNCE improvement."),
    batch_size: int = typer.Option(512, "--batch-size", min=4),
    lr: float = typer.Option(1e-3, "--lr", min=0.0),
    queue_size: int = typer.Option(65536, "--queue-size", min=1, help="Negative keys kept (capped to half the training series)."),
    momentum: float = typer.Option(0.999, "--momentum", min=0.0, max=0.99999, help="Key encoder momentum."),
    temperature: float = typer.Option(0.07, "--temperature", min=1e-4, help="InfoNCE temperature (0.07 MoCo v1 / SITS-MoCo, 0.2 MoCo v2)."),
    view_length: int = typer.Option(70, "--view-length", min=4, help="Dates per augmented view (resampled)."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    also: list[Path] = typer.Option([], "--also", help="masked: more unlabelled patch stores or openEO *_inputs.nc cubes (repeatable)."),
    mask_ratio: float = typer.Option(0.4, "--mask-ratio", help="masked: probability that a (date, pixel) cell is masked."),
    gate: float | None = typer.Option(None, "--gate", help="masked: only dates with more than this fraction of pixels at NDVI > 0.2 are maskable (STCLN: 0.9)."),
    patch_size: int = typer.Option(16, "--patch-size", min=4, help="masked: patch side for .nc cubes (patch stores keep theirs)."),
) -> None:
    """Self-supervised pre-training of a model's encoder (moco: MoCo with the SITS-MoCo augmentations on pixel series;
    masked: STCLN spatiotemporal masked reconstruction on patches)."""
    _setup(_state["debug"])
    from cropmap.models.moco import MoCoConfig

    from .pretrain import METHODS, pretrain_encoder
    from .samples import load_samples

    if method == "masked":
        from .patch_cli import pretrain_patches

        _check_device(device)
        _threads()
        console = _console()
        meta = pretrain_patches([samples, *also], out, model=model if "--model" in sys.argv else "stcln", epochs=epochs, lr=lr,
                                batch_size=batch_size if "--batch-size" in sys.argv else 4, mask_ratio=mask_ratio, gate=gate,
                                patch_size=patch_size, seed=seed, device=device,
                                on_epoch=lambda r: console.print(f"  epoch {r['epoch']:3d} masked MSE {r['train_mse']:.4f}"
                                                                 + (f"  val {r['val_mse']:.4f}" if "val_mse" in r else "")))
        p = meta["pretrain"]
        console.print(f"encoder written to {out} (stcln, {p['n_train']} patches, best epoch {p['best_epoch']} of {p['epochs_run']})")
        return
    if method not in METHODS:
        raise CropmapError(f"unknown --method {method!r}", fix=f"use one of: {', '.join(METHODS)}")
    _check_device(device)
    _threads()
    _, console = _data_parallel(device)
    data = load_samples(samples, labelled=False)
    cfg = MoCoConfig(epochs=epochs, patience=patience, batch_size=batch_size, lr=lr, queue_size=queue_size, momentum=momentum,
                     temperature=temperature, view_length=view_length, seed=seed, device=device)
    progress, on_batch, on_epoch = _epoch_progress(
        console, epochs, int(len(data) * (1 - cfg.val_fraction)),
        lambda r: f"epoch {r['epoch']:3d} InfoNCE {r['train_infonce']:.4f}" + (f"  val {r['val_infonce']:.4f} top-1 {r['val_top1']:.3f}" if "val_infonce" in r else ""))
    with progress:
        meta = pretrain_encoder(data, out, method=method, model_name=model, config=cfg, on_epoch=on_epoch, on_batch=on_batch,
                                extra_meta={"samples": str(samples)})
    p = meta["pretrain"]
    console.print(f"encoder written to {out} ({model}, {p['n_train']} series, queue {p['queue_size']}, best epoch {p['best_epoch']} of {p['epochs_run']})")


@app.command()
def evaluate(
    model: Path = typer.Option(..., "--model", help="Model directory."),
    samples: Path = typer.Option(..., "--samples", help="Sample store directory or Parquet long table."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    device: str = typer.Option("auto", "--device"),
    s2_date_fraction: float | None = typer.Option(None, "--s2-date-fraction", help="Parcel models: override the model's sparse-S2 fraction."),
    until: str | None = typer.Option(None, "--until", help="Parcel models: override the model's early-season cut (MM-DD)."),
) -> None:
    """Evaluate a model on labelled samples (all samples passed)."""
    _setup(_state["debug"], quiet=as_json)
    from .evaluate import evaluate_model
    from .parcel_train import evaluate_parcel_model, is_parcel_model
    from .parcels import is_parcel_store, load_parcel_store
    from .samples import load_samples

    _check_device(device)
    _threads()
    dev = None if device == "auto" else device
    from cropmap.models.patch_registry import is_patch_model_dir

    from .patch_cli import evaluate_patches
    from .patches import is_patch_store

    if is_patch_model_dir(model) or is_patch_store(samples):
        if not is_patch_model_dir(model):
            raise CropmapError(f"{str(samples)!r} is a patch store but {str(model)!r} is not a patch model", fix="pass a model of `cropmap train --model stcln|utae`")
        m = evaluate_patches(model, samples, dev)
    elif is_parcel_model(model) or is_parcel_store(samples):
        if not is_parcel_model(model):
            raise CropmapError(f"{str(samples)!r} is a parcel store but {str(model)!r} is not a parcel model", fix="pass a model of `cropmap train --model psetae`")
        if not is_parcel_store(samples):
            raise CropmapError(f"{str(model)!r} is a parcel model but {str(samples)!r} is not a parcel store",
                               fix="pass runs/SITE/YEAR/samples/parcels (made by `cropmap run --level parcel`)")
        m = evaluate_parcel_model(model, load_parcel_store(samples), dev, s2_date_fraction=s2_date_fraction, until=until)
    elif s2_date_fraction is not None or until is not None:
        raise CropmapError("--s2-date-fraction and --until apply to parcel models", fix="pass a parcel model and parcel store")
    else:
        m = evaluate_model(model, load_samples(samples), dev)
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


@app.command("runs")
def runs_cmd(
    site: str | None = typer.Option(None, "--site", help="Only this site."),
    out: Path = typer.Option(Path("runs"), "--out", help="Output root of the runs."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON list on stdout."),
) -> None:
    """List the run versions under OUT with their status (* = the current version of its year)."""
    _setup(_state["debug"], quiet=as_json)
    from .production import list_runs

    rows = list_runs(out, site)
    if as_json:
        typer.echo(json.dumps(rows))
        return
    if not rows:
        typer.echo(f"no runs under {out}" + (f" for site {site}" if site else ""))
        return
    for r in rows:
        extra = "".join([f" stage={r['stage']}" if r["stage"] and r["status"] != "succeeded" else "",
                         f" until={r['early_season_until']}" if r["early_season_until"] else "",
                         f" transfer={r['transfer_from']}" if r["transfer_from"] else ""])
        typer.echo(f"{'*' if r['current'] else ' '} {r['site']:<14} {r['year']} {r['version']:<4} {r['status']:<11} "
                   f"{r['finished'] or r['started'] or '-':<25} code={r['code_version'] or '?'}{extra}")


@app.command()
def schedule(
    site: str = typer.Option(..., "--site", help="Site to rerun (see `cropmap sites`)."),
    at: str = typer.Option("0 6 * * 1", "--at", help="When, as a cron expression (default: Mondays 06:00)."),
    out: Path = typer.Option(Path("runs"), "--out", help="Output root of the scheduled runs."),
    kind: str = typer.Option("cron", "--kind", help="cron, systemd or kubernetes."),
    print_: bool = typer.Option(False, "--print", help="Print the entry."),
    install: bool = typer.Option(False, "--install", help="Install it (crontab, or systemd user units)."),
    image: str = typer.Option("cropmap:latest", "--image", help="Docker image (kubernetes)."),
) -> None:
    """Print or install a schedule for `cropmap run --site SITE --year auto` (cron, systemd timer, Kubernetes CronJob)."""
    _setup(_state["debug"])
    from . import schedule as sched
    from .sites import load_site

    if print_ == install:
        raise CropmapError("pass exactly one of --print and --install", fix="--print shows the entry, --install adds it")
    if kind not in sched.KINDS:
        raise CropmapError(f"unknown --kind {kind!r}", fix=f"use one of: {', '.join(sched.KINDS)}")
    load_site(site)
    if kind == "cron":
        entry = sched.cron_entry(site, at, out)
        if print_:
            typer.echo(entry)
            return
        sched.install_cron(entry, site)
        typer.echo(f"installed in the crontab: {entry}")
    elif kind == "systemd":
        units = sched.systemd_units(site, at, out)
        if print_:
            for name, text in units.items():
                typer.echo(f"# {name}\n{text}")
            return
        for line in sched.install_systemd(units, site):
            typer.echo(line)
    else:
        if install:
            raise CropmapError("--install does not apply a Kubernetes CronJob", fix="--print it and `kubectl apply -f` the output")
        typer.echo(sched.kubernetes_cronjob(site, at, image))


@app.command()
def mosaic(
    maps: list[Path] = typer.Argument(..., help="Class maps (crops.tif) of the sites of one region, in any UTM zones."),
    out: Path = typer.Option(..., "--out", help="The VRT to write."),
    crs: str | None = typer.Option(None, "--crs", help="CRS of the mosaic (default: the map with the lowest EPSG code's)."),
) -> None:
    """One VRT of class maps made in several UTM zones (nearest neighbour; the eastern zone wins overlaps)."""
    _setup(_state["debug"])
    from .mosaic import zone_mosaic

    typer.echo(str(zone_mosaic(maps, out, crs=crs)))


auth_app = typer.Typer(no_args_is_help=True, help="Earth Engine credentials for `source: gee` sites.")
app.add_typer(auth_app, name="auth")


@auth_app.command("check")
def auth_check(
    site: str | None = typer.Option(None, "--site", help="Use this site's gee.project."),
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
