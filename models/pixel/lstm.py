"""LSTM classifier for pixel time series.

Reference: S. Hochreiter and J. Schmidhuber, "Long Short-Term Memory", Neural
Computation 9(8), 1997; for crop mapping e.g. M. Rußwurm and M. Körner, "Temporal
Vegetation Modelling using Long Short-Term Memory Networks for Crop Identification from
Medium-Resolution Multi-Spectral Satellite Images", CVPR workshops 2017, and the LSTM of
the BreizhCrops benchmark (Rußwurm et al., ISPRS Archives 2020), which SITS-MoCo uses as
a pixel-level baseline.

A stacked LSTM reads the dates in order; the final hidden state of the last layer (both
directions' when ``bidirectional``) goes through a LayerNorm - that is the embedding -
and the decoder (dropout + ``Linear``) gives logits.

Choice of defaults: 2 layers of 128 units, *unidirectional*, dropout 0.2, day code 16
(about 222k parameters with 12 bands and 21 classes). The forward state at the last real
date has read the whole season; a bidirectional LSTM (``bidirectional=True``) reads it
twice, which doubles the recurrent cost (about 575k parameters) - sequential recurrences
are the slowest part of this zoo on CPU - for little expected gain on series of <= 48
dates.

Adaptations to the cropmap convention: each date's input is
``cat([x, present, day code])`` - presence flags tell missing from mean values, the
sinusoidal code (:class:`cropmap.models.encoding.DayEncoding`, base 1000) of the real
day offset tells the LSTM how far apart the irregular dates are; the padded batch is
packed (``pack_padded_sequence``) with the lengths given by ``mask``, so padding is never
read and the last state is that of each row's last real date. Rows without any real date
get length 1 (their first position holds only zeros) so they do not crash. The LSTM
itself always runs in float32 (autocast is switched off around it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from cropmap.models.base import DAY_BASE, PixelClassifier, PixelModelConfig, date_features
from cropmap.models.encoding import DayEncoding

__all__ = ["LSTMConfig", "LSTMClassifier"]


@dataclass
class LSTMConfig(PixelModelConfig):
    """Hyper-parameters of :class:`LSTMClassifier`; plain types only (JSON round-trip)."""

    hidden: int = 128
    n_layers: int = 2
    bidirectional: bool = False
    dropout: float = 0.2
    day_dim: int = 16

    def validate(self) -> None:
        super().validate()
        self._require_positive("hidden", "n_layers")
        self._require_even("day_dim")
        self._require_probability("dropout")


class LSTMClassifier(PixelClassifier):
    """LSTM classifier (see module docstring). Rows must be padded at the end."""

    config_class = LSTMConfig
    config: LSTMConfig

    def __init__(self, n_bands: int, n_classes: int, **kwargs: Any) -> None:
        super().__init__(n_bands, n_classes, **kwargs)
        c = self.config
        self.day_encoding = DayEncoding(c.day_dim, base=DAY_BASE)
        self.lstm = nn.LSTM(
            2 * c.n_bands + c.day_dim,
            c.hidden,
            num_layers=c.n_layers,
            batch_first=True,
            bidirectional=c.bidirectional,
            dropout=c.dropout if c.n_layers > 1 else 0.0,
        )
        self.directions = 2 if c.bidirectional else 1
        self.embed_dim = self.directions * c.hidden
        self.output_norm = nn.LayerNorm(self.embed_dim)
        self.decoder = nn.Sequential(nn.Dropout(c.dropout), nn.Linear(self.embed_dim, c.n_classes))

    def encode(self, x: Tensor, present: Tensor, days: Tensor, mask: Tensor) -> Tensor:
        """Final hidden state of the last layer (directions concatenated), ``(B, embed_dim)``."""
        x, present, days, mask = self.prepare(x, present, days, mask)
        feats = date_features(x, present, days, mask, self.day_encoding)
        lengths = mask.sum(1).clamp_min(1).cpu()
        # The recurrence runs in float32 even under a bfloat16 autocast: reduced-precision
        # LSTM kernels are missing on some CUDA set-ups, and it is a small part of the cost.
        with torch.autocast(device_type=feats.device.type, enabled=False):
            packed = pack_padded_sequence(feats.float(), lengths, batch_first=True, enforce_sorted=False)
            _, (h_n, _) = self.lstm(packed)
        # h_n: (layers * directions, B, hidden), already back in the batch's row order.
        last = h_n[-self.directions:]  # the last layer, forward (then backward)
        return self.output_norm(last.transpose(0, 1).reshape(x.shape[0], self.embed_dim))
