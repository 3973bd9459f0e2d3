"""Shared parts of the patch (segmentation) models: config base, input normalisation, convolution blocks.

Patch models take ``x`` (B, T, C, H, W) float in physical units (reflectance, dB) with NaN where
not observed, ``days`` (B, T) real day offsets and ``valid`` (B, T, H, W) bool, and return class
logits (B, K, H, W). Normalisation statistics live in the model (buffers), so a checkpoint is
self-contained; NaN becomes 0 after normalisation (the band mean).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn


@dataclasses.dataclass
class PatchModelConfig:
    """Config base: plain JSON types, unknown keys rejected."""

    n_bands: int
    n_classes: int
    band_names: list[str]
    mean: list[float]
    std: list[float]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; valid: {sorted(names - {'n_bands', 'n_classes', 'band_names', 'mean', 'std'})}")
        cfg = cls(**dict(data))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if len(self.mean) != self.n_bands or len(self.std) != self.n_bands or len(self.band_names) != self.n_bands:
            raise ValueError("band_names, mean and std need one value per band")
        if self.n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {self.n_classes}")


class Normalise(nn.Module):
    """(x - mean) / std per band, NaN -> 0, on (B, T, C, H, W)."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).clamp_min(1e-6).view(1, 1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        z = (x - self.mean) / self.std
        return torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)


def double_conv(n_in: int, n_out: int) -> nn.Sequential:
    """(3x3 conv, BatchNorm, ReLU) x 2: a receptive field of 5 px."""
    return nn.Sequential(nn.Conv2d(n_in, n_out, 3, padding=1, bias=False), nn.BatchNorm2d(n_out), nn.ReLU(inplace=True),
                         nn.Conv2d(n_out, n_out, 3, padding=1, bias=False), nn.BatchNorm2d(n_out), nn.ReLU(inplace=True))


def keep_any(valid: Tensor) -> Tensor:
    """Per-pixel attention mask (B, T, ...) that never leaves a pixel with no date: a pixel without a
    valid date may look at all of its (zero) dates."""
    return valid | ~valid.any(1, keepdim=True)
