"""Series models: fit, save, load and score any registered pixel model on a :class:`PixelSamples` set.

Shared by the levels that classify time series: the pixel level (one series per pixel; its
``train`` stage fits one model per split seed, ``cropmap train --samples`` any store or long
table) and the parcel level (one parcel-mean series per parcel, the series candidates of
``parcel.model: auto``). A model directory is self-contained (config, weights, class table,
normalisation, calibration). The class map is built from the training labels: labels are integer
codes or class names, kept as given and named from the samples' class names where known.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

import cropmap
from cropmap.models import ddp
from cropmap.models.checkpoint import load_model, load_weights, save_model
from cropmap.models.pixel.presto import EMBED_MAX_OBS, PrestoClassifier, fit_embed_head
from cropmap.models.pixel.presto import data_options as presto_data_options
from cropmap.models.pixel.trees import TREE_MAX_OBS, TreeClassifier, fit_tree_head
from cropmap.models.registry import build_model, model_names
from cropmap.models.series import Series, band_statistics
from cropmap.models.training import FitConfig, FitResult, fit, predict_proba, resolve_device
from cropmap.models.training_log import TrainingLog, write_history
from cropmap.pipeline.errors import ModelError, SamplesError
from cropmap.pipeline.fsio import atomic_path, ensure_writable_dir
from cropmap.pipeline.levels.common import class_table, encode_labels  # noqa: F401  (re-exported)
from cropmap.pipeline.samples import PixelSamples, from_ragged

log = logging.getLogger(__name__)

PRESTO_MODELS = ("presto", "presto-embed")


def as_series(samples: PixelSamples) -> Series:
    return Series(np.asarray(samples.values), np.asarray(samples.days), np.asarray(samples.offsets))


def subsample_labels(y: np.ndarray, idx: np.ndarray, seed: int, fraction: float | None = None,
                     per_class: int | None = None) -> np.ndarray:
    """Stratified, seeded label budget: keep ``fraction`` of each class or ``per_class`` samples (at least one each)."""
    if fraction is None and per_class is None:
        return idx
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y[idx]):
        members = idx[y[idx] == c]
        n = len(members)
        k = max(1, int(round(n * fraction))) if fraction is not None else min(n, per_class)
        keep.append(rng.choice(members, size=min(k, n), replace=False))
    return np.sort(np.concatenate(keep))


def default_split(samples: PixelSamples, seed: int, val_fraction: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """Train/val indices for ``cropmap train``: the ``split`` column when present, else a seeded
    validation draw (by parcel when ``parcel_id`` exists, so validation never shares a field)."""
    t = samples.table
    n = len(t)
    if "split" in t.columns:
        split = t["split"].astype(str).to_numpy()
        return np.nonzero(split == "train")[0], np.nonzero(split == "val")[0]
    rng = np.random.default_rng(seed + 7919)
    groups = t["parcel_id"].to_numpy() if "parcel_id" in t.columns else np.arange(n)
    uniq = np.unique(groups)
    val_groups = set(rng.choice(uniq, size=int(round(len(uniq) * val_fraction)), replace=False).tolist()) if len(uniq) >= 10 else set()
    is_val = np.array([g in val_groups for g in groups])
    return np.nonzero(~is_val)[0], np.nonzero(is_val)[0]


ARCHITECTURE_EXCLUDE = ("n_bands", "n_classes", "band_names", "mean", "std")


def work_dir_for(out_dir: Path) -> Path:
    """Where a training in progress keeps its live logs and resumable checkpoint (removed on success)."""
    out_dir = Path(out_dir)
    return out_dir.with_name(f"{out_dir.name}.training")


def train_model(samples: PixelSamples, train_idx: np.ndarray, val_idx: np.ndarray, out_dir: Path, *,
                model_name: str = "stnet", fit_config: FitConfig | None = None, pretrained: Path | None = None,
                model_options: dict | None = None, extra_meta: dict | None = None, extra_files: dict[str, object] | None = None,
                on_epoch: Callable[[dict], None] | None = None, on_batch: Callable[[int], None] | None = None,
                resume: bool = True, normalisation: tuple[np.ndarray, np.ndarray] | None = None,
                early_stopping: bool = True) -> dict:
    """Fit ``model_name`` and write the model directory ``out_dir`` atomically; returns its meta.

    While training, ``OUT.training/`` holds ``history.csv``, TensorBoard logs and a checkpoint of
    the last epoch; an interrupted training with the same data and configuration resumes from it
    (``resume=False`` starts again). ``pretrained`` (a model or ``cropmap pretrain`` encoder
    directory) fixes the architecture and normalisation and initialises every non-decoder weight.
    ``normalisation`` (band means, stds) replaces the training samples' statistics when there is no
    ``pretrained`` directory (benchmarks use it to normalise paired rows identically).
    ``early_stopping=False``: a fixed schedule (all epochs, all boosting rounds); the validation
    samples then only fit the temperature, so that their scores stay a fair basis for choosing
    between models (``training.model: auto``), which early stopping on them would bias.
    """
    cfg = fit_config or FitConfig()
    if model_name not in model_names("pixel"):
        raise ModelError(f"unknown model {model_name!r}", fix=f"choose one of: {', '.join(model_names('pixel'))}")
    if len(train_idx) < 2:
        raise SamplesError(f"only {len(train_idx)} training sample(s)", fix="pass more labelled samples")
    try:
        cfg.device = resolve_device(cfg.device)
    except RuntimeError as exc:
        raise ModelError(str(exc), fix="use --device cpu, or install a CUDA build of torch") from None
    classes = class_table(samples, train_idx)
    y = encode_labels(samples, classes)
    val_idx = val_idx[y[val_idx] >= 0]
    series = as_series(samples)
    options = dict(model_options or {})
    init = None
    if pretrained is not None:
        init, pmeta = _read_pretrained(Path(pretrained), model_name, samples.bands)
        mean = np.asarray(pmeta["normalisation"]["mean"], np.float32)
        std = np.asarray(pmeta["normalisation"]["std"], np.float32)
        options = {**{k: v for k, v in pmeta["model_config"].items() if k not in ARCHITECTURE_EXCLUDE}, **options}
    elif normalisation is not None:
        mean, std = (np.asarray(v, np.float32) for v in normalisation)
    else:
        mean, std = band_statistics(series, train_idx)
    options = {**data_options_for(model_name, samples, train_idx), **options}  # e.g. Presto's month window and location
    torch.manual_seed(cfg.seed)
    try:
        model, model_config = build_model(model_name, bands=samples.bands, n_classes=len(classes), mean=mean.tolist(),
                                          std=std.tolist(), **options)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"invalid options {options} for model {model_name!r}: {exc}", fix="fix training.model_options") from None
    if init is not None:
        _initialise(model, init, Path(pretrained))
    if cfg.freeze_encoder and not hasattr(model, "decoder"):
        raise ModelError(f"model {model_name!r} has no separate decoder", fix="drop --freeze-encoder")
    sub = lambda idx: as_series(samples.subset(idx))  # noqa: E731
    if (isinstance(model, PrestoClassifier) and model.config.head == "boosting") or isinstance(model, TreeClassifier):
        return _fit_head(model, samples, train_idx, val_idx, y, classes, mean, std, out_dir, model_name=model_name,
                         cfg=cfg, pretrained=pretrained, extra_meta=extra_meta, extra_files=extra_files, early_stopping=early_stopping)
    work = work_dir_for(out_dir)
    main = ddp.current().is_main  # under torchrun only rank 0 logs and writes; the others train in step with it
    if not resume and main:
        shutil.rmtree(work, ignore_errors=True)
    ddp.barrier()
    tlog, log_epoch = epoch_logger(work, on_epoch) if main else (None, None)
    try:
        result: FitResult = fit(
            model, sub(train_idx), y[train_idx], mean, std, cfg,
            val=sub(val_idx) if len(val_idx) and early_stopping else None, y_val=y[val_idx] if len(val_idx) and early_stopping else None,
            n_classes=len(classes), on_epoch=log_epoch, on_batch=on_batch, checkpoint=work / "checkpoint.pt",
        )
    finally:
        if tlog is not None:
            tlog.close()
    calibration = _calibrate(model, sub(val_idx), y[val_idx], mean, std, cfg, parcels_of_rows(samples, val_idx)) if len(val_idx) else None
    meta = {
        "model": model_name,
        "model_config": model_config,
        "bands": list(samples.bands),
        "normalisation": {"mean": mean.tolist(), "std": std.tolist(), "units": "reflectance (S2), dB (S1)"},
        "classes": classes,
        "max_len": cfg.max_len,
        "time_axis": "days since 1 January of the season year",
        "fit": {**asdict(cfg), "best_epoch": result.best_epoch, "seconds": round(result.seconds, 2),
                "epochs_run": len(result.history), "resumed_from_epoch": result.resumed_from or None,
                **({"data_parallel_ranks": result.world_size} if result.world_size > 1 else {}),
                "pretrained": str(pretrained) if pretrained else None},
        "data": {"n_train": int(len(train_idx)), "n_val": int(len(val_idx)),
                 "train_per_class": {c["name"]: int((y[train_idx] == c["index"]).sum()) for c in classes}},
        "calibration": calibration,
        "cropmap_version": cropmap.__version__,
        "torch_version": torch.__version__,
        **(extra_meta or {}),
    }
    if main:
        write_directory(out_dir, work, lambda tmp: save_model(tmp, model, meta), result.history, extra_files)
    ddp.barrier()  # the model directory exists for every rank once train_model returns
    return meta


def data_options_for(model_name: str, samples: PixelSamples, train_idx: np.ndarray) -> dict:
    """Builder options a model takes from its training data (Presto: the month window of the
    training observations and the location of the training samples); none for the others."""
    if model_name not in PRESTO_MODELS:
        return {}
    train = as_series(samples.subset(train_idx))
    try:
        return presto_data_options(train.days, samples.table.iloc[train_idx])
    except ValueError as exc:
        raise SamplesError(f"cannot locate the samples for Presto: {exc}", fix="give x/y in the CRS of the epsg column (or lon/lat with epsg 4326)") from None


def _fit_head(model: PrestoClassifier | TreeClassifier, samples: PixelSamples, train_idx: np.ndarray, val_idx: np.ndarray,
              y: np.ndarray, classes: list[dict], mean: np.ndarray, std: np.ndarray, out_dir: Path, *, model_name: str,
              cfg: FitConfig, pretrained: Path | None, extra_meta: dict | None, extra_files: dict[str, object] | None,
              early_stopping: bool = True) -> dict:
    """The models fitted without gradient steps, in the same model directory as :func:`train_model`:

    * ``presto-embed``: frozen encoder embeddings (computed once, cached) + a boosting head with
      early stopping on the validation embeddings;
    * ``forest`` / ``boosting``: the tree ensemble on binned median features (boosting stops early
      on the validation pixels; the forest does not look at them).

    Both read every observation of a series (``max_len`` of the directory), and both are
    calibrated on the validation pixels like the networks."""
    t0 = time.perf_counter()
    sub = lambda idx: as_series(samples.subset(idx))  # noqa: E731
    has_val = len(val_idx) > 0
    stop = has_val and early_stopping
    args = (model, sub(train_idx), y[train_idx], mean, std, sub(val_idx) if stop else None, y[val_idx] if stop else None)
    if isinstance(model, TreeClassifier):
        info, max_len = fit_tree_head(*args, seed=cfg.seed), TREE_MAX_OBS
        method = (f"{model.config.kind} on {model.config.bin_days}-day median features"
                  + (" (early stopping on validation)" if model.config.kind == "boosting" and stop else ""))
    else:
        info, max_len = fit_embed_head(*args, seed=cfg.seed), EMBED_MAX_OBS
        method = "frozen Presto embeddings + LightGBM head" + (" (early stopping on validation)" if stop else " (fixed rounds)")
    seconds = time.perf_counter() - t0
    calibration = (_calibrate(model, sub(val_idx), y[val_idx], mean, std, replace(cfg, max_len=max_len, batch_size=max(cfg.batch_size, 256)),
                              parcels_of_rows(samples, val_idx)) if has_val else None)
    meta = {
        "model": model_name,
        "model_config": model.config.to_dict(),
        "bands": list(samples.bands),
        "normalisation": {"mean": mean.tolist(), "std": std.tolist(), "units": "reflectance (S2), dB (S1)"},
        "classes": classes,
        "max_len": max_len,
        "time_axis": "days since 1 January of the season year",
        "fit": {"method": method, "seed": cfg.seed,
                "best_epoch": 0, "epochs_run": 0, "seconds": round(seconds, 2), "resumed_from_epoch": None,
                "pretrained": str(pretrained) if pretrained else None, **info},
        "data": {"n_train": int(len(train_idx)), "n_val": int(len(val_idx)),
                 "train_per_class": {c["name"]: int((y[train_idx] == c["index"]).sum()) for c in classes}},
        "calibration": calibration,
        "cropmap_version": cropmap.__version__,
        "torch_version": torch.__version__,
        **(extra_meta or {}),
    }
    if ddp.current().is_main:
        write_directory(out_dir, work_dir_for(out_dir), lambda tmp: save_model(tmp, model, meta), [], extra_files)
    ddp.barrier()
    return meta


def parcels_of_rows(samples: PixelSamples, idx: np.ndarray) -> np.ndarray | None:
    """The parcel id of each sample ``idx`` (``None`` when the samples have no ``parcel_id``)."""
    t = samples.table
    return t["parcel_id"].to_numpy()[idx] if "parcel_id" in t.columns else None


def _calibrate(model, val: Series, y_val: np.ndarray, mean: np.ndarray, std: np.ndarray, cfg: FitConfig,
               groups: np.ndarray | None = None) -> dict | None:
    """Temperature scaling fitted on the validation samples (:func:`cropmap.models.calibration.fit_temperature`:
    every validation parcel ``groups`` weighted alike, a prior on log T whose width is chosen by
    leave-one-parcel-out cross-validation), with the validation ECE before and after; ``None`` when
    no validation sample has a training class."""
    from cropmap.models.calibration import before_after, fit_temperature

    if not (y_val >= 0).any():
        return None
    proba = predict_proba(model, val, mean, std, cfg.max_len, cfg.batch_size * 4, cfg.device, amp=cfg.amp)
    fitted = fit_temperature(proba, y_val, groups)
    rel = before_after(proba[y_val >= 0], y_val[y_val >= 0], fitted["temperature"])
    return {**fitted, "validation_ece": {"before": rel["before"]["ece"], "after": rel["after"]["ece"]}}


def epoch_logger(work: Path, on_epoch: Callable[[dict], None] | None) -> tuple[TrainingLog, Callable[[dict], None]]:
    """The live log of a training in ``work`` and the per-epoch callback that feeds it (then ``on_epoch``)."""
    ensure_writable_dir(work)
    tlog = TrainingLog(work)

    def log_epoch(row: dict) -> None:
        tlog(row)
        if on_epoch:
            on_epoch(row)

    return tlog, log_epoch


def write_directory(out_dir: Path, work: Path, save: Callable[[Path], None], history: list[dict],
                    extra_files: dict[str, object] | None = None) -> None:
    """Write a model/encoder directory atomically (weights via ``save``, history, TensorBoard logs,
    extra JSON files), then remove the training's work directory."""
    with atomic_path(Path(out_dir), is_dir=True) as tmp:
        save(tmp)
        write_history(tmp / "history.csv", history)
        if (work / "tensorboard").is_dir():
            shutil.copytree(work / "tensorboard", tmp / "tensorboard")
        for name, obj in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)


