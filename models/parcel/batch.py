"""Parcel pixel sets in memory, the date experiments on them, and the parcel batch convention.

A :class:`ParcelSets` holds, for P parcels, one :class:`SensorSets` per sensor (``s2``, ``s1``):
``values`` (rows, C, S) float32 - the values of up to S stored pixels of each parcel on each of
its dates (NaN = missing), ``days`` (rows,) day offsets and ``offsets`` (P + 1) so that parcel
``i`` is rows ``offsets[i]:offsets[i+1]``, sorted by day. Each sensor keeps its own dates. The
S pixel slots are the same pixels for every sensor; ``n_pixels[i]`` of them are real, the rest
are padding. ``geom`` (P, G) holds geometric features (area, perimeter, ...).

This differs from the pixel batch of :mod:`cropmap.models.series` (one ragged series per pixel,
sensors merged on one day axis): a parcel batch (:func:`make_batch`) is a dict from an input name
to a :class:`~cropmap.models.parcel.psetae.SensorInput` of shape (B, T, C, S):

* ``s2`` / ``s1``: one sensor on its own dates;
* ``s1_on_s2``: radar resampled on the optical dates (:func:`align_s1_to_s2`);
* ``early``: optical and aligned radar channels concatenated per date (early fusion).

Date experiments of the PSE-TSA study: :func:`subsample_dates` keeps a seeded random fraction of
each parcel's optical dates (not the first k, the original's bug), :func:`cut_until` ends every
series at a day (early-season mapping).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from cropmap.models.parcel.psetae import SensorInput

ALIGNMENTS = ("nn", "linear")


@dataclass
class SensorSets:
    channels: list[str]
    values: np.ndarray
    days: np.ndarray
    offsets: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def parcel(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.values[a:b], self.days[a:b]

    def keep_rows(self, keep: np.ndarray) -> SensorSets:
        """The sets restricted to the rows (dates) where ``keep`` is True."""
        keep = np.asarray(keep, bool)
        parcel_of = np.repeat(np.arange(len(self.offsets) - 1), self.lengths)
        lengths = np.bincount(parcel_of[keep], minlength=len(self.offsets) - 1)
        return SensorSets(list(self.channels), np.asarray(self.values)[keep], np.asarray(self.days)[keep],
                          np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))

    def subset(self, idx: np.ndarray) -> SensorSets:
        idx = np.asarray(idx, np.int64)
        lengths = self.lengths[idx]
        rows = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in idx]) if len(idx) else np.zeros(0, np.int64)
        return SensorSets(list(self.channels), np.asarray(self.values)[rows], np.asarray(self.days)[rows],
                          np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))


@dataclass
class ParcelSets:
    sensors: dict[str, SensorSets]
    n_pixels: np.ndarray
    geom: np.ndarray
    geom_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.n_pixels)

    @property
    def max_pixels(self) -> int:
        return int(next(iter(self.sensors.values())).values.shape[2])

    def subset(self, idx: np.ndarray) -> ParcelSets:
        idx = np.asarray(idx, np.int64)
        return ParcelSets({k: s.subset(idx) for k, s in self.sensors.items()}, self.n_pixels[idx], self.geom[idx], list(self.geom_names))

    def with_sensor(self, name: str, sets: SensorSets) -> ParcelSets:
        return ParcelSets({**self.sensors, name: sets}, self.n_pixels, self.geom, list(self.geom_names))


# ---------------------------------------------------------------- date experiments
def subsample_dates(data: ParcelSets, fraction: float, seed: int, sensor: str = "s2", keys: np.ndarray | None = None) -> ParcelSets:
    """Keep a random ``fraction`` of each parcel's ``sensor`` dates (at least one), drawn without
    replacement from all of its dates. The draw of parcel ``i`` is seeded by ``seed`` and
    ``keys[i]`` (default: its position), so a parcel keeps the same dates in training and evaluation."""
    if not 0 < fraction <= 1:
        raise ValueError(f"date fraction must be in (0, 1], got {fraction}")
    s = data.sensors[sensor]
    keys = np.arange(len(data)) if keys is None else np.asarray(keys)
    keep = np.zeros(len(s.days), bool)
    for i, key in enumerate(keys):
        n = int(s.lengths[i])
        if n == 0:
            continue
        k = max(1, int(round(n * fraction)))
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(str(key).encode())])
        keep[s.offsets[i] + rng.choice(n, size=k, replace=False)] = True
    return data.with_sensor(sensor, s.keep_rows(keep))


def cut_until(data: ParcelSets, day: float | np.ndarray) -> ParcelSets:
    """Every sensor's dates up to and including day offset ``day`` (early-season mapping); ``day``
    is one value or one per parcel (parcels of different season years)."""
    out = data
    per_parcel = np.broadcast_to(np.asarray(day, np.float64), (len(data),))
    for name, s in data.sensors.items():
        out = out.with_sensor(name, s.keep_rows(np.asarray(s.days) <= np.repeat(per_parcel, s.lengths)))
    return out


# ---------------------------------------------------------------- S1 -> S2 alignment
def nearest_unused(d1: np.ndarray, d2: np.ndarray) -> np.ndarray:
    """For each optical day (in order) the index of the nearest radar day not yet taken; once all
    radar days are taken (fewer radar than optical dates) the nearest one is reused."""
    d1 = np.asarray(d1, np.float64)
    out = np.zeros(len(d2), np.int64)
    used = np.zeros(len(d1), bool)
    for j, d in enumerate(np.asarray(d2, np.float64)):
        dist = np.abs(d1 - d)
        if not used.all():
            dist = np.where(used, np.inf, dist)
        k = int(np.argmin(dist))
        used[k] = True
        out[j] = k
    return out


def align_s1_to_s2(data: ParcelSets, method: str = "nn") -> SensorSets:
    """Radar values on each parcel's optical dates: ``nn`` (nearest unused radar date, see
    :func:`nearest_unused`) or ``linear`` (per-pixel linear interpolation in time, clamped at the
    ends; missing radar values are interpolated from the observed ones of the same pixel)."""
    if method not in ALIGNMENTS:
        raise ValueError(f"unknown alignment {method!r} (choose {', '.join(ALIGNMENTS)})")
    s1, s2 = data.sensors["s1"], data.sensors["s2"]
    c1, npx = s1.values.shape[1], s1.values.shape[2]
    out = np.full((len(s2.days), c1, npx), np.nan, np.float32)
    for i in range(len(data)):
        v1, d1 = s1.parcel(i)
        a, b = s2.offsets[i], s2.offsets[i + 1]
        if len(d1) == 0 or a == b:
            continue
        d2 = np.asarray(s2.days[a:b], np.float64)
        v1 = np.asarray(v1, np.float32)
        if method == "nn":
            out[a:b] = v1[nearest_unused(d1, d2)]
            continue
        flat = v1.reshape(len(d1), -1)  # (T1, C*S)
        res = np.full((len(d2), flat.shape[1]), np.nan, np.float32)
        for col in np.nonzero(~np.isnan(flat).all(axis=0))[0]:
            ok = ~np.isnan(flat[:, col])
            res[:, col] = np.interp(d2, np.asarray(d1, np.float64)[ok], flat[ok, col])
        out[a:b] = res.reshape(len(d2), c1, npx)
    return SensorSets(list(s1.channels), out, np.asarray(s2.days).copy(), s2.offsets.copy())


def prepare_inputs(data: ParcelSets, inputs: list[str], alignment: str = "nn") -> ParcelSets:
    """Add the derived sensors a model needs (``s1_on_s2``, ``early``) to ``data``."""
    if ("s1_on_s2" in inputs or "early" in inputs) and "s1_on_s2" not in data.sensors:
        data = data.with_sensor("s1_on_s2", align_s1_to_s2(data, alignment))
    if "early" in inputs and "early" not in data.sensors:
        s2, s1a = data.sensors["s2"], data.sensors["s1_on_s2"]
        data = data.with_sensor("early", SensorSets([*s2.channels, *s1a.channels],
                                                    np.concatenate([np.asarray(s2.values), s1a.values], axis=1),
                                                    np.asarray(s2.days), s2.offsets))
    return data


# ---------------------------------------------------------------- normalisation and batches
def channel_statistics(sets: SensorSets, n_pixels: np.ndarray, idx: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std over the real pixels of the parcels ``idx`` (NaN ignored; std >= 1e-3)."""
    idx = np.arange(len(n_pixels)) if idx is None else np.asarray(idx)
    c = sets.values.shape[1]
    total, total2, count = np.zeros(c), np.zeros(c), np.zeros(c)
    for i in idx:
        v, _ = sets.parcel(int(i))
        v = np.asarray(v[:, :, : int(n_pixels[i])], np.float64)
        ok = ~np.isnan(v)
        total += np.where(ok, v, 0).sum(axis=(0, 2))
        total2 += np.where(ok, v * v, 0).sum(axis=(0, 2))
        count += ok.sum(axis=(0, 2))
    mean = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    var = np.where(count > 1, total2 / np.maximum(count, 1) - mean ** 2, 1.0)
    return mean.astype(np.float32), np.sqrt(np.maximum(var, 1e-6)).clip(1e-3).astype(np.float32)


