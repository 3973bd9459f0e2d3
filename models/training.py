"""Training and inference loops, model-agnostic (CPU or CUDA).

:func:`fit` trains with Adam and class-weighted cross-entropy on randomly subsampled series,
keeps the weights of the best validation epoch (macro F1, then loss) and stops early after
``patience`` epochs without improvement; without a validation set it trains all epochs.
:func:`predict_proba` is deterministic (evenly spaced observations, eval mode).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from .metrics import classification_metrics
from .series import Augment, Series, interleaved_views, make_batch, missing_band_patterns, pad_batch

log = logging.getLogger(__name__)


@dataclass
class FitConfig:
    epochs: int = 40
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    max_len: int = 64
    patience: int = 10
    seed: int = 0
    device: str = "cpu"
    class_weighting: str = "sqrt"
    """``sqrt`` (inverse square-root frequency), ``balanced`` (inverse frequency) or ``none``."""
    label_smoothing: float = 0.0
    augment: Augment = field(default_factory=Augment)


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CUDA was requested but torch sees no CUDA device")
    return device


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def class_weights(y: np.ndarray, n_classes: int, mode: str = "sqrt") -> np.ndarray:
    """Inverse (``balanced``) or inverse square-root (``sqrt``) frequency weights, mean 1 over present classes."""
    if mode not in ("sqrt", "balanced"):
        raise ValueError(f"unknown class weighting {mode!r}")
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    inv = 1.0 / np.maximum(counts, 1)
    w = np.where(counts > 0, np.sqrt(inv) if mode == "sqrt" else inv, 0.0)
    present = counts > 0
    return (w / w[present].mean()).astype(np.float32)


def fit(model: nn.Module, train: Series, y_train: np.ndarray, mean: np.ndarray, std: np.ndarray, cfg: FitConfig,
        val: Series | None = None, y_val: np.ndarray | None = None, n_classes: int | None = None,
        on_epoch: Callable[[dict], None] | None = None) -> FitResult:
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    n_classes = n_classes or int(y_train.max()) + 1
    model.to(device)
    weight = None
    if cfg.class_weighting != "none":
        weight = torch.from_numpy(class_weights(y_train, n_classes, cfg.class_weighting)).to(device)
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    y_t = torch.from_numpy(np.asarray(y_train, np.int64)).to(device)
    augment = cfg.augment
    if augment.band_drop_p > 0 and augment.band_patterns is None:
        augment = dataclasses.replace(augment, band_patterns=missing_band_patterns(train))
    result = FitResult()
    best_key, best_state, bad = None, None, 0
    t0 = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = rng.permutation(len(train))
        total, n = 0.0, 0
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            if len(idx) < 2:  # BatchNorm needs more than one sample
                continue
            batch = make_batch(train, idx, mean, std, cfg.max_len, rng=rng, device=device, augment=augment)
            logits = model(**batch)
            loss = loss_fn(logits, y_t[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            n += len(idx)
        sched.step()
        row = {"epoch": epoch, "train_loss": total / max(n, 1), "lr": opt.param_groups[0]["lr"]}
        if val is not None and len(val) and y_val is not None:
            proba = predict_proba(model, val, mean, std, cfg.max_len, cfg.batch_size * 4, device)
            vl = float(nn.functional.nll_loss(torch.log(torch.from_numpy(proba).clamp_min(1e-8)), torch.from_numpy(np.asarray(y_val, np.int64))))
            m = classification_metrics(y_val, proba.argmax(1), [str(i) for i in range(n_classes)])
            row.update(val_loss=vl, val_macro_f1=m["macro_f1"], val_overall_accuracy=m["overall_accuracy"])
            key = (round(m["macro_f1"], 6), -vl)
            if best_key is None or key > best_key:
                best_key, best_state, bad, result.best_epoch = key, copy.deepcopy(model.state_dict()), 0, epoch
            else:
                bad += 1
        else:
            result.best_epoch = epoch
        result.history.append(row)
        if on_epoch:
            on_epoch(row)
        if val is not None and bad >= cfg.patience:
            log.info("early stop at epoch %d (best %d)", epoch, result.best_epoch)
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    result.seconds = time.perf_counter() - t0
    return result


@torch.no_grad()
def predict_proba(model: nn.Module, series: Series, mean: np.ndarray, std: np.ndarray, max_len: int,
                  batch_size: int = 1024, device: str | None = None) -> np.ndarray:
    """Class probabilities (N, K), deterministic.

    A series longer than ``max_len`` is cut into interleaved views that together cover all its
    observations (:func:`~cropmap.models.series.interleaved_views`); their probabilities are averaged.
    """
    device = resolve_device(device)
    model.to(device).eval()
    owner, picks = [], []
    for i in range(len(series)):
        for view in interleaved_views(int(series.lengths[i]), max_len):
            owner.append(i)
            picks.append(series.offsets[i] + view)
    owner = np.asarray(owner, dtype=np.int64)
    out = None
    for start in range(0, len(picks), batch_size):
        batch = pad_batch(series, picks[start:start + batch_size], mean, std, device)
        p = torch.softmax(model(**batch).float(), dim=-1).cpu().numpy()
        if out is None:
            out = np.zeros((len(series), p.shape[1]), dtype=np.float64)
        np.add.at(out, owner[start:start + batch_size], p)
    if out is None:
        return np.zeros((0, 0), dtype=np.float32)
    out /= np.bincount(owner, minlength=len(series))[:, None]
    return out.astype(np.float32)
