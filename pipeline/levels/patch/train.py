"""Training, masked pre-training and evaluation of patch models on patch stores (the pipeline side).

Background/void policy (``background``):

* ``void`` (default): label 0 (no parcel of the label source) and pixels without any observation
  are void: never in the loss, never in the metrics; the model predicts crop classes only.
* ``class``: label 0 on observed pixels is a ``background`` class (index 0) that is trained,
  predicted (written as 0 = nodata in the map) and evaluated; unobserved pixels stay void.

Metrics are computed on legend codes (0 = background): ``miou`` excludes background (STCLN's
convention) and ``miou_with_background`` includes it (U-TAE's); under ``void`` both are the same
number because background has no support.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import cropmap
from cropmap.models.metrics import CLASS_SET_RULE, classification_metrics
from cropmap.models.patch.checkpoint import (
    PATCH_MODELS,
    build_patch_model,
    load_patch_model,
    load_patch_weights,
    save_patch_encoder,
    save_patch_model,
)
from cropmap.models.patch.training import VOID, PatchFitConfig, fit_patches, predict_patch_proba
from cropmap.models.pretrain.masked import MaskedConfig, pretrain_masked
from cropmap.models.series import Series
from cropmap.pipeline.errors import ModelError, SamplesError
from cropmap.pipeline.fsio import atomic_path, write_json
from cropmap.pipeline.levels.patch.patches import PatchSet

BACKGROUND_POLICIES = ("void", "class")
BACKGROUND = "background"


def check_patch_model(name: str) -> None:
    if name not in PATCH_MODELS:
        raise ModelError(f"unknown patch model {name!r}", fix=f"choose one of: {', '.join(sorted(PATCH_MODELS))}")


def check_background(policy: str) -> None:
    if policy not in BACKGROUND_POLICIES:
        raise SamplesError(f"unknown background policy {policy!r}", fix=f"use one of: {', '.join(BACKGROUND_POLICIES)}")


def band_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-band mean and std over observed values of x (N, T, C, H, W); all-missing bands get 0 / 1."""
    c = x.shape[2]
    v = np.moveaxis(x, 2, 0).reshape(c, -1)
    mean, std = [], []
    for row in v:
        ok = row[~np.isnan(row)]
        mean.append(float(ok.mean()) if ok.size else 0.0)
        std.append(float(ok.std()) if ok.size > 1 and ok.std() > 0 else 1.0)
    return mean, std


def class_table(ps: PatchSet, idx, background: str) -> list[dict]:
    """Classes of the model: [background,] the legend codes present in the training patches."""
    check_background(background)
    codes = sorted(int(c) for c in np.unique(ps.labels[np.asarray(idx, np.int64)]) if c > 0)
    if not codes:
        raise SamplesError("the training patches hold no labelled pixel", fix="use more patches or another split seed")
    classes = [{"label": 0, "name": BACKGROUND}] if background == "class" else []
    classes += [{"label": c, "name": ps.class_names.get(c, str(c))} for c in codes]
    return [{**c, "index": i} for i, c in enumerate(classes)]


def encode_targets(labels: np.ndarray, valid: np.ndarray, classes: list[dict], background: str) -> np.ndarray:
    """Class indices (N, H, W) int64, VOID where unobserved, unlabelled (``void`` policy) or a class the model lacks."""
    lut = np.full(256, VOID, np.int64)
    for c in classes:
        lut[int(c["label"])] = int(c["index"])
    y = lut[labels]
    y[~valid.any(1)] = VOID
    if background == "void":
        y[labels == 0] = VOID
    return y