def make_batch(data: ParcelSets, idx: np.ndarray, inputs: list[str], norm: dict, geom_norm: dict,
               sample_pixels: int, rng: np.random.Generator | None = None) -> dict[str, SensorInput]:
    """The parcel batch of parcels ``idx``: per input name a :class:`SensorInput`.

    Training (``rng`` given) draws ``sample_pixels`` pixels per parcel at random (all of them when
    the parcel has fewer; the free slots are masked, never repeated); evaluation (``rng=None``)
    takes every stored pixel, so predictions are deterministic. Values are standardised with
    ``norm[name] = (mean, std)``; missing values become 0 (the channel mean).
    """
    idx = np.asarray(idx, np.int64)
    b = len(idx)
    slots = sample_pixels if rng is not None else data.max_pixels
    picks = []
    for i in idx:
        n = int(data.n_pixels[i])
        if rng is not None and n > slots:
            picks.append(np.sort(rng.choice(n, size=slots, replace=False)))
        else:
            picks.append(np.arange(min(n, slots)))
    pixel_mask = np.zeros((b, slots), bool)
    for k, p in enumerate(picks):
        pixel_mask[k, : len(p)] = True
    g = (np.log1p(np.maximum(data.geom[idx], 0)) - geom_norm["mean"]) / geom_norm["std"] if data.geom.shape[1] else data.geom[idx]
    geom = torch.as_tensor(np.asarray(g, np.float32))
    out = {}
    for name in inputs:
        s = data.sensors[name]
        mean, std = (np.asarray(a, np.float32) for a in norm[name])
        c = s.values.shape[1]
        t = max(1, int(s.lengths[idx].max())) if b else 1
        x = np.zeros((b, t, c, slots), np.float32)
        days = np.zeros((b, t), np.float32)
        date_mask = np.zeros((b, t), bool)
        for k, i in enumerate(idx):
            v, d = s.parcel(int(i))
            n = len(d)
            if n == 0:
                continue
            vals = (np.asarray(v[:, :, picks[k]], np.float32) - mean[None, :, None]) / std[None, :, None]
            x[k, :n, :, : len(picks[k])] = np.nan_to_num(vals, nan=0.0)
            days[k, :n] = d
            date_mask[k, :n] = True
        out[name] = SensorInput(torch.from_numpy(x), torch.from_numpy(pixel_mask), torch.from_numpy(date_mask),
                                torch.from_numpy(days), geom)
    return out
