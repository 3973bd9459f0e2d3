"""Classification metrics for crop-type maps, as JSON-ready dicts.

All metrics derive from one confusion matrix whose **rows are the true (reference)
classes and whose columns are the predicted classes** - ``cm[i, j]`` counts samples
of true class ``i`` predicted as ``j`` (the scikit-learn orientation; the original
code had it transposed). From it:

* overall accuracy = trace / total, and Cohen's kappa, over every counted sample;
* per class: precision, recall, F1 and IoU (intersection over union,
  ``TP / (TP + FP + FN)``); a class with support that is never predicted correctly
  gets F1 = IoU = 0 rather than an undefined value;
* macro F1 and mIoU average the per-class values over the classes that occur in the
  reference or in the predictions (what scikit-learn does with its default
  ``labels``): a class absent from both has no defined score and is left out,
  while a class that is only predicted counts with F1 = 0, since its predictions
  are all false positives. ``labels`` further restricts the averaged classes;
* weighted F1 weights the per-class F1 by reference support.

Samples whose reference equals ``ignore_index`` (unlabelled pixels) are dropped
before anything is counted. Every value returned is a plain ``int``/``float``/
``str``/``list``/``dict`` so the result can go straight to ``json.dumps``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["confusion_matrix", "classification_metrics", "label_metrics", "summarize_runs", "SCALAR_METRICS", "CLASS_SET_RULE"]

CLASS_SET_RULE = ("macro F1 and mIoU average over the union of the classes present in the test reference or in the "
                  "predictions; a class predicted but absent from the test set counts with F1 = 0, a test class the "
                  "model never saw in training is its own never-predicted class (F1 = 0)")
"""The class-set rule of every macro average in runs and benchmarks (stated in ``metrics.json``)."""

SCALAR_METRICS = ("overall_accuracy", "kappa", "macro_f1", "weighted_f1", "miou")


def _as_int_array(values: Any) -> np.ndarray:
    # Accept torch tensors (possibly on GPU) without importing torch here.
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values).reshape(-1)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError("class labels must be integers")
    return arr.astype(np.int64, copy=False)


def confusion_matrix(
    y_true: Any, y_pred: Any, n_classes: int, ignore_index: int | None = None
) -> np.ndarray:
    """Return the ``(n_classes, n_classes)`` int64 confusion matrix.

    Rows are TRUE classes, columns PREDICTED classes: ``cm[i, j]`` is the number of
    samples of true class ``i`` predicted as class ``j``. Samples whose true label
    equals ``ignore_index`` are skipped; any other label outside
    ``[0, n_classes)`` raises ``ValueError``.
    """
    t = _as_int_array(y_true)
    p = _as_int_array(y_pred)
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in size: {t.size} vs {p.size}")
    if n_classes <= 0:
        raise ValueError("n_classes must be positive")
    if ignore_index is not None:
        keep = t != ignore_index
        t, p = t[keep], p[keep]
    for name, arr in (("y_true", t), ("y_pred", p)):
        if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
            raise ValueError(f"{name} has labels outside [0, {n_classes})")
    counts = np.bincount(t * n_classes + p, minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes).astype(np.int64)


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else 0.0


def classification_metrics(
    y_true: Any,
    y_pred: Any,
    class_names: Sequence[str],
    ignore_index: int | None = None,
    labels: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Compute the project's standard metrics; see the module docstring.

    ``class_names[i]`` names class ``i``. ``labels`` (class indices) restricts the
    classes averaged by macro F1, weighted F1 and mIoU; overall accuracy and kappa
    always use every counted sample. Returns ``overall_accuracy``, ``kappa``,
    ``macro_f1``, ``weighted_f1``, ``miou``, ``per_class`` (name -> f1, iou,
    precision, recall, support), ``averaged_classes``, ``confusion_matrix``
    (nested lists), ``confusion_matrix_axes`` and ``n_samples``.
    """
    names = [str(n) for n in class_names]
    if len(set(names)) != len(names):
        raise ValueError("class_names must be unique")
    n_classes = len(names)
    cm = confusion_matrix(y_true, y_pred, n_classes, ignore_index=ignore_index)
    total = int(cm.sum())
    if total == 0:
        raise ValueError("no samples to evaluate (all ignored or empty input)")

    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)  # true counts per class (rows)
    predicted = cm.sum(axis=0)  # predicted counts per class (columns)
    fp = predicted - tp
    fn = support - tp

    per_class: dict[str, dict[str, Any]] = {}
    f1 = np.zeros(n_classes)
    iou = np.zeros(n_classes)
    for k, name in enumerate(names):
        f1[k] = _ratio(2 * tp[k], 2 * tp[k] + fp[k] + fn[k])
        iou[k] = _ratio(tp[k], tp[k] + fp[k] + fn[k])
        per_class[name] = {
            "f1": float(f1[k]),
            "iou": float(iou[k]),
            "precision": _ratio(tp[k], predicted[k]),
            "recall": _ratio(tp[k], support[k]),
            "support": int(support[k]),
        }

    candidates = range(n_classes) if labels is None else [int(c) for c in labels]
    for c in candidates:
        if not 0 <= c < n_classes:
            raise ValueError(f"label {c} outside [0, {n_classes})")
    averaged = sorted({c for c in candidates if support[c] > 0 or predicted[c] > 0})
    if averaged:
        idx = np.asarray(averaged)
        macro_f1 = float(f1[idx].mean())
        miou = float(iou[idx].mean())
        weighted_f1 = _ratio(float((f1[idx] * support[idx]).sum()), float(support[idx].sum()))
    else:
        macro_f1 = miou = weighted_f1 = 0.0

    accuracy = float(tp.sum()) / total
    expected = float((support.astype(np.float64) * predicted).sum()) / (total * total)
    if expected < 1.0:
        kappa = (accuracy - expected) / (1.0 - expected)
    else:
        # Both sides use a single identical class: chance agreement is 1 and kappa
        # is 0/0; report perfect agreement as 1 instead of NaN (invalid in JSON).
        kappa = 1.0 if accuracy == 1.0 else 0.0

    return {
        "overall_accuracy": float(accuracy),
        "kappa": float(kappa),
        "macro_f1": macro_f1,
        "weighted_f1": weighted_f1,
        "miou": miou,
        "per_class": per_class,
        "averaged_classes": [names[c] for c in averaged],
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_axes": "rows=true, columns=predicted",
        "n_samples": total,
    }