def pretrained_model_name(directory: Path) -> str:
    """The model name recorded in a ``--pretrained`` directory."""
    path = Path(directory) / "config.json"
    try:
        return str(json.loads(path.read_text())["model"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ModelError(f"{str(directory)!r} is not a model or encoder directory (no readable config.json with a model name)",
                         fix="pass the --out directory of `cropmap train` or `cropmap pretrain`") from None


def _read_pretrained(directory: Path, model_name: str, bands: list[str]) -> tuple[dict, dict]:
    """Weights and meta of a ``--pretrained`` directory, checked against the model and bands."""
    if not (directory / "config.json").is_file():
        raise ModelError(f"{str(directory)!r} is not a model or encoder directory (no config.json)",
                         fix="pass the --out directory of `cropmap train` or `cropmap pretrain`")
    try:
        state, meta = load_weights(directory)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"pretrained directory {str(directory)!r} is damaged or incompatible: {str(exc).splitlines()[0]}",
                         fix="pass the --out directory of `cropmap train` or `cropmap pretrain`") from None
    if meta["model"] != model_name:
        raise ModelError(f"pretrained directory {str(directory)!r} holds a {meta['model']!r} model, not {model_name!r}",
                         fix=f"use --model {meta['model']} (or omit --model)")
    if list(meta["bands"]) != list(bands):
        raise ModelError(f"pretrained model {str(directory)!r} was trained on bands {meta['bands']}, the samples have {bands}",
                         fix="use samples with the same bands in the same order")
    return state, meta


def _initialise(model: torch.nn.Module, state: dict, directory: Path) -> None:
    """Load every encoder tensor of ``state`` into ``model`` (all must fit); the decoder too when its shapes match."""
    own = model.state_dict()
    encoder = {k: v for k, v in state.items() if not k.startswith("decoder.")}
    misfit = sorted(k for k, v in encoder.items() if k not in own or own[k].shape != v.shape)
    missing = sorted(k for k in own if not k.startswith("decoder.") and k not in encoder)
    if misfit or missing:
        raise ModelError(f"pretrained weights of {str(directory)!r} do not fit the model ({len(misfit)} mismatched, "
                         f"{len(missing)} missing tensors, e.g. {(misfit + missing)[0]})", fix="use the same model options as the pre-training")
    decoder = {k: v for k, v in state.items() if k.startswith("decoder.") and k in own and own[k].shape == v.shape}
    if len(decoder) != sum(k.startswith("decoder.") for k in own):
        decoder = {}  # another class set: a fresh decoder
    own.update(encoder)
    own.update(decoder)
    model.load_state_dict(own)
    log.info("initialised %d encoder and %d decoder tensors from %s", len(encoder), len(decoder), directory)


def load_model_dir(directory: Path, device: str | None = None):
    """Load a model directory for prediction (raises :class:`ModelError`)."""
    directory = Path(directory)
    if not (directory / "config.json").is_file() or not (directory / "model.safetensors").is_file():
        raise ModelError(f"{str(directory)!r} is not a model directory (needs config.json and model.safetensors)",
                         fix="pass the --out directory of `cropmap train` or runs/SITE/YEAR/model")
    try:
        return load_model(directory, device=resolve_device(device))
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise ModelError(f"model directory {str(directory)!r} is damaged or incompatible: {str(exc).splitlines()[0]}", fix="retrain it") from None


def align_bands(samples: PixelSamples, bands: list[str]) -> PixelSamples:
    """The samples with their band columns in the model's order (error if any is missing)."""
    if list(samples.bands) == list(bands):
        return samples
    missing = [b for b in bands if b not in samples.bands]
    if missing:
        raise ModelError(f"the samples lack band(s) {', '.join(missing)} that the model was trained on",
                         fix=f"provide columns {', '.join(bands)}")
    cols = [samples.bands.index(b) for b in bands]
    values = np.asarray(samples.values)[:, cols]
    observed = ~np.isnan(values).all(axis=1)
    sample_of = np.repeat(np.arange(len(samples)), samples.lengths)
    lengths = np.bincount(sample_of[observed], minlength=len(samples))
    out = from_ragged(bands, values[observed], np.asarray(samples.days)[observed], lengths, samples.table, samples.class_names)
    keep = np.nonzero(lengths > 0)[0]
    return out if len(keep) == len(out) else out.subset(keep)


def predict_samples(model_dir: Path, samples: PixelSamples, device: str | None = None, batch_size: int = 1024):
    """(probabilities, model meta, band-aligned samples)."""
    model, meta = load_model_dir(model_dir, device)
    samples = align_bands(samples, meta["bands"])
    norm = meta["normalisation"]
    proba = predict_proba(model, as_series(samples), np.asarray(norm["mean"], np.float32), np.asarray(norm["std"], np.float32),
                          int(meta["max_len"]), batch_size, device)
    return proba, meta, samples
