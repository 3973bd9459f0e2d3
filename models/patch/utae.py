"""U-TAE: U-Net with temporal attention encoder (Garnot and Landrieu, ICCV 2021), the published reference.

A shared per-date U-Net encoder (``encoder_widths``; every level after the first halves the
resolution), an L-TAE at the lowest resolution producing per-pixel attention masks over the dates
(``n_heads`` heads, master query learned, sinusoidal code of the real day offsets), the masks
upsampled to every level to collapse each skip connection's time axis (channels split in head
groups), and a convolutional decoder (``decoder_widths``). Invalid dates are masked out (a
low-resolution cell is valid when one of its pixels is). The published widths are
[64, 64, 64, 128] / [32, 32, 64, 128] with 16 heads and d_model 256 (~1.09M parameters); the
defaults here are a CPU-size version. H and W are padded to a multiple of 2^(levels - 1).
Memory: O(H W T max(width)), linear in the patch area.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cropmap.models.encoding import sinusoidal_encoding
from cropmap.models.patch.base import Normalise, PatchModelConfig, double_conv, keep_any

__all__ = ["UTAE", "UTAEConfig"]


@dataclasses.dataclass
class UTAEConfig(PatchModelConfig):
    encoder_widths: list[int] = dataclasses.field(default_factory=lambda: [16, 16, 32])
    decoder_widths: list[int] = dataclasses.field(default_factory=lambda: [16, 16, 32])
    n_heads: int = 4
    d_model: int = 32
    d_k: int = 4
    day_base: float = 1000.0

    def validate(self) -> None:
        super().validate()
        if len(self.encoder_widths) != len(self.decoder_widths) or len(self.encoder_widths) < 2:
            raise ValueError("encoder_widths and decoder_widths need the same length (>= 2)")
        if self.encoder_widths[-1] != self.decoder_widths[-1]:
            raise ValueError("the last encoder and decoder widths must be equal")
        for w in [*self.encoder_widths[:-1], *self.decoder_widths[:-1]]:
            if w % self.n_heads:
                raise ValueError(f"every width of a skip connection must be a multiple of n_heads {self.n_heads}, got {w}")
        if self.d_model % 2 or self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} must be even and a multiple of n_heads")


class LTAE2d(nn.Module):
    """Lightweight temporal attention per pixel: (B, T, E, h, w) -> (B, E_out, h, w) and masks (heads, B, T, h, w)."""

    def __init__(self, n_in: int, n_out: int, n_heads: int, d_model: int, d_k: int, day_base: float) -> None:
        super().__init__()
        self.n_heads, self.d_k, self.day_base = n_heads, d_k, day_base
        # per-date normalisation (the published GroupNorm over the whole sequence would mix invalid dates in)
        self.inp = nn.Sequential(nn.LayerNorm(n_in), nn.Linear(n_in, d_model))
        self.key = nn.Linear(d_model, n_heads * d_k)
        self.query = nn.Parameter(torch.randn(n_heads, d_k) * 0.1)
        self.out = nn.Sequential(nn.Linear(d_model, n_out), nn.LayerNorm(n_out), nn.ReLU())
        self.d_model = d_model

    def forward(self, x: Tensor, days: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        b, t, e, h, w = x.shape
        seq = self.inp(x.permute(0, 3, 4, 1, 2).reshape(b * h * w, t, e))  # (N, T, d)
        code = sinusoidal_encoding(days.to(seq.dtype), self.d_model, self.day_base)  # (B, T, d)
        seq = seq + code[:, None, None].expand(b, h, w, t, self.d_model).reshape(b * h * w, t, self.d_model)
        k = self.key(seq).view(-1, t, self.n_heads, self.d_k)
        scores = torch.einsum("nthk,hk->nht", k, self.query) / math.sqrt(self.d_k)
        keep = keep_any(valid).permute(0, 2, 3, 1).reshape(b * h * w, 1, t)
        attn = torch.softmax(scores.masked_fill(~keep, float("-inf")), -1)  # (N, heads, T)
        vals = seq.view(-1, t, self.n_heads, self.d_model // self.n_heads)
        out = torch.einsum("nht,nthc->nhc", attn, vals).reshape(-1, self.d_model)
        out = self.out(out).view(b, h, w, -1).permute(0, 3, 1, 2)
        return out, attn.view(b, h, w, self.n_heads, t).permute(3, 0, 4, 1, 2)


def _collapse(feat: Tensor, attn: Tensor) -> Tensor:
    """Weighted sum over time of (B, T, C, h, w) by head masks (heads, B, T, h, w), channels split by head."""
    heads = attn.shape[0]
    b, t, c, h, w = feat.shape
    if attn.shape[-2:] != (h, w):
        attn = F.interpolate(attn.reshape(heads * b, t, *attn.shape[-2:]), size=(h, w), mode="bilinear", align_corners=False)
        attn = attn.view(heads, b, t, h, w)
    groups = feat.view(b, t, heads, c // heads, h, w)
    out = torch.einsum("hbtyx,bthcyx->bhcyx", attn, groups)
    return out.reshape(b, c, h, w)


class UTAE(nn.Module):
    """U-TAE (see the module docstring)."""

    def __init__(self, config: UTAEConfig) -> None:
        super().__init__()
        config.validate()
        self.config = c = config
        self.norm_in = Normalise(c.mean, c.std)
        enc = c.encoder_widths
        self.levels = len(enc)
        self.inconv = double_conv(c.n_bands, enc[0])
        self.down = nn.ModuleList(
            nn.Sequential(nn.Conv2d(enc[i], enc[i], 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(enc[i]), nn.ReLU(inplace=True),
                          double_conv(enc[i], enc[i + 1]))
            for i in range(self.levels - 1))
        self.tae = LTAE2d(enc[-1], enc[-1], c.n_heads, c.d_model, c.d_k, c.day_base)
        dec = c.decoder_widths
        self.up = nn.ModuleList()
        for i in range(self.levels - 1, 0, -1):  # from the deepest level up
            self.up.append(nn.ModuleDict({
                "up": nn.ConvTranspose2d(dec[i], dec[i - 1], 4, stride=2, padding=1),
                "skip": nn.Conv2d(enc[i - 1], dec[i - 1], 1),
                "conv": double_conv(2 * dec[i - 1], dec[i - 1]),
            }))
        self.decoder = nn.Conv2d(dec[0], c.n_classes, 1)

    @classmethod
    def from_config(cls, config) -> UTAE:
        return cls(config if isinstance(config, UTAEConfig) else UTAEConfig.from_dict(config))

    def forward(self, x: Tensor, days: Tensor, valid: Tensor, origin: tuple[int, int] = (0, 0)) -> Tensor:
        b, t, c, h, w = x.shape
        m = 2 ** (self.levels - 1)
        hp, wp = math.ceil(h / m) * m, math.ceil(w / m) * m
        z = F.pad(self.norm_in(x).view(b * t, c, h, w), (0, wp - w, 0, hp - h))
        vmask = F.pad(valid.to(x.dtype), (0, wp - w, 0, hp - h))
        feats = [self.inconv(z)]
        for down in self.down:
            feats.append(down(feats[-1]))
        low = feats[-1].view(b, t, -1, *feats[-1].shape[-2:])
        v_low = F.adaptive_max_pool2d(vmask, low.shape[-2:]) > 0
        out, attn = self.tae(low, days, v_low)
        for i, blk in zip(range(self.levels - 2, -1, -1), self.up):
            skip = _collapse(feats[i].view(b, t, -1, *feats[i].shape[-2:]), attn)
            out = blk["conv"](torch.cat([blk["up"](out), blk["skip"](skip)], 1))
        return self.decoder(out)[:, :, :h, :w]
