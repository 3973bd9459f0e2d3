"""Model and encoder directories: weights as safetensors plus one JSON of plain types (no pickle).

A model directory (``cropmap.model/1``) holds ``model.safetensors`` and ``config.json`` with the
model name, its constructor config, the input bands, normalisation statistics, the class map and
the series length used; everything needed to rebuild and run the model, nothing that executes
on load. An encoder directory (``cropmap.encoder/1``, written by ``cropmap pretrain``) holds the
same minus the class map and the ``decoder`` weights: it can only initialise a classifier.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from cropmap.models.registry import model_from_config

FORMAT = "cropmap.model/1"
ENCODER_FORMAT = "cropmap.encoder/1"


def save_model(directory: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write weights and ``config.json`` into ``directory`` (which must exist)."""
    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"format": FORMAT, **meta}, indent=2) + "\n")


def read_meta(directory: Path) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    for key in ("model", "model_config", "bands", "normalisation", "classes", "max_len"):
        if key not in meta:
            raise ValueError(f"{path} lacks {key!r}")
    return meta


def load_model(directory: Path, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of ``directory`` with its weights (weights-only, via safetensors)."""
    meta = read_meta(directory)
    model = model_from_config(meta["model"], meta["model_config"])
    state = load_file(str(Path(directory) / "model.safetensors"), device=device)
    model.load_state_dict(state)
    return model.to(device).eval(), meta


def save_encoder(directory: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write the encoder weights (everything but ``decoder.*``) and ``config.json`` into ``directory``."""
    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("decoder.")}
    save_file(state, str(directory / "encoder.safetensors"))
    (directory / "config.json").write_text(json.dumps({"format": ENCODER_FORMAT, **meta}, indent=2) + "\n")


def load_weights(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Weights and meta of a model or encoder directory, for initialising another model."""
    path = Path(directory) / "config.json"
    meta = json.loads(path.read_text())
    fmt = meta.get("format")
    if fmt == FORMAT:
        read_meta(directory)
        weights = Path(directory) / "model.safetensors"
    elif fmt == ENCODER_FORMAT:
        for key in ("model", "model_config", "bands", "normalisation"):
            if key not in meta:
                raise ValueError(f"{path} lacks {key!r}")
        weights = Path(directory) / "encoder.safetensors"
    else:
        raise ValueError(f"{path} has format {fmt!r}, expected {FORMAT!r} or {ENCODER_FORMAT!r}")
    return load_file(str(weights), device="cpu"), meta
