"""Presto as a project model: ``presto`` (fine-tuned end to end) and ``presto-embed`` (frozen
embeddings + a gradient-boosting head, WorldCereal's recipe).

Both are :class:`PrestoClassifier` (a :class:`~cropmap.models.base.PixelClassifier`): they take
the usual batch (``x``, ``present``, ``days``, ``mask``), composite it into Presto's monthly
inputs (:class:`~.presto_inputs.PrestoInputs`), run the pre-trained encoder
(:mod:`.presto_net`, published weights loaded strictly) and return class logits, so training,
checkpoints, ``cropmap evaluate`` and mapping treat them like any other model.

* ``head="mlp"`` (``presto``): encoder + a small head (LayerNorm, Linear 128 -> ``head_hidden``,
  GELU, dropout, Linear -> classes), all fine-tuned by :func:`cropmap.models.training.fit`
  (label budgets, early stopping on validation, augmentations: as every model).
  ``FitConfig.freeze_encoder`` trains the head only (linear probing).
* ``head="boosting"`` (``presto-embed``): the encoder stays frozen; its embeddings of the
  training samples (computed once, cached) train a LightGBM classifier
  (:func:`cropmap.models.boosting.fit_boosting`, early stopping on the validation embeddings),
  stored *inside the weights file* as a byte buffer (``decoder.blob``, zlib-compressed LightGBM
  text; no pickle), so the model directory stays ``config.json`` + ``model.safetensors``. Its
  forward returns log-probabilities (a softmax of them gives the booster's probabilities back).

API (also used by the ``auto`` selection)::

    from cropmap.models.pixel.presto import (PrestoClassifier, data_options, embed_series,
                                             fit_embed_head)
    opts = data_options(days=series.days, table=samples.table)   # month window + location
    model = PrestoClassifier(len(bands), n_classes, band_names=bands, mean=mean, std=std,
                             head="boosting", **opts)
    emb = embed_series(model, series, mean, std)                   # (N, 128), cached
    info = fit_embed_head(model, series_tr, y_tr, mean, std, series_val, y_val, seed=0)

The pixel level trains both by name (``cropmap train --model presto|presto-embed``, a site's
``training.model``): :func:`cropmap.pipeline.levels.series_models.train_model` takes the window and
location from the training samples (:func:`data_options`) and, for ``presto-embed``, fits the
head with :func:`fit_embed_head` instead of gradient steps. Any :class:`~cropmap.models.series.Series`
can be embedded the same way (e.g. parcel-mean series: one row per parcel), with the model's
``band_names`` naming its bands. Fine-tuning recipe chosen on validation (RPG 2023 points,
43 classes): lr 1e-3 (val macro F1 0.36) over 3e-4 (0.32), the CLI default.

Config options: ``first_month``/``n_months`` (the month window, months after January of the
season year; :func:`~.presto_inputs.window_for_days`), ``location`` ([lat, lon] of the samples'
centre, ``[]`` when unknown: the location token is then left out), ``head``, ``head_hidden``,
``dropout``, ``pretrained`` (False: the same network with random weights, for ablations) and
``head_bytes`` (size of the boosting head's buffer, set by :func:`fit_embed_head`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cropmap.models.base import PixelClassifier, PixelModelConfig
from cropmap.models.boosting import BoostingHead
from cropmap.models.series import Series, pad_batch

from .presto_inputs import PrestoInputs, samples_location, window_for_days
from .presto_net import EMBED_DIM, MAX_MONTHS, PrestoEncoder, load_published_weights

__all__ = ["BoostingHead", "PrestoClassifier", "PrestoConfig", "data_options", "embed_series", "fit_embed_head"]

HEADS = ("mlp", "boosting")
EMBED_MAX_OBS = 512
"""Observations per series when embedding (and ``max_len`` of a ``presto-embed`` model): a
monthly composite should see every acquisition, not a subsample."""


@dataclass
class PrestoConfig(PixelModelConfig):
    first_month: int = 0
    """First month of the window, in months after January of the season year (-3: October before)."""
    n_months: int = 12
    """Months in the window (1..24, Presto's pre-training range)."""
    location: list[float] = field(default_factory=list)
    """[lat, lon] in degrees of the samples' centre, or [] when unknown."""
    head: str = "mlp"
    """``mlp`` (fine-tuned, ``presto``) or ``boosting`` (frozen encoder + LightGBM, ``presto-embed``)."""
    head_hidden: int = 64
    dropout: float = 0.1
    pretrained: bool = True
    """Start from the published weights (False: random initialisation, for comparisons)."""
    head_bytes: int = 0
    """Size of the serialized boosting head (``head="boosting"``)."""

    def validate(self) -> None:
        super().validate()
        if not 1 <= self.n_months <= MAX_MONTHS:
            raise ValueError(f"n_months must be in 1..{MAX_MONTHS}, got {self.n_months}")
        if not -36 <= self.first_month <= 36:
            raise ValueError(f"first_month must be in -36..36, got {self.first_month}")
        if len(self.location) not in (0, 2) or (self.location and not (-90 <= self.location[0] <= 90 and -180 <= self.location[1] <= 360)):
            raise ValueError(f"location must be [] or [lat, lon] in degrees, got {self.location}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        self._require_positive("head_hidden")
        self._require_probability("dropout")
        if self.head_bytes < 0:
            raise ValueError(f"head_bytes must be >= 0, got {self.head_bytes}")


class PrestoClassifier(PixelClassifier):
    """Presto encoder on the project's batches, with an MLP or a boosting head (module docstring)."""

    config_class = PrestoConfig
    config: PrestoConfig

    def __init__(self, n_bands: int, n_classes: int, **kwargs: Any) -> None:
        super().__init__(n_bands, n_classes, **kwargs)
        cfg = self.config
        self.inputs = PrestoInputs(cfg.band_names, cfg.mean, cfg.std, cfg.first_month, cfg.n_months)
        self.encoder = PrestoEncoder()
        if cfg.pretrained:
            state = {k[len("encoder."):]: v for k, v in load_published_weights().items() if k.startswith("encoder.")}
            self.encoder.load_state_dict(state, strict=True)
        self.embed_dim = EMBED_DIM
        loc = cfg.location or [0.0, 0.0]
        self.register_buffer("location", torch.tensor(loc, dtype=torch.float32), persistent=False)
        self.has_location = bool(cfg.location)
        if cfg.head == "mlp":
            self.decoder = nn.Sequential(nn.LayerNorm(EMBED_DIM), nn.Linear(EMBED_DIM, cfg.head_hidden), nn.GELU(),
                                         nn.Dropout(cfg.dropout), nn.Linear(cfg.head_hidden, cfg.n_classes))
        else:
            self.decoder = BoostingHead(cfg.head_bytes, cfg.n_classes)
            self.encoder.requires_grad_(False)

    def encode(self, x: Tensor, present: Tensor, days: Tensor, mask: Tensor) -> Tensor:
        x, present, days, mask = self.prepare(x, present, days, mask)
        x17, missing, dw, months = self.inputs(x, present, days, mask)
        b = x.shape[0]
        latlon = self.location[None].expand(b, 2)
        has = torch.full((b,), self.has_location, dtype=torch.bool, device=x.device)
        return self.encoder(x17, missing, dw, months, latlon, has)

    def forward(self, x: Tensor, present: Tensor, days: Tensor, mask: Tensor) -> Tensor:
        if self.config.head == "boosting":
            with torch.inference_mode():
                return self.decoder(self.encode(x, present, days, mask))
        return self.decoder(self.encode(x, present, days, mask))

    def train(self, mode: bool = True) -> PrestoClassifier:
        super().train(mode)
        if self.config.head == "boosting":  # frozen encoder: never in training mode
            self.encoder.eval()
        return self


def data_options(days: np.ndarray | None = None, table=None) -> dict[str, Any]:
    """Builder options taken from the training data: the month window (from the observation
    ``days``) and the location (from the sample ``table``'s ``x``/``y``/``epsg``)."""
    out: dict[str, Any] = {}
    if days is not None and len(days):
        out["first_month"], out["n_months"] = window_for_days(np.asarray(days))
    if table is not None:
        out["location"] = samples_location(table)
    return out


# ------------------------------------------------------------------ embeddings, cached
_EMBED_CACHE: OrderedDict[str, np.ndarray] = OrderedDict()
_EMBED_CACHE_SIZE = 16


def _encoder_digest(model: PrestoClassifier) -> str:
    h = hashlib.sha256()
    cfg = model.config
    h.update(repr((cfg.band_names, cfg.mean, cfg.std, cfg.first_month, cfg.n_months, cfg.location)).encode())
    for k, v in sorted(model.encoder.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _series_digest(series: Series, mean: np.ndarray, std: np.ndarray) -> str:
    h = hashlib.sha256()
    for part in (series.values, series.days, series.offsets, mean, std):
        h.update(np.ascontiguousarray(part).tobytes())
    return h.hexdigest()


def embed_series(model: PrestoClassifier, series: Series, mean: np.ndarray, std: np.ndarray, batch_size: int = 512,
                 max_obs: int = EMBED_MAX_OBS, device: str = "cpu", cache: bool = True) -> np.ndarray:
    """Encoder embeddings (N, 128) of every series, all observations (up to ``max_obs``, evenly
    spaced), batched under ``torch.inference_mode``. Results are cached in memory by the content
    of the series and the encoder, so a sample set is embedded once per process."""
    key = _series_digest(series, np.asarray(mean, np.float32), np.asarray(std, np.float32)) + _encoder_digest(model) + str(max_obs)
    if cache and key in _EMBED_CACHE:
        _EMBED_CACHE.move_to_end(key)
        return _EMBED_CACHE[key]
    was_training = model.training
    model.eval().to(device)
    out = np.zeros((len(series), EMBED_DIM), dtype=np.float32)
    lengths = series.lengths
    order = np.argsort(lengths, kind="stable")  # similar lengths together: less padding
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            picks = []
            for i in idx:
                n = int(lengths[i])
                sel = np.arange(n) if n <= max_obs else np.unique(np.linspace(0, n - 1, max_obs).round().astype(np.int64))
                picks.append(series.offsets[i] + sel)
            batch = pad_batch(series, picks, np.asarray(mean, np.float32), np.asarray(std, np.float32), device)
            out[idx] = model.encode(**batch).float().cpu().numpy()
    model.train(was_training)
    if cache:
        _EMBED_CACHE[key] = out
        while len(_EMBED_CACHE) > _EMBED_CACHE_SIZE:
            _EMBED_CACHE.popitem(last=False)
    return out


def fit_embed_head(model: PrestoClassifier, train: Series, y_train: np.ndarray, mean: np.ndarray, std: np.ndarray,
                   val: Series | None = None, y_val: np.ndarray | None = None, seed: int = 0, n_jobs: int = 1,
                   boosting_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Train the boosting head of a ``head="boosting"`` model on frozen embeddings (in place).

    Early stopping uses the validation embeddings when given. Returns a summary (rounds, sizes).
    Every class index ``0..n_classes-1`` must occur in ``y_train``.
    """
    from cropmap.models.boosting import fit_boosting

    if model.config.head != "boosting":
        raise ValueError("fit_embed_head needs a model built with head='boosting'")
    n_classes = model.config.n_classes
    missing = sorted(set(range(n_classes)) - set(np.unique(y_train).tolist()))
    if missing:
        raise ValueError(f"classes {missing} have no training sample")
    e_tr = embed_series(model, train, mean, std)
    e_va = embed_series(model, val, mean, std) if val is not None and len(val) and y_val is not None else None
    clf = fit_boosting(e_tr, np.asarray(y_train), e_va, None if e_va is None else np.asarray(y_val), seed=seed, n_jobs=n_jobs,
                       **dict(boosting_options or {}))
    model.decoder.set_booster(clf.booster_)
    model.config.head_bytes = int(model.decoder.blob.numel())
    best = getattr(clf, "best_iteration_", None)
    return {"boosting_rounds": int(best) if best else int(clf.n_estimators), "head_bytes": model.config.head_bytes,
            "n_train": int(len(train)), "n_val": int(0 if e_va is None else len(e_va))}
