"""Ragged pixel time series and how they become padded model batches.

:class:`Series` is the models' view of samples: ``values`` (n_obs, C) with NaN for unobserved
band values, ``days`` (n_obs,) day offsets, ``offsets`` (N + 1). :func:`make_batch` normalises,
selects at most ``max_len`` observations per series and pads: randomly (sorted, without
replacement) when training — an augmentation that mimics irregular acquisitions — and
deterministically (evenly spaced) otherwise, so evaluation never depends on a random draw.
"""

from __future__ import annotations

import warnings
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


def ragged_rows(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(s, s + n)`` for every (start, length) pair, vectorised."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    rel = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(np.asarray(starts, dtype=np.int64), lengths) + rel


def band_statistics(series: Series, sample_idx: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and std of the observed values (of the given samples); std >= 1e-6."""
    vals = np.asarray(series.values)
    if sample_idx is not None:
        vals = vals[ragged_rows(series.offsets[sample_idx], series.lengths[sample_idx])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a band never observed: NaN, replaced below
        mean = np.nanmean(vals, axis=0)
        std = np.nanstd(vals, axis=0)
    mean = np.where(np.isfinite(mean), mean, 0.0)
    std = np.where(np.isfinite(std) & (std > 1e-6), std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


def select_positions(length: int, max_len: int, rng: np.random.Generator | None) -> np.ndarray:
    """Training: a random sorted subset of at most ``max_len`` positions. Without ``rng``: evenly spaced."""
    if length <= max_len:
        return np.arange(length)
    if rng is None:
        return np.unique(np.linspace(0, length - 1, max_len).round().astype(np.int64))
    return np.sort(rng.choice(length, size=max_len, replace=False))


def interleaved_views(length: int, max_len: int) -> list[np.ndarray]:
    """Deterministic views of a series for inference: ``k = ceil(length / max_len)`` interleaved
    subsets (positions ``j, j+k, j+2k, ...``) that together cover every observation, each as dense
    in time as a training draw."""
    k = max(1, -(-length // max_len))
    return [np.arange(j, length, k)[:max_len] for j in range(k)]


def pad_batch(series: Series, picks: list[np.ndarray], mean: np.ndarray, std: np.ndarray,
              device: str | torch.device = "cpu", day_shift: np.ndarray | None = None,
              value_picks: list[np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    """Padded, normalised tensors ``x``, ``present``, ``days``, ``mask`` for rows ``picks`` (one array per series).

    ``value_picks`` (same lengths as ``picks``) takes the band values from other rows than the
    dates: the temporal-shift augmentation of MoCo rolls the spectra while the dates stay.
    """
    t = max(1, max(len(p) for p in picks))
    c = series.values.shape[1]
    x = np.zeros((len(picks), t, c), dtype=np.float32)
    days = np.zeros((len(picks), t), dtype=np.float32)
    mask = np.zeros((len(picks), t), dtype=bool)
    for b, rows in enumerate(picks):
        n = len(rows)
        x[b, :n] = series.values[rows if value_picks is None else value_picks[b]]
        days[b, :n] = series.days[rows]
        mask[b, :n] = True
    if day_shift is not None:
        days += day_shift.astype(np.float32)[:, None] * mask
    present = ~np.isnan(x) & mask[:, :, None]
    x = np.where(present, (x - mean) / std, 0.0).astype(np.float32)
    return {
        "x": torch.from_numpy(x).to(device),
        "present": torch.from_numpy(present).to(device),
        "days": torch.from_numpy(days).to(device),
        "mask": torch.from_numpy(mask).to(device),
    }


@dataclass
class Augment:
    """Training augmentations that mimic differences *between* fields, so that a model trained on
    the pixels of a few dozen parcels does not learn the parcels themselves."""

    jitter_days: float = 0.0
    """Shift each series in time by a uniform ±days (earlier or later sowing, another year)."""
    offset_std: float = 0.0
    """Add a per-series, per-band offset ~ N(0, offset_std) in z-units (soil, management, calibration)."""
    date_noise_p: float = 0.0
    """Each date, with this probability, gets ±|N(0, 0.5)| z-units on all its bands (residual cloud +
    or shadow -), as in SITS-MoCo."""
    band_drop_p: float = 0.0
    """With this probability a series loses the bands of a missing-band pattern seen in the
    training data (e.g. a tile exported without its 10 m bands), so the model learns to work
    from what such tiles have."""
    band_patterns: list[list[int]] | None = None
    """Missing-band patterns (band indices); :func:`missing_band_patterns` finds them."""

    def apply(self, batch: dict[str, torch.Tensor], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        x, present = batch["x"], batch["present"]
        b, t, c = x.shape
        if self.offset_std > 0:
            off = torch.from_numpy(rng.normal(0, self.offset_std, size=(b, 1, c)).astype(np.float32)).to(x.device)
            x = x + off * present
        if self.date_noise_p > 0:
            hit = rng.random((b, t, 1)) < self.date_noise_p
            amp = np.abs(rng.normal(0, 0.5, size=(b, t, 1))) * rng.choice([-1.0, 1.0], size=(b, t, 1))
            x = x + torch.from_numpy((hit * amp).astype(np.float32)).to(x.device) * present
        if self.band_drop_p > 0 and self.band_patterns:
            drop = np.zeros((b, 1, c), dtype=bool)
            for i in np.nonzero(rng.random(b) < self.band_drop_p)[0]:
                drop[i, 0, self.band_patterns[rng.integers(len(self.band_patterns))]] = True
            keep = ~torch.from_numpy(drop).to(x.device)
            present = present & keep
            x = x * present
        return {**batch, "x": x, "present": present}


def missing_band_patterns(series: Series) -> list[list[int]]:
    """The distinct sets of bands that some series never observe (e.g. a tile lacking a file)."""
    lengths = series.lengths
    nonempty = np.nonzero(lengths > 0)[0]
    if len(nonempty) == 0:
        return []
    absent = np.logical_and.reduceat(np.isnan(np.asarray(series.values)), series.offsets[nonempty], axis=0)
    patterns = {tuple(np.nonzero(row)[0].tolist()) for row in absent if row.any() and not row.all()}
    return [list(p) for p in sorted(patterns)]


def make_batch(series: Series, idx: np.ndarray, mean: np.ndarray, std: np.ndarray, max_len: int,
               rng: np.random.Generator | None = None, device: str | torch.device = "cpu",
               augment: Augment | None = None) -> dict[str, torch.Tensor]:
    """A batch of the samples ``idx``, one view each.

    With ``rng`` (training): a random sorted subset of at most ``max_len`` observations and the
    ``augment`` transforms. Without: evenly spaced observations (deterministic).
    """
    picks = [series.offsets[i] + select_positions(int(series.lengths[i]), max_len, rng) for i in idx]
    if rng is None or augment is None:
        return pad_batch(series, picks, mean, std, device)
    shift = rng.uniform(-augment.jitter_days, augment.jitter_days, size=len(idx)) if augment.jitter_days > 0 else None
    return augment.apply(pad_batch(series, picks, mean, std, device, shift), rng)
