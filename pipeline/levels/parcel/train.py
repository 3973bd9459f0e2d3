"""Parcel-level training, prediction and evaluation (PSE-TSA and its optical + radar fusion variants).

:func:`train_parcel_model` fits a parcel model on a parcel store and writes a self-contained model
directory (``cropmap.parcel-model/1``: ``model.safetensors`` + ``config.json`` with the fusion,
sensors, alignment, channels, normalisation, class map and date experiments, ``history.csv``).
:func:`predict_parcels` applies a model directory to parcels with the same date experiments it was
trained with (or others given explicitly), deterministically; :func:`evaluate_parcel_model` gives
the JSON of ``cropmap evaluate`` (the keys of the pixel path).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import cropmap
from cropmap.models.parcel.batch import ALIGNMENTS, ParcelSets, channel_statistics, cut_until, prepare_inputs, subsample_dates
from cropmap.models.parcel.fusion import build_parcel_model, check_config, model_inputs
from cropmap.models.parcel.training import ParcelFitConfig, fit_parcels, predict_parcel_proba
from cropmap.models.series import Series
from cropmap.models.training import resolve_device
from cropmap.pipeline.errors import CropmapError, ModelError, SamplesError
from cropmap.pipeline.fsio import atomic_path
from cropmap.pipeline.levels.common import class_table, encode_labels, metrics_for
from cropmap.pipeline.levels.parcel.parcels import ParcelSamples
from cropmap.pipeline.samples import PixelSamples, from_ragged
from cropmap.pipeline.season import cut_date, parse_until

MODEL_FORMAT = "cropmap.parcel-model/1"


@dataclass
class ParcelOptions:
    """What a parcel model is and the date experiment it is trained under."""

    model: str = "psetae"
    fusion: str = "tsa"
    sensors: str = "s1+s2"
    alignment: str = "nn"
    """S1 -> S2 date alignment of ``early`` and ``pse`` fusion: ``nn`` (nearest unused) or ``linear``."""
    s2_date_fraction: float | None = None
    """Sparse optical series: keep this seeded random fraction of each parcel's S2 dates."""
    until: str | None = None
    """Early season: cut every series after this month-day (``MM-DD``) of the season year."""

    def check(self) -> None:
        try:
            check_config(self.model, self.fusion, self.sensors)
        except ValueError as exc:
            raise CropmapError(str(exc), fix="see `cropmap train --help` for --model, --fusion and --sensors") from None
        if self.alignment not in ALIGNMENTS:
            raise CropmapError(f"unknown alignment {self.alignment!r}", fix=f"use one of: {', '.join(ALIGNMENTS)}")
        if self.s2_date_fraction is not None and not 0 < self.s2_date_fraction <= 1:
            raise CropmapError(f"--s2-date-fraction must be in (0, 1], got {self.s2_date_fraction}", fix="e.g. --s2-date-fraction 0.2")
        if self.s2_date_fraction is not None and self.sensors == "s1":
            raise CropmapError("--s2-date-fraction needs an optical sensor, but --sensors is s1", fix="use --sensors s2 or s1+s2")
        if self.until is not None:
            parse_until(self.until)

    @property
    def sensor_list(self) -> list[str]:
        return ["s2", "s1"] if self.sensors == "s1+s2" else [self.sensors]


def until_days(until: str, season_years: np.ndarray) -> np.ndarray:
    """Day offsets (since 1 January of each parcel's season year) of ``until`` (MM-DD or YYYY-MM-DD,
    parsed by :func:`cropmap.pipeline.season.parse_until`, the one ``--until`` parser)."""
    cut = parse_until(until)
    return np.asarray([(cut_date(int(y), cut) - dt.date(int(y), 1, 1)).days for y in np.asarray(season_years, int)], np.float64)


