"""Spatiotemporal masked pre-training (STCLN): mask (date, pixel) cells, reconstruct them.

Each valid (date, pixel) cell of a patch is masked i.i.d. with probability ``mask_ratio`` (one draw
per cell, shared by all bands). With ``gate`` set (e.g. 0.9), only dates on which more than that
fraction of the patch's valid pixels is vegetated (NDVI > 0.2 on real reflectances, computed when
the patches were cut) are maskable; dates whose NDVI is unknown (no red or NIR band) are then not
maskable either. Masked cells are replaced by one learnable token (``model.mask_token``) before the
spatial encoder; ``model.recon`` reconstructs every band from the temporal output; the loss is the
MSE on the masked cells' observed bands only (normalised units). Adam, gradient clipping, best
epoch by validation loss on a held-out fraction of the patches (the final weights are the best).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from cropmap.models.training import RunningMean, optimizer_step

__all__ = ["MaskedConfig", "MaskedResult", "masked_cells", "masked_loss", "pretrain_masked"]


@dataclasses.dataclass
class MaskedConfig:
    epochs: int = 50
    batch_size: int = 4
    lr: float = 1e-3
    mask_ratio: float = 0.4
    gate: float | None = None
    """Fraction of vegetated pixels above which a date is maskable (STCLN: 0.9); None: every date."""
    grad_clip: float = 5.0
    val_fraction: float = 0.1
    patience: int = 20
    augment: bool = True
    seed: int = 0
    device: str = "cpu"

    def validate(self) -> None:
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.gate is not None and not 0 <= self.gate < 1:
            raise ValueError(f"gate must be in [0, 1), got {self.gate}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")


@dataclasses.dataclass
class MaskedResult:
    history: list[dict]
    best_epoch: int
    seconds: float
    n_train: int
    n_val: int


def masked_cells(valid: Tensor, vegetated: Tensor, ratio: float, gate: float | None, generator: torch.Generator) -> Tensor:
    """(B, T, H, W) bool: Bernoulli(``ratio``) over valid cells, restricted to gated dates."""
    draw = torch.rand(valid.shape, generator=generator, device="cpu").to(valid.device) < ratio
    m = draw & valid
    if gate is not None:
        ok = torch.nan_to_num(vegetated, nan=-1.0) > gate  # (B, T)
        m &= ok[:, :, None, None]
    return m


def masked_loss(model: nn.Module, x: Tensor, days: Tensor, valid: Tensor, mask: Tensor) -> Tensor:
    """MSE between reconstruction and normalised input on masked cells' observed bands."""
    h, _ = model.encode(x, days, valid, mask)
    rec = model.reconstruct(h)  # (B, T, C, H, W)
    target = model.norm_in(x)
    observed = ~torch.isnan(x) & mask.unsqueeze(2)
    n = observed.sum()
    if n == 0:
        return rec.sum() * 0.0
    return ((rec - target) ** 2)[observed].sum() / n


def _flip_rot(arrs: list[Tensor], rng: np.random.Generator) -> list[Tensor]:
    k, flip = int(rng.integers(4)), bool(rng.integers(2))
    out = []
    for a in arrs:
        if flip:
            a = a.flip(-1)
        out.append(torch.rot90(a, k, (-2, -1)))
    return out


def pretrain_masked(model: nn.Module, x: np.ndarray, days: np.ndarray, valid: np.ndarray, vegetated: np.ndarray, cfg: MaskedConfig,
                    on_epoch: Callable[[dict], None] | None = None) -> MaskedResult:
    """Masked pre-training of ``model`` (an STCLN) on unlabelled patches (x (N, T, C, H, W) with NaN)."""
    cfg.validate()
    n = len(x)
    if n < 2:
        raise ValueError(f"masked pre-training needs at least 2 patches, got {n}")
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = rng.permutation(n)
    n_val = int(round(cfg.val_fraction * n)) if n >= 5 else 0
    val_idx, tr_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    dev = torch.device(cfg.device)
    model.to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    t0 = time.perf_counter()

    def batch(idx):
        return (torch.from_numpy(x[idx]).to(dev), torch.from_numpy(days[idx]).to(dev), torch.from_numpy(valid[idx]).to(dev),
                torch.from_numpy(vegetated[idx]).to(dev))

    # a fixed validation mask: the validation loss is comparable across epochs
    val_gen = torch.Generator().manual_seed(cfg.seed + 1)
    val_batches = []
    for s in range(0, n_val, cfg.batch_size):
        xb, db, vb, gb = batch(val_idx[s:s + cfg.batch_size])
        val_batches.append((xb, db, vb, masked_cells(vb, gb, cfg.mask_ratio, cfg.gate, val_gen)))
    history, best, best_state, best_epoch, stale = [], float("inf"), None, 0, 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        perm = rng.permutation(tr_idx)
        running = RunningMean()
        for s in range(0, len(perm), cfg.batch_size):
            xb, db, vb, gb = batch(np.sort(perm[s:s + cfg.batch_size]))
            if cfg.augment:
                xb, vb = _flip_rot([xb, vb], rng)
            m = masked_cells(vb, gb, cfg.mask_ratio, cfg.gate, gen)
            running.add(optimizer_step(opt, masked_loss(model, xb, db, vb, m), cfg.grad_clip, model.parameters()), len(xb))
        row = {"epoch": epoch, "train_mse": running.mean}
        if val_batches:
            model.eval()
            with torch.no_grad():
                row["val_mse"] = float(np.mean([float(masked_loss(model, *vb)) for vb in val_batches]))
        history.append(row)
        score = row.get("val_mse", row["train_mse"])
        if score < best:
            best, best_epoch, stale = score, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
        if on_epoch:
            on_epoch(row)
        if stale >= cfg.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return MaskedResult(history, best_epoch, time.perf_counter() - t0, len(tr_idx), len(val_idx))
