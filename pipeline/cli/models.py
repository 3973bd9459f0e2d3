"""`cropmap train`, `pretrain`, `evaluate` and `export-samples`: models and sample stores outside a run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from cropmap.pipeline.errors import CropmapError

from .app import _check_device, _console, _data_parallel, _epoch_progress, _setup, _state, _threads, app


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
    from cropmap.pipeline.levels.pixel.train import class_table, default_split, encode_labels, pretrained_model_name, subsample_labels, train_model
    from cropmap.pipeline.samples import load_samples
    from cropmap.pipeline.sites import Training

    device = _check_device(device)
    _threads()
    dctx, console = _data_parallel(device)
    from cropmap.pipeline.levels.parcel.parcels import is_parcel_store
    from cropmap.pipeline.levels.patch.commands import train_patches, wants_patches

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

    from cropmap.models.parcel.training import ParcelFitConfig
    from cropmap.pipeline.levels.parcel.parcels import load_parcel_store
    from cropmap.pipeline.levels.parcel.train import ParcelOptions, train_parcel_model
    from cropmap.pipeline.levels.pixel.train import default_split

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
    from cropmap.models.pretrain.moco import MoCoConfig
    from cropmap.pipeline.levels.pixel.pretrain import METHODS, pretrain_encoder
    from cropmap.pipeline.samples import load_samples

    if method == "masked":
        from cropmap.pipeline.levels.patch.commands import pretrain_patches

        device = _check_device(device)
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
    device = _check_device(device)
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
    from cropmap.pipeline.levels.parcel.parcels import is_parcel_store, load_parcel_store
    from cropmap.pipeline.levels.parcel.train import evaluate_parcel_model, is_parcel_model
    from cropmap.pipeline.levels.pixel.evaluate import evaluate_model
    from cropmap.pipeline.samples import load_samples

    device = _check_device(device)
    _threads()
    dev = device
    from cropmap.models.patch.checkpoint import is_patch_model_dir
    from cropmap.pipeline.levels.patch.commands import evaluate_patches
    from cropmap.pipeline.levels.patch.patches import is_patch_store

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
    from cropmap.pipeline.samples import load_samples, write_long_table

    s = load_samples(samples)
    write_long_table(s, out)
    typer.echo(f"{len(s)} samples, {int(s.offsets[-1])} observations -> {out}")
