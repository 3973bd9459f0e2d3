"""The Presto network: a small pre-trained transformer over monthly multi-sensor pixel series.

Presto (Tseng et al., "Lightweight, Pre-trained Transformers for Remote Sensing Timeseries",
arXiv 2304.14065, 2023) is a masked auto-encoder pre-trained on millions of pixel time series
sampled worldwide. This module is this project's own implementation of its architecture, written
from the paper and from the names and shapes of the published state dict, so that the published
weights (``cropmap/models/weights/presto.safetensors``, MIT, provenance beside it) load with a
strict ``load_state_dict`` and every tensor used.

Inputs (one pixel, ``T`` <= 24 consecutive months):

* ``x`` (B, T, 17): the 17 Presto channels of :data:`CHANNELS`, already Presto-normalised
  (:mod:`.presto_inputs` builds them from the project's samples);
* ``missing`` (B, T, 17) bool: True where a channel has no value that month;
* ``dw`` (B, T) long: the Dynamic World class of the month, :data:`DW_MISSING` (9) when absent;
* ``months`` (B, T) long: the calendar month (0 = January) of each step;
* ``latlon`` (B, 2) degrees and ``has_latlon`` (B,) bool.

Tokens: one per channel group and month (:data:`GROUPS`; the SRTM group is static: one token),
one per month for Dynamic World, and one for the location (lat/lon as a point on the unit
sphere through a linear layer). A group's token is absent when any of its channels is missing.
Each token gets ``cat(month code, channel-group embedding, position code)`` (32 + 32 + 64 in
the encoder; the SRTM token has only its channel part, the location token nothing). Absent
tokens are removed before the transformer (they never take part in attention), so a series
observed only in NDVI is 1 location + T NDVI tokens.

Encoder: 2 pre-norm ViT blocks (128 wide, 8 heads, MLP 512, GELU, qkv bias) and a final
LayerNorm; the pooled embedding is the LayerNorm of the mean of the present tokens (the
location token included), as in the published fine-tuning and WorldCereal recipes.
Decoder (pre-training only, used here to check the weights): a linear map to 128, mask tokens
at the removed positions, its own month/channel/position codes (48 + 32 + 48), 2 blocks, a
LayerNorm, and one linear read-out per group (Dynamic World: 9 class logits).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CHANNELS",
    "DW_MISSING",
    "GROUPS",
    "MAX_MONTHS",
    "PrestoDecoder",
    "PrestoEncoder",
    "PrestoNet",
    "WEIGHTS_PATH",
    "convert_published",
    "load_published_weights",
    "pretrained_encoder",
    "pretrained_net",
    "month_table",
    "sinusoid_table",
]

CHANNELS: tuple[str, ...] = (
    "VV", "VH",                                   # Sentinel-1 backscatter, dB
    "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12",  # Sentinel-2 L2A reflectance
    "temperature_2m", "total_precipitation",      # ERA5 monthly
    "elevation", "slope",                         # SRTM (static)
    "NDVI",
)
"""The 17 input channels in the published order (the network's channel indices)."""

GROUPS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("S1", (0, 1)),
    ("S2_RGB", (2, 3, 4)),
    ("S2_Red_Edge", (5, 6, 7)),
    ("S2_NIR_10m", (8,)),
    ("S2_NIR_20m", (9,)),
    ("S2_SWIR", (10, 11)),
    ("ERA5", (12, 13)),
    ("SRTM", (14, 15)),
    ("NDVI", (16,)),
)
"""Channel groups in the published order; a group's position is its channel-embedding row, and
Dynamic World takes the next row (9)."""

STATIC_GROUP = "SRTM"
DW_CLASSES = 9
DW_MISSING = DW_CLASSES
"""Dynamic World class index meaning "no value" (its embedding row exists; the token is removed)."""
MAX_MONTHS = 24
EMBED_DIM = 128

WEIGHTS_PATH = Path(__file__).resolve().parent.parent / "weights" / "presto.safetensors"


