"""Tree ensembles as pixel models: the random forest and LightGBM boosting on binned medians.

The project's baselines (:mod:`cropmap.models.forest`, :mod:`cropmap.models.boosting`) summarise
each series per band by the median of its observations in fixed day bins (30 days from 5 months
before to the end of the season year). This module makes them models like the others, so that
``training.model: auto`` can choose one, ``cropmap train --model forest`` writes a model
directory, and the map is drawn by the same predictor as a network's:

* :func:`binned_medians` computes the features from a ragged :class:`~cropmap.models.series.Series`
  or from a padded batch (``x``, ``present``, ``days``, ``mask``), fully vectorised (one sort per
  band, no Python loop per sample), with the pandas median (mean of the two middle values);
* :class:`ForestHead` holds a fitted scikit-learn forest as plain arrays (node features,
  thresholds, children, NaN routing, leaf class fractions) in buffers, so it travels in
  safetensors (no pickle is ever loaded) and predicts with a vectorised traversal that gives
  scikit-learn's ``predict_proba``;
* :class:`~cropmap.models.boosting.BoostingHead` holds the LightGBM model as its text dump;
* :class:`TreeClassifier` is the :class:`~cropmap.models.base.PixelClassifier` around either head.

Inputs arrive z-scored (as for every pixel model). A per-band positive affine map keeps the order
of the values, and so the medians' order, so the trees learn the same splits as on raw values.
The model reads a series whole: ``max_len`` of its directory is :data:`TREE_MAX_OBS`, so a pixel is
one view (a median over a subsample of the dates would not be the feature it was trained on).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from cropmap.models.base import PixelClassifier, PixelModelConfig
from cropmap.models.boosting import BoostingHead, fit_boosting
from cropmap.models.forest import DEFAULT_EDGES, make_forest
from cropmap.models.series import Series

__all__ = ["KINDS", "TREE_MAX_OBS", "ForestHead", "TreeClassifier", "TreeConfig", "binned_medians", "fit_tree_head"]

KINDS = ("forest", "boosting")
TREE_MAX_OBS = 1024
"""Observations a tree model reads per pixel (``max_len`` of its model directory): all of them."""


def _group_medians(group: np.ndarray, values: np.ndarray, n_groups: int) -> np.ndarray:
    """Median of ``values`` (NaN ignored) per ``group`` id; NaN for a group without a value."""
    out = np.full(n_groups, np.nan, dtype=np.float32)
    ok = ~np.isnan(values)
    g, v = group[ok], values[ok]
    if len(g) == 0:
        return out
    order = np.lexsort((v, g))
    g, v = g[order], v[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    counts = np.diff(np.r_[starts, len(g)])
    lo, hi = starts + (counts - 1) // 2, starts + counts // 2
    out[g[starts]] = (v[lo].astype(np.float64) + v[hi]) / 2.0
    return out


def binned_medians(values: np.ndarray, days: np.ndarray, sample: np.ndarray, n_samples: int,
                   edges: np.ndarray = DEFAULT_EDGES) -> np.ndarray:
    """(n_samples, bins x bands) float32: per sample and band, the median of its values per day bin.

    ``values`` (N, C) with NaN where a band is not observed, ``days`` (N,), ``sample`` (N,) the
    sample each row belongs to. Rows outside the bins are ignored; an empty bin is NaN (the trees
    route NaN). Column order: bin-major (bin 0's bands, bin 1's bands, ...), as
    :func:`cropmap.models.forest.binned_features`.
    """
    nb = len(edges) - 1
    c = values.shape[1]
    b = np.digitize(np.asarray(days, np.float32), edges) - 1
    ok = (b >= 0) & (b < nb)
    key = (np.asarray(sample, np.int64)[ok] * nb + b[ok])
    vals = np.asarray(values, np.float32)[ok]
    feats = np.empty((n_samples * nb, c), dtype=np.float32)
    for j in range(c):
        feats[:, j] = _group_medians(key, vals[:, j], n_samples * nb)
    return feats.reshape(n_samples, nb * c)


def series_medians(series: Series, mean: np.ndarray, std: np.ndarray, edges: np.ndarray = DEFAULT_EDGES) -> np.ndarray:
    """:func:`binned_medians` of z-scored series (the values a :class:`TreeClassifier` sees)."""
    z = (np.asarray(series.values, np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return binned_medians(z, series.days, np.repeat(np.arange(len(series)), series.lengths), len(series), edges)


class ForestHead(nn.Module):
    """A fitted random forest as arrays in buffers; :meth:`predict_proba` = scikit-learn's."""

    def __init__(self, n_nodes: int, n_trees: int, n_classes: int) -> None:
        super().__init__()
        self.register_buffer("feature", torch.zeros(n_nodes, dtype=torch.int32))
        self.register_buffer("threshold", torch.zeros(n_nodes, dtype=torch.float64))
        self.register_buffer("left", torch.full((n_nodes,), -1, dtype=torch.int32))
        self.register_buffer("right", torch.full((n_nodes,), -1, dtype=torch.int32))
        self.register_buffer("nan_left", torch.zeros(n_nodes, dtype=torch.bool))
        self.register_buffer("value", torch.zeros(n_nodes, n_classes, dtype=torch.float32))
        self.register_buffer("roots", torch.zeros(n_trees, dtype=torch.int64))
        self.register_buffer("depth", torch.zeros((), dtype=torch.int64))

    @classmethod
    def from_forest(cls, forest, n_classes: int) -> ForestHead:
        trees = [e.tree_ for e in forest.estimators_]
        sizes = [t.node_count for t in trees]
        head = cls(sum(sizes), len(trees), n_classes)
        offsets = np.r_[0, np.cumsum(sizes)[:-1]]
        cols = np.asarray(forest.classes_, np.int64)
        feat, thr, left, right, nanl, value = [], [], [], [], [], []
        for t, off in zip(trees, offsets):
            leaf = t.children_left < 0
            feat.append(np.where(leaf, 0, t.feature))
            thr.append(t.threshold)
            left.append(np.where(leaf, -1, t.children_left + off))
            right.append(np.where(leaf, -1, t.children_right + off))
            nanl.append(np.asarray(getattr(t, "missing_go_to_left", np.zeros(t.node_count)), bool))
            v = t.value[:, 0, :].astype(np.float64)
            v = v / np.maximum(v.sum(1, keepdims=True), 1e-300)
            full = np.zeros((t.node_count, n_classes), np.float32)
            full[:, cols] = v
            value.append(full)
        with torch.no_grad():
            head.feature.copy_(torch.from_numpy(np.concatenate(feat).astype(np.int32)))
            head.threshold.copy_(torch.from_numpy(np.concatenate(thr)))
            head.left.copy_(torch.from_numpy(np.concatenate(left).astype(np.int32)))
            head.right.copy_(torch.from_numpy(np.concatenate(right).astype(np.int32)))
            head.nan_left.copy_(torch.from_numpy(np.concatenate(nanl)))
            head.value.copy_(torch.from_numpy(np.concatenate(value)))
            head.roots.copy_(torch.from_numpy(offsets.astype(np.int64)))
            head.depth.fill_(int(max(t.max_depth for t in trees)))
        return head

    def predict_proba(self, X: np.ndarray, chunk: int = 4096) -> np.ndarray:
        feature, thr = self.feature.numpy().astype(np.int64), self.threshold.numpy()
        left, right = self.left.numpy().astype(np.int64), self.right.numpy().astype(np.int64)
        nan_left, value, roots = self.nan_left.numpy(), self.value.numpy(), self.roots.numpy()
        X = np.asarray(X, np.float32)
        out = np.zeros((len(X), value.shape[1]), np.float32)
        for s in range(0, len(X), chunk):
            x = X[s:s + chunk]
            rows = np.arange(len(x))[:, None]
            node = np.broadcast_to(roots, (len(x), len(roots))).copy()
            for _ in range(int(self.depth) + 1):
                inner = left[node] >= 0
                if not inner.any():
                    break
                xv = x[rows, feature[node]]
                go_left = np.where(np.isnan(xv), nan_left[node], xv <= thr[node])
                node = np.where(inner, np.where(go_left, left[node], right[node]), node)
            out[s:s + chunk] = value[node].mean(axis=1)
        return out

    def forward(self, feats: Tensor) -> Tensor:
        p = self.predict_proba(feats.detach().float().cpu().numpy())
        return torch.log(torch.from_numpy(p).clamp_min(1e-9)).to(device=feats.device)


