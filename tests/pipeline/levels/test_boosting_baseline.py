"""The gradient-boosting baseline beside the forest: written per split, read back, summarised in metrics.json."""

import numpy as np
import pytest

from cropmap.pipeline.errors import StageError
from cropmap.pipeline.levels.common import metrics_document, read_baseline, write_boosting_baseline


def _metrics(oa, f1):
    return {"overall_accuracy": oa, "macro_f1": f1, "kappa": 0.0, "weighted_f1": f1, "miou": f1, "per_class": {},
            "n_samples": 10, "confusion_matrix": [[1]], "class_names": ["a"]}


def test_boosting_baseline_round_trip_and_early_stopping_on_validation(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 6)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64) + (X[:, 1] > 1)
    X[rng.random(X.shape) < 0.2] = np.nan  # empty bins stay NaN
    ids = np.array([f"s{i}" for i in range(30)])
    path = tmp_path / "boosting-seed-0.parquet"
    write_boosting_baseline(path, 0, X[:60], y[:60], X[90:], 3, "sample_id", ids, X[60:90], y[60:90])
    p = read_baseline(path, "sample_id", ids, 3, "pixels")
    assert p.shape == (30, 3) and np.allclose(p.sum(1), 1, atol=1e-5)
    assert (p.argmax(1) == y[90:]).mean() > 0.6
    with pytest.raises(StageError):
        read_baseline(path, "sample_id", ids[::-1], 3, "pixels")


def test_metrics_document_reports_boosting_next_to_the_forest():
    runs = [{"seed": s, "evaluated_classes": ["a"], "train_only_classes": [], "model": _metrics(0.8, 0.7),
             "baseline": _metrics(0.7, 0.6), "boosting": _metrics(0.75 + 0.1 * s, 0.65)} for s in (0, 1)]
    doc = metrics_document(runs, protocol="p", head={"model": "m"}, baseline_model="random_forest")
    assert doc["baseline"]["model"] == "random_forest" and doc["comparison"]["overall_accuracy_gain"] == pytest.approx(0.1)
    assert doc["boosting"]["model"].startswith("lightgbm")
    assert doc["boosting"]["overall_accuracy"] == pytest.approx(0.8)
    assert doc["boosting"]["comparison"]["overall_accuracy_gain"] == pytest.approx(0.0) and doc["boosting"]["comparison"]["model_better_overall_accuracy_runs"] == "1/2"
    # runs of an older layout without boosting predictions: no boosting section, nothing invented
    old = [{k: v for k, v in r.items() if k != "boosting"} for r in runs]
    assert "boosting" not in metrics_document(old, protocol="p", head={}, baseline_model="rf")
