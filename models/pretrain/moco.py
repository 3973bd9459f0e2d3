"""MoCo self-supervised pre-training of a pixel time-series encoder (SITS-MoCo).

Two augmented *views* of the same unlabelled pixel series are a positive pair; views of other
pixels, kept in a queue of past keys, are negatives. The query encoder (any registered model's
``encode``) and an MLP projection head learn by InfoNCE; the key encoder and head follow them as
an exponential moving average (``momentum``). After pre-training, the query encoder's weights
initialise a classifier (``cropmap train --pretrained``), fine-tuned or frozen.

The view transforms reproduce the SITS-MoCo recipe (Xu et al. 2024), each a small composable
class so a recipe is a list:

1. :class:`TemporalShift` — with p=0.5 roll the spectra along the series by
   ``round(clip(N(0, 0.3), -1, 1) * 6)`` steps while the dates stay (a shifted phenology);
2. :class:`DateNoise` — each date with p=0.15 gets ``|N(0, 0.5)|`` z-units on all its bands,
   with a random sign per date (cloud +, shadow -);
3. :class:`DropDates` — each date is dropped with p=0.15 (irregular acquisitions);
4. :class:`Resample` — a random sorted draw of ``length`` dates (with replacement when the series
   is shorter), as the original resamples to 70 steps.

Fixes of the original's bugs: the validation loss neither enqueues keys nor updates the key
encoder, and it is computed on views drawn from a fixed seed with the other validation series as
negatives (not the ever-changing queue), so epochs are comparable and early stopping is meaningful.
The queue is capped to half the number of training series (rounded to whole batches): a queue
longer than the data holds stale copies of the query's own pixel as negatives.

Shuffle-BN (MoCo, He et al. 2020, section 3.3): encoders with BatchNorm (STNet, the Transformer
and L-TAE per-date MLPs, TempCNN, InceptionTime) normalise with statistics of the batch. If the
query and key encoders see the *same* batch in train mode, a query can find its positive key
through the shared batch statistics instead of through its content (a "cheating" shortcut that
lowers the InfoNCE without learning features). MoCo's multi-GPU fix shuffles the key batch
across GPUs so each key is normalised with other samples than its query. The single-process
equivalent used here: both batches are cut into ``shuffle_bn_groups`` sub-batches, each encoded
separately (so each has its own BatchNorm statistics); the key batch is randomly permuted before
the cut and un-permuted after, so a query's and its key's sub-batches are different random sets
of series. We chose this over swapping BatchNorm for LayerNorm during pre-training because it
keeps the architecture identical between pre-training and fine-tuning (every BatchNorm weight and
running statistic transfers as it is). Encoders without BatchNorm (LSTM) are encoded in one piece.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cropmap.models import ddp
from cropmap.models.series import Series, pad_batch
from cropmap.models.training import autocast, optimizer_step, prefetch, resolve_device, seed_everything

log = logging.getLogger(__name__)


# --- view transforms --------------------------------------------------------------------------

class RowTransform(Protocol):
    """Acts on one series' observation rows: ``(value_rows, day_rows) -> (value_rows, day_rows)``."""

    def __call__(self, value_rows: np.ndarray, day_rows: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass
class TemporalShift:
    p: float = 0.5
    std: float = 0.3
    max_steps: int = 6

    def __call__(self, value_rows, day_rows, rng):
        if rng.random() >= self.p or len(value_rows) < 2:
            return value_rows, day_rows
        k = int(round(float(np.clip(rng.normal(0.0, self.std), -1.0, 1.0)) * self.max_steps))
        return np.roll(value_rows, k), day_rows


@dataclass
class DropDates:
    p: float = 0.15

    def __call__(self, value_rows, day_rows, rng):
        keep = rng.random(len(value_rows)) >= self.p
        if not keep.any():
            keep[rng.integers(len(keep))] = True
        return value_rows[keep], day_rows[keep]


@dataclass
class Resample:
    length: int = 70

    def __call__(self, value_rows, day_rows, rng):
        n = len(value_rows)
        if n == 0:
            return value_rows, day_rows
        pos = np.sort(rng.choice(n, size=self.length, replace=n < self.length))
        return value_rows[pos], day_rows[pos]


@dataclass
class DateNoise:
    """Acts on the padded batch (z-scored values): residual cloud (+) or shadow (-) on whole dates."""

    p: float = 0.15
    std: float = 0.5

    def apply(self, batch: dict[str, torch.Tensor], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        x, present = batch["x"], batch["present"]
        b, t, _ = x.shape
        hit = rng.random((b, t, 1)) < self.p
        amp = np.abs(rng.normal(0.0, self.std, size=(b, t, 1))) * rng.choice([-1.0, 1.0], size=(b, t, 1))
        noise = torch.from_numpy((hit * amp).astype(np.float32)).to(x.device)
        return {**batch, "x": x + noise * present}


@dataclass
class ViewRecipe:
    """Row transforms in order, then batch transforms: one augmented view per series."""

    rows: list = field(default_factory=list)
    batch: list = field(default_factory=list)

    def make(self, series: Series, idx: np.ndarray, mean: np.ndarray, std: np.ndarray, rng: np.random.Generator,
             device: str = "cpu") -> dict[str, torch.Tensor]:
        day_picks, value_picks = [], []
        for i in idx:
            rows = np.arange(series.offsets[i], series.offsets[i + 1])
            v, d = rows, rows
            for tf in self.rows:
                v, d = tf(v, d, rng)
            value_picks.append(v)
            day_picks.append(d)
        out = pad_batch(series, day_picks, mean, std, device, value_picks=value_picks)
        for tf in self.batch:
            out = tf.apply(out, rng)
        return out


def sits_moco_views(length: int = 70, shift_p: float = 0.5, noise_p: float = 0.15, drop_p: float = 0.15) -> ViewRecipe:
    """The SITS-MoCo recipe (see the module docstring) with its published parameters."""
    return ViewRecipe(rows=[TemporalShift(p=shift_p), DropDates(p=drop_p), Resample(length)], batch=[DateNoise(p=noise_p)])


# --- the MoCo model ---------------------------------------------------------------------------

def embed_dim(model: nn.Module) -> int:
    dim = getattr(model, "embed_dim", None)
    if dim is None:
        raise ValueError(f"{type(model).__name__} has no `embed_dim`: it cannot be pre-trained with MoCo")
    return int(dim)


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) or "BatchNorm" in type(m).__name__ for m in model.modules())


