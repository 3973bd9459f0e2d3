"""TempCNN: a temporal convolutional network for pixel time series.

Reference: C. Pelletier, G. I. Webb and F. Petitjean, "Temporal Convolutional Neural
Network for the Classification of Satellite Image Time Series", Remote Sensing 11(5),
523, 2019. SITS-MoCo uses it as a pixel-level baseline.

The original: three 1-D convolutions over the date axis (64 filters, kernel 5, each
followed by BatchNorm, ReLU and dropout), the feature maps flattened, one dense layer
(256 units, BatchNorm, ReLU, dropout) and a softmax classifier. It assumes a fixed,
regular series of dates. Adaptations to the cropmap convention, where every pixel has
its own irregular dates, optical and radar dates share one sequence and rows are padded
at the end:

* each date's input is ``cat([x, present, day code])``: the presence flags tell a
  missing value from a band mean, and the sinusoidal code of the real day offset
  (:class:`cropmap.models.encoding.DayEncoding`, base 1000, ``day_dim`` channels) tells
  the network *when* each date was acquired - a convolution only sees positions;
* padding is zero before every convolution (as beyond the sequence end), and the
  BatchNorms normalise and count the real dates only
  (:class:`~cropmap.models.pixel.transformer.MaskedBatchNorm1d`), so outputs do not depend on
  how much padding a row has;
* instead of flattening a fixed length, the last feature maps are pooled over the real
  dates (``pooling``: ``"meanmax"`` - masked mean and max concatenated, default -
  ``"mean"`` or ``"max"``), which handles any length.

Why the grid (the fix of TempCNN's weak scores, benchmarks/RESULTS.md): convolving over the
*positions* of a cropmap series mixes optical and radar dates (each row observes only one
sensor's bands) and, in training, a random subset of ``max_len`` of a few hundred dates, so a
kernel of 5 positions spans anything from a few days to months and its weights cannot mean a
time pattern. On a regular grid of 10-day bins (``grid_days``, the default), interpolated per
band, a kernel spans 50 days everywhere, as in the published model on gap-filled series.
Checkpoints saved before this option (no ``grid_days`` in their config) load with
``grid_days=0`` and behave as before.

Defaults: 3 layers of 64 filters, kernel 5, dense 256, dropout 0.2, 10-day grid from day -150 to
400 of the season year (55 bins), with the day code (16) of each bin's centre as input (the
pooling is shift-invariant: without it the network could not tell an early from a late peak),
masked mean + max pooling; about 93k parameters with 12 bands and 21 classes. ``encode`` returns the dense layer's output
``(B, hidden)``; ``decoder`` is the final ``Linear(hidden, classes)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cropmap.models.base import (
    DAY_BASE,
    MaskedBatchNorm1d,
    PixelClassifier,
    PixelModelConfig,
    date_features,
    linear_block,
    masked_max,
    masked_mean,
)
from cropmap.models.encoding import DayEncoding

__all__ = ["TempCNNConfig", "TempCNN", "POOLING_MODES", "temporal_pool"]

POOLING_MODES = ("meanmax", "mean", "max", "flatten")


def temporal_pool(h: Tensor, mask: Tensor, pooling: str) -> Tensor:
    """Pool feature maps ``(B, C, T)`` over the real dates: ``(B, C)`` or ``(B, 2C)`` for meanmax."""
    if pooling == "mean":
        return masked_mean(h, mask, dim=2)
    if pooling == "max":
        return masked_max(h, mask, dim=2)
    return torch.cat([masked_mean(h, mask, dim=2), masked_max(h, mask, dim=2)], dim=1)


@dataclass
class TempCNNConfig(PixelModelConfig):
    """Hyper-parameters of :class:`TempCNN`; plain types only (JSON round-trip)."""

    n_filters: int = 64
    kernel_size: int = 5
    n_layers: int = 3
    hidden: int = 256
    dropout: float = 0.2
    day_dim: int = 16
    pooling: str = "meanmax"
    grid_days: int = 10
    """``> 0`` (default 10, chosen on validation: benchmarks/RESULTS.md): resample every series onto a regular grid of ``grid_days``-day bins from
    ``grid_start`` to ``grid_end`` (day of the season year) before the convolutions (masked mean
    per band and bin, gaps linearly interpolated per band, presence flags kept), so the kernel
    spans a fixed time window as in the published TempCNN. ``0``: convolve over the positions of
    the irregular series (the earlier adaptation)."""
    grid_start: int = -150
    grid_end: int = 400
    interpolate: bool = True

    def validate(self) -> None:
        super().validate()
        self._require_positive("n_filters", "kernel_size", "n_layers", "hidden")
        if self.grid_days < 0 or (self.grid_days and self.grid_end - self.grid_start < self.grid_days):
            raise ValueError(f"grid_days must be 0 or positive and fit in [grid_start, grid_end], got {self.grid_days}")
        if self.pooling == "flatten" and not self.grid_days:
            raise ValueError("pooling 'flatten' needs a regular grid (grid_days > 0)")
        self._require_even("day_dim")
        self._require_probability("dropout")
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {self.pooling!r}")


class TempCNN(PixelClassifier):
    """TempCNN classifier (see module docstring)."""

    config_class = TempCNNConfig
    config: TempCNNConfig

    def __init__(self, n_bands: int, n_classes: int, **kwargs: Any) -> None:
        super().__init__(n_bands, n_classes, **kwargs)
        c = self.config
        self.day_encoding = DayEncoding(c.day_dim, base=DAY_BASE)
        self.n_bins = -(-(c.grid_end - c.grid_start) // c.grid_days) if c.grid_days else 0
        n_in = 2 * c.n_bands + c.day_dim
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        for i in range(c.n_layers):
            # No bias: the BatchNorm after it has one, and a bias would make padding non-zero.
            self.convs.append(
                nn.Conv1d(n_in if i == 0 else c.n_filters, c.n_filters, c.kernel_size, padding="same", bias=False)
            )
            self.norms.append(MaskedBatchNorm1d(c.n_filters))
        self.dropout = nn.Dropout(c.dropout)
        pooled = c.n_filters * (2 if c.pooling == "meanmax" else self.n_bins if c.pooling == "flatten" else 1)
        self.dense = nn.Sequential(*linear_block(pooled, c.hidden), nn.Dropout(c.dropout))
        self.embed_dim = c.hidden
        self.decoder = nn.Linear(c.hidden, c.n_classes)

    @classmethod
    def from_config(cls, config):
        # a saved config without grid_days is a model that convolved over positions: keep it so
        if not isinstance(config, TempCNNConfig) and "grid_days" not in config:
            config = {**config, "grid_days": 0}
        return super().from_config(config)

    def encode(self, x: Tensor, present: Tensor, days: Tensor, mask: Tensor) -> Tensor:
        """Dense-layer embedding ``(B, hidden)``."""
        x, present, days, mask = self.prepare(x, present, days, mask)
        if self.config.grid_days:
            x, present, mask = self.to_grid(x, present, days, mask)
            # the day code of each bin's centre: global pooling alone would forget *when* a pattern was
            centres = (self.config.grid_start + self.config.grid_days * (torch.arange(self.n_bins, device=x.device) + 0.5)).to(x.dtype)
            code = self.day_encoding(centres.expand(x.shape[0], -1)).to(x.dtype)
            h = torch.cat([x, present.to(x.dtype), code], dim=-1).transpose(1, 2)  # (B, 2C + day_dim, G)
        else:
            h = date_features(x, present, days, mask, self.day_encoding).transpose(1, 2)  # (B, F, T)
        for conv, norm in zip(self.convs, self.norms):
            # Padding is zero here: the features are, and the masked BatchNorm, ReLU and
            # dropout keep zeros at padding.
            h = self.dropout(torch.relu(norm(conv(h), mask)))
        if self.config.pooling == "flatten":
            return self.dense(h.flatten(1))
        return self.dense(temporal_pool(h, mask, self.config.pooling))

    def to_grid(self, x: Tensor, present: Tensor, days: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Masked mean per band in regular day bins ``(B, G, C)``, presence ``(B, G, C)`` and an
        all-true grid mask ``(B, G)``; empty bins are linearly interpolated between the nearest
        observed bins of the band (held constant beyond the first/last), or zero when the band
        has no observation at all (``interpolate=False``: empty bins stay zero)."""
        c = self.config
        b, _, n = x.shape
        g = self.n_bins
        idx = torch.div(days - c.grid_start, c.grid_days, rounding_mode="floor").long().clamp(0, g - 1)
        w = present.to(x.dtype)
        idx = idx.unsqueeze(-1).expand(-1, -1, n)
        total = torch.zeros(b, g, n, dtype=x.dtype, device=x.device).scatter_add_(1, idx, x * w)
        count = torch.zeros(b, g, n, dtype=x.dtype, device=x.device).scatter_add_(1, idx, w)
        seen = count > 0
        val = total / count.clamp_min(1)
        if c.interpolate:
            pos = torch.arange(g, device=x.device).view(1, g, 1).expand(b, g, n)
            prev = torch.where(seen, pos, torch.full_like(pos, -1)).cummax(1).values
            nxt = torch.where(seen, pos, torch.full_like(pos, g)).flip(1).cummin(1).values.flip(1)
            has_prev, has_next = prev >= 0, nxt < g
            v_prev = val.gather(1, prev.clamp(0, g - 1))
            v_next = val.gather(1, nxt.clamp(max=g - 1))
            span = (nxt - prev).clamp_min(1).to(x.dtype)
            t = ((pos - prev).to(x.dtype) / span).clamp(0, 1)
            both = v_prev + t * (v_next - v_prev)
            filled = torch.where(has_prev & has_next, both, torch.where(has_prev, v_prev, torch.where(has_next, v_next, torch.zeros_like(val))))
            val = torch.where(seen, val, filled)
        grid_mask = torch.ones(b, g, dtype=torch.bool, device=x.device) & mask.any(1, keepdim=True)
        return val, seen, grid_mask