@dataclass
class TreeConfig(PixelModelConfig):
    kind: str = "forest"
    """``forest`` (500 trees of depth 25, the project's baseline) or ``boosting`` (LightGBM)."""
    bin_days: int = 30
    """Width of the day bins of the median features."""
    first_day: int = -150
    """Start of the first bin, in days since 1 January of the season year."""
    last_day: int = 366
    """End of the bins (the last bin ends at or after it)."""
    n_estimators: int = 500
    max_depth: int = 25
    n_nodes: int = 0
    """Nodes of the fitted forest (set by training; sizes the buffers on load)."""
    n_trees: int = 0
    head_bytes: int = 0
    """Size of the serialized LightGBM model (``kind="boosting"``)."""

    def validate(self) -> None:
        super().validate()
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        self._require_positive("bin_days", "n_estimators", "max_depth")
        if self.last_day <= self.first_day:
            raise ValueError(f"last_day ({self.last_day}) must be after first_day ({self.first_day})")

    def edges(self) -> np.ndarray:
        return np.arange(self.first_day, self.last_day + self.bin_days, self.bin_days, dtype=np.float32)


class TreeClassifier(PixelClassifier):
    """A forest or boosting head on binned median features (module docstring)."""

    config_class = TreeConfig
    config: TreeConfig

    def __init__(self, n_bands: int, n_classes: int, **kwargs) -> None:
        super().__init__(n_bands, n_classes, **kwargs)
        cfg = self.config
        self.embed_dim = (len(cfg.edges()) - 1) * cfg.n_bands
        if cfg.kind == "forest":
            self.decoder = ForestHead(cfg.n_nodes, cfg.n_trees, cfg.n_classes)
        else:
            self.decoder = BoostingHead(cfg.head_bytes, cfg.n_classes)

    def encode(self, x: Tensor, present: Tensor, days: Tensor, mask: Tensor) -> Tensor:
        """The binned median features ``(B, bins x bands)`` (NaN for an empty bin)."""
        x, present, days, mask = self.prepare(x, present, days, mask)
        b, t, c = x.shape
        xv = torch.where(present, x, torch.full_like(x, float("nan"))).detach().float().cpu().numpy().reshape(b * t, c)
        m = mask.cpu().numpy().reshape(-1)
        sample = np.repeat(np.arange(b), t)[m]
        feats = binned_medians(xv[m], days.detach().float().cpu().numpy().reshape(-1)[m], sample, b, self.config.edges())
        return torch.from_numpy(feats).to(x.device)

    def forward(self, x: Tensor, present: Tensor, days: Tensor, mask: Tensor) -> Tensor:
        with torch.inference_mode():
            return self.decoder(self.encode(x, present, days, mask))


