"""InceptionTime for pixel time series.

Reference: H. Ismail Fawaz, B. Lucas, G. Forestier, C. Pelletier, D. F. Schmidt,
J. Weber, G. I. Webb, L. Idoumghar, P.-A. Muller and F. Petitjean, "InceptionTime:
Finding AlexNet for Time Series Classification", Data Mining and Knowledge Discovery 34,
2020. One of the strongest general-purpose time-series classifiers (UCR/UEA archives).

Architecture (one network; the paper ensembles five - train several seeds for that):

* ``depth`` Inception modules. A module reduces its input with a 1x1 "bottleneck"
  convolution to ``bottleneck`` channels, runs parallel convolutions with
  ``kernel_sizes`` (39, 19, 9 - the paper's 40, 20, 10 made odd so "same" padding is
  symmetric) of ``n_filters`` each on it, plus a branch max-pool(3) -> 1x1 convolution
  on the module input; the ``4 * n_filters`` concatenated channels go through BatchNorm
  and ReLU;
* a residual connection every 3 modules (1x1 convolution + BatchNorm on the shortcut,
  added, ReLU);
* global average pooling over time - the embedding, ``(B, 4 * n_filters)`` - and a
  ``Linear`` classifier (``decoder``).

Defaults: depth 6, 32 filters per branch, bottleneck 32, kernels 39/19/9, day code 16;
about 481k parameters with 12 bands and 21 classes.

Adaptations to the cropmap convention (as :mod:`cropmap.models.pixel.tempcnn`): each date's
input is ``cat([x, present, day code])`` (presence flags, and the sinusoidal code of the
real day offset, :class:`cropmap.models.encoding.DayEncoding` base 1000, because a
convolution sees positions, not dates); padding is exactly zero before every convolution
(convolutions have no bias and the BatchNorms,
:class:`~cropmap.models.pixel.transformer.MaskedBatchNorm1d`, normalise and count real dates
only), the max-pool branch treats padding as -inf, and the global average pooling is a
mean over the real dates. So outputs do not depend on how much padding a row carries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from cropmap.models.base import (
    DAY_BASE,
    MaskedBatchNorm1d,
    PixelClassifier,
    PixelModelConfig,
    date_features,
    masked_mean,
)
from cropmap.models.encoding import DayEncoding

__all__ = ["InceptionTimeConfig", "InceptionTime", "InceptionModule"]

MAX_KERNEL = 79


class InceptionModule(nn.Module):
    """Bottleneck, parallel convolutions and a max-pool branch, BatchNorm + ReLU (masked)."""

    def __init__(self, n_in: int, n_filters: int, kernel_sizes: list[int], bottleneck: int) -> None:
        super().__init__()
        use_bottleneck = bottleneck > 0 and n_in > 1
        self.bottleneck = nn.Conv1d(n_in, bottleneck, 1, bias=False) if use_bottleneck else nn.Identity()
        n_mid = bottleneck if use_bottleneck else n_in
        self.convs = nn.ModuleList(
            nn.Conv1d(n_mid, n_filters, k, padding="same", bias=False) for k in kernel_sizes
        )
        self.pool = nn.MaxPool1d(3, stride=1, padding=1)
        self.pool_conv = nn.Conv1d(n_in, n_filters, 1, bias=False)
        self.norm = MaskedBatchNorm1d(n_filters * (len(kernel_sizes) + 1))

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        """``h`` (B, C, T) with zeros on padding -> (B, n_out, T) with zeros on padding."""
        z = self.bottleneck(h)
        branches = [conv(z) for conv in self.convs]
        pad = ~mask.unsqueeze(1)
        # Padding must not win a max (it would where every real neighbour is negative).
        pooled = self.pool(h.masked_fill(pad, float("-inf"))).masked_fill(pad, 0.0)
        branches.append(self.pool_conv(pooled))
        return torch.relu(self.norm(torch.cat(branches, dim=1), mask))


class _Shortcut(nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(n_in, n_out, 1, bias=False)
        self.norm = MaskedBatchNorm1d(n_out)

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        return self.norm(self.conv(h), mask)


@dataclass
class InceptionTimeConfig(PixelModelConfig):
    """Hyper-parameters of :class:`InceptionTime`; plain types only (JSON round-trip)."""

    n_filters: int = 32
    bottleneck: int = 32
    kernel_sizes: list[int] = field(default_factory=lambda: [39, 19, 9])
    depth: int = 6
    residual: bool = True
    day_dim: int = 16

    def validate(self) -> None:
        super().validate()
        self._require_positive("n_filters", "depth")
        self._require_even("day_dim")
        if self.bottleneck < 0:
            raise ValueError(f"bottleneck must be >= 0 (0: none), got {self.bottleneck}")
        if not self.kernel_sizes or any(not 1 <= k <= MAX_KERNEL for k in self.kernel_sizes):
            raise ValueError(f"kernel_sizes must be a non-empty list of sizes in 1..{MAX_KERNEL}, got {self.kernel_sizes}")


class InceptionTime(PixelClassifier):
    """InceptionTime classifier (see module docstring)."""

    config_class = InceptionTimeConfig
    config: InceptionTimeConfig

    def __init__(self, n_bands: int, n_classes: int, **kwargs: Any) -> None:
        super().__init__(n_bands, n_classes, **kwargs)
        c = self.config
        self.day_encoding = DayEncoding(c.day_dim, base=DAY_BASE)
        n_in = 2 * c.n_bands + c.day_dim
        n_out = c.n_filters * (len(c.kernel_sizes) + 1)
        self.blocks = nn.ModuleList()
        self.shortcuts = nn.ModuleDict()
        res_in = n_in
        for i in range(c.depth):
            self.blocks.append(InceptionModule(n_in if i == 0 else n_out, c.n_filters, c.kernel_sizes, c.bottleneck))
            if c.residual and i % 3 == 2:
                self.shortcuts[str(i)] = _Shortcut(res_in, n_out)
                res_in = n_out
        self.embed_dim = n_out
        self.decoder = nn.Linear(n_out, c.n_classes)

    def encode(self, x: Tensor, present: Tensor, days: Tensor, mask: Tensor) -> Tensor:
        """Mean over the real dates of the last module's maps, ``(B, 4 * n_filters)``."""
        x, present, days, mask = self.prepare(x, present, days, mask)
        h = date_features(x, present, days, mask, self.day_encoding).transpose(1, 2)  # (B, F, T)
        residual = h
        for i, module in enumerate(self.blocks):
            h = module(h, mask)
            if str(i) in self.shortcuts:
                h = torch.relu(h + self.shortcuts[str(i)](residual, mask))
                residual = h
        return masked_mean(h, mask, dim=2)
