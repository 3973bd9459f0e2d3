"""Training and inference loops of parcel models (PSE-TSA and its fusion variants), CPU or CUDA.

Adam, cross-entropy or focal loss (gamma 1 in the study), optional class weighting; each epoch
draws a fresh random pixel sample per parcel. With a validation set the weights of the best
validation mIoU are kept (the study's criterion) and training stops after ``patience`` epochs
without improvement; without one every epoch is trained and the last weights kept. Prediction is
deterministic (all stored pixels, eval mode).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from cropmap.models.metrics import classification_metrics
from cropmap.models.parcel.batch import ParcelSets, make_batch
from cropmap.models.training import FocalLoss, LoopConfig, RunningMean, class_weights, optimizer_step


@dataclass
class ParcelFitConfig(LoopConfig):
    epochs: int = 60
    batch_size: int = 128
    class_weighting: str = "none"
    weight_decay: float = 0.0
    loss: str = "focal"
    focal_gamma: float = 1.0
    sample_pixels: int = 64
    patience: int = 20


@dataclass
class ParcelFitResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0


def _loss(cfg: ParcelFitConfig, weight: torch.Tensor | None) -> nn.Module:
    if cfg.loss == "focal":
        return FocalLoss(cfg.focal_gamma, weight)
    if cfg.loss == "ce":
        return nn.CrossEntropyLoss(weight=weight)
    raise ValueError(f"unknown loss {cfg.loss!r} (choose ce or focal)")


def _to(batch: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def predict_parcel_proba(model: nn.Module, data: ParcelSets, inputs: list[str], norm: dict, geom_norm: dict,
                         device: str = "cpu", batch_size: int = 256) -> np.ndarray:
    """(P, K) class probabilities; deterministic."""
    model.eval()
    out = []
    with torch.no_grad():
        for a in range(0, len(data), batch_size):
            idx = np.arange(a, min(len(data), a + batch_size))
            logits = model(_to(make_batch(data, idx, inputs, norm, geom_norm, data.max_pixels, None), device))
            out.append(torch.softmax(logits.float(), -1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def fit_parcels(model: nn.Module, data: ParcelSets, y: np.ndarray, train_idx: np.ndarray, inputs: list[str], norm: dict,
                geom_norm: dict, cfg: ParcelFitConfig, n_classes: int, val_idx: np.ndarray | None = None,
                on_epoch: Callable[[dict], None] | None = None) -> ParcelFitResult:
    """Train ``model`` on parcels ``train_idx`` of ``data`` (labels ``y``, class indices)."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model.to(cfg.device)
    weight = None
    if cfg.class_weighting != "none":
        weight = torch.as_tensor(class_weights(y[train_idx], n_classes, cfg.class_weighting), device=cfg.device)
    criterion = _loss(cfg, weight).to(cfg.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    result = ParcelFitResult()
    has_val = val_idx is not None and len(val_idx) > 0
    best, best_state, stale = -1.0, None, 0
    train_idx = np.asarray(train_idx)
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = rng.permutation(train_idx)
        # a last batch of one parcel cannot be batch-normalised: fold it into the previous one
        cuts = list(range(0, len(order), cfg.batch_size))
        if len(cuts) > 1 and len(order) - cuts[-1] < 2:
            cuts.pop()
        running = RunningMean()
        for k, a in enumerate(cuts):
            idx = order[a: cuts[k + 1] if k + 1 < len(cuts) else len(order)]
            batch = _to(make_batch(data, idx, inputs, norm, geom_norm, cfg.sample_pixels, rng), cfg.device)
            target = torch.as_tensor(y[idx], device=cfg.device)
            running.add(optimizer_step(opt, criterion(model(batch), target)), len(idx))
        row = {"epoch": epoch, "train_loss": running.mean}
        if has_val:
            proba = predict_parcel_proba(model, data.subset(val_idx), inputs, norm, geom_norm, cfg.device)
            m = classification_metrics(y[val_idx], proba.argmax(1), [str(i) for i in range(n_classes)])
            row.update(val_miou=m["miou"], val_overall_accuracy=m["overall_accuracy"])
            if m["miou"] > best:
                best, best_state, stale, result.best_epoch = m["miou"], copy.deepcopy(model.state_dict()), 0, epoch
            else:
                stale += 1
        result.history.append(row)
        if on_epoch:
            on_epoch(row)
        if has_val and stale >= cfg.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        result.best_epoch = len(result.history)
    result.seconds = time.perf_counter() - t0
    model.eval()
    return result