def split_batch(batch: dict[str, torch.Tensor], groups: int) -> list[dict[str, torch.Tensor]]:
    """``groups`` contiguous sub-batches (sizes differ by at most one)."""
    n = len(batch["x"])
    bounds = np.linspace(0, n, groups + 1).round().astype(int)
    return [{k: v[a:b] for k, v in batch.items()} for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


MIN_BN_GROUP = 16
"""Fewest series of one shuffle-BN sub-batch."""


class MoCo(nn.Module):
    """Query encoder + head (trained), key encoder + head (momentum copies), queue of keys."""

    def __init__(self, encoder: nn.Module, queue_size: int = 65536, momentum: float = 0.999,
                 temperature: float = 0.07, proj_hidden: int = 128, proj_dim: int = 128, shuffle_bn_groups: int = 4) -> None:
        super().__init__()
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if queue_size < 1:
            raise ValueError(f"queue size must be positive, got {queue_size}")
        if shuffle_bn_groups < 1:
            raise ValueError(f"shuffle_bn_groups must be at least 1, got {shuffle_bn_groups}")
        dim = embed_dim(encoder)
        self.shuffle_bn_groups = int(shuffle_bn_groups) if has_batch_norm(encoder) else 1
        self.momentum, self.temperature = float(momentum), float(temperature)
        self.encoder_q = encoder
        self.head_q = nn.Sequential(nn.Linear(dim, proj_hidden), nn.ReLU(inplace=True), nn.Linear(proj_hidden, proj_dim))
        self.encoder_k = copy.deepcopy(encoder)
        self.head_k = copy.deepcopy(self.head_q)
        for p in [*self.encoder_k.parameters(), *self.head_k.parameters()]:
            p.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def _groups(self, n: int) -> int:
        # separate statistics only while BatchNorm uses batch statistics (train mode), with at least
        # MIN_BN_GROUP series a group: BatchNorm statistics of fewer are too noisy to learn from (a batch of 32
        # in 4 groups of 8 stopped the validation InfoNCE from falling at all; 2 groups of 16 learn)
        return max(1, min(self.shuffle_bn_groups, n // MIN_BN_GROUP)) if self.training else 1

    def query(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        g = self._groups(len(batch["x"]))
        if g == 1:
            return F.normalize(self.head_q(self.encoder_q.encode(**batch)).float(), dim=1)
        parts = [self.encoder_q.encode(**sub) for sub in split_batch(batch, g)]
        return F.normalize(self.head_q(torch.cat(parts)).float(), dim=1)

    @torch.no_grad()
    def key(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        n = len(batch["x"])
        g = self._groups(n)
        if g == 1:
            return F.normalize(self.head_k(self.encoder_k.encode(**batch)).float(), dim=1)
        # shuffle-BN: permute, encode sub-batches with their own BatchNorm statistics, un-permute
        perm = torch.randperm(n, generator=generator).to(batch["x"].device)
        inverse = torch.argsort(perm)
        shuffled = {k: v[perm] for k, v in batch.items()}
        parts = [self.encoder_k.encode(**sub) for sub in split_batch(shuffled, g)]
        return F.normalize(self.head_k(torch.cat(parts)[inverse]).float(), dim=1)

    def logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """InfoNCE logits ``(B, 1 + queue)``: the positive first, then the queue's negatives."""
        pos = (q * k).sum(dim=1, keepdim=True)
        neg = q @ self.queue.clone().detach().T
        return torch.cat([pos, neg], dim=1) / self.temperature

    def loss(self, view_q: dict, view_k: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """InfoNCE of a pair of view batches; returns (loss, keys). Changes no state."""
        q, k = self.query(view_q), self.key(view_k)
        logits = self.logits(q, k)
        target = torch.zeros(len(q), dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, target), k

    @torch.no_grad()
    def momentum_update(self) -> None:
        m = self.momentum
        for pk, pq in zip([*self.encoder_k.parameters(), *self.head_k.parameters()],
                          [*self.encoder_q.parameters(), *self.head_q.parameters()]):
            pk.mul_(m).add_(pq.detach(), alpha=1 - m)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        n, size = len(keys), len(self.queue)
        keys = keys[-size:]
        ptr = int(self.queue_ptr)
        rows = (ptr + torch.arange(len(keys), device=keys.device)) % size
        self.queue[rows] = keys.to(self.queue.dtype)
        self.queue_ptr.fill_((ptr + n) % size)


class _MoCoStep(nn.Module):
    """One InfoNCE step as a module call, so DistributedDataParallel can average its gradients."""

    def __init__(self, moco: MoCo) -> None:
        super().__init__()
        self.moco = moco

    def forward(self, view_q: dict, view_k: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.moco.loss(view_q, view_k)


# --- pre-training loop ------------------------------------------------------------------------

MAX_VAL_SERIES = 4096
"""Validation series at most (each is a negative of every other: the cost grows with its square)."""

@dataclass
class MoCoConfig:
    """Defaults are SITS-MoCo's (SEEDS.md); ``temperature`` 0.2 gives MoCo v2's."""

    queue_size: int = 65536
    momentum: float = 0.999
    temperature: float = 0.07
    proj_hidden: int = 128
    proj_dim: int = 128
    shuffle_bn_groups: int = 4
    """Shuffle-BN sub-batches (see the module docstring); 1 turns it off (leaky with BatchNorm)."""
    epochs: int = 100
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 10
    val_fraction: float = 0.1
    view_length: int = 70
    shift_p: float = 0.5
    noise_p: float = 0.15
    drop_p: float = 0.15
    seed: int = 0
    device: str = "cpu"
    amp: bool = True


@dataclass
class PretrainResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0
    queue_size: int = 0
    n_train: int = 0
    n_val: int = 0


def effective_queue(cfg: MoCoConfig, n_train: int) -> int:
    """The queue length used: the configured one, capped to half the training series (whole batches)."""
    batch = min(cfg.batch_size, max(2, n_train))
    cap = max(batch, (n_train // 2) // batch * batch)
    return int(min(cfg.queue_size, cap))


def pretrain_moco(model: nn.Module, series: Series, mean: np.ndarray, std: np.ndarray, cfg: MoCoConfig,
                  on_epoch: Callable[[dict], None] | None = None,
                  on_batch: Callable[[int], None] | None = None) -> PretrainResult:
    """Pre-train ``model``'s encoder in place with MoCo on unlabelled ``series``.

    A ``val_fraction`` of the series is held out; the weights of the epoch with the lowest
    validation InfoNCE are kept, and training stops after ``patience`` epochs without improvement.
    """
    dctx = ddp.current()  # torchrun: this rank's shard, gradients averaged, keys of all ranks enqueued, rank 0 validates
    device = ddp.rank_device(resolve_device(cfg.device), dctx)
    seed_everything(cfg.seed + dctx.rank)
    rng = np.random.default_rng(cfg.seed)  # the same train/val split on every rank
    n = len(series)
    nonempty = np.nonzero(series.lengths > 0)[0]
    perm = rng.permutation(nonempty)
    n_val = min(int(round(len(perm) * cfg.val_fraction)), MAX_VAL_SERIES) if len(perm) >= 20 else 0
    val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    if len(train_idx) < 4:
        raise ValueError(f"MoCo needs at least 4 series with observations, got {len(train_idx)} of {n}")
    result = PretrainResult(queue_size=effective_queue(cfg, len(train_idx)), n_train=len(train_idx), n_val=len(val_idx))
    if result.queue_size < cfg.queue_size:
        log.info("MoCo queue capped from %d to %d (half of %d training series)", cfg.queue_size, result.queue_size, len(train_idx))
    moco = MoCo(model, result.queue_size, cfg.momentum, cfg.temperature, cfg.proj_hidden, cfg.proj_dim,
                cfg.shuffle_bn_groups).to(device)
    views = sits_moco_views(cfg.view_length, cfg.shift_p, cfg.noise_p, cfg.drop_p)
    params = [*moco.encoder_q.parameters(), *moco.head_q.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    batch_size = min(cfg.batch_size, len(train_idx))
    step = ddp.wrap(_MoCoStep(moco), device, find_unused=True) if dctx.enabled else _MoCoStep(moco)
    view_rng = rng if dctx.rank == 0 else np.random.default_rng([cfg.seed, dctx.rank])
    best, best_state, bad = None, None, 0
    t0 = time.perf_counter()

    def pairs(order: np.ndarray, generator: np.random.Generator):
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2:
                continue
            yield (views.make(series, idx, mean, std, generator, device), views.make(series, idx, mean, std, generator, device))

    for epoch in range(1, cfg.epochs + 1):
        moco.train()
        total, seen = 0.0, 0
        order = ddp.shard(train_idx, epoch, cfg.seed, dctx) if dctx.enabled else rng.permutation(train_idx)
        for vq, vk in prefetch(pairs(order, view_rng)):
            with autocast(device, cfg.amp):
                loss, keys = step(vq, vk)
            optimizer_step(opt, loss)
            moco.momentum_update()
            moco.enqueue(ddp.all_gather_cat(keys))  # the same queue on every rank
            total += loss.item() * len(keys)
            seen += len(keys)
            if on_batch and dctx.is_main:
                on_batch(len(keys) * dctx.world_size)
        ddp.sync_buffers(moco)
        total, seen = ddp.sum_over_ranks(total, seen)
        row = {"epoch": epoch, "train_infonce": total / max(seen, 1)}
        if n_val:
            stats = _validate(moco, pairs(val_idx, np.random.default_rng(cfg.seed + 104729)), device, cfg.amp) if dctx.is_main else None
            row.update(ddp.broadcast_object(stats))
            if best is None or row["val_infonce"] < best - 1e-6:
                best, bad, result.best_epoch = row["val_infonce"], 0, epoch
                best_state = copy.deepcopy(moco.encoder_q.state_dict())
            else:
                bad += 1
        else:
            result.best_epoch = epoch
        row["seconds"] = round(time.perf_counter() - t0, 3)
        result.history.append(row)
        if on_epoch and dctx.is_main:
            on_epoch(row)
        if n_val and bad >= cfg.patience:
            log.info("MoCo early stop at epoch %d (best %d)", epoch, result.best_epoch)
            break
    if best_state is not None:
        moco.encoder_q.load_state_dict(best_state)
    if not ddp.check_identical(moco.encoder_q):
        raise RuntimeError(f"data-parallel ranks ended with different encoder weights (rank {dctx.rank})")
    result.seconds = time.perf_counter() - t0
    return result


@torch.no_grad()
def _validate(moco: MoCo, pairs, device: str, amp: bool) -> dict:
    """Validation InfoNCE and top-1 retrieval accuracy; no enqueue, no momentum update.

    The negatives of each validation query are the keys of the *other validation series*, not the
    queue: the queue changes every step, so a loss against it is not comparable between epochs
    (an untrained encoder scores deceptively well against a queue of stale keys).
    """
    moco.eval()
    qs, ks = [], []
    for vq, vk in pairs:
        with autocast(device, amp):
            qs.append(moco.query(vq))
            ks.append(moco.key(vk))
    q, k = torch.cat(qs), torch.cat(ks)
    total, correct = 0.0, 0
    for start in range(0, len(q), 1024):
        logits = q[start:start + 1024] @ k.T / moco.temperature
        target = torch.arange(start, start + len(logits), device=q.device)
        total += F.cross_entropy(logits, target, reduction="sum").item()
        correct += int((logits.argmax(1) == target).sum())
    return {"val_infonce": total / max(len(q), 1), "val_top1": correct / max(len(q), 1)}


def config_dict(cfg: MoCoConfig) -> dict:
    return dataclasses.asdict(cfg)
