"""Model registry: a name -> a network built from the data's bands, classes and statistics.

Every model takes the batch convention of :mod:`cropmap.models.series` (``x``, ``present``,
``days``, ``mask``) and returns class logits, so training, prediction and checkpoints are
model-agnostic. The random-forest baseline (:mod:`cropmap.models.forest`) is not a network
and is not registered here.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .stnet import STNet, STNetConfig


def _stnet(*, bands: list[str], n_classes: int, mean: list[float], std: list[float], **kw: Any) -> tuple[nn.Module, dict]:
    cfg = STNetConfig(n_bands=len(bands), n_classes=n_classes, band_names=list(bands), mean=list(mean), std=list(std), **kw)
    return STNet.from_config(cfg), cfg.to_dict()


def _stnet_from(cfg: dict) -> nn.Module:
    return STNet.from_config(cfg)


_BUILDERS: dict[str, tuple[Callable[..., tuple[nn.Module, dict]], Callable[[dict], nn.Module]]] = {
    "stnet": (_stnet, _stnet_from),
}


def model_names() -> list[str]:
    return sorted(_BUILDERS)


def build_model(name: str, **kwargs: Any) -> tuple[nn.Module, dict]:
    """Build model ``name``; returns the module and its config (plain types, for the checkpoint)."""
    if name not in _BUILDERS:
        raise KeyError(name)
    return _BUILDERS[name][0](**kwargs)


def model_from_config(name: str, config: dict) -> nn.Module:
    if name not in _BUILDERS:
        raise KeyError(name)
    return _BUILDERS[name][1](config)
