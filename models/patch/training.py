"""Training loop of the patch (segmentation) models.

Targets are class indices (N, H, W) with ``-1`` = void: never in the loss, never in the metrics
(the caller decides what is void: no label, no observation, and background under the ``void``
policy). Cross-entropy (optionally class-weighted), Adam, gradient clipping, flips and 90-degree
rotations applied to inputs, valid masks and targets together. With validation patches the kept
weights are those of the best validation overall accuracy (STCLN's protocol); without, the last.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from cropmap.models.training import LoopConfig, RunningMean, optimizer_step

__all__ = ["PatchFitConfig", "PatchFitResult", "fit_patches", "predict_patch_proba"]

VOID = -1


@dataclasses.dataclass
class PatchFitConfig(LoopConfig):
    epochs: int = 30
    batch_size: int = 4
    grad_clip: float = 5.0
    augment: bool = True


@dataclasses.dataclass
class PatchFitResult:
    history: list[dict]
    best_epoch: int
    seconds: float


def _weights(y: np.ndarray, n_classes: int, mode: str) -> torch.Tensor | None:
    if mode == "none":
        return None
    counts = np.bincount(y[y >= 0].ravel(), minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / n_classes, 0.0)
    if mode == "sqrt":
        w = np.sqrt(w)
    w = w / w[counts > 0].mean() if (counts > 0).any() else np.ones(n_classes)
    return torch.tensor(w, dtype=torch.float32)


def _augment(xb, vb, yb, rng: np.random.Generator):
    out = ([], [], [])
    for i in range(xb.shape[0]):
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        for dst, a in zip(out, (xb[i], vb[i], yb[i])):
            if flip:
                a = a.flip(-1)
            dst.append(torch.rot90(a, k, (-2, -1)))
    return tuple(torch.stack(o) for o in out)


def predict_patch_proba(model: nn.Module, x: np.ndarray, days: np.ndarray, valid: np.ndarray, batch_size: int = 4,
                        device: str = "cpu", origins: list[tuple[int, int]] | None = None) -> np.ndarray:
    """Class probabilities (N, K, H, W) float32; ``origins`` place each patch on the global grid (STA windows)."""
    model.eval()
    outs = []
    with torch.no_grad():
        for s in range(0, len(x), batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(x[s:s + batch_size])).to(device)
            db = torch.from_numpy(np.ascontiguousarray(days[s:s + batch_size])).to(device)
            vb = torch.from_numpy(np.ascontiguousarray(valid[s:s + batch_size])).to(device)
            if origins is None or len({tuple(o) for o in origins[s:s + batch_size]}) <= 1:
                o = (0, 0) if origins is None else tuple(origins[s])
                outs.append(torch.softmax(model(xb, db, vb, o), 1).cpu().numpy())
            else:
                for i in range(len(xb)):
                    outs.append(torch.softmax(model(xb[i:i + 1], db[i:i + 1], vb[i:i + 1], tuple(origins[s + i])), 1).cpu().numpy())
    return np.concatenate(outs).astype(np.float32)


def fit_patches(model: nn.Module, x: np.ndarray, days: np.ndarray, valid: np.ndarray, y: np.ndarray, n_classes: int, cfg: PatchFitConfig,
                val: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
                on_epoch: Callable[[dict], None] | None = None) -> PatchFitResult:
    """Train ``model`` on patches ``x`` (N, T, C, H, W) with targets ``y`` (N, H, W) int64 (-1 void)."""
    if len(x) == 0 or not (y >= 0).any():
        raise ValueError("no labelled pixel to train on")
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    dev = torch.device(cfg.device)
    model.to(dev)
    w = _weights(y, n_classes, cfg.class_weighting)
    loss_fn = nn.CrossEntropyLoss(weight=None if w is None else w.to(dev), ignore_index=VOID)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    t0 = time.perf_counter()
    history, best, best_state, best_epoch = [], -1.0, None, cfg.epochs
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        perm = rng.permutation(len(x))
        running = RunningMean()
        for s in range(0, len(perm), cfg.batch_size):
            idx = np.sort(perm[s:s + cfg.batch_size])
            xb, db = torch.from_numpy(x[idx]).to(dev), torch.from_numpy(days[idx]).to(dev)
            vb, yb = torch.from_numpy(valid[idx]).to(dev), torch.from_numpy(y[idx]).to(dev)
            if cfg.augment:
                xb, vb, yb = _augment(xb, vb, yb, rng)
            running.add(optimizer_step(opt, loss_fn(model(xb, db, vb), yb), cfg.grad_clip, model.parameters()), len(idx))
        row = {"epoch": epoch, "train_loss": running.mean}
        if val is not None and (val[3] >= 0).any():
            proba = predict_patch_proba(model, val[0], val[1], val[2], cfg.batch_size, cfg.device)
            keep = val[3] >= 0
            row["val_overall_accuracy"] = float((proba.argmax(1)[keep] == val[3][keep]).mean())
            if row["val_overall_accuracy"] > best:
                best, best_epoch = row["val_overall_accuracy"], epoch
                best_state = copy.deepcopy(model.state_dict())
        history.append(row)
        if on_epoch:
            on_epoch(row)
    if best_state is not None:
        model.load_state_dict(best_state)
    return PatchFitResult(history, best_epoch, time.perf_counter() - t0)
