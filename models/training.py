"""Training and inference loops, model-agnostic (CPU or CUDA).

:func:`fit` trains with Adam and class-weighted cross-entropy (or focal loss) on randomly
subsampled series, keeps the weights of the best validation epoch (macro F1, then loss) and
stops early after ``patience`` epochs without improvement; without a validation set it trains
all epochs. Batches are built by a background thread while the model computes. On CUDA it uses
bfloat16 autocast and (optionally) ``torch.compile``. With a ``checkpoint`` path it saves its
whole state after every epoch (weights-only ``torch.save``) and resumes from it after a crash.
:func:`predict_proba` is deterministic (evenly spaced observations, eval mode).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cropmap.models import ddp
from cropmap.models.metrics import classification_metrics
from cropmap.models.series import Augment, Series, interleaved_views, make_batch, missing_band_patterns, pad_batch

log = logging.getLogger(__name__)

LOSSES = ("ce", "focal")


@dataclass
class LoopConfig:
    """What every training loop here is configured by; each level's config adds its own fields and defaults
    (:class:`FitConfig` pixels, :class:`~cropmap.models.parcel.training.ParcelFitConfig`,
    :class:`~cropmap.models.patch.training.PatchFitConfig`)."""

    epochs: int = 40
    batch_size: int = 256
    lr: float = 1e-3
    seed: int = 0
    device: str = "cpu"
    class_weighting: str = "sqrt"
    """``sqrt`` (inverse square-root frequency), ``balanced`` (inverse frequency) or ``none``."""


@dataclass
class FitConfig(LoopConfig):
    """The pixel models' training (:func:`fit`)."""

    weight_decay: float = 1e-4
    max_len: int = 64
    patience: int = 10
    loss: str = "ce"
    """``ce`` (cross-entropy) or ``focal`` (focal loss, ``focal_gamma``; as in PSE-TSA)."""
    focal_gamma: float = 1.0
    label_smoothing: float = 0.0
    freeze_encoder: bool = False
    """Train only the ``decoder`` of the model (a frozen, e.g. pre-trained, encoder: linear probing)."""
    amp: bool = True
    """bfloat16 autocast on CUDA (ignored on CPU)."""
    compile: bool = True
    """``torch.compile`` the model on CUDA (falls back to eager if compilation fails); ignored on CPU."""
    augment: Augment = field(default_factory=Augment)


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0
    resumed_from: int = 0
    world_size: int = 1
    """Data-parallel ranks that trained (torchrun); their weights were checked identical at the end."""


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CUDA was requested but torch sees no CUDA device")
    return device


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, clip: float | None = None,
                   params: Iterable[torch.nn.Parameter] | None = None) -> float:
    """One optimisation step of every training loop here (pixel, parcel, patch, MoCo, masked): zero the
    gradients, backpropagate ``loss``, clip the gradient norm of ``params`` to ``clip`` when given, step.
    Returns the loss value."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    return loss.item()


class RunningMean:
    """Sample-weighted mean of per-batch losses over an epoch."""

    def __init__(self) -> None:
        self.total, self.n = 0.0, 0

    def add(self, value: float, n: int) -> None:
        self.total += value * n
        self.n += n

    @property
    def mean(self) -> float:
        return self.total / max(self.n, 1)


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


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): cross-entropy scaled by ``(1 - p_true) ** gamma``, optionally class-weighted."""

    def __init__(self, gamma: float = 1.0, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"focal gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.register_buffer("weight", weight if weight is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits.float(), dim=-1).gather(1, target[:, None]).squeeze(1)
        loss = -((1 - logp.exp()) ** self.gamma) * logp
        if self.weight is not None:
            w = self.weight[target]
            return (loss * w).sum() / w.sum().clamp_min(1e-12)
        return loss.mean()


def make_loss(cfg: FitConfig, weight: torch.Tensor | None) -> nn.Module:
    if cfg.loss == "ce":
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    if cfg.loss == "focal":
        return FocalLoss(cfg.focal_gamma, weight)
    raise ValueError(f"unknown loss {cfg.loss!r} (choose {', '.join(LOSSES)})")


def prefetch(batches: Iterable, depth: int = 2) -> Iterator:
    """Iterate ``batches`` produced by a background thread (``depth`` ahead), so building the next
    batch (numpy indexing, padding, augmentation) overlaps with the model's forward/backward.
    Batches come out in order, so results stay reproducible. Errors are re-raised here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for b in batches:
                while not stop.is_set():
                    try:
                        q.put(b, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put(exc)

    thread = threading.Thread(target=produce, name="cropmap-batches", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def autocast(device: str, enabled: bool):
    """bfloat16 autocast on CUDA; a no-op context elsewhere."""
    if enabled and device.startswith("cuda"):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def maybe_compile(model: nn.Module, device: str, enabled: bool) -> nn.Module:
    """``torch.compile`` on CUDA (dynamic shapes: series lengths vary); the eager model otherwise."""
    if not (enabled and device.startswith("cuda") and hasattr(torch, "compile")):
        return model
    try:
        return torch.compile(model, dynamic=True)
    except Exception as exc:  # noqa: BLE001 - compilation is an optimisation only
        log.warning("torch.compile failed (%s); training in eager mode", exc)
        return model


def trainable_parameters(model: nn.Module, freeze_encoder: bool) -> list[nn.Parameter]:
    if not freeze_encoder:
        return list(model.parameters())
    decoder = getattr(model, "decoder", None)
    if decoder is None:
        raise ValueError(f"{type(model).__name__} has no `decoder`: its encoder cannot be frozen")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in decoder.parameters():
        p.requires_grad_(True)
    return list(decoder.parameters())


def set_train_mode(model: nn.Module, freeze_encoder: bool) -> None:
    """Train mode; with a frozen encoder only the decoder (its BatchNorm statistics stay fixed elsewhere)."""
    if freeze_encoder:
        model.eval()
        model.decoder.train()
    else:
        model.train()


def _data_digest(train: Series, y_train: np.ndarray, val: Series | None, y_val: np.ndarray | None) -> str:
    """A checksum of the training and validation data: a checkpoint resumes only on the same data."""
    h = hashlib.sha256()
    for part in (train.values, train.days, train.offsets, y_train,
                 *((val.values, val.days, val.offsets, y_val) if val is not None and y_val is not None else ())):
        h.update(np.ascontiguousarray(part).tobytes())
    return h.hexdigest()


def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_state(path: Path, signature: dict) -> dict | None:
    """The checkpoint at ``path`` if it belongs to this training (same signature), else None."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged checkpoint is not fatal: start again
        log.warning("ignoring unreadable training checkpoint %s (%s)", path, exc)
        return None
    if state.get("signature") != signature:
        log.warning("ignoring training checkpoint %s: it belongs to another configuration", path)
        return None
    return state


def fit(model: nn.Module, train: Series, y_train: np.ndarray, mean: np.ndarray, std: np.ndarray, cfg: FitConfig,
        val: Series | None = None, y_val: np.ndarray | None = None, n_classes: int | None = None,
        on_epoch: Callable[[dict], None] | None = None, on_batch: Callable[[int], None] | None = None,
        checkpoint: Path | None = None) -> FitResult:
    """Train ``model`` in place (it ends with the best validation epoch's weights).

    ``on_epoch(row)`` gets each epoch's log row; ``on_batch(n)`` the number of samples of each
    step. With ``checkpoint``, the full training state is saved there after every epoch and a
    matching checkpoint found at start is resumed (same data sizes and configuration).
    """
    dctx = ddp.current()  # torchrun: this rank's shard, gradients averaged, rank 0 validates, logs and saves
    device = ddp.rank_device(resolve_device(cfg.device), dctx)
    seed_everything(cfg.seed + dctx.rank)  # per-rank seeds (dropout, augmentation); rank 0's is the single-process seed
    rng = np.random.default_rng(cfg.seed if dctx.rank == 0 else [cfg.seed, dctx.rank])
    n_classes = n_classes or int(y_train.max()) + 1
    model.to(device)
    weight = None
    if cfg.class_weighting != "none":
        weight = torch.from_numpy(class_weights(y_train, n_classes, cfg.class_weighting)).to(device)
    loss_fn = make_loss(cfg, weight).to(device)
    params = trainable_parameters(model, cfg.freeze_encoder)
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    y_t = torch.from_numpy(np.asarray(y_train, np.int64)).to(device)
    augment = cfg.augment
    if augment.band_drop_p > 0 and augment.band_patterns is None:
        augment = dataclasses.replace(augment, band_patterns=missing_band_patterns(train))
    result = FitResult()
    best_key, best_state, bad, start_epoch = None, None, 0, 1
    signature = {"config": repr(dataclasses.replace(cfg, device="")), "data": _data_digest(train, y_train, val, y_val),
                 "n_classes": int(n_classes), "n_params": sum(p.numel() for p in model.parameters())}
    if checkpoint is not None:
        state = _load_state(Path(checkpoint), signature)
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            rng.bit_generator.state = state["rng"]
            torch.set_rng_state(state["torch_rng"])
            best_key = tuple(state["best_key"]) if state["best_key"] is not None else None
            best_state, bad, result.best_epoch = state["best_state"], state["bad"], state["best_epoch"]
            result.history = list(state["history"])
            start_epoch = result.resumed_from = state["epoch"] + 1
            if dctx.rank > 0:  # the checkpoint holds rank 0's random state
                rng = np.random.default_rng([cfg.seed, dctx.rank, start_epoch])
                torch.manual_seed(cfg.seed + dctx.rank + 7919 * start_epoch)
            log.info("resuming training at epoch %d from %s", start_epoch, checkpoint)
    eager = ddp.wrap(model, device) if dctx.enabled else model
    step_model = maybe_compile(eager, device, cfg.compile)
    result.world_size = dctx.world_size
    t0 = time.perf_counter() - (result.history[-1]["seconds"] if result.history else 0.0)

    def batches(order: np.ndarray):
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            if len(idx) < 2:  # BatchNorm needs more than one sample
                continue
            yield idx, make_batch(train, idx, mean, std, cfg.max_len, rng=rng, device=device, augment=augment)

    for epoch in range(start_epoch, cfg.epochs + 1):
        set_train_mode(model, cfg.freeze_encoder)
        order = ddp.shard(np.arange(len(train)), epoch, cfg.seed, dctx) if dctx.enabled else rng.permutation(len(train))
        running = RunningMean()
        for idx, batch in prefetch(batches(order)):
            with autocast(device, cfg.amp):
                try:
                    logits = step_model(**batch)
                except Exception as exc:  # noqa: BLE001 - a compiled graph that fails falls back to eager
                    if step_model is eager:
                        raise
                    log.warning("compiled model failed (%s: %s); training in eager mode", type(exc).__name__, exc)
                    step_model = eager
                    logits = eager(**batch)
            running.add(optimizer_step(opt, loss_fn(logits.float(), y_t[idx])), len(idx))
            if on_batch and dctx.is_main:
                on_batch(len(idx) * dctx.world_size)
        sched.step()
        ddp.sync_buffers(model)
        total, n = ddp.sum_over_ranks(running.total, running.n)
        row = {"epoch": epoch, "train_loss": total / max(n, 1), "lr": opt.param_groups[0]["lr"]}
        if val is not None and len(val) and y_val is not None:
            stats = None
            if dctx.is_main:
                proba = predict_proba(model, val, mean, std, cfg.max_len, cfg.batch_size * 4, device, amp=cfg.amp)
                vl = float(nn.functional.nll_loss(torch.log(torch.from_numpy(proba).clamp_min(1e-8)), torch.from_numpy(np.asarray(y_val, np.int64))))
                m = classification_metrics(y_val, proba.argmax(1), [str(i) for i in range(n_classes)])
                stats = (vl, m["macro_f1"], m["overall_accuracy"])
            vl, f1, oa = ddp.broadcast_object(stats)  # every rank takes rank 0's decision
            row.update(val_loss=vl, val_macro_f1=f1, val_overall_accuracy=oa)
            key = (round(f1, 6), -vl)
            if best_key is None or key > best_key:
                best_key, best_state, bad, result.best_epoch = key, copy.deepcopy(model.state_dict()), 0, epoch
            else:
                bad += 1
        else:
            result.best_epoch = epoch
        row["seconds"] = round(time.perf_counter() - t0, 3)
        result.history.append(row)
        stop = val is not None and bad >= cfg.patience
        if checkpoint is not None and dctx.is_main:
            _save_state(Path(checkpoint), {
                "signature": signature, "epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                "best_key": list(best_key) if best_key is not None else None, "best_state": best_state, "bad": bad,
                "best_epoch": result.best_epoch, "history": result.history,
            })
        if on_epoch and dctx.is_main:
            on_epoch(row)
        if stop:
            log.info("early stop at epoch %d (best %d)", epoch, result.best_epoch)
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    for p in model.parameters():
        p.requires_grad_(True)
    if not ddp.check_identical(model):
        raise RuntimeError(f"data-parallel ranks ended with different weights (rank {dctx.rank} of {dctx.world_size})")
    result.seconds = time.perf_counter() - t0
    return result


@torch.no_grad()
def predict_proba(model: nn.Module, series: Series, mean: np.ndarray, std: np.ndarray, max_len: int,
                  batch_size: int = 1024, device: str | None = None, amp: bool = True) -> np.ndarray:
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
        with autocast(device, amp):
            logits = model(**batch)
        p = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        if out is None:
            out = np.zeros((len(series), p.shape[1]), dtype=np.float64)
        np.add.at(out, owner[start:start + batch_size], p)
    if out is None:
        return np.zeros((0, 0), dtype=np.float32)
    out /= np.bincount(owner, minlength=len(series))[:, None]
    return out.astype(np.float32)
