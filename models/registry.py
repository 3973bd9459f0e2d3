"""The one model registry: every network of the project by name, with its level.

=============  ======  =====================================================================
name           level   model
=============  ======  =====================================================================
stnet          pixel   STNet, the SITS-MoCo encoder with cloud-aware pooling (:mod:`.pixel.stnet`)
transformer    pixel   transformer encoder with masked mean pooling (:mod:`.pixel.transformer`)
ltae           pixel   Lightweight Temporal Attention Encoder (:mod:`.pixel.ltae`)
tempcnn        pixel   TempCNN, temporal convolutions (:mod:`.pixel.tempcnn`)
lstm           pixel   stacked LSTM (:mod:`.pixel.lstm`)
inceptiontime  pixel   InceptionTime (:mod:`.pixel.inceptiontime`)
presto         pixel   pre-trained Presto encoder fine-tuned end to end with a small head (:mod:`.pixel.presto`)
presto-embed   pixel   frozen Presto embeddings + a LightGBM head, WorldCereal's recipe (:mod:`.pixel.presto`)
forest         pixel   random forest on 30-day median features, the project's baseline (:mod:`.pixel.trees`)
boosting       pixel   LightGBM gradient boosting on the same features (:mod:`.pixel.trees`)
psetae         parcel  PSE-TAE with optical + radar fusion variants (:mod:`.parcel.fusion`)
stcln          patch   STCLN, windowed spatiotemporal attention, masked pre-training (:mod:`.patch.stcln`)
utae           patch   U-TAE, the published reference (:mod:`.patch.utae`)
=============  ======  =====================================================================

Pixel and patch builders take ``bands``, ``n_classes``, ``mean``, ``std`` and the model's
hyper-parameters as keyword options (an unknown option raises TypeError or ValueError) and return
the module and its config as plain types; the parcel builder takes the parcel model config (fusion,
sensors, channels, ...). :func:`model_from_config` rebuilds any module from its saved config.
Pixel models take the batch convention of :mod:`cropmap.models.series` and expose
``encode(x, present, days, mask) -> (B, D)`` and a ``decoder``. Adding a model: its module beside
the others of its level and one entry in :data:`MODELS`. ``presto-embed``, ``forest`` and
``boosting`` are fitted without gradient steps (:func:`fitted_without_gradients`): the pixel
level's ``train_model`` fits their heads directly, and they map like the networks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .base import PixelClassifier
from .parcel.fusion import build_parcel_model
from .patch.stcln import STCLN, STCLNConfig
from .patch.utae import UTAE, UTAEConfig
from .pixel.inceptiontime import InceptionTime
from .pixel.lstm import LSTMClassifier
from .pixel.ltae import LTAE
from .pixel.presto import PrestoClassifier
from .pixel.stnet import STNet, STNetConfig
from .pixel.tempcnn import TempCNN
from .pixel.transformer import PixelTransformer
from .pixel.trees import TreeClassifier

LEVELS = ("pixel", "parcel", "patch")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    level: str  # "pixel", "parcel" or "patch"
    build: Callable[..., Any]  # pixel/patch: (**kw) -> (module, config); parcel: (config) -> module
    rebuild: Callable[[dict], nn.Module]  # saved config -> module
    gradient: bool = True  # False: fitted without gradient steps (no fit() loop)


def _stnet(*, bands: list[str], n_classes: int, mean: list[float], std: list[float], **kw: Any) -> tuple[nn.Module, dict]:
    cfg = STNetConfig(n_bands=len(bands), n_classes=n_classes, band_names=list(bands), mean=list(mean), std=list(std), **kw)
    return STNet.from_config(cfg), cfg.to_dict()


def _zoo(name: str, cls: type[PixelClassifier]) -> ModelSpec:
    """Spec of a :class:`~.base.PixelClassifier` subclass."""

    def build(*, bands: list[str], n_classes: int, mean: list[float], std: list[float], **kw: Any) -> tuple[nn.Module, dict]:
        model = cls(len(bands), n_classes, band_names=list(bands), mean=list(mean), std=list(std), **kw)
        return model, model.config.to_dict()

    return ModelSpec(name, "pixel", build, cls.from_config)


def _presto_embed() -> ModelSpec:
    """``presto`` with the boosting head (trained without gradient steps by the pixel level's train_model)."""
    spec = _zoo("presto-embed", PrestoClassifier)
    return ModelSpec(spec.name, "pixel", lambda **kw: spec.build(**{**kw, "head": "boosting"}), spec.rebuild, gradient=False)


def _trees(kind: str) -> ModelSpec:
    """A :class:`~.pixel.trees.TreeClassifier` of one ``kind`` (forest or boosting)."""
    spec = _zoo(kind, TreeClassifier)
    return ModelSpec(kind, "pixel", lambda **kw: spec.build(**{**kw, "kind": kind}), spec.rebuild, gradient=False)


def _patch(name: str, cls: type, cfg_cls: type) -> ModelSpec:
    def build(*, bands: list[str], n_classes: int, mean: list[float], std: list[float], **options: Any) -> tuple[nn.Module, dict]:
        cfg = cfg_cls.from_dict({"n_bands": len(bands), "n_classes": n_classes, "band_names": list(bands), "mean": list(mean),
                                 "std": list(std), **options})
        return cls(cfg), cfg.to_dict()

    return ModelSpec(name, "patch", build, cls.from_config)


MODELS: dict[str, ModelSpec] = {s.name: s for s in (
    ModelSpec("stnet", "pixel", _stnet, STNet.from_config),
    _zoo("transformer", PixelTransformer),
    _zoo("ltae", LTAE),
    _zoo("tempcnn", TempCNN),
    _zoo("lstm", LSTMClassifier),
    _zoo("inceptiontime", InceptionTime),
    _zoo("presto", PrestoClassifier),
    _presto_embed(),
    _trees("forest"),
    _trees("boosting"),
    ModelSpec("psetae", "parcel", build_parcel_model, build_parcel_model),
    _patch("stcln", STCLN, STCLNConfig),
    _patch("utae", UTAE, UTAEConfig),
)}


def model_names(level: str | None = None) -> list[str]:
    """Registered names, of one level or of all."""
    if level is not None and level not in LEVELS:
        raise ValueError(f"unknown level {level!r}")
    return sorted(n for n, s in MODELS.items() if level is None or s.level == level)


def fitted_without_gradients() -> list[str]:
    """Models whose training is not a gradient loop (``presto-embed``, ``forest``, ``boosting``)."""
    return sorted(n for n, s in MODELS.items() if not s.gradient)


def level_of(name: str) -> str:
    """The level of model ``name`` (KeyError for an unknown name)."""
    return MODELS[name].level


def build_model(name: str, **kwargs: Any) -> tuple[nn.Module, dict]:
    """Build pixel or patch model ``name``; returns the module and its config (plain types, for the checkpoint)."""
    spec = MODELS[name]
    if spec.level == "parcel":
        raise KeyError(f"{name} is a parcel model: build it from its parcel config (cropmap.models.parcel.fusion)")
    return spec.build(**kwargs)


def model_from_config(name: str, config: dict) -> nn.Module:
    return MODELS[name].rebuild(config)