def experiment_sets(samples: ParcelSamples, opts: ParcelOptions, seed: int) -> ParcelSets:
    """The parcel sets under the options' date experiments (sparse optical dates, early-season cut)."""
    sets = samples.sets
    if opts.until is not None:
        sets = cut_until(sets, until_days(opts.until, samples.table["season_year"].to_numpy()))
    if opts.s2_date_fraction is not None and opts.s2_date_fraction < 1:
        sets = subsample_dates(sets, opts.s2_date_fraction, seed, "s2", keys=samples.table["parcel_id"].to_numpy())
    return sets


def usable(sets: ParcelSets, inputs_sensors: list[str]) -> np.ndarray:
    """Parcels with at least one date of every sensor used."""
    ok = np.ones(len(sets), bool)
    for s in inputs_sensors:
        ok &= sets.sensors[s].lengths > 0
    return ok


def _geom_norm(sets: ParcelSets, idx: np.ndarray) -> dict:
    g = np.log1p(np.maximum(sets.geom[idx], 0))
    return {"mean": g.mean(0).tolist(), "std": np.maximum(g.std(0), 1e-3).tolist()}


def _as_arrays(norm: dict) -> dict:
    return {k: (np.asarray(v[0], np.float32), np.asarray(v[1], np.float32)) for k, v in norm.items()}


