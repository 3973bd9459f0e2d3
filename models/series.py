"""Ragged pixel time series and how they become padded model batches.

:class:`Series` is the models' view of samples: ``values`` (n_obs, C) with NaN for unobserved
band values, ``days`` (n_obs,) day offsets, ``offsets`` (N + 1). :func:`make_batch` normalises,
selects at most ``max_len`` observations per series and pads: randomly (sorted, without
replacement) when training — an augmentation that mimics irregular acquisitions — and
deterministically (evenly spaced) otherwise, so evaluation never depends on a random draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Series:
    values: np.ndarray
    days: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def band_statistics(series: Series, sample_idx: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and std of the observed values (of the given samples); std >= 1e-6."""
    vals = np.asarray(series.values)
    if sample_idx is not None:
        starts, lengths = series.offsets[sample_idx], series.lengths[sample_idx]
        rows = np.repeat(starts, lengths) + (np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths))
        vals = vals[rows]
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(vals, axis=0)
            std = np.nanstd(vals, axis=0)
    mean = np.where(np.isfinite(mean), mean, 0.0)
    std = np.where(np.isfinite(std) & (std > 1e-6), std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


def select_positions(length: int, max_len: int, rng: np.random.Generator | None) -> np.ndarray:
    if length <= max_len:
        return np.arange(length)
    if rng is None:
        return np.unique(np.linspace(0, length - 1, max_len).round().astype(np.int64))
    return np.sort(rng.choice(length, size=max_len, replace=False))


def make_batch(series: Series, idx: np.ndarray, mean: np.ndarray, std: np.ndarray, max_len: int,
               rng: np.random.Generator | None = None, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Padded tensors ``x``, ``present``, ``days``, ``mask`` for the samples ``idx``."""
    picks = [series.offsets[i] + select_positions(int(series.lengths[i]), max_len, rng) for i in idx]
    t = max(1, max(len(p) for p in picks))
    c = series.values.shape[1]
    x = np.zeros((len(idx), t, c), dtype=np.float32)
    days = np.zeros((len(idx), t), dtype=np.float32)
    mask = np.zeros((len(idx), t), dtype=bool)
    for b, rows in enumerate(picks):
        n = len(rows)
        x[b, :n] = series.values[rows]
        days[b, :n] = series.days[rows]
        mask[b, :n] = True
    present = ~np.isnan(x) & mask[:, :, None]
    x = np.where(present, (x - mean) / std, 0.0).astype(np.float32)
    return {
        "x": torch.from_numpy(x).to(device),
        "present": torch.from_numpy(present).to(device),
        "days": torch.from_numpy(days).to(device),
        "mask": torch.from_numpy(mask).to(device),
    }
