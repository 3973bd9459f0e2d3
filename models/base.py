"""Building blocks shared by the pixel model zoo (``transformer``, ``ltae``, ``tempcnn``, ``lstm``, ``inceptiontime``).

- :class:`PixelModelConfig`: the config base class (plain JSON types, ``to_dict``/``from_dict``,
  unknown keys and out-of-range values rejected);
- :class:`PixelClassifier`: the module base class (input validation, cleaning of padding and
  missing values, ``forward = decoder(encode(...))``, ``embed_dim`` for MoCo pre-training);
- masked pooling (:func:`masked_mean`, :func:`masked_max`), per-date features for convolutional
  and recurrent models (:func:`date_features`: values, presence flags and the shared day
  encoding), token embedding on real dates only (:func:`embed_tokens`) and a BatchNorm that
  ignores padding (:class:`MaskedBatchNorm1d`).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from cropmap.models.encoding import DayEncoding

__all__ = [
    "DAY_BASE",
    "MaskedBatchNorm1d",
    "PixelClassifier",
    "PixelModelConfig",
    "attention_keep_mask",
    "date_features",
    "embed_tokens",
    "linear_block",
    "masked_max",
    "masked_mean",
    "mlp_decoder",
]

DAY_BASE = 1000.0
"""Base of the sinusoidal day encoding of every zoo model (as STNet)."""


def _convert(hint: Any, value: Any) -> Any:
    """Convert ``value`` to the plain type named by the type hint (``int``, ``list[float]``...)."""
    if typing.get_origin(hint) is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_convert(item, v) for v in value]
    if hint is str and not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    if hint is bool:
        if not isinstance(value, (bool, int)):
            raise ValueError(f"expected a boolean, got {value!r}")
        return bool(value)
    if hint is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(f"expected an integer, got {value!r}")
    return hint(value)


@dataclass
class PixelModelConfig:
    """Base of the zoo model configs: data description plus (in subclasses) hyper-parameters.

    ``band_names``, ``mean`` and ``std`` describe the ``n_bands`` input channels and their
    z-score statistics; the zoo models do not use them (inputs arrive normalised) but keep
    them so a checkpoint describes its inputs, as STNet's config does. Every field has a
    plain type (``int``, ``float``, ``bool``, ``str`` or a list of those), so
    :meth:`to_dict` output round-trips JSON.
    """

    n_bands: int
    n_classes: int
    band_names: list[str]
    mean: list[float]
    std: list[float]

    @classmethod
    def option_names(cls) -> list[str]:
        """Names of the hyper-parameters (every field but the data description)."""
        base = {f.name for f in dataclasses.fields(PixelModelConfig)}
        return [f.name for f in dataclasses.fields(cls) if f.name not in base]

    @classmethod
    def _coerce(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        return {key: _convert(hints[key], value) for key, value in data.items()}

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a JSON-ready dict of plain Python types."""
        return self._coerce({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PixelModelConfig:
        """Build a config from :meth:`to_dict` output; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
        missing = {f.name for f in dataclasses.fields(PixelModelConfig)} - set(data)
        if missing:
            raise ValueError(f"{cls.__name__} lacks {sorted(missing)}")
        return cls(**cls._coerce(data))

    def validate(self) -> None:
        """Raise ValueError on inconsistent values; subclasses extend it."""
        if self.n_bands <= 0 or self.n_classes <= 0:
            raise ValueError(
                f"n_bands and n_classes must be positive, got {self.n_bands} and {self.n_classes}"
            )
        if not (len(self.band_names) == len(self.mean) == len(self.std) == self.n_bands):
            raise ValueError(
                f"band_names, mean and std must each have n_bands={self.n_bands} entries, "
                f"got {len(self.band_names)}, {len(self.mean)}, {len(self.std)}"
            )
        if any(not s > 0 for s in self.std):
            raise ValueError("std values must be positive")

    def _require_positive(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def _require_probability(self, *names: str) -> None:
        for name in names:
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    def _require_even(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if value <= 0 or value % 2:
                raise ValueError(f"{name} must be a positive even number, got {value}")


class PixelClassifier(nn.Module):
    """Base of the zoo models: config handling, input checks and ``forward``.

    Subclasses set ``config_class``, build their layers (including a ``decoder`` that maps
    the embedding to logits) and set ``embed_dim``, and implement :meth:`encode`.
    Constructor: ``Model(n_bands, n_classes, band_names=..., mean=..., std=..., **options)``
    where ``options`` are the config's hyper-parameters; an unknown option is a TypeError
    and an invalid value a ValueError. ``band_names``/``mean``/``std`` default to
    ``band0..``, 0 and 1.
    """

    config_class: ClassVar[type[PixelModelConfig]] = PixelModelConfig
    embed_dim: int
    decoder: nn.Module

    def __init__(
        self,
        n_bands: int,
        n_classes: int,
        *,
        band_names: Sequence[str] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        valid = self.config_class.option_names()
        unknown = set(options) - set(valid)
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unknown option(s) {sorted(unknown)}; "
                f"valid options: {valid}"
            )
        n = max(int(n_bands), 0)
        config = self.config_class.from_dict(
            {
                "n_bands": n_bands,
                "n_classes": n_classes,
                "band_names": list(band_names) if band_names is not None else [f"band{i}" for i in range(n)],
                "mean": list(mean) if mean is not None else [0.0] * n,
                "std": list(std) if std is not None else [1.0] * n,
                **options,
            }
        )
        config.validate()
        self.config = config

    @classmethod
    def from_config(cls, config: PixelModelConfig | Mapping[str, Any]) -> PixelClassifier:
        """Build a model from its config or the config's ``to_dict()`` form."""
        if not isinstance(config, cls.config_class):
            config = cls.config_class.from_dict(config)
        kwargs = config.to_dict()
        return cls(kwargs.pop("n_bands"), kwargs.pop("n_classes"), **kwargs)

    def prepare(
        self, x: Tensor, present: Tensor, days: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Check shapes and clean a batch: ``mask``/``present`` as bool (``present`` only on
        real dates), ``x`` zero where not observed and ``days`` zero on padding, so that
        whatever padding or unobserved entries hold (even NaN) cannot reach the network."""
        n_bands = self.config.n_bands
        if x.dim() != 3 or x.shape[-1] != n_bands:
            raise ValueError(f"x must be (B, T, {n_bands}), got {tuple(x.shape)}")
        if present.shape != x.shape:
            raise ValueError(f"present must have the shape of x {tuple(x.shape)}, got {tuple(present.shape)}")
        if days.shape != x.shape[:2] or mask.shape != x.shape[:2]:
            raise ValueError(
                f"days and mask must be (B, T) = {tuple(x.shape[:2])}, "
                f"got {tuple(days.shape)} and {tuple(mask.shape)}"
            )
        mask = mask.bool()
        present = present.bool() & mask.unsqueeze(-1)
        x = torch.where(present, x, torch.zeros_like(x))
        days = torch.where(mask, days, torch.zeros_like(days))
        return x, present, days, mask

    def encode(self, x: Tensor, present: Tensor, days: Tensor, mask: Tensor) -> Tensor:
        """Pooled embedding ``(B, embed_dim)``."""
        raise NotImplementedError

    def forward(self, x: Tensor, present: Tensor, days: Tensor, mask: Tensor) -> Tensor:
        """Class logits ``(B, n_classes)``."""
        return self.decoder(self.encode(x, present, days, mask))


def linear_block(n_in: int, n_out: int) -> list[nn.Module]:
    """Linear + BatchNorm + ReLU, the unit of the per-date MLPs and decoders."""
    return [nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out), nn.ReLU(inplace=True)]


def mlp_decoder(n_in: int, n_classes: int) -> nn.Sequential:
    """STNet's decoder: ``n_in -> 64 -> 32 -> n_classes``."""
    return nn.Sequential(*linear_block(n_in, 64), *linear_block(64, 32), nn.Linear(32, n_classes))


def embed_tokens(mlp: Callable[[Tensor], Tensor], x: Tensor, present: Tensor, mask: Tensor) -> Tensor:
    """Run the per-date ``mlp`` on ``cat([x, present])`` of the real dates only.

    Returns ``(B, T, D)`` with zeros on padding; padding never enters the MLP, so its
    BatchNorm statistics are those of real dates.
    """
    feats = torch.cat([x, present.to(x.dtype)], dim=-1)
    tokens = mlp(feats[mask])
    out = tokens.new_zeros(*mask.shape, tokens.shape[-1])
    out[mask] = tokens
    return out


def date_features(x: Tensor, present: Tensor, days: Tensor, mask: Tensor, encoding: DayEncoding) -> Tensor:
    """Per-date features ``cat([x, present, day code])`` ``(B, T, 2C + dim)``, zero on padding.

    Convolutional and recurrent models see positions, not dates; the day code tells them
    when each (irregularly spaced) date was acquired.
    """
    code = encoding(days).to(x.dtype)
    code = torch.where(mask.unsqueeze(-1), code, torch.zeros_like(code))
    return torch.cat([x, present.to(x.dtype), code], dim=-1)


def masked_mean(h: Tensor, mask: Tensor, dim: int = 1) -> Tensor:
    """Mean of ``h`` over the real dates (``mask``) along ``dim``; rows without one give 0.

    ``h`` is ``(B, T, D)`` for ``dim=1`` or ``(B, D, T)`` for ``dim=2``.
    """
    m = mask.unsqueeze(-1) if dim == 1 else mask.unsqueeze(1)
    total = torch.where(m, h, torch.zeros_like(h)).sum(dim)
    count = mask.sum(1, keepdim=True).clamp_min(1).to(h.dtype)
    return total / count


def masked_max(h: Tensor, mask: Tensor, dim: int = 1) -> Tensor:
    """Maximum of ``h`` over the real dates along ``dim`` (layout as :func:`masked_mean`);
    rows without a real date give 0."""
    m = mask.unsqueeze(-1) if dim == 1 else mask.unsqueeze(1)
    out = torch.where(m, h, torch.full_like(h, float("-inf"))).amax(dim)
    has = mask.any(1, keepdim=True)
    return torch.where(has, out, torch.zeros_like(out))


def attention_keep_mask(mask: Tensor) -> Tensor:
    """The dates attention may look at: the real ones, plus position 0 in rows without any
    real date (attending to nothing gives NaN; that position holds only zeros and the code
    of day 0, and pooling ignores it anyway)."""
    keep = mask.clone()
    keep[:, 0] |= ~mask.any(1)
    return keep


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm over the channels of ``(B, C, T)`` computed on the real dates only.

    Padding positions are neither normalised nor counted in the batch statistics, and come
    out as exact zeros (so a following convolution sees zero padding, as at the sequence
    end). The state dict is that of :class:`torch.nn.BatchNorm1d`.
    """

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:  # type: ignore[override]
        normed = super().forward(h.transpose(1, 2)[mask])  # (N_real, C)
        out = normed.new_zeros(h.shape[0], h.shape[2], h.shape[1])
        out[mask] = normed
        return out.transpose(1, 2)