def fit_tree_head(model: TreeClassifier, train: Series, y_train: np.ndarray, mean: np.ndarray, std: np.ndarray,
                  val: Series | None = None, y_val: np.ndarray | None = None, seed: int = 0, n_jobs: int = -1) -> dict:
    """Fit the model's forest or boosting head on the binned medians of ``train`` (in place).

    Boosting stops early on the validation series' log-loss when they are given (never on test);
    the forest ignores them. Every class index must occur in ``y_train``. Returns a summary.
    """
    cfg = model.config
    missing = sorted(set(range(cfg.n_classes)) - set(np.unique(y_train).tolist()))
    if missing:
        raise ValueError(f"classes {missing} have no training sample")
    X = series_medians(train, mean, std, cfg.edges())
    if cfg.kind == "forest":
        forest = make_forest(seed, n_jobs=n_jobs, n_estimators=cfg.n_estimators, max_depth=cfg.max_depth).fit(X, y_train)
        model.decoder = ForestHead.from_forest(forest, cfg.n_classes)
        cfg.n_nodes, cfg.n_trees = int(model.decoder.value.shape[0]), int(model.decoder.roots.numel())
        return {"trees": cfg.n_trees, "nodes": cfg.n_nodes, "features": int(X.shape[1]), "n_train": int(len(X))}
    has_val = val is not None and y_val is not None and len(val) > 0
    Xv = series_medians(val, mean, std, cfg.edges()) if has_val else None
    clf = fit_boosting(X, np.asarray(y_train), Xv, np.asarray(y_val) if has_val else None, seed=seed)
    model.decoder.set_booster(clf.booster_)
    cfg.head_bytes = int(model.decoder.blob.numel())
    best = getattr(clf, "best_iteration_", None)
    return {"boosting_rounds": int(best) if best else int(clf.n_estimators), "head_bytes": cfg.head_bytes,
            "features": int(X.shape[1]), "n_train": int(len(X)), "n_val": int(0 if Xv is None else len(Xv))}