def label_metrics(reference: Sequence[Any], y_pred: Any, class_names: Sequence[str],
                  class_keys: Sequence[Any] | None = None) -> dict[str, Any]:
    """The metrics of runs and benchmarks alike (:data:`CLASS_SET_RULE`).

    ``reference`` holds the true labels as *keys* (``class_keys[i]`` is the key of predicted class
    ``i``; by default the names themselves); ``y_pred`` the predicted class indices. A reference key
    outside ``class_keys`` (a class the training never saw) becomes an extra class that is never
    predicted, named after its key. Nothing restricts the average: every class present in the
    reference or the predictions counts. Adds ``class_set_rule`` and ``classes_unseen_in_training``.
    """
    names = [str(n) for n in class_names]
    keys = [str(k) for k in (class_keys if class_keys is not None else names)]
    if len(keys) != len(names):
        raise ValueError("class_keys and class_names differ in length")
    index = {k: i for i, k in enumerate(keys)}
    ref = [str(v) for v in (reference.tolist() if hasattr(reference, "tolist") else reference)]
    unseen = sorted({r for r in ref if r not in index})
    all_names = list(names)
    for u in unseen:
        index[u] = len(all_names)
        all_names.append(u if u not in all_names else f"{u} (unseen)")
    y_true = np.array([index[r] for r in ref], np.int64)
    m = classification_metrics(y_true, y_pred, all_names)
    m["class_set_rule"] = CLASS_SET_RULE
    m["classes_unseen_in_training"] = unseen
    return m


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    # Sample standard deviation across runs (ddof=1); a single run has no spread.
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return {"mean": float(arr.mean()), "std": std}


def summarize_runs(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and sample std (ddof=1; 0 for one run) of metrics over repeated runs.

    ``runs`` are :func:`classification_metrics` dicts (e.g. one per seed or fold).
    Returns ``n_runs``, ``{"mean", "std"}`` for each scalar metric present in every
    run, and ``per_class_f1``: class name -> ``{"mean", "std", "n_runs"}``, over
    the runs that report that class.
    """
    runs = list(runs)
    if not runs:
        raise ValueError("summarize_runs needs at least one run")
    summary: dict[str, Any] = {"n_runs": len(runs)}
    for key in SCALAR_METRICS:
        if all(key in r for r in runs):
            summary[key] = _mean_std([float(r[key]) for r in runs])

    per_class: dict[str, list[float]] = {}
    for r in runs:
        for name, stats in r.get("per_class", {}).items():
            per_class.setdefault(name, []).append(float(stats["f1"]))
    summary["per_class_f1"] = {
        name: {**_mean_std(vals), "n_runs": len(vals)} for name, vals in per_class.items()
    }
    return summary
