"""PSE-TSA: the Pixel-Set Encoder and the Temporal Attention Encoder (Garnot et al. 2020), as used
for optical + radar fusion by Ofori-Ampofo, Pelletier and Lang (2021).

A parcel is a *set* of pixels observed on a series of dates. The PSE embeds each date's pixel set
(shared per-pixel MLP, masked mean || std pooling over the pixels, geometric features of the
parcel appended, second MLP) into one vector; the TAE attends over the dates with a master query
(the masked mean over time) and positions from :mod:`cropmap.models.encoding` evaluated on the
real day offsets (never a table indexed by day, which overflowed in the original); the decoder
maps the embedding to class logits.

Input of one sensor (a :class:`SensorInput`):

* ``x`` (B, T, C, S) float: normalised values of S sampled pixels on T dates (0 where missing);
* ``pixel_mask`` (B, S) bool: which of the S pixel slots hold a real pixel (small parcels repeat
  nothing: their free slots are masked);
* ``date_mask`` (B, T) bool: which of the T date slots hold a real date (series are padded);
* ``days`` (B, T) float: day offsets of the dates (any real value);
* ``geom`` (B, G) float: normalised geometric features of the parcel (G may be 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cropmap.models.encoding import sinusoidal_encoding

__all__ = ["SensorInput", "PixelSetEncoder", "TemporalAttentionEncoder", "Decoder", "PSETAE"]


@dataclass
class SensorInput:
    x: Tensor
    pixel_mask: Tensor
    date_mask: Tensor
    days: Tensor
    geom: Tensor

    def to(self, device) -> SensorInput:
        return SensorInput(*(t.to(device) for t in (self.x, self.pixel_mask, self.date_mask, self.days, self.geom)))


class _MaskedBatchNorm(nn.Module):
    """Batch normalisation over the last axis whose statistics come from the real entries only
    (padded pixels and dates never enter them); running statistics as in ``nn.BatchNorm1d``."""

    def __init__(self, dim: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))
        self.momentum, self.eps = momentum, eps

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        w = mask.unsqueeze(-1).to(x.dtype)
        dims = tuple(range(x.dim() - 1))
        n = w.sum()
        if self.training and n > 1:
            mean = (x * w).sum(dims) / n
            var = (((x - mean) ** 2) * w).sum(dims) / n
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        scale = self.weight * torch.rsqrt(var + self.eps)
        # padded entries get values too; every consumer masks them out (pooling weights, attention mask)
        return torch.addcmul(self.bias - mean * scale, x, scale)


class _MLP(nn.Module):
    """Linear -> masked BatchNorm -> ReLU layers; the last layer's activation is optional."""

    def __init__(self, sizes: list[int], last_relu: bool = True) -> None:
        super().__init__()
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.norms = nn.ModuleList(_MaskedBatchNorm(b) for b in sizes[1:])
        self.last_relu = last_relu

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        n = len(self.linears)
        for i, (lin, norm) in enumerate(zip(self.linears, self.norms)):
            x = norm(lin(x), mask)
            if i < n - 1 or self.last_relu:
                x = torch.relu_(x)
        return x


class PixelSetEncoder(nn.Module):
    """(B, T, C, S) pixel sets -> (B, T, out) date embeddings."""

    def __init__(self, in_channels: int, mlp1: list[int] = (32, 64), mlp2: list[int] = (128,), n_geom: int = 4) -> None:
        super().__init__()
        self.mlp1 = _MLP([in_channels, *mlp1])
        pooled = 2 * mlp1[-1]
        self.mlp2 = _MLP([pooled + n_geom, *mlp2], last_relu=False)
        self.n_geom = n_geom
        self.out_dim = mlp2[-1]

    def forward(self, inp: SensorInput) -> Tensor:
        x = inp.x.transpose(2, 3)  # (B, T, S, C)
        b, t, s, _ = x.shape
        valid = inp.date_mask[:, :, None] & inp.pixel_mask[:, None, :]  # (B, T, S)
        h = self.mlp1(x, valid)  # (B, T, S, D)
        w = valid.unsqueeze(-1).to(h.dtype)
        n = w.sum(2).clamp_min(1.0)
        mean = (h * w).sum(2) / n
        var = (((h - mean.unsqueeze(2)) ** 2) * w).sum(2) / (n - 1).clamp_min(1.0)
        std = torch.sqrt(var + 1e-6)  # one pixel: std 0 (+eps), not NaN
        feats = [mean, std]
        if self.n_geom:
            feats.append(inp.geom[:, None, :].expand(b, t, self.n_geom))
        return self.mlp2(torch.cat(feats, dim=-1), inp.date_mask)