def train_parcel_model(samples: ParcelSamples, train_idx: np.ndarray, val_idx: np.ndarray, out_dir: Path, opts: ParcelOptions,
                       cfg: ParcelFitConfig, *, extra_files: dict | None = None, extra_meta: dict | None = None,
                       on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Fit a parcel model and write its directory atomically; returns its meta."""
    opts.check()
    try:
        cfg.device = resolve_device(cfg.device)
    except RuntimeError as exc:
        raise ModelError(str(exc), fix="use --device cpu, or install a CUDA build of torch") from None
    sets = experiment_sets(samples, opts, cfg.seed)
    ok = usable(sets, opts.sensor_list)
    dropped = {"train": int((~ok[train_idx]).sum()), "val": int((~ok[val_idx]).sum())}
    train_idx, val_idx = np.asarray(train_idx)[ok[train_idx]], np.asarray(val_idx)[ok[val_idx]]
    if len(train_idx) < 2:
        raise SamplesError(f"only {len(train_idx)} training parcel(s) with observations of {opts.sensors}"
                           + (f" up to {opts.until}" if opts.until else ""), fix="pass more parcels or a later --until")
    classes = class_table(samples, train_idx)
    y = encode_labels(samples, classes)
    val_idx = val_idx[y[val_idx] >= 0]
    config = {"fusion": opts.fusion, "sensors": opts.sensor_list,
              "channels": {s: len(samples.sets.sensors[s].channels) for s in opts.sensor_list},
              "n_classes": len(classes), "n_geom": int(sets.geom.shape[1])}
    inputs = model_inputs(config)
    data = prepare_inputs(sets, inputs, opts.alignment)
    norm = {k: [a.tolist() for a in channel_statistics(data.sensors[k], data.n_pixels, train_idx)] for k in inputs}
    geom_norm = _geom_norm(data, train_idx)
    torch.manual_seed(cfg.seed)
    model = build_parcel_model(config)
    result = fit_parcels(model, data, y, train_idx, inputs, _as_arrays(norm), geom_norm, cfg, len(classes),
                         val_idx=val_idx if len(val_idx) else None, on_epoch=on_epoch)
    meta = {
        "format": MODEL_FORMAT,
        "model": opts.model,
        "level": "parcel",
        "options": asdict(opts),
        "model_config": config,
        "inputs": inputs,
        "channels": {s: list(samples.sets.sensors[s].channels) for s in opts.sensor_list},
        "normalisation": norm,
        "geom_features": list(samples.sets.geom_names),
        "geom_normalisation": geom_norm,
        "classes": classes,
        "n_parameters": int(sum(p.numel() for p in model.parameters())),
        "time_axis": "days since 1 January of the season year",
        "fit": {**asdict(cfg), "best_epoch": result.best_epoch, "seconds": round(result.seconds, 2), "epochs_run": len(result.history)},
        "data": {"n_train": int(len(train_idx)), "n_val": int(len(val_idx)), "dropped_without_dates": dropped,
                 "train_per_class": {c["name"]: int((y[train_idx] == c["index"]).sum()) for c in classes}},
        "cropmap_version": cropmap.__version__,
        "torch_version": torch.__version__,
        **(extra_meta or {}),
    }
    with atomic_path(Path(out_dir), is_dir=True) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        with open(tmp / "history.csv", "w", newline="") as f:
            keys = sorted({k for r in result.history for k in r}, key=lambda k: (k != "epoch", k))
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(result.history)
        for name, obj in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
    return meta


def is_parcel_model(directory: Path) -> bool:
    try:
        return json.loads((Path(directory) / "config.json").read_text()).get("format") == MODEL_FORMAT
    except (OSError, ValueError):
        return False


def load_parcel_model(directory: Path, device: str | None = None):
    directory = Path(directory)
    try:
        meta = json.loads((directory / "config.json").read_text())
        if meta.get("format") != MODEL_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {MODEL_FORMAT!r}")
        model = build_parcel_model(meta["model_config"])
        dev = resolve_device(device)
        model.load_state_dict(load_file(str(directory / "model.safetensors"), device=dev))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"{str(directory)!r} is not a usable parcel model directory ({str(exc).splitlines()[0]})",
                         fix="pass the --out directory of `cropmap train --model psetae`") from None
    return model.to(dev).eval(), meta, dev


def predict_parcels(model_dir: Path, samples: ParcelSamples, device: str | None = None, *, s2_date_fraction: float | None = None,
                    until: str | None = None, seed: int | None = None) -> tuple[np.ndarray, dict, np.ndarray]:
    """(probabilities of the usable parcels, model meta, positions of those parcels in ``samples``).

    The model's own date experiment applies unless ``s2_date_fraction`` / ``until`` are given; a
    parcel with no date of a sensor the model uses (e.g. before ``until``) cannot be predicted and is
    left out of the positions returned.
    """
    model, meta, dev = load_parcel_model(model_dir, device)
    o = dict(meta["options"])
    if s2_date_fraction is not None:
        o["s2_date_fraction"] = s2_date_fraction
    if until is not None:
        o["until"] = until
    opts = ParcelOptions(**o)
    opts.check()
    for s, channels in meta["channels"].items():
        if s not in samples.sets.sensors or list(samples.sets.sensors[s].channels) != channels:
            have = samples.sets.sensors[s].channels if s in samples.sets.sensors else None
            raise ModelError(f"the parcels have {s} channels {have}, the model was trained on {channels}", fix="use parcels built with the same bands")
    sets = experiment_sets(samples, opts, meta["fit"]["seed"] if seed is None else seed)
    keep = np.nonzero(usable(sets, opts.sensor_list))[0]
    data = prepare_inputs(sets.subset(keep), meta["inputs"], opts.alignment)
    proba = predict_parcel_proba(model, data, meta["inputs"], _as_arrays(meta["normalisation"]),
                                 {k: np.asarray(v) for k, v in meta["geom_normalisation"].items()}, dev)
    return proba, meta, keep


def evaluate_parcel_model(model_dir: Path, samples: ParcelSamples, device: str | None = None, **experiment) -> dict:
    """Metrics of a parcel model on every parcel passed (the JSON of ``cropmap evaluate``)."""
    if len(samples) == 0:
        raise SamplesError("no parcels to evaluate", fix="pass a parcel store with labelled parcels")
    proba, meta, keep = predict_parcels(model_dir, samples, device, **experiment)
    if len(keep) == 0:
        raise SamplesError("no parcel has observations of every sensor the model uses", fix="use a later --until")
    m = metrics_for(samples.subset(keep), proba, meta["classes"])
    m["model"] = f"{meta['model']} ({meta['options']['fusion']}, {meta['options']['sensors']})"
    m["level"] = "parcel"
    m["n_parcels_without_dates"] = int(len(samples) - len(keep))
    m["protocol"] = ("every parcel passed is evaluated, one prediction per parcel; deterministic (every stored pixel, "
                     "seeded date experiments)")
    return m


def sensor_means(sets: ParcelSets) -> dict[str, Series]:
    """Per sensor, the parcel-mean series: each date's band values averaged over the parcel's stored pixels (NaN ignored)."""
    out = {}
    for name in ("s2", "s1"):
        if name not in sets.sensors:
            continue
        s = sets.sensors[name]
        vals = np.asarray(s.values)
        npx = np.repeat(sets.n_pixels, s.lengths)
        slot = np.arange(vals.shape[2])[None, None, :] < npx[:, None, None]
        seen = (slot & ~np.isnan(vals)).sum(axis=2)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.nansum(np.where(slot, vals, 0), axis=2) / np.maximum(seen, 1)
        mean[seen == 0] = np.nan
        out[name] = Series(mean.astype(np.float32), np.asarray(s.days, np.float32), s.offsets)
    return out


def parcel_mean_samples(samples: ParcelSamples) -> PixelSamples:
    """The parcels as pixel samples: one series per parcel (its mean over pixels per date, optical and radar
    dates merged in day order, the other sensor's bands NaN), keyed ``sample_id`` = ``parcel_id``, with
    the parcel table (label, centroid ``x``/``y``/``epsg``). Any pixel model fits them (``parcel.model: auto``)."""
    means = sensor_means(samples.sets)
    bands = [c for name in means for c in samples.sets.sensors[name].channels]
    n = len(samples)
    values, days, owner = [], [], []
    col = 0
    for name, s in means.items():
        c = s.values.shape[1]
        v = np.full((len(s.days), len(bands)), np.nan, np.float32)
        v[:, col:col + c] = s.values
        col += c
        values.append(v)
        days.append(np.asarray(s.days, np.float32))
        owner.append(np.repeat(np.arange(n), s.lengths))
    values, days, owner = np.concatenate(values), np.concatenate(days), np.concatenate(owner)
    observed = ~np.isnan(values).all(axis=1)
    values, days, owner = values[observed], days[observed], owner[observed]
    order = np.lexsort((days, owner))
    table = samples.table.copy()
    table["sample_id"] = table["parcel_id"]
    lengths = np.bincount(owner, minlength=n)
    return from_ragged(bands, values[order], days[order], lengths, table, dict(samples.class_names))


def candidate_proba(name: str, model_dir: Path, samples: ParcelSamples, means: PixelSamples, device: str | None = None,
                    calibrate: bool = True) -> tuple[np.ndarray, list[dict]]:
    """(n parcels, classes) probabilities of a parcel candidate on every parcel of ``samples`` (``means``: the
    same parcels as :func:`parcel_mean_samples`), and its class table. A parcel the candidate cannot see
    (no date of a sensor it uses) gets a row of zeros: it counts as an error, never hidden. Series
    candidates' probabilities are temperature-scaled as fitted on their validation parcels (``calibrate``)."""
    from cropmap.models.calibration import scale
    from cropmap.pipeline.levels.series_models import predict_samples

    if name == "psetae":
        proba, meta, keep = predict_parcels(model_dir, samples, device)
        full = np.zeros((len(samples), proba.shape[1]), np.float32)
        full[keep] = proba
        return full, meta["classes"]
    keep = np.nonzero(means.lengths > 0)[0]
    proba, meta, aligned = predict_samples(model_dir, means.subset(keep), device)
    t = float((meta.get("calibration") or {}).get("temperature", 1.0))
    if calibrate and t != 1.0:
        proba = scale(proba, t)
    pos = {pid: i for i, pid in enumerate(samples.table["parcel_id"])}
    full = np.zeros((len(samples), proba.shape[1]), np.float32)
    full[[pos[p] for p in aligned.table["sample_id"]]] = proba
    return full, meta["classes"]
