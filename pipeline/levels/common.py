"""What the three levels share, below all of them: the class table of training labels, metrics of
predictions, the summary of split runs, the model-vs-baseline comparison and the metrics document
(``metrics.json``) every level writes. No level module is imported here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from cropmap.models.metrics import label_metrics, summarize_runs
from cropmap.pipeline.errors import StageError
from cropmap.pipeline.fsio import atomic_path
from cropmap.pipeline.splits import ParcelSplit


def _label_key(v) -> object:
    """Labels compare as ints when they are integral numbers, else as strings."""
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return int(v)
    return str(v)


def class_table(samples, idx: np.ndarray) -> list[dict]:
    """Classes of the training samples: ``[{"index", "label", "name"}]`` sorted by label."""
    labels = sorted({_label_key(v) for v in samples.table["label"].to_numpy()[idx]}, key=lambda v: (isinstance(v, str), v))
    names = samples.class_names
    out = []
    for i, lab in enumerate(labels):
        name = names.get(lab, names.get(str(lab), str(lab)))
        out.append({"index": i, "label": lab, "name": str(name)})
    return out


def encode_labels(samples, classes: list[dict]) -> np.ndarray:
    """Class indices of the samples (-1 for labels the class map does not know)."""
    lookup: dict[object, int] = {}
    for c in classes:
        lookup[c["label"]] = c["index"]
        lookup.setdefault(c["name"], c["index"])
    return np.array([lookup.get(_label_key(v), lookup.get(str(v), -1)) for v in samples.table["label"].to_numpy()], dtype=np.int64)


def metrics_for(samples, proba: np.ndarray, classes: list[dict], evaluated: list[str] | None = None) -> dict:
    """Metrics of predictions ``proba`` against the samples' labels, by :func:`cropmap.models.metrics.label_metrics`
    (one implementation for runs and benchmarks; its class-set rule: the union of test and predicted
    classes). ``evaluated`` (the test classes) is accepted for older callers and does not restrict the average."""
    names = [c["name"] for c in classes]
    y = encode_labels(samples, classes)
    reference = [names[k] if k >= 0 else str(v) for k, v in zip(y, samples.table["label"].to_numpy())]
    return label_metrics(reference, proba.argmax(1), names)


SCALARS = ("overall_accuracy", "kappa", "macro_f1", "weighted_f1", "miou")


def summary(metric_runs: list[dict]) -> dict:
    s = summarize_runs(metric_runs)
    out = {}
    for k in SCALARS:
        out[k] = round(s[k]["mean"], 4)
        out[f"{k}_std"] = round(s[k]["std"], 4)
    names = sorted({n for m in metric_runs for n in m["per_class"]})
    per_class = {}
    for n in names:
        rows = [m["per_class"][n] for m in metric_runs if n in m["per_class"] and m["per_class"][n]["support"] > 0]
        if rows:
            per_class[n] = {
                "f1": round(float(np.mean([r["f1"] for r in rows])), 4),
                "f1_std": round(float(np.std([r["f1"] for r in rows], ddof=1)) if len(rows) > 1 else 0.0, 4),
                "iou": round(float(np.mean([r["iou"] for r in rows])), 4),
                "precision": round(float(np.mean([r["precision"] for r in rows])), 4),
                "recall": round(float(np.mean([r["recall"] for r in rows])), 4),
                "support": int(sum(r["support"] for r in rows)),
                "runs_evaluated": len(rows),
            }
    out["per_class"] = per_class
    out["n_samples"] = int(sum(m["n_samples"] for m in metric_runs))
    return out


def model_vs_baseline(runs: list[dict], key: str = "baseline") -> dict:
    """Paired gain of the model over a baseline across split runs (``runs[i]["model"]`` vs
    ``runs[i][key]``: ``baseline`` is the random forest, ``boosting`` the gradient-boosting baseline)."""
    oa_gain = [r["model"]["overall_accuracy"] - r[key]["overall_accuracy"] for r in runs]
    f1_gain = [r["model"]["macro_f1"] - r[key]["macro_f1"] for r in runs]
    return {
        "overall_accuracy_gain": round(float(np.mean(oa_gain)), 4),
        "overall_accuracy_gain_std": round(float(np.std(oa_gain, ddof=1)) if len(oa_gain) > 1 else 0.0, 4),
        "macro_f1_gain": round(float(np.mean(f1_gain)), 4),
        "model_better_overall_accuracy_runs": f"{sum(g > 0 for g in oa_gain)}/{len(runs)}",
    }


BOOSTING_MODEL = "lightgbm (200 rounds at most, learning rate 0.1, 15 leaves, early stopping on validation; the forest's features)"


def metrics_document(runs: list[dict], *, protocol: str, head: dict, baseline_model: str, model_summary: dict | None = None,
                     baseline_summary: dict | None = None, boosting_summary: dict | None = None,
                     boosting_model: str = BOOSTING_MODEL) -> dict:
    """The ``metrics.json`` of a run: ``protocol``, the level's ``head`` keys (model name, options, ...),
    the model's summary over split runs, the baseline's (random forest), their paired comparison,
    the gradient-boosting baseline's summary and comparison (when the runs have ``boosting``
    metrics) and every run."""
    model = model_summary if model_summary is not None else summary([r["model"] for r in runs])
    base = baseline_summary if baseline_summary is not None else summary([r["baseline"] for r in runs])
    boosted = {}
    if runs and all("boosting" in r for r in runs):
        boost = boosting_summary if boosting_summary is not None else summary([r["boosting"] for r in runs])
        boosted = {"boosting": {"model": boosting_model, **boost, "comparison": model_vs_baseline(runs, "boosting")}}
    return {
        "protocol": protocol,
        **head,
        **model,
        "n_runs": len(runs),
        "evaluated_classes": sorted({c for r in runs for c in r["evaluated_classes"]}),
        "train_only_classes": sorted({c for r in runs for c in r["train_only_classes"]}),
        "baseline": {"model": baseline_model, **base},
        "comparison": model_vs_baseline(runs),
        **boosted,
        "runs": runs,
    }


def held_out(samples, model_dir: Path, names: dict) -> tuple[ParcelSplit, np.ndarray, list[str]]:
    """The parcel split a model was trained with (its ``split.json``), the indices of the samples its
    test parcels hold, and the names of the classes present among them (the evaluated classes)."""
    split = ParcelSplit.from_dict(json.loads((Path(model_dir) / "split.json").read_text()))
    test = np.nonzero(split.row_sides(samples.table) == "test")[0]
    evaluated = sorted({names.get(int(c), str(c)) for c in samples.table["label"].to_numpy()[test]})
    return split, test, evaluated


def write_forest_baseline(path: Path, seed: int, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, n_classes: int,
                          id_column: str, test_ids: np.ndarray) -> None:
    """The random-forest baseline of one split: fit on the training features, write the class
    probabilities of the test samples (columns ``p0..p{n-1}``, keyed by ``id_column``) to ``path``."""
    from cropmap.models.forest import make_forest

    forest = make_forest(seed).fit(x_train, y_train)
    full = np.zeros((len(x_test), n_classes), dtype=np.float32)
    full[:, forest.classes_] = forest.predict_proba(x_test)
    write_baseline(path, id_column, test_ids, full)


def write_baseline(path: Path, id_column: str, test_ids: np.ndarray, proba: np.ndarray) -> None:
    """Class probabilities of the test samples (columns ``p0..p{n-1}``, keyed by ``id_column``), atomically."""
    base = pd.DataFrame({id_column: test_ids})
    base[[f"p{i}" for i in range(np.asarray(proba).shape[1])]] = np.asarray(proba, np.float32)
    with atomic_path(path) as tmp:
        base.to_parquet(tmp, index=False)


def write_boosting_baseline(path: Path, seed: int, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, n_classes: int,
                            id_column: str, test_ids: np.ndarray, x_val: np.ndarray | None = None, y_val: np.ndarray | None = None) -> None:
    """The gradient-boosting baseline of one split, on the forest's features: early stopping on the
    validation samples when given (never on test); written like :func:`write_forest_baseline`."""
    from cropmap.models.boosting import fit_boosting, proba_for_classes

    clf = fit_boosting(x_train, y_train, x_val, y_val, seed=seed)
    write_baseline(path, id_column, test_ids, proba_for_classes(clf, x_test, n_classes))


def read_baseline(path: Path, id_column: str, test_ids: np.ndarray, n_classes: int, what: str) -> np.ndarray:
    """The baseline probabilities written by :func:`write_forest_baseline`, checked to be of ``test_ids``."""
    base = pd.read_parquet(path)
    if list(base[id_column]) != list(test_ids):
        raise StageError(f"baseline predictions {Path(path).name} do not match the test {what}", fix="rerun with --force")
    return base[[f"p{i}" for i in range(n_classes)]].to_numpy()


def baseline_metrics(base_dir: Path, seed: int, id_column: str, test_samples, classes: list[dict], evaluated: list[str], what: str) -> dict:
    """``{"baseline": forest metrics, "boosting": boosting metrics}`` of one split seed's test samples, from the
    predictions the train stage wrote (``boosting`` only where its file exists)."""
    ids = test_samples.table[id_column]
    out = {}
    for key, name in (("baseline", "forest"), ("boosting", "boosting")):
        path = Path(base_dir) / f"{name}-seed-{seed}.parquet"
        if key == "baseline" or path.is_file():
            out[key] = metrics_for(test_samples, read_baseline(path, id_column, ids, len(classes), f"{what} of seed {seed}"), classes, evaluated)
    return out
