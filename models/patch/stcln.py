"""STCLN: a spatiotemporal network for patch segmentation, pre-trainable by masked reconstruction.

After Qin et al. (JAG 2025), scaled for CPU and made memory-aware:

* per-date spatial encoder at full resolution: two DoubleConv blocks (C -> conv_dim -> d_model);
* per-pixel temporal transformer (post-norm, ``n_layers`` x ``n_heads``) on the sinusoidal code of
  the *real day offsets* (the original fed indices 0..T-1), with invalid dates masked out;
* STA head (SpatioTemporal Attention): queries from the temporal output, keys from the
  pre-temporal conv features, both projected to ``sta_dim`` per date, their similarity summed over
  the whole temporal stack (valid dates only); values = 1x1 conv of the max over time of the
  temporal output; ``out = gamma * A V + V`` with ``gamma`` learnable from 0; 1x1 conv to classes;
* masked pre-training hooks: a learnable ``mask_token`` replacing masked (date, pixel) cells of the
  normalised input, and ``recon`` (Linear d_model -> C) reconstructing every band.

Memory. The original STA is an HW x HW attention (a 128 x 128 patch: 16k x 16k, ~1 GB fp32 per
sample). Here it is windowed: pixels attend within non-overlapping ``sta_window`` x ``sta_window``
windows aligned on a grid fixed by the patch ``origin`` (so tiled prediction sees the same windows
wherever a patch starts). Activation memory per sample is then

    spatial encoder + temporal transformer:  O(H W T (d_model + d_ff + n_heads T))
    STA:                                      O(H W (T sta_dim + sta_window^2))

i.e. linear in the patch area H W for a fixed window (the full STA would be O((H W)^2)).
``benchmarks/patch_segmentation.py`` measures it at 16-128 px.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cropmap.models.encoding import sinusoidal_encoding
from cropmap.models.patch.base import Normalise, PatchModelConfig, double_conv, keep_any

__all__ = ["STCLN", "STCLNConfig", "STAHead", "window_attention"]


@dataclasses.dataclass
class STCLNConfig(PatchModelConfig):
    conv_dim: int = 16
    d_model: int = 32
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 64
    dropout: float = 0.1
    sta_dim: int = 4
    """Query/key width per date of the STA similarity."""
    sta_window: int = 8
    """Side of the STA attention windows (pixels)."""
    day_base: float = 1000.0

    def validate(self) -> None:
        super().validate()
        for k in ("conv_dim", "d_model", "n_heads", "n_layers", "d_ff", "sta_dim", "sta_window"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.d_model % self.n_heads or self.d_model % 2:
            raise ValueError(f"d_model {self.d_model} must be even and a multiple of n_heads {self.n_heads}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def window_attention(q: Tensor, k: Tensor, v: Tensor, window: int, origin: tuple[int, int] = (0, 0),
                     scale: float | None = None) -> Tensor:
    """Attention among the pixels of each ``window`` x ``window`` window of a global grid.

    ``q``, ``k`` (B, D, H, W), ``v`` (B, E, H, W); windows are aligned so that pixel (r, c) of the patch
    (global position ``origin + (r, c)``) falls in window ``((origin_r + r) // window, ...)``. Positions
    outside the patch are padding and never attended. ``scale`` multiplies q.k (default 1/sqrt(D)).
    Returns (B, E, H, W). Memory: B H W window^2.
    """
    b, d, h, w = q.shape
    top, left = origin[0] % window, origin[1] % window
    hp, wp = math.ceil((top + h) / window) * window, math.ceil((left + w) / window) * window
    pad = (left, wp - w - left, top, hp - h - top)

    def tiles(t: Tensor) -> Tensor:  # (B, X, hp, wp) -> (B, nW, window^2, X)
        t = F.pad(t, pad)
        x = t.shape[1]
        t = t.view(b, x, hp // window, window, wp // window, window).permute(0, 2, 4, 3, 5, 1)
        return t.reshape(b, -1, window * window, x)

    qw, kw, vw, mw = tiles(q), tiles(k), tiles(v), tiles(q.new_ones(b, 1, h, w))[..., 0] > 0
    scores = (qw @ kw.transpose(-1, -2)) * (scale if scale is not None else 1.0 / math.sqrt(d))  # (B, nW, n, n)
    scores = scores.masked_fill(~mw[:, :, None, :], float("-inf"))
    out = torch.softmax(scores, -1) @ vw  # (B, nW, n, E)
    e = v.shape[1]
    out = out.view(b, hp // window, wp // window, window, window, e).permute(0, 5, 1, 3, 2, 4).reshape(b, e, hp, wp)
    return out[:, :, top:top + h, left:left + w]


class STAHead(nn.Module):
    """The STA segmentation head (windowed; see the module docstring)."""

    def __init__(self, d_model: int, conv_dim: int, n_classes: int, sta_dim: int, window: int) -> None:
        super().__init__()
        self.q = nn.Linear(d_model, sta_dim)
        self.k = nn.Linear(d_model, sta_dim)
        self.v = nn.Conv2d(d_model, d_model, 1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.classifier = nn.Conv2d(d_model, n_classes, 1)
        self.window = window

    def forward(self, h: Tensor, f: Tensor, valid: Tensor, origin: tuple[int, int] = (0, 0)) -> Tensor:
        """``h`` temporal output, ``f`` conv features, both (B, T, H, W, d); ``valid`` (B, T, H, W)."""
        b, t, hh, ww, _ = h.shape
        m = valid.unsqueeze(-1).to(h.dtype)
        n_valid = valid.sum(1).clamp_min(1).to(h.dtype)  # (B, H, W)
        # the similarity sums over the valid dates of both pixels; 1/sqrt(T) keeps its scale
        q = (self.q(h) * m / n_valid[:, None, :, :, None].sqrt()).permute(0, 1, 4, 2, 3).reshape(b, -1, hh, ww)
        k = (self.k(f) * m).permute(0, 1, 4, 2, 3).reshape(b, -1, hh, ww)
        mx = torch.where(keep_any(valid).unsqueeze(-1), h, torch.full_like(h, float("-inf"))).amax(1)  # (B, H, W, d)
        v = self.v(mx.permute(0, 3, 1, 2))
        a = window_attention(q, k, v, self.window, origin, scale=1.0 / math.sqrt(self.q.out_features))
        return self.classifier(self.gamma * a + v)


class STCLN(nn.Module):
    """STCLN backbone + STA head (see the module docstring)."""

    def __init__(self, config: STCLNConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        c = config
        self.norm_in = Normalise(c.mean, c.std)
        self.mask_token = nn.Parameter(torch.zeros(c.n_bands))
        self.spatial = nn.Sequential(double_conv(c.n_bands, c.conv_dim), double_conv(c.conv_dim, c.d_model))
        self.in_norm = nn.LayerNorm(c.d_model)
        layer = nn.TransformerEncoderLayer(c.d_model, c.n_heads, c.d_ff, c.dropout, batch_first=True, norm_first=False)
        self.temporal = nn.TransformerEncoder(layer, c.n_layers, enable_nested_tensor=False)
        self.recon = nn.Linear(c.d_model, c.n_bands)
        self.decoder = STAHead(c.d_model, c.conv_dim, c.n_classes, c.sta_dim, c.sta_window)

    @classmethod
    def from_config(cls, config) -> STCLN:
        return cls(config if isinstance(config, STCLNConfig) else STCLNConfig.from_dict(config))

    def encode(self, x: Tensor, days: Tensor, valid: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Temporal output ``h`` and conv features ``f``, both (B, T, H, W, d_model).

        ``mask`` (B, T, H, W) bool: cells replaced by the learnable mask token (masked pre-training)."""
        b, t, c, hh, ww = x.shape
        z = self.norm_in(x)
        if mask is not None:
            z = torch.where(mask.unsqueeze(2), self.mask_token.view(1, 1, -1, 1, 1).to(z.dtype), z)
        f = self.spatial(z.reshape(b * t, c, hh, ww))  # (B*T, d, H, W)
        d = f.shape[1]
        f = f.view(b, t, d, hh, ww).permute(0, 1, 3, 4, 2)  # (B, T, H, W, d)
        code = sinusoidal_encoding(days.to(f.dtype), d, self.config.day_base)  # (B, T, d)
        seq = self.in_norm(f + code[:, :, None, None, :])
        seq = seq.permute(0, 2, 3, 1, 4).reshape(b * hh * ww, t, d)
        keep = keep_any(valid).permute(0, 2, 3, 1).reshape(b * hh * ww, t)
        h = self.temporal(seq, src_key_padding_mask=~keep)
        h = h.view(b, hh, ww, t, d).permute(0, 3, 1, 2, 4)
        return h, f

    def reconstruct(self, h: Tensor) -> Tensor:
        """(B, T, H, W, d) -> normalised band values (B, T, C, H, W)."""
        return self.recon(h).permute(0, 1, 4, 2, 3)

    def forward(self, x: Tensor, days: Tensor, valid: Tensor, origin: tuple[int, int] = (0, 0)) -> Tensor:
        h, f = self.encode(x, days, valid)
        return self.decoder(h, f, valid, origin)
