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

Defaults: 3 layers of 64 filters, kernel 5, dense 256, dropout 0.2, day code 16; about
93k parameters with 12 bands and 21 classes. ``encode`` returns the dense layer's output
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

POOLING_MODES = ("meanmax", "mean", "max")


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

    def validate(self) -> None:
        super().validate()
        self._require_positive("n_filters", "kernel_size", "n_layers", "hidden")
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
        pooled = c.n_filters * (2 if c.pooling == "meanmax" else 1)
        self.dense = nn.Sequential(*linear_block(pooled, c.hidden), nn.Dropout(c.dropout))
        self.embed_dim = c.hidden
        self.decoder = nn.Linear(c.hidden, c.n_classes)

    def encode(self, x: Tensor, present: Tensor, days: Tensor, mask: Tensor) -> Tensor:
        """Dense-layer embedding ``(B, hidden)``."""
        x, present, days, mask = self.prepare(x, present, days, mask)
        h = date_features(x, present, days, mask, self.day_encoding).transpose(1, 2)  # (B, F, T)
        for conv, norm in zip(self.convs, self.norms):
            # Padding is zero here: the features are, and the masked BatchNorm, ReLU and
            # dropout keep zeros at padding.
            h = self.dropout(torch.relu(norm(conv(h), mask)))
        return self.dense(temporal_pool(h, mask, self.config.pooling))