class TemporalAttentionEncoder(nn.Module):
    """(B, T, d) date embeddings + day offsets -> (B, out): multi-head attention with a master query."""

    def __init__(self, d_model: int = 128, n_head: int = 4, d_k: int = 32, mlp: list[int] | None = None,
                 dropout: float = 0.2, day_base: float = 1000.0) -> None:
        super().__init__()
        mlp = list(mlp) if mlp is not None else [n_head * d_model, 128, 128]
        if mlp[0] != n_head * d_model:
            raise ValueError(f"TAE mlp must start with n_head * d_model = {n_head * d_model}, got {mlp[0]}")
        self.d_model, self.n_head, self.d_k, self.day_base = d_model, n_head, d_k, day_base
        self.norm_in = nn.LayerNorm(d_model)
        self.fc_q = nn.Linear(d_model, n_head * d_k)
        self.fc_k = nn.Linear(d_model, n_head * d_k)
        nn.init.normal_(self.fc_q.weight, 0.0, (2.0 / d_k) ** 0.5)
        nn.init.normal_(self.fc_k.weight, 0.0, (2.0 / d_k) ** 0.5)
        layers: list[nn.Module] = []
        for a, b in zip(mlp[:-1], mlp[1:]):
            layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU()]
        self.mlp = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.norm_out = nn.LayerNorm(mlp[-1])
        self.out_dim = mlp[-1]

    def forward(self, e: Tensor, days: Tensor, date_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Returns the embedding (B, out) and the attention weights (B, heads, T)."""
        b, t, d = e.shape
        x = self.norm_in(e) + sinusoidal_encoding(days, d, self.day_base).to(e.dtype)
        m = date_mask.unsqueeze(-1).to(x.dtype)
        master = (x * m).sum(1) / m.sum(1).clamp_min(1.0)  # masked mean over time
        q = self.fc_q(master).view(b, self.n_head, self.d_k)
        k = self.fc_k(x).view(b, t, self.n_head, self.d_k).permute(0, 2, 1, 3)  # (B, H, T, dk)
        scores = torch.einsum("bhd,bhtd->bht", q, k) / self.d_k ** 0.5
        scores = scores.masked_fill(~date_mask[:, None, :], float("-inf"))
        attn = torch.softmax(scores, dim=-1)
        attn = torch.nan_to_num(attn)  # a series with no date: zero weights, zero output
        out = torch.einsum("bht,btd->bhd", self.dropout(attn), x).reshape(b, self.n_head * d)
        return self.norm_out(self.dropout(self.mlp(out))), attn


class Decoder(nn.Sequential):
    """MLP [in, 64, 32, n_classes] with BatchNorm and ReLU between layers."""

    def __init__(self, sizes: list[int]) -> None:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers += [nn.BatchNorm1d(b), nn.ReLU()]
        super().__init__(*layers)


class PSETAE(nn.Module):
    """Single-sensor PSE-TSA: PSE -> TAE -> decoder; ``encode`` gives the (B, 128) embedding."""

    def __init__(self, in_channels: int, n_classes: int, n_geom: int = 4, *, mlp1=(32, 64), mlp2=(128,), n_head: int = 4,
                 d_k: int = 32, mlp3: list[int] | None = None, dropout: float = 0.2, decoder=(64, 32)) -> None:
        super().__init__()
        self.pse = PixelSetEncoder(in_channels, list(mlp1), list(mlp2), n_geom)
        self.tae = TemporalAttentionEncoder(self.pse.out_dim, n_head, d_k, mlp3, dropout)
        self.decoder = Decoder([self.tae.out_dim, *decoder, n_classes])

    def encode(self, inp: SensorInput) -> Tensor:
        return self.tae(self.pse(inp), inp.days, inp.date_mask)[0]

    def forward(self, inp: SensorInput) -> Tensor:
        return self.decoder(self.encode(inp))
