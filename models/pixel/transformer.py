"""Transformer with masked mean pooling (a SITS-MoCo baseline).

The model
---------
:class:`PixelTransformer` is the "Transformer" baseline of SITS-MoCo (Xu, Ma & Zhang,
ISPRS J. Photogramm. Remote Sens. 2024), itself the encoder of SITS-BERT (Yuan & Lin,
IEEE JSTARS 2021) on top of Vaswani et al. (2017). It is STNet without the cloud-aware
pooling and with a deeper encoder. Each observation date of a pixel is one token:

1. a per-date MLP lifts the date's features to ``d_model`` (Linear + BatchNorm + ReLU,
   ``in -> 32 -> 64 -> d_model``), followed by a LayerNorm;
2. the sinusoidal code of the date's day offset is added
   (:class:`cropmap.models.encoding.DayEncoding`, base 1000) - the only information
   about *when* each date was acquired, tokens have no other order;
3. ``n_layers`` post-norm transformer encoder layers mix the dates;
4. the tokens are averaged over the real dates (masked mean pooling);
5. an MLP decoder (``d_model -> 64 -> 32 -> classes``, as STNet's) gives logits.

Defaults: ``d_model`` 128, 8 heads, 3 layers, feed-forward 256, dropout 0.1 - the usual
"small" setting of the SITS transformers (SITS-BERT uses 3 layers with 8 heads); with
12 bands and 21 classes that is about 421k parameters.

Adaptations to the cropmap batch convention (``x``, ``present``, ``days``, ``mask``, see
:mod:`cropmap.models.series`): optical and radar dates share one sequence, so the
per-date MLP reads ``cat([x, present])`` (a 0 in ``x`` is ambiguous - band mean or
missing - the presence flag is not); the MLP runs only on the real tokens so BatchNorm
never sees padding; the day encoding is evaluated on the real, possibly negative or
fractional, day offsets; padding is excluded from attention and from the pooling.

The building blocks shared with the other zoo models are in :mod:`cropmap.models.base`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from cropmap.models.base import (
    DAY_BASE,
    PixelClassifier,
    PixelModelConfig,
    attention_keep_mask,
    embed_tokens,
    linear_block,
    masked_mean,
    mlp_decoder,
)
from cropmap.models.encoding import DayEncoding

__all__ = ["PixelTransformer", "TransformerConfig"]


# --------------------------------------------------------------------------------------
# The Transformer
# --------------------------------------------------------------------------------------


@dataclass
class TransformerConfig(PixelModelConfig):
    """Hyper-parameters of :class:`PixelTransformer`; plain types only (JSON round-trip)."""

    d_model: int = 128
    n_heads: int = 8
    n_layers: int = 3
    d_ff: int = 256
    dropout: float = 0.1

    def validate(self) -> None:
        super().validate()
        self._require_positive("n_heads", "n_layers", "d_ff")
        self._require_even("d_model")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        self._require_probability("dropout")


class PixelTransformer(PixelClassifier):
    """Transformer encoder with masked mean pooling (see module docstring).

    ``encode`` returns the ``(B, d_model)`` mean of the encoded real dates.
    """

    config_class = TransformerConfig
    config: TransformerConfig

    def __init__(self, n_bands: int, n_classes: int, **kwargs: Any) -> None:
        super().__init__(n_bands, n_classes, **kwargs)
        c = self.config
        self.embed_dim = c.d_model
        self.input_mlp = nn.Sequential(
            *linear_block(2 * c.n_bands, 32), *linear_block(32, 64), *linear_block(64, c.d_model)
        )
        self.input_norm = nn.LayerNorm(c.d_model)
        self.day_encoding = DayEncoding(c.d_model, base=DAY_BASE)
        layer = nn.TransformerEncoderLayer(
            c.d_model, c.n_heads, dim_feedforward=c.d_ff, dropout=c.dropout,
            batch_first=True, norm_first=False,
        )
        self.encoder = nn.TransformerEncoder(layer, c.n_layers, enable_nested_tensor=False)
        self.decoder = mlp_decoder(c.d_model, c.n_classes)

    def encode(self, x: Tensor, present: Tensor, days: Tensor, mask: Tensor) -> Tensor:
        """Masked mean of the encoded dates, ``(B, d_model)``."""
        x, present, days, mask = self.prepare(x, present, days, mask)
        mlp = self.input_mlp
        h = embed_tokens(lambda f: self.input_norm(mlp(f)), x, present, mask)
        h = h + self.day_encoding(days).to(h.dtype)
        h = self.encoder(h, src_key_padding_mask=~attention_keep_mask(mask))
        return masked_mean(h, mask)
