"""STNet: a light pixel-level transformer for satellite image time series.

STNet is the encoder/classifier of SITS-MoCo (Xu et al., 2024). Each observation
date of a pixel becomes one token:

1. a per-date MLP lifts the band values to ``d_model`` features
   (Linear + BatchNorm + ReLU, three times: in -> 32 -> 64 -> d_model), followed
   by a LayerNorm;
2. the sinusoidal code of the observation's day offset is added
   (:mod:`cropmap.models.encoding`), which is the only way the model knows *when*
   each date was acquired - tokens have no other order;
3. one post-norm transformer encoder layer mixes information across dates;
4. the tokens are pooled over time with weights that favour clear, vegetated
   observations: each date's weight is proportional to ``exp(NDVI)`` and dates
   flagged cloudy or dark get NDVI = -1 (a softmax over valid dates);
5. a small MLP decoder (d_model -> 64 -> 32 -> classes) produces logits.

Adaptations to the cropmap data convention (see the package docs): the batch is
``x (B,T,C)`` z-scored with missing values set to 0, ``present (B,T,C)`` marking
observed band values, ``days (B,T)`` and ``mask (B,T)`` marking real dates (padding
at the end). Optical and radar acquisitions share one sequence, so

* the per-date MLP sees ``cat([x, present], -1)`` (``2*C`` features): a zero in
  ``x`` is ambiguous (band mean or missing), the presence flag is not;
* the MLP runs only on the real tokens (``x[mask]``), so padding never enters the
  BatchNorm statistics;
* the pooling weight needs true reflectances, so the model keeps the normalisation
  statistics as buffers and de-normalises internally; where red or NIR is missing
  on a date (radar-only dates, tiles lacking a band) NDVI is undefined and the
  date gets a neutral NDVI of 0, and a cloud/dark flag is only raised when every
  band it needs was observed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cropmap.models.encoding import DayEncoding
from cropmap.models.inference import eval_fast_path

__all__ = ["STNetConfig", "STNet", "cloud_weights", "POOLING_MODES"]

POOLING_MODES = ("ndvi", "mean")

# Thresholds of the original cloud/dark screening, in reflectance units (0..1).
_CLOUD_THRESHOLD = 0.2  # (R + G + B - 0.2) / 0.6 above this -> cloudy
_DARK_THRESHOLD = 0.35  # NIR + SWIR1 + SWIR2 below this -> dark (shadow, water)


@dataclass
class STNetConfig:
    """Hyper-parameters of :class:`STNet`; plain types only so it round-trips JSON.

    ``reflectance_scale`` divides the de-normalised optical values to get
    reflectances in 0..1 (use 10000 if the statistics were computed on raw
    Sentinel-2 digital numbers).
    """

    n_bands: int
    n_classes: int
    band_names: list[str]
    mean: list[float]
    std: list[float]
    d_model: int = 128
    n_heads: int = 16
    d_ff: int = 128
    dropout: float = 0.2
    pooling: str = "ndvi"
    reflectance_scale: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a JSON-ready dict of plain Python types."""
        return {
            "n_bands": int(self.n_bands),
            "n_classes": int(self.n_classes),
            "band_names": [str(b) for b in self.band_names],
            "mean": [float(m) for m in self.mean],
            "std": [float(s) for s in self.std],
            "d_model": int(self.d_model),
            "n_heads": int(self.n_heads),
            "d_ff": int(self.d_ff),
            "dropout": float(self.dropout),
            "pooling": str(self.pooling),
            "reflectance_scale": float(self.reflectance_scale),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> STNetConfig:
        """Build a config from :meth:`to_dict` output; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown STNetConfig keys: {sorted(unknown)}")
        values = dict(data)
        for key in ("band_names", "mean", "std"):
            if key in values:
                values[key] = list(values[key])
        return cls(**values)


def _block(n_in: int, n_out: int) -> list[nn.Module]:
    return [nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out), nn.ReLU(inplace=True)]


def cloud_weights(
    reflectance: Tensor,
    present: Tensor,
    mask: Tensor,
    band_names: Sequence[str],
) -> Tensor:
    """Temporal pooling weights ``(B, T)`` from reflectances ``(B, T, C)`` in 0..1.

    Each real date gets ``exp(NDVI)`` normalised over the real dates of its row
    (padding gets exactly 0). NDVI is forced to -1 on dates flagged cloudy
    (``(B02+B03+B04-0.2)/0.6 > 0.2``) or dark (``NIR+B11+B12 < 0.35``) and is 0
    (neutral) where red or NIR was not observed. A flag is raised only when all the
    bands it reads were observed on that date. NIR is B08, or B8A on dates where
    B08 is missing. Without red or NIR in ``band_names`` the weights are uniform.
    """
    index = {name.upper(): i for i, name in enumerate(band_names)}
    present = present & mask.unsqueeze(-1)
    B, T, _ = reflectance.shape
    zeros = reflectance.new_zeros(B, T)
    no = torch.zeros(B, T, dtype=torch.bool, device=reflectance.device)

    def band(name: str) -> tuple[Tensor, Tensor]:
        i = index.get(name)
        if i is None:
            return zeros, no
        # Values of unobserved entries are meaningless: zero them so nothing
        # non-finite can leak into the arithmetic below.
        ok = present[..., i]
        return torch.where(ok, reflectance[..., i], zeros), ok

    blue, blue_ok = band("B02")
    green, green_ok = band("B03")
    red, red_ok = band("B04")
    nir, nir_ok = band("B08")
    nir_a, nir_a_ok = band("B8A")
    nir = torch.where(nir_ok, nir, nir_a)
    nir_ok = nir_ok | nir_a_ok
    swir1, swir1_ok = band("B11")
    swir2, swir2_ok = band("B12")

    ndvi_ok = red_ok & nir_ok
    denom = nir + red
    # Near-zero denominators (dark or unphysical values) would blow NDVI up; the
    # clamp keeps it in its natural range so exp() stays bounded.
    safe = torch.where(denom.abs() > 1e-6, denom, torch.ones_like(denom))
    ndvi = torch.where(ndvi_ok, ((nir - red) / safe).clamp(-1.0, 1.0), zeros)

    cloudy = (blue_ok & green_ok & red_ok) & (
        (red + green + blue - 0.2) / 0.6 > _CLOUD_THRESHOLD
    )
    dark = (nir_ok & swir1_ok & swir2_ok) & (nir + swir1 + swir2 < _DARK_THRESHOLD)
    ndvi = torch.where(cloudy | dark, torch.full_like(ndvi, -1.0), ndvi)

    # Softmax over real dates == exp(NDVI) normalised; -inf gives padding weight 0.
    logits = ndvi.masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=1)


def encoder_layer_eval(layer: nn.TransformerEncoderLayer, x: Tensor, pad: Tensor | None) -> Tensor:
    """``layer(x, src_key_padding_mask=pad)`` in eval mode (no dropout), in the batch-first layout throughout.

    The same arithmetic as ``nn.TransformerEncoderLayer`` (post- or pre-norm, ReLU or GELU), to float
    noise, without the module's transposes to (T, B, E) and the copies they force, and with no
    attention mask at all when ``pad`` is None (a batch without padding: the unmasked attention kernel
    is about 1.7x faster on CPU than the masked one at 16 heads of 8 features)."""
    sa = layer.self_attn
    b, t, e = x.shape
    h = sa.num_heads

    def attend(y: Tensor) -> Tensor:
        qkv = F.linear(y, sa.in_proj_weight, sa.in_proj_bias).view(b, t, 3, h, e // h).permute(2, 0, 3, 1, 4)
        mask = None if pad is None else (~pad)[:, None, None, :]  # True = attend
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)
        return sa.out_proj(o.transpose(1, 2).reshape(b, t, e))

    def ff(y: Tensor) -> Tensor:
        return layer.linear2(layer.activation(layer.linear1(y)))

    if layer.norm_first:
        x = x + attend(layer.norm1(x))
        return x + ff(layer.norm2(x))
    x = layer.norm1(x + attend(x))
    return layer.norm2(x + ff(x))


def _eval_layer_ok(layer: nn.Module) -> bool:
    """A layer :func:`encoder_layer_eval` reproduces (packed q/k/v projections, no extra key/value biases)."""
    sa = getattr(layer, "self_attn", None)
    return (isinstance(layer, nn.TransformerEncoderLayer) and sa is not None and sa.batch_first and sa._qkv_same_embed_dim
            and sa.in_proj_bias is not None and sa.bias_k is None and not sa.add_zero_attn and layer.activation in (F.relu, F.gelu))


class STNet(nn.Module):
    """STNet classifier for pixel time series (see module docstring).

    ``forward(x, present, days, mask)`` returns logits ``(B, n_classes)``;
    ``encode`` returns the pooled ``(B, d_model)`` embedding. ``band_names``,
    ``mean`` and ``std`` describe the ``n_bands`` input channels and their z-score
    statistics (used only by ``pooling="ndvi"``); ``pooling="mean"`` uses a masked
    mean over dates instead.
    """

    def __init__(
        self,
        n_bands: int,
        n_classes: int,
        *,
        band_names: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
        d_model: int = 128,
        n_heads: int = 16,
        d_ff: int = 128,
        dropout: float = 0.2,
        pooling: str = "ndvi",
        reflectance_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if n_bands <= 0 or n_classes <= 0:
            raise ValueError("n_bands and n_classes must be positive")
        if not (len(band_names) == len(mean) == len(std) == n_bands):
            raise ValueError(
                f"band_names, mean and std must each have n_bands={n_bands} entries, "
                f"got {len(band_names)}, {len(mean)}, {len(std)}"
            )
        if any(float(s) <= 0 for s in std):
            raise ValueError("std values must be positive")
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")
        if d_model % 2 != 0 or d_model % n_heads != 0:
            raise ValueError("d_model must be even and divisible by n_heads")
        if reflectance_scale <= 0:
            raise ValueError("reflectance_scale must be positive")

        self.config = STNetConfig(
            n_bands=int(n_bands),
            n_classes=int(n_classes),
            band_names=[str(b) for b in band_names],
            mean=[float(m) for m in mean],
            std=[float(s) for s in std],
            d_model=int(d_model),
            n_heads=int(n_heads),
            d_ff=int(d_ff),
            dropout=float(dropout),
            pooling=pooling,
            reflectance_scale=float(reflectance_scale),
        )
        self.band_names = list(self.config.band_names)
        self.pooling = pooling
        self.weight_dropout = float(dropout)
        self.register_buffer("band_mean", torch.tensor(self.config.mean, dtype=torch.float32))
        self.register_buffer("band_std", torch.tensor(self.config.std, dtype=torch.float32))

        self.input_mlp = nn.Sequential(
            *_block(2 * n_bands, 32), *_block(32, 64), *_block(64, d_model)
        )
        self.input_norm = nn.LayerNorm(d_model)
        self.day_encoding = DayEncoding(d_model, base=1000.0)
        self.encoder = nn.TransformerEncoderLayer(
            d_model,
            n_heads,
            dim_feedforward=d_ff,
            dropout=dropout,
            batch_first=True,
            norm_first=False,
        )
        self.decoder = nn.Sequential(
            *_block(d_model, 64), *_block(64, 32), nn.Linear(32, n_classes)
        )

    @classmethod
    def from_config(cls, config: STNetConfig | Mapping[str, Any]) -> STNet:
        """Build a model from an :class:`STNetConfig` or its ``to_dict()`` form."""
        if not isinstance(config, STNetConfig):
            config = STNetConfig.from_dict(config)
        kwargs = config.to_dict()
        return cls(kwargs.pop("n_bands"), kwargs.pop("n_classes"), **kwargs)

    @property
    def embed_dim(self) -> int:
        """Size of the :meth:`encode` embedding."""
        return self.config.d_model

    def pooling_weights(self, x: Tensor, present: Tensor, mask: Tensor) -> Tensor:
        """Deterministic pooling weights ``(B, T)`` (no weight dropout), rows sum to 1."""
        with torch.no_grad():
            if self.pooling == "mean":
                w = mask.to(x.dtype)
                return w / w.sum(dim=1, keepdim=True)
            reflectance = (x * self.band_std + self.band_mean) / self.config.reflectance_scale
            return cloud_weights(reflectance, present, mask, self.band_names)

    def _check(self, x: Tensor, present: Tensor, days: Tensor, mask: Tensor) -> None:
        if x.dim() != 3 or x.shape[-1] != self.config.n_bands:
            raise ValueError(f"x must be (B, T, {self.config.n_bands}), got {tuple(x.shape)}")
        if present.shape != x.shape:
            raise ValueError("present must have the shape of x")
        if days.shape != x.shape[:2] or mask.shape != x.shape[:2]:
            raise ValueError("days and mask must be (B, T)")

    def encode(self, x: Tensor, present: Tensor, days: Tensor, mask: Tensor) -> Tensor:
        """Pooled embedding ``(B, d_model)`` of a batch in the cropmap convention."""
        self._check(x, present, days, mask)
        mask = mask.bool()
        present = present.bool() & mask.unsqueeze(-1)
        # Padding may carry garbage (even NaN); zero it so it cannot leak through
        # 0-weighted sums (0 * NaN = NaN).
        x = torch.where(present, x, torch.zeros_like(x))
        days = torch.where(mask, days, torch.zeros_like(days))

        B, T, _ = x.shape
        feats = torch.cat([x, present.to(x.dtype)], dim=-1)
        # inference on CPU inside predict_views (it buckets views by length): the batch-first layer, and
        # without padding no boolean indexing and no attention mask; the same outputs to float noise
        fast = not self.training and x.device.type == "cpu" and eval_fast_path() and _eval_layer_ok(self.encoder)
        full = fast and bool(mask.all())
        if full:
            h = self.input_norm(self.input_mlp(feats.reshape(B * T, -1))).view(B, T, -1)
        else:
            # Only real tokens go through the MLP so BatchNorm never sees padding.
            tokens = self.input_norm(self.input_mlp(feats[mask]))
            h = tokens.new_zeros(B, T, tokens.shape[-1])
            h[mask] = tokens
        if fast:  # the dates of a block are few: encode each distinct day once (the same values)
            uniq, inverse = torch.unique(days, return_inverse=True)
            h += self.day_encoding(uniq)[inverse]
        else:
            h = h + self.day_encoding(days)
        if not full:
            h = torch.where(mask.unsqueeze(-1), h, torch.zeros_like(h))

        if fast:
            h = encoder_layer_eval(self.encoder, h, None if full else ~mask)
        else:
            h = self.encoder(h, src_key_padding_mask=~mask)
        if not full:
            h = torch.where(mask.unsqueeze(-1), h, torch.zeros_like(h))

        w = self.pooling_weights(x, present, mask)
        if self.training and self.pooling == "ndvi" and self.weight_dropout > 0:
            # Weight dropout (as in the original) keeps the model from relying on a
            # single date; a row that lost every date keeps its undropped weights.
            keep = (torch.rand_like(w) >= self.weight_dropout).to(w.dtype)
            dropped = w * keep
            total = dropped.sum(dim=1, keepdim=True)
            w = torch.where(total > 0, dropped / total.clamp_min(1e-12), w)
        return torch.einsum("bt,btd->bd", w, h)

    def forward(self, x: Tensor, present: Tensor, days: Tensor, mask: Tensor) -> Tensor:
        """Class logits ``(B, n_classes)``."""
        return self.decoder(self.encode(x, present, days, mask))
