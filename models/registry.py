"""Model registry: a name -> a network built from the data's bands, classes and statistics.

Every model takes the batch convention of :mod:`cropmap.models.series` (``x``, ``present``,
``days``, ``mask``) and returns class logits, so training, prediction and checkpoints are
model-agnostic. Registered names:

* ``stnet`` - STNet, the SITS-MoCo encoder with cloud-aware pooling (:mod:`.stnet`);
* ``transformer`` - transformer encoder with masked mean pooling (:mod:`.transformer`);
* ``ltae`` - Lightweight Temporal Attention Encoder (:mod:`.ltae`);
* ``tempcnn`` - TempCNN, temporal convolutions (:mod:`.tempcnn`);
* ``lstm`` - stacked LSTM (:mod:`.lstm`);
* ``inceptiontime`` - InceptionTime (:mod:`.inceptiontime`);
* ``presto`` - the pre-trained Presto encoder fine-tuned end to end with a small head
  (:mod:`.pixel.presto`; published weights, month window and location from the training data);
* ``presto-embed`` - the frozen Presto encoder's embeddings + a LightGBM head (WorldCereal's
  recipe; trained by :func:`cropmap.pipeline.train.train_model` without gradient steps).

A builder takes ``bands``, ``n_classes``, ``mean``, ``std`` and the model's hyper-parameters
as keyword options (an unknown option raises TypeError or ValueError) and returns the module
and its config as plain types; :func:`model_from_config` rebuilds the module from that
config. Every model has ``encode(x, present, days, mask) -> (B, D)`` and a ``decoder``
submodule mapping that embedding to logits (``D`` is ``embed_dim``, or ``config.d_model``
for STNet). The random-forest baseline (:mod:`cropmap.models.forest`) is not a network and
is not registered here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .base import PixelClassifier
from .inceptiontime import InceptionTime
from .lstm import LSTMClassifier
from .ltae import LTAE
from .pixel.presto import PrestoClassifier
from .stnet import STNet, STNetConfig
from .tempcnn import TempCNN
from .transformer import PixelTransformer


def _stnet(*, bands: list[str], n_classes: int, mean: list[float], std: list[float], **kw: Any) -> tuple[nn.Module, dict]:
    cfg = STNetConfig(n_bands=len(bands), n_classes=n_classes, band_names=list(bands), mean=list(mean), std=list(std), **kw)
    return STNet.from_config(cfg), cfg.to_dict()


def _stnet_from(cfg: dict) -> nn.Module:
    return STNet.from_config(cfg)


def _zoo(cls: type[PixelClassifier]) -> tuple[Callable[..., tuple[nn.Module, dict]], Callable[[dict], nn.Module]]:
    """Builder and rebuilder of a :class:`~.transformer.PixelClassifier` subclass."""

    def build(*, bands: list[str], n_classes: int, mean: list[float], std: list[float], **kw: Any) -> tuple[nn.Module, dict]:
        model = cls(len(bands), n_classes, band_names=list(bands), mean=list(mean), std=list(std), **kw)
        return model, model.config.to_dict()

    return build, cls.from_config


def _presto_embed() -> tuple[Callable[..., tuple[nn.Module, dict]], Callable[[dict], nn.Module]]:
    build, rebuild = _zoo(PrestoClassifier)
    return (lambda **kw: build(**{**kw, "head": "boosting"})), rebuild


_BUILDERS: dict[str, tuple[Callable[..., tuple[nn.Module, dict]], Callable[[dict], nn.Module]]] = {
    "stnet": (_stnet, _stnet_from),
    "transformer": _zoo(PixelTransformer),
    "ltae": _zoo(LTAE),
    "tempcnn": _zoo(TempCNN),
    "lstm": _zoo(LSTMClassifier),
    "inceptiontime": _zoo(InceptionTime),
    "presto": _zoo(PrestoClassifier),
    "presto-embed": _presto_embed(),
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
