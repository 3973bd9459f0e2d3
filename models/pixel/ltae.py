"""L-TAE: the Lightweight Temporal Attention Encoder, for pixel time series.

Reference: V. Sainte Fare Garnot and L. Landrieu, "Lightweight Temporal Self-Attention
for Classifying Satellite Images Time Series", AALTD @ ECML-PKDD 2020 (arXiv:2007.00586).
SITS-MoCo uses it as a pixel-level baseline.

L-TAE replaces the queries of multi-head self-attention by one *learnt master query per
head* and does not project the values: the ``d_model`` input channels are split into
``n_heads`` groups and head ``h`` averages group ``h`` over time with its own attention
weights. So each head is a cheap, learnt temporal pooling looking at a part of the
features; the concatenated heads go through an MLP. Here:

1. a per-date MLP lifts each date's features to ``d_model`` (Linear + BatchNorm + ReLU,
   ``in -> 32 -> 64 -> d_model``, as STNet's - the original L-TAE gets its per-date
   features from a pixel-set encoder instead), then a LayerNorm;
2. the sinusoidal code of the day offset is added; as in L-TAE the code has
   ``d_model / n_heads`` channels and is repeated for every head, so each head's value
   group carries the full range of frequencies
   (:class:`cropmap.models.encoding.DayEncoding`, base 1000 as in the paper);
3. keys ``Linear(d_model, n_heads * d_k)``; scores ``q_h . k_{t,h} / sqrt(d_k)`` with the
   master queries ``q_h``; softmax over the real dates (padding is masked out), attention
   dropout; output ``sum_t a_{h,t} v_{t,h}`` concatenated over heads ``(B, d_model)``;
4. output MLP ``Linear(d_model, mlp_dim)`` + BatchNorm + ReLU, dropout, LayerNorm (the
   2020 version's output norm) - this is the embedding;
5. decoder MLP ``mlp_dim -> 64 -> 32 -> classes`` (the decoder of PSE+L-TAE).

Defaults: ``d_model`` 128 split into 16 heads of 8 channels, ``d_k`` 8, ``mlp_dim`` 128,
dropout 0.2, attention dropout 0.1 (the paper's 16 heads, ``d_k`` 8, dropout 0.2; its
``d_model`` 256 is halved as the pixel input is far smaller than a pixel-set embedding);
about 57k parameters with 12 bands and 21 classes.

Adaptations to the cropmap convention: the per-date MLP reads ``cat([x, present])`` and
runs on real dates only (BatchNorm never sees padding); the day code is computed from
the real (fractional, possibly negative) day offsets; padding gets zero attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cropmap.models.base import (
    DAY_BASE,
    PixelClassifier,
    PixelModelConfig,
    attention_keep_mask,
    embed_tokens,
    linear_block,
    mlp_decoder,
)
from cropmap.models.encoding import DayEncoding

__all__ = ["LTAEConfig", "LTAE"]


@dataclass
class LTAEConfig(PixelModelConfig):
    """Hyper-parameters of :class:`LTAE`; plain types only (JSON round-trip)."""

    d_model: int = 128
    n_heads: int = 16
    d_k: int = 8
    mlp_dim: int = 128
    dropout: float = 0.2
    attn_dropout: float = 0.1

    def validate(self) -> None:
        super().validate()
        self._require_positive("d_model", "n_heads", "d_k", "mlp_dim")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"d_model / n_heads = {self.d_model // self.n_heads} must be even (it is the size "
                "of the per-head sinusoidal day code)"
            )
        self._require_probability("dropout", "attn_dropout")


class LTAE(PixelClassifier):
    """Lightweight Temporal Attention Encoder classifier (see module docstring).

    ``encode`` returns the ``(B, mlp_dim)`` embedding; ``attention`` the ``(B, n_heads, T)``
    attention weights (useful to inspect which dates each head picks).
    """

    config_class = LTAEConfig
    config: LTAEConfig

    def __init__(self, n_bands: int, n_classes: int, **kwargs: Any) -> None:
        super().__init__(n_bands, n_classes, **kwargs)
        c = self.config
        self.embed_dim = c.mlp_dim
        self.input_mlp = nn.Sequential(
            *linear_block(2 * c.n_bands, 32), *linear_block(32, 64), *linear_block(64, c.d_model)
        )
        self.input_norm = nn.LayerNorm(c.d_model)
        self.day_encoding = DayEncoding(c.d_model // c.n_heads, base=DAY_BASE)
        self.key = nn.Linear(c.d_model, c.n_heads * c.d_k)
        self.query = nn.Parameter(torch.randn(c.n_heads, c.d_k) * math.sqrt(2.0 / c.d_k))
        self.attn_dropout = nn.Dropout(c.attn_dropout)
        self.output_mlp = nn.Sequential(*linear_block(c.d_model, c.mlp_dim), nn.Dropout(c.dropout))
        self.output_norm = nn.LayerNorm(c.mlp_dim)
        self.decoder = mlp_decoder(c.mlp_dim, c.n_classes)

    def _tokens(self, x: Tensor, present: Tensor, days: Tensor, mask: Tensor) -> Tensor:
        mlp = self.input_mlp
        h = embed_tokens(lambda f: self.input_norm(mlp(f)), x, present, mask)
        code = self.day_encoding(days).to(h.dtype).repeat(1, 1, self.config.n_heads)
        return h + code

    def _attend(self, h: Tensor, mask: Tensor) -> Tensor:
        B, T, _ = h.shape
        c = self.config
        keys = self.key(h).view(B, T, c.n_heads, c.d_k)
        scores = torch.einsum("bthd,hd->bht", keys, self.query) / math.sqrt(c.d_k)
        keep = attention_keep_mask(mask).unsqueeze(1)  # (B, 1, T)
        scores = scores.masked_fill(~keep, float("-inf"))
        return torch.softmax(scores, dim=-1)

    def attention(self, x: Tensor, present: Tensor, days: Tensor, mask: Tensor) -> Tensor:
        """Attention weights ``(B, n_heads, T)`` of each head over the dates (eval: no dropout)."""
        x, present, days, mask = self.prepare(x, present, days, mask)
        return self._attend(self._tokens(x, present, days, mask), mask)

    def encode(self, x: Tensor, present: Tensor, days: Tensor, mask: Tensor) -> Tensor:
        """Embedding ``(B, mlp_dim)``."""
        x, present, days, mask = self.prepare(x, present, days, mask)
        h = self._tokens(x, present, days, mask)
        B, T, _ = h.shape
        c = self.config
        attn = self.attn_dropout(self._attend(h, mask))
        values = h.view(B, T, c.n_heads, c.d_model // c.n_heads)
        out = torch.einsum("bht,bthe->bhe", attn, values).reshape(B, c.d_model)
        return self.output_norm(self.output_mlp(out))