def train_patch_model(ps: PatchSet, train_idx, val_idx, out_dir: Path, *, model_name: str, model_options: dict | None = None,
                      fit_config: PatchFitConfig | None = None, background: str = "void", pretrained: Path | None = None,
                      extra_meta: dict | None = None, extra_files: dict | None = None,
                      on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Train a patch model on ``ps[train_idx]`` (validation: ``val_idx``) and write its directory atomically."""
    check_patch_model(model_name)
    cfg = fit_config or PatchFitConfig()
    if ps.labels is None:
        raise SamplesError("the patch store has no labels", fix="train on a labelled patch store")
    train_idx, val_idx = np.asarray(train_idx, np.int64), np.asarray(val_idx, np.int64)
    classes = class_table(ps, train_idx, background)
    options = dict(model_options or {})
    state = None
    if pretrained is not None:
        try:
            state, pmeta = load_patch_weights(pretrained)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"{str(pretrained)!r} is not a patch model or encoder directory ({exc})",
                             fix="pass the --out of `cropmap pretrain --method masked`") from None
        if pmeta["model"] != model_name:
            raise ModelError(f"the pre-trained encoder is a {pmeta['model']!r}, not a {model_name!r}", fix=f"use --model {pmeta['model']}")
        if pmeta["bands"] != ps.bands:
            raise ModelError(f"the pre-trained encoder has bands {pmeta['bands']}, the patches {ps.bands}", fix="pre-train on the same bands")
        mc = pmeta["model_config"]
        options = {k: v for k, v in mc.items() if k not in ("n_bands", "n_classes", "band_names", "mean", "std")}
        mean, std = mc["mean"], mc["std"]
    else:
        mean, std = band_stats(ps.x[train_idx])
    torch.manual_seed(cfg.seed)
    try:
        model, model_config = build_patch_model(model_name, bands=ps.bands, n_classes=len(classes), mean=mean, std=std, **options)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"invalid options {options} for model {model_name!r}: {exc}", fix="fix the model options") from None
    if state is not None:
        enc = {k: v for k, v in state.items() if not k.startswith("decoder.")}
        missing, unexpected = model.load_state_dict(enc, strict=False)
        bad = [k for k in missing if not k.startswith("decoder.")]
        if bad or unexpected:
            raise ModelError(f"the pre-trained weights do not fit {model_name!r} (missing {bad[:3]}, unexpected {list(unexpected)[:3]})",
                             fix="pre-train with the same model options")
    y = encode_targets(ps.labels, ps.valid, classes, background)
    val = (ps.x[val_idx], ps.days[val_idx], ps.valid[val_idx], y[val_idx]) if len(val_idx) else None
    try:
        result = fit_patches(model, ps.x[train_idx], ps.days[train_idx], ps.valid[train_idx], y[train_idx], len(classes), cfg, val, on_epoch)
    except ValueError as exc:
        raise SamplesError(str(exc), fix="use more labelled patches") from None
    meta = {
        "model": model_name,
        "model_config": model_config,
        "bands": list(ps.bands),
        "normalisation": {"mean": list(mean), "std": list(std), "units": "reflectance (S2), dB (S1)"},
        "classes": classes,
        "background": background,
        "time_axis": "days since 1 January of the season year",
        "pretrained": str(pretrained) if pretrained is not None else None,
        "fit": {"config": dataclasses.asdict(cfg), "best_epoch": result.best_epoch, "epochs_run": len(result.history),
                "seconds": round(result.seconds, 2), "history": result.history},
        "data": {"n_train_patches": int(len(train_idx)), "n_val_patches": int(len(val_idx)),
                 "n_train_pixels": int((y[train_idx] >= 0).sum())},
        "n_parameters": int(sum(p.numel() for p in model.parameters())),
        "cropmap_version": cropmap.__version__,
        "torch_version": torch.__version__,
        **(extra_meta or {}),
    }
    with atomic_path(Path(out_dir), is_dir=True) as tmp:
        save_patch_model(tmp, model.cpu(), meta)
        for name, doc in (extra_files or {}).items():
            write_json(tmp / name, doc)
    return meta


def pretrain_patch_encoder(ps: PatchSet, out_dir: Path, *, model_name: str = "stcln", model_options: dict | None = None,
                           config: MaskedConfig | None = None, extra_meta: dict | None = None,
                           on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Masked spatiotemporal pre-training of an STCLN on unlabelled patches; writes an encoder directory atomically."""
    if model_name != "stcln":
        raise ModelError(f"masked pre-training needs the STCLN reconstruction head, not model {model_name!r}", fix="use --model stcln")
    cfg = config or MaskedConfig()
    if len(ps) < 2:
        raise SamplesError(f"only {len(ps)} patch(es) to pre-train on", fix="pass more unlabelled patches")
    mean, std = band_stats(ps.x)
    torch.manual_seed(cfg.seed)
    try:
        model, model_config = build_patch_model(model_name, bands=ps.bands, n_classes=1, mean=mean, std=std, **(model_options or {}))
    except (TypeError, ValueError) as exc:
        raise ModelError(f"invalid options {model_options} for model {model_name!r}: {exc}", fix="fix the model options") from None
    try:
        result = pretrain_masked(model, ps.x, ps.days, ps.valid, ps.vegetated, cfg, on_epoch)
    except ValueError as exc:
        raise SamplesError(str(exc), fix="check --mask-ratio / --gate and pass more patches") from None
    gated = None
    if cfg.gate is not None:
        gated = round(float((np.nan_to_num(ps.vegetated, nan=-1) > cfg.gate).sum() / max(1, (ps.valid.any((2, 3))).sum())), 4)
    meta = {
        "model": model_name,
        "model_config": model_config,
        "bands": list(ps.bands),
        "normalisation": {"mean": mean, "std": std, "units": "reflectance (S2), dB (S1)"},
        "time_axis": "days since 1 January of the season year",
        "pretrain": {"method": "masked", "config": dataclasses.asdict(cfg), "best_epoch": result.best_epoch,
                     "epochs_run": len(result.history), "seconds": round(result.seconds, 2), "n_train": result.n_train,
                     "n_val": result.n_val, "maskable_date_fraction": gated, "history": result.history},
        "cropmap_version": cropmap.__version__,
        "torch_version": torch.__version__,
        **(extra_meta or {}),
    }
    with atomic_path(Path(out_dir), is_dir=True) as tmp:
        save_patch_encoder(tmp, model.cpu(), meta)
    return meta


def segmentation_metrics(codes_true: np.ndarray, codes_pred: np.ndarray, keep: np.ndarray, names: dict[int, str], evaluated: list[int]) -> dict:
    """Metrics on legend codes (0 = background) of the pixels ``keep``, under the runs' class-set rule
    (:data:`cropmap.models.metrics.CLASS_SET_RULE`: the union of the crop classes in the reference and
    in the predictions, a predicted class absent from the reference counting with F1 = IoU = 0);
    background (code 0) is left out of ``miou``/``macro_f1`` and counted in the ``*_with_background``
    figures. ``evaluated`` (the test crop codes) is accepted for older callers and does not restrict the average."""
    k = max([*names, int(codes_true[keep].max(initial=0)), int(codes_pred[keep].max(initial=0))]) + 1
    class_names = [BACKGROUND if c == 0 else names.get(c, str(c)) for c in range(k)]
    yt, yp = codes_true[keep].astype(np.int64), codes_pred[keep].astype(np.int64)
    m = classification_metrics(yt, yp, class_names, labels=list(range(1, k)))  # classes absent from both drop out
    with_bg = classification_metrics(yt, yp, class_names)
    m["miou_with_background"] = with_bg["miou"]
    m["macro_f1_with_background"] = with_bg["macro_f1"]
    m["class_set_rule"] = CLASS_SET_RULE + "; background (code 0) excluded except in the *_with_background figures"
    return m


def predict_codes(model_dir: Path, ps: PatchSet, device: str = "cpu", batch_size: int = 4) -> tuple[np.ndarray, np.ndarray, dict]:
    """Predicted legend codes (N, H, W) (0 = background) and probabilities (N, K, H, W) of a patch model on ``ps``."""
    try:
        model, meta = load_patch_model(model_dir, device)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{str(model_dir)!r} is not a trained patch model ({exc})", fix="pass the --out of `cropmap train --model stcln|utae`") from None
    if meta["bands"] != ps.bands:
        raise ModelError(f"the model has bands {meta['bands']}, the patches {ps.bands}", fix="use patches built with the model's bands")
    proba = predict_patch_proba(model, ps.x, ps.days, ps.valid, batch_size, device,
                                origins=[(int(r), int(c)) for r, c in zip(ps.table["row"], ps.table["col"])])
    lut = np.array([int(c["label"]) for c in meta["classes"]], np.uint8)
    return lut[proba.argmax(1)], proba, meta


def evaluate_patch_model(model_dir: Path, ps: PatchSet, idx=None, device: str = "cpu", background: str | None = None) -> dict:
    """Metrics of a patch model on ``ps[idx]`` under its background policy (or ``background``)."""
    if ps.labels is None:
        raise SamplesError("the patch store has no labels", fix="evaluate on a labelled patch store")
    sub = ps if idx is None else ps.subset(idx)
    codes, _, meta = predict_codes(model_dir, sub, device)
    policy = background or meta.get("background", "void")
    keep = sub.valid.any(1)
    if policy == "void":
        keep &= sub.labels > 0
    if not keep.any():
        raise SamplesError("no evaluable pixel in these patches", fix="evaluate on labelled patches")
    evaluated = sorted(int(c) for c in np.unique(sub.labels[keep]) if c > 0)
    m = segmentation_metrics(sub.labels, codes, keep, sub.class_names, evaluated)
    m["background_policy"] = policy
    return m


def pixel_series(ps: PatchSet, idx, pixel_mask: np.ndarray | None = None, max_pixels: int | None = None,
                 seed: int = 0) -> tuple[Series, np.ndarray, np.ndarray]:
    """Per-pixel series of patches ``idx`` (for the random-forest baseline): Series, (patch, row, col) of each."""
    idx = np.asarray(idx, np.int64)
    sel = ps.valid[idx].any(1) if pixel_mask is None else pixel_mask[idx] & ps.valid[idx].any(1)
    where = np.argwhere(sel)  # (P, 3): patch (local), row, col
    if max_pixels is not None and len(where) > max_pixels:
        where = where[np.sort(np.random.default_rng(seed).choice(len(where), max_pixels, replace=False))]
    n, r, c = where[:, 0], where[:, 1], where[:, 2]
    vals = ps.x[idx[n], :, :, r, c]  # (P, T, C)
    v = ps.valid[idx[n], :, r, c]  # (P, T)
    days = np.broadcast_to(ps.days[idx[n]], v.shape)
    offsets = np.concatenate([[0], np.cumsum(v.sum(1))]).astype(np.int64)
    return Series(vals[v].astype(np.float32), days[v].astype(np.float32), offsets), idx[n], where


def seed_threads(n_seeds: int, cores: int | None = None) -> tuple[int, int]:
    """(worker processes, torch threads each) for training ``n_seeds`` split seeds on ``cores`` cores.

    One torch thread per process: these models are small (a 4-patch batch is ~1k short sequences),
    so intra-op threads gain little, and on a shared machine an OpenMP thread waiting for a busy
    core stalls every op (measured: an STCLN step took 0.51 s with 1 thread and 4.9 s with 2 on
    the loaded 2-core machine). Seeds are independent: one process per core."""
    import os

    cores = cores or os.cpu_count() or 1
    return max(1, min(n_seeds, cores)), 1


def train_seed_with_forest(ps: PatchSet, seed: int, split: dict, budget: list[int], model_dir: Path, forest_path: Path, *,
                           model_name: str, model_options: dict, fit_config: PatchFitConfig, background: str,
                           pretrained: Path | None, extra_meta: dict, rf_pixels: int, threads: int | None = None,
                           on_epoch: Callable[[dict], None] | None = None) -> dict:
    """One split seed of the patch_train stage: the model, then the per-pixel random forest and gradient
    boosting on (a sample of) the same training pixels predicting every test pixel (``boosting-seed-N.npz``
    beside ``forest_path``). Runs in a worker process or in the caller."""
    from cropmap.models.forest import binned_features, make_forest

    if threads:
        torch.set_num_threads(threads)
    meta = train_patch_model(ps, budget, split["val"], model_dir, model_name=model_name, model_options=model_options,
                             fit_config=fit_config, background=background, pretrained=pretrained,
                             extra_files={"split.json": {**split, "budget": budget}}, extra_meta=extra_meta, on_epoch=on_epoch)
    classes = class_table(ps, budget, background)
    y = encode_targets(ps.labels, ps.valid, classes, background)
    series, pidx, where = pixel_series(ps, budget, y >= 0, rf_pixels, seed)
    forest = make_forest(seed, n_jobs=1 if threads else -1, n_estimators=200).fit(binned_features(series), y[pidx, where[:, 1], where[:, 2]])
    test = np.asarray(split["test"], np.int64)
    tseries, tidx, twhere = pixel_series(ps, test)
    codes = np.zeros((len(test), *ps.labels.shape[1:]), np.uint8)
    lut = np.array([c["label"] for c in classes], np.uint8)
    pos = {int(p): i for i, p in enumerate(test)}
    codes[[pos[int(p)] for p in tidx], twhere[:, 1], twhere[:, 2]] = lut[forest.classes_[forest.predict_proba(binned_features(tseries)).argmax(1)]]
    with atomic_path(forest_path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, test=test, codes=codes)
    # gradient boosting on the same training pixels (early stopping on pixels of the validation patches)
    from cropmap.models.boosting import fit_boosting

    val = np.asarray(split["val"], np.int64)
    vseries, vidx, vwhere = pixel_series(ps, val, y >= 0, rf_pixels, seed) if len(val) else (None, None, None)
    boost = fit_boosting(binned_features(series), y[pidx, where[:, 1], where[:, 2]],
                         binned_features(vseries) if vseries is not None else None,
                         y[vidx, vwhere[:, 1], vwhere[:, 2]] if vseries is not None else None, seed=seed)
    bcodes = np.zeros_like(codes)
    bcodes[[pos[int(p)] for p in tidx], twhere[:, 1], twhere[:, 2]] = lut[boost.classes_[boost.predict_proba(binned_features(tseries)).argmax(1)]]
    with atomic_path(forest_path.with_name(forest_path.name.replace("forest-", "boosting-"))) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, test=test, codes=bcodes)
    return {"n_train_patches": len(budget), "n_val_patches": len(split["val"]), "n_test_patches": len(split["test"]),
            "best_epoch": meta["fit"]["best_epoch"], "seconds": meta["fit"]["seconds"], "n_parameters": meta["n_parameters"]}