def sinusoid_table(n_positions: int, dim: int, base: float = 1000.0) -> Tensor:
    """Fixed sinusoidal position codes (n_positions, dim): sin on even, cos on odd dimensions."""
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]
    i = torch.arange(dim)[None, :]
    angle = pos / torch.pow(torch.tensor(base, dtype=torch.float64), (2 * (i // 2)).double() / dim)
    return torch.where(i % 2 == 0, torch.sin(angle), torch.cos(angle)).float()


def month_table(dim: int) -> Tensor:
    """Calendar-month codes (12, dim): sin(2 pi m / 12) on the first half, cos on the second."""
    angle = torch.arange(12, dtype=torch.float64) * (2 * math.pi / 12)
    half = dim // 2
    return torch.cat([torch.sin(angle)[:, None].expand(12, half), torch.cos(angle)[:, None].expand(12, half)], 1).float()


def to_sphere(latlon: Tensor) -> Tensor:
    """Degrees (B, 2) -> unit-sphere coordinates (B, 3)."""
    rad = latlon.float() * (math.pi / 180.0)
    lat, lon = rad[:, 0], rad[:, 1]
    return torch.stack([torch.cos(lat) * torch.cos(lon), torch.cos(lat) * torch.sin(lon), torch.sin(lat)], -1)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, keep: Tensor | None) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if keep is None else keep[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    """Pre-norm transformer block (attention, then MLP, each with a residual)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, dim * mlp_ratio)

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), keep)
        return x + self.mlp(self.norm2(x))


def _xavier_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _codes(month_emb: Tensor, channel_w: Tensor, pos: Tensor) -> Tensor:
    """Per-token codes of the layout [group 0 x T, ..., SRTM x 1, ..., NDVI x T, DW x T] (no location token).

    ``month_emb`` (B, T, m), ``channel_w`` (10, c), ``pos`` (T, p) -> (B, 9T + 1, m + c + p).
    """
    b, t, _ = month_emb.shape
    pos = pos[None].expand(b, t, -1)
    parts = []
    for g, (name, _) in enumerate((*GROUPS, ("DW", ()))):
        ch = channel_w[g][None, None].expand(b, t, -1)
        if name == STATIC_GROUP:
            parts.append(torch.cat([torch.zeros_like(month_emb[:, :1]), ch[:, :1], torch.zeros_like(pos[:, :1])], -1))
        else:
            parts.append(torch.cat([month_emb, ch, pos], -1))
    return torch.cat(parts, 1)


def _present_tokens(missing: Tensor, dw: Tensor) -> Tensor:
    """Which tokens of the layout (B, 9T + 1) carry data (no location token)."""
    keep = []
    for name, idx in GROUPS:
        gone = missing[:, :, list(idx)].any(-1)
        keep.append(~(gone[:, :1] if name == STATIC_GROUP else gone))
    keep.append(dw != DW_MISSING)
    return torch.cat(keep, 1)


class PrestoEncoder(nn.Module):
    """The Presto encoder (parameter names as in the published state dict, prefix ``encoder.``)."""

    def __init__(self, dim: int = EMBED_DIM, depth: int = 2, heads: int = 8, mlp_ratio: int = 4,
                 max_months: int = MAX_MONTHS, channel_dim: int = 32, month_dim: int = 32) -> None:
        super().__init__()
        self.dim = dim
        self.eo_patch_embed = nn.ModuleDict({name: nn.Linear(len(idx), dim) for name, idx in GROUPS})
        self.dw_embed = nn.Embedding(DW_CLASSES + 1, dim)
        self.latlon_embed = nn.Linear(3, dim)
        self.blocks = nn.ModuleList([_Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.pos_embed = nn.Parameter(sinusoid_table(max_months, dim - channel_dim - month_dim)[None], requires_grad=False)
        self.month_embed = nn.Embedding.from_pretrained(month_table(month_dim), freeze=True)
        self.channel_embed = nn.Embedding(len(GROUPS) + 1, channel_dim)
        _xavier_init(self)

    def tokens(self, x: Tensor, missing: Tensor, dw: Tensor, months: Tensor, latlon: Tensor,
               has_latlon: Tensor) -> tuple[Tensor, Tensor]:
        """All tokens (B, 9T + 2, D), the location token first, and which are present (B, 9T + 2)."""
        b, t, _ = x.shape
        if t > self.pos_embed.shape[1]:
            raise ValueError(f"Presto takes at most {self.pos_embed.shape[1]} months, got {t}")
        x = torch.where(missing, torch.zeros_like(x), x)  # absent values never reach a weight
        emb = []
        for name, idx in GROUPS:
            e = self.eo_patch_embed[name](x[:, :, list(idx)])
            emb.append(e[:, :1] if name == STATIC_GROUP else e)
        emb.append(self.dw_embed(dw.clamp(0, DW_CLASSES)))
        tok = torch.cat(emb, 1) + _codes(self.month_embed(months), self.channel_embed.weight, self.pos_embed[0, :t])
        loc = self.latlon_embed(to_sphere(latlon))[:, None]
        keep = torch.cat([has_latlon.bool()[:, None], _present_tokens(missing, dw)], 1)
        keep[:, 0] |= ~keep.any(1)  # a row with nothing at all attends to its location token alone
        return torch.cat([loc, tok], 1), keep

    def forward(self, x: Tensor, missing: Tensor, dw: Tensor, months: Tensor, latlon: Tensor,
                has_latlon: Tensor, pooled: bool = True) -> Tensor | tuple[Tensor, Tensor]:
        """Pooled embedding (B, D); with ``pooled=False`` the normalised tokens (B, N, D) (zeros at
        absent positions) and the presence mask (B, N)."""
        tok, keep = self.tokens(x, missing, dw, months, latlon, has_latlon)
        # gather the present tokens to the front and cut the batch to the longest row: absent
        # tokens cost nothing (an NDVI-only series is 1 + T tokens, not 9T + 2)
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
        n = int(keep.sum(1).max())
        idx = order[:, :n]
        h = torch.gather(tok, 1, idx[..., None].expand(-1, -1, tok.shape[-1]))
        k = torch.gather(keep, 1, idx)
        for blk in self.blocks:
            h = blk(h, k)
        if pooled:
            w = k[..., None].to(h.dtype)
            return self.norm((h * w).sum(1) / w.sum(1).clamp_min(1.0))
        full = torch.zeros_like(tok).scatter(1, idx[..., None].expand(-1, -1, h.shape[-1]), self.norm(h))
        return full, keep


class PrestoDecoder(nn.Module):
    """The pre-training decoder: reconstructs every channel of every month from the encoder tokens."""

    def __init__(self, enc_dim: int = EMBED_DIM, dim: int = EMBED_DIM, depth: int = 2, heads: int = 8,
                 mlp_ratio: int = 4, max_months: int = MAX_MONTHS, channel_dim: int = 32) -> None:
        super().__init__()
        rest = (dim - channel_dim) // 2
        self.decoder_embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.decoder_blocks = nn.ModuleList([_Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.decoder_norm = nn.LayerNorm(dim)
        self.eo_decoder_pred = nn.ModuleDict({name: nn.Linear(dim, len(idx)) for name, idx in GROUPS})
        self.dw_decoder_pred = nn.Linear(dim, DW_CLASSES)
        self.channel_embeddings = nn.Embedding(len(GROUPS) + 1, channel_dim)
        self.pos_embed = nn.Parameter(sinusoid_table(max_months, rest)[None], requires_grad=False)
        self.month_embed = nn.Embedding.from_pretrained(month_table(rest), freeze=True)
        _xavier_init(self)

    def forward(self, tokens: Tensor, keep: Tensor, months: Tensor) -> tuple[Tensor, Tensor]:
        """``tokens`` (B, 9T + 2, D_enc), ``keep`` (B, 9T + 2) -> channels (B, T, 17), DW logits (B, T, 9)."""
        b, n, _ = tokens.shape
        t = (n - 2) // 9
        h = self.decoder_embed(tokens)
        h = torch.where(keep[..., None], h, self.mask_token.to(h.dtype))
        codes = _codes(self.month_embed(months), self.channel_embeddings.weight, self.pos_embed[0, :t])
        h = h + torch.cat([torch.zeros_like(codes[:, :1]), codes], 1)
        for blk in self.decoder_blocks:
            h = blk(h)
        h = self.decoder_norm(h)[:, 1:]
        out = h.new_zeros(b, t, len(CHANNELS))
        start = 0
        for name, idx in GROUPS:
            if name == STATIC_GROUP:
                out[:, :, list(idx)] = self.eo_decoder_pred[name](h[:, start:start + 1]).expand(b, t, -1)
                start += 1
            else:
                out[:, :, list(idx)] = self.eo_decoder_pred[name](h[:, start:start + t])
                start += t
        return out, self.dw_decoder_pred(h[:, start:start + t])


class PrestoNet(nn.Module):
    """Encoder + decoder (the pre-trained masked auto-encoder)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = PrestoEncoder()
        self.decoder = PrestoDecoder()

    def forward(self, x: Tensor, missing: Tensor, dw: Tensor, months: Tensor, latlon: Tensor,
                has_latlon: Tensor) -> tuple[Tensor, Tensor]:
        tokens, keep = self.encoder(x, missing, dw, months, latlon, has_latlon, pooled=False)
        return self.decoder(tokens, keep, months)


_CACHE: dict[str, dict[str, Tensor]] = {}


def load_published_weights(path: Path | None = None) -> dict[str, Tensor]:
    """The published Presto state dict (``encoder.*`` and ``decoder.*``), read once per process."""
    from safetensors.torch import load_file

    path = Path(path or WEIGHTS_PATH)
    key = str(path)
    if key not in _CACHE:
        if not path.is_file():
            raise FileNotFoundError(f"Presto weights {path} are missing (they ship with cropmap; reinstall it)")
        _CACHE[key] = load_file(str(path), device="cpu")
    return {k: v.clone() for k, v in _CACHE[key].items()}


def pretrained_net() -> PrestoNet:
    """The masked auto-encoder with the published weights (strict: every tensor used, none missing)."""
    net = PrestoNet()
    net.load_state_dict(load_published_weights(), strict=True)
    return net.eval()


def pretrained_encoder() -> PrestoEncoder:
    enc = PrestoEncoder()
    state = {k[len("encoder."):]: v for k, v in load_published_weights().items() if k.startswith("encoder.")}
    enc.load_state_dict(state, strict=True)
    return enc


def convert_published(pt_path: Path, out_path: Path = WEIGHTS_PATH) -> Path:
    """Convert the published PyTorch state dict (``default_model.pt``) to safetensors, once.

    The file is read with ``weights_only=True`` (no code runs) and must load strictly into
    :class:`PrestoNet`; shared tensors (the decoder reuses the encoder's channel embeddings) are
    stored as separate copies, as safetensors requires.
    """
    from safetensors.torch import save_file

    state = torch.load(Path(pt_path), map_location="cpu", weights_only=True)
    PrestoNet().load_state_dict(state, strict=True)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    save_file({k: v.detach().clone().contiguous().float() for k, v in state.items()}, str(tmp),
              metadata={"source": "nasaharvest/presto data/default_model.pt", "licence": "MIT"})
    tmp.replace(out_path)
    return out_path
