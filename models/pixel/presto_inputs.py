"""Presto inputs from the project's samples: band mapping, units, monthly composites, location.

The project's models take the batch convention of :mod:`cropmap.models.series` (``x`` z-scored
per band, ``present``, ``days`` since 1 January of the season year, ``mask``). Presto takes
monthly composites of 17 named channels in its own normalisation (:mod:`.presto_net`).
:class:`PrestoInputs` converts one into the other inside the model, so that training,
evaluation and mapping feed Presto exactly like every other model:

1. undo the z-score with the model's band statistics (back to reflectance, dB, ...);
2. map the model's bands to Presto channels by name (:func:`presto_channel`; ``B02``/``B2``,
   ``B8A``, ``VV``, ``NDVI``, ``temperature_2m``, ``elevation``, ...); other bands are ignored;
3. composite each band over calendar months (mean of the observations of the month) within the
   model's window of ``n_months`` months starting ``first_month`` months after January of the
   season year (negative: the previous year);
4. Presto's normalisation: S1 ``(dB + 25) / 25``, S2 reflectance as is (digital numbers are
   divided by 1e4), ERA5 temperature ``(K - 272.15) / 35``, precipitation ``m / 0.03``, SRTM
   ``m / 2000`` and ``degrees / 50``, NDVI as is;
5. NDVI from the B4/B8 composites when the samples have no NDVI band;
6. everything a sample lacks (a month without observation, a band the data does not have,
   ERA5/SRTM/Dynamic World for the usual Sentinel-only samples) is *masked*, never filled.

The location (lat/lon) is one per model (:func:`samples_location`: the centre of the training
samples, from the table's ``x``/``y``/``epsg`` or the tile grid), because the batch convention
carries no coordinates; within a site or region that is what Presto's location token is for.
:func:`window_for_days` chooses the month window from the training observations.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .presto_net import CHANNELS, DW_MISSING, MAX_MONTHS

__all__ = [
    "PrestoInputs",
    "month_offsets",
    "presto_channel",
    "samples_location",
    "window_for_days",
]

_ALIASES = {
    "vv": "VV", "vh": "VH", "ndvi": "NDVI",
    "temperature_2m": "temperature_2m", "t2m": "temperature_2m", "temperature": "temperature_2m",
    "total_precipitation": "total_precipitation", "precipitation": "total_precipitation", "tp": "total_precipitation",
    "elevation": "elevation", "dem": "elevation", "altitude": "elevation", "slope": "slope",
}
DW_NAMES = {"dynamic_world", "dw", "dynamicworld"}
_CUM_DAYS = np.cumsum([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30])


def presto_channel(band: str) -> str | None:
    """The Presto channel of a band name (``B02`` -> ``B2``, ``vv`` -> ``VV``), or None."""
    key = band.strip()
    m = re.fullmatch(r"[Bb]0?(\d{1,2})([Aa]?)", key)
    if m:
        name = f"B{int(m.group(1))}{m.group(2).upper()}"
        return name if name in CHANNELS else None
    return _ALIASES.get(key.lower())


def month_offsets(days: Tensor | np.ndarray) -> Tensor:
    """Months since January of the season year of day offsets (days since 1 January; negative
    before it), on a 365-day calendar (a leap day moves a month boundary by one day)."""
    d = torch.as_tensor(days, dtype=torch.float64)
    year = torch.floor(d / 365.0)
    r = d - 365.0 * year
    month = torch.bucketize(r, torch.as_tensor(_CUM_DAYS[1:], dtype=torch.float64), right=True)
    return (12 * year).long() + month


def window_for_days(days: np.ndarray, max_months: int = MAX_MONTHS, coverage: float = 0.99) -> tuple[int, int]:
    """``(first_month, n_months)`` covering ``coverage`` of the observation days (at most ``max_months``)."""
    days = np.asarray(days, dtype=np.float64)
    days = days[np.isfinite(days)]
    if len(days) == 0:
        return 0, 12
    m = month_offsets(days).numpy()
    tail = (1.0 - coverage) / 2
    lo, hi = int(np.quantile(m, tail, method="lower")), int(np.quantile(m, 1 - tail, method="higher"))
    if hi - lo + 1 > max_months:  # keep the months with the most observations
        counts = np.bincount(m - lo, minlength=hi - lo + 1)
        best = int(np.argmax(np.convolve(counts, np.ones(max_months, int), mode="valid")))
        lo, hi = lo + best, lo + best + max_months - 1
    return lo, hi - lo + 1


def samples_location(table) -> list[float]:
    """``[lat, lon]`` (degrees) of the centre of the samples in ``table`` (columns ``x``, ``y``
    and ``epsg``, per sample), or ``[]`` when the table has no coordinates."""
    if table is None or not {"x", "y"} <= set(table.columns) or len(table) == 0:
        return []
    x = np.asarray(table["x"], dtype=np.float64)
    y = np.asarray(table["y"], dtype=np.float64)
    epsg = np.asarray(table["epsg"], dtype=np.int64) if "epsg" in table.columns else np.full(len(x), 4326)
    ok = np.isfinite(x) & np.isfinite(y)
    if not ok.any():
        return []
    lat, lon = np.empty(len(x)), np.empty(len(x))
    for code in np.unique(epsg[ok]):
        sel = ok & (epsg == code)
        if int(code) == 4326:
            lon[sel], lat[sel] = x[sel], y[sel]
        else:
            from pyproj import Transformer

            tr = Transformer.from_crs(int(code), 4326, always_xy=True)
            lon[sel], lat[sel] = tr.transform(x[sel], y[sel])
    lat, lon = lat[ok], lon[ok]
    if np.abs(lat).max() > 90 or np.abs(lon).max() > 180:
        raise ValueError("sample coordinates are not longitude/latitude degrees under their epsg")
    # centre on the sphere (robust across the antimeridian)
    v = np.stack([np.cos(np.radians(lat)) * np.cos(np.radians(lon)), np.cos(np.radians(lat)) * np.sin(np.radians(lon)),
                  np.sin(np.radians(lat))]).mean(1)
    return [float(np.degrees(np.arctan2(v[2], np.hypot(v[0], v[1])))), float(np.degrees(np.arctan2(v[1], v[0])))]


def _unit_transform(channel: str, mean: float) -> tuple[float, float, float]:
    """(scale, shift, divide): presto value = (raw * scale + shift) / divide."""
    if channel in ("VV", "VH"):
        return 1.0, 25.0, 25.0
    if channel.startswith("B"):
        return (1e-4 if abs(mean) > 5.0 else 1.0), 0.0, 1.0  # digital numbers vs reflectance
    if channel == "temperature_2m":
        return 1.0, (0.0 if mean < 150.0 else -272.15), 35.0  # Celsius vs Kelvin
    if channel == "total_precipitation":
        return 1.0, 0.0, 0.03
    if channel == "elevation":
        return 1.0, 0.0, 2000.0
    if channel == "slope":
        return 1.0, 0.0, 50.0
    return 1.0, 0.0, 1.0  # NDVI


class PrestoInputs(nn.Module):
    """Batch convention -> Presto inputs (monthly composites, masks, months), no parameters.

    ``forward(x, present, days, mask)`` returns ``x17`` (B, M, 17), ``missing`` (B, M, 17),
    ``dw`` (B, M) and ``months`` (B, M), with M = ``n_months``.
    """

    def __init__(self, band_names: Sequence[str], mean: Sequence[float], std: Sequence[float],
                 first_month: int = 0, n_months: int = 12) -> None:
        super().__init__()
        if not 1 <= n_months <= MAX_MONTHS:
            raise ValueError(f"n_months must be in 1..{MAX_MONTHS}, got {n_months}")
        self.first_month, self.n_months = int(first_month), int(n_months)
        src, dst, scale, shift, div = [], [], [], [], []
        self.dw_band: int | None = None
        taken: dict[str, str] = {}
        for j, band in enumerate(band_names):
            if band.strip().lower() in DW_NAMES:
                self.dw_band = j
                continue
            ch = presto_channel(band)
            if ch is None:
                continue
            if ch in taken:
                raise ValueError(f"bands {taken[ch]!r} and {band!r} are both Presto channel {ch}")
            taken[ch] = band
            s, sh, dv = _unit_transform(ch, float(mean[j]))
            src.append(j)
            dst.append(CHANNELS.index(ch))
            scale.append(s)
            shift.append(sh)
            div.append(dv)
        if not src and self.dw_band is None:
            raise ValueError(f"none of the bands {list(band_names)} is a Presto input "
                             f"(Sentinel-1 VV/VH, Sentinel-2 B2..B12, NDVI, ERA5, SRTM or dynamic_world)")
        self.channels = [CHANNELS[d] for d in dst]
        self.compute_ndvi = "NDVI" not in taken and "B4" in taken and "B8" in taken
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32), persistent=False)
        self.register_buffer("src", torch.tensor(src, dtype=torch.long), persistent=False)
        self.register_buffer("dst", torch.tensor(dst, dtype=torch.long), persistent=False)
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32), persistent=False)
        self.register_buffer("shift", torch.tensor(shift, dtype=torch.float32), persistent=False)
        self.register_buffer("div", torch.tensor(div, dtype=torch.float32), persistent=False)

    def forward(self, x: Tensor, present: Tensor, days: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        b, t, _ = x.shape
        m = self.n_months
        step = month_offsets(days).to(x.device) - self.first_month
        valid = mask.bool() & (step >= 0) & (step < m)
        onehot = F.one_hot(step.clamp(0, m - 1), m).to(torch.float32) * valid[..., None]  # (B, T, M)
        raw = x.float()[..., self.src] * self.std[self.src] + self.mean[self.src]
        val = (raw * self.scale + self.shift) / self.div
        w = present.bool()[..., self.src].to(torch.float32)
        total = torch.einsum("btm,btc->bmc", onehot, torch.where(w > 0, val, torch.zeros_like(val)))
        count = torch.einsum("btm,btc->bmc", onehot, w)
        comp = total / count.clamp_min(1.0)
        x17 = x.new_zeros(b, m, len(CHANNELS), dtype=torch.float32)
        missing = torch.ones(b, m, len(CHANNELS), dtype=torch.bool, device=x.device)
        x17[..., self.dst] = comp
        missing[..., self.dst] = count == 0
        if self.compute_ndvi:
            r, n = CHANNELS.index("B4"), CHANNELS.index("B8")
            red, nir = x17[..., r], x17[..., n]
            s = red + nir
            ok = ~(missing[..., r] | missing[..., n])
            x17[..., CHANNELS.index("NDVI")] = torch.where(ok & (s > 0), (nir - red) / s.clamp_min(1e-6), torch.zeros_like(s))
            missing[..., CHANNELS.index("NDVI")] = ~ok
        if self.dw_band is not None:
            cls = (x[..., self.dw_band] * self.std[self.dw_band] + self.mean[self.dw_band]).round().long()
            seen = present.bool()[..., self.dw_band] & (cls >= 0) & (cls < DW_MISSING)
            votes = torch.einsum("btm,btk->bmk", onehot, F.one_hot(cls.clamp(0, DW_MISSING - 1), DW_MISSING).float() * seen[..., None])
            dw = torch.where(votes.sum(-1) > 0, votes.argmax(-1), torch.full_like(votes[..., 0], DW_MISSING, dtype=torch.long))
        else:
            dw = torch.full((b, m), DW_MISSING, dtype=torch.long, device=x.device)
        months = torch.remainder(torch.arange(m, device=x.device) + self.first_month, 12)[None].expand(b, m)
        return x17, missing, dw, months

