"""Pretrain: self-supervised pre-training of a model's encoder on unlabelled pixel series.

Used by ``cropmap pretrain --method moco`` (any sample store or long table; labels, if any, are
ignored) and by the ``pretrain`` stage of ``cropmap run`` (a sample of the site's pixels). The
result is an encoder directory (``cropmap.encoder/1``) that ``cropmap train --pretrained`` and
the ``train`` stage load: it fixes the model, its options, the bands and the normalisation.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import cropmap
from cropmap.models import ddp
from cropmap.models.checkpoint import save_encoder
from cropmap.models.pretrain.moco import MoCoConfig, pretrain_moco
from cropmap.models.registry import build_model, model_names
from cropmap.models.series import band_statistics
from cropmap.models.training import resolve_device
from cropmap.pipeline.errors import ModelError, SamplesError
from cropmap.pipeline.levels.pixel.train import as_series, epoch_logger, work_dir_for, write_directory
from cropmap.pipeline.samples import PixelSamples

log = logging.getLogger(__name__)

METHODS = ("moco",)


def pretrain_encoder(samples: PixelSamples, out_dir: Path, *, method: str = "moco", model_name: str = "stnet",
                     model_options: dict | None = None, config: MoCoConfig | None = None,
                     on_epoch: Callable[[dict], None] | None = None, on_batch: Callable[[int], None] | None = None,
                     extra_meta: dict | None = None, normalisation: tuple | None = None) -> dict:
    """Pre-train ``model_name``'s encoder on ``samples`` and write the encoder directory ``out_dir`` atomically.

    ``normalisation`` (band means, stds) replaces the statistics of ``samples`` (e.g. those of a
    benchmark's training split, so pre-trained and from-scratch models normalise alike)."""
    if method not in METHODS:
        raise ModelError(f"unknown pre-training method {method!r}", fix=f"choose one of: {', '.join(METHODS)}")
    if model_name not in model_names("pixel"):
        raise ModelError(f"unknown model {model_name!r}", fix=f"choose one of: {', '.join(model_names('pixel'))}")
    if model_name == "presto-embed":
        raise ModelError("presto-embed keeps the published Presto encoder frozen: there is nothing to pre-train",
                         fix="use --model presto (self-supervised pre-training from the published weights)")
    cfg = config or MoCoConfig()
    try:
        cfg.device = resolve_device(cfg.device)
    except RuntimeError as exc:
        raise ModelError(str(exc), fix="use --device cpu, or install a CUDA build of torch") from None
    series = as_series(samples)
    if int((series.lengths > 0).sum()) < 4:
        raise SamplesError(f"only {int((series.lengths > 0).sum())} series with observations", fix="pass more (unlabelled) samples")
    mean, std = band_statistics(series) if normalisation is None else (np.asarray(v, np.float32) for v in normalisation)
    torch.manual_seed(cfg.seed)
    try:
        model, model_config = build_model(model_name, bands=samples.bands, n_classes=1, mean=mean.tolist(), std=std.tolist(),
                                          **(model_options or {}))
    except (TypeError, ValueError) as exc:
        raise ModelError(f"invalid options {model_options} for model {model_name!r}: {exc}", fix="fix the model options") from None
    if getattr(model, "embed_dim", None) is None:
        raise ModelError(f"model {model_name!r} exposes no embedding to pre-train", fix="pre-train another model")
    work = work_dir_for(out_dir)
    main = ddp.current().is_main  # under torchrun only rank 0 logs and writes
    if main:
        shutil.rmtree(work, ignore_errors=True)
    ddp.barrier()
    tlog, log_epoch = epoch_logger(work, on_epoch) if main else (None, None)
    try:
        result = pretrain_moco(model, series, mean, std, cfg, on_epoch=log_epoch, on_batch=on_batch)
    except ValueError as exc:
        raise SamplesError(str(exc), fix="pass more samples") from None
    finally:
        if tlog is not None:
            tlog.close()
    meta = {
        "model": model_name,
        "model_config": model_config,
        "bands": list(samples.bands),
        "normalisation": {"mean": mean.tolist(), "std": std.tolist(), "units": "reflectance (S2), dB (S1)"},
        "max_len": cfg.view_length,
        "time_axis": "days since 1 January of the season year",
        "pretrain": {"method": method, "config": dataclasses.asdict(cfg), "best_epoch": result.best_epoch,
                     "epochs_run": len(result.history), "seconds": round(result.seconds, 2), "queue_size": result.queue_size,
                     "n_train": result.n_train, "n_val": result.n_val,
                     "best_val_infonce": min((r["val_infonce"] for r in result.history if "val_infonce" in r), default=None)},
        "cropmap_version": cropmap.__version__,
        "torch_version": torch.__version__,
        **(extra_meta or {}),
    }
    if main:
        write_directory(out_dir, work, lambda tmp: save_encoder(tmp, model, meta), result.history)
    ddp.barrier()
    return meta
