"""Checkpoints of patch (segmentation) models; the models themselves are in the one registry.

Patch models (``stcln``, ``utae``) are built through :mod:`cropmap.models.registry`; checkpoints reuse the model/encoder directory formats of
:mod:`.checkpoint` (safetensors + JSON) with ``"level": "patch"`` in ``config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import nn

from cropmap.models.checkpoint import ENCODER_FORMAT, FORMAT, save_encoder, save_model
from cropmap.models.registry import build_model, model_from_config, model_names

__all__ = ["PATCH_MODELS", "build_patch_model", "load_patch_model", "patch_model_from_config", "save_patch_encoder", "save_patch_model",
           "is_patch_model_dir", "load_patch_weights"]

PATCH_MODELS: tuple[str, ...] = tuple(model_names("patch"))
"""The patch models of the registry (:mod:`cropmap.models.registry`)."""


def build_patch_model(name: str, *, bands: list[str], n_classes: int, mean: list[float], std: list[float], **options: Any) -> tuple[nn.Module, dict]:
    """Build patch model ``name``; unknown names raise KeyError, bad options TypeError/ValueError."""
    if name not in PATCH_MODELS:
        raise KeyError(name)
    return build_model(name, bands=bands, n_classes=n_classes, mean=mean, std=std, **options)


def patch_model_from_config(name: str, config: dict) -> nn.Module:
    if name not in PATCH_MODELS:
        raise KeyError(name)
    return model_from_config(name, config)


def save_patch_model(directory: Path, model: nn.Module, meta: dict) -> None:
    save_model(directory, model, {"level": "patch", "max_len": None, **meta})


def save_patch_encoder(directory: Path, model: nn.Module, meta: dict) -> None:
    save_encoder(directory, model, {"level": "patch", **meta})


def is_patch_model_dir(directory: Path) -> bool:
    p = Path(directory) / "config.json"
    try:
        return p.is_file() and json.loads(p.read_text()).get("level") == "patch"
    except (OSError, ValueError):
        return False


def load_patch_weights(directory: Path) -> tuple[dict, dict]:
    """Weights and meta of a patch model or encoder directory (ValueError when it is not one)."""
    path = Path(directory) / "config.json"
    meta = json.loads(path.read_text())
    if meta.get("level") != "patch" or meta.get("format") not in (FORMAT, ENCODER_FORMAT):
        raise ValueError(f"{path} is not a patch model or encoder directory")
    weights = Path(directory) / ("model.safetensors" if meta["format"] == FORMAT else "encoder.safetensors")
    return load_file(str(weights), device="cpu"), meta


def load_patch_model(directory: Path, device: str = "cpu") -> tuple[nn.Module, dict]:
    state, meta = load_patch_weights(directory)
    if meta["format"] != FORMAT:
        raise ValueError(f"{directory} is an encoder directory, not a trained model")
    model = patch_model_from_config(meta["model"], meta["model_config"])
    model.load_state_dict(state)
    return model.to(device).eval(), meta
