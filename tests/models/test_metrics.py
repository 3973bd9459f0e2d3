"""Tests of the metrics module against scikit-learn and known examples."""

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from cropmap.models.metrics import classification_metrics, confusion_matrix, summarize_runs

NAMES = ["wheat", "maize", "rapeseed", "grass", "other"]


def _random_labels(seed, n=500):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 5, n)
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.integers(0, 5, n))
    # Class 3 is never predicted: its predictions are moved to class 0.
    y_pred[y_pred == 3] = 0
    return y_true, y_pred


def test_confusion_orientation_rows_true_columns_predicted():
    y_true = [0, 0, 0, 1]
    y_pred = [1, 1, 0, 1]
    cm = confusion_matrix(y_true, y_pred, 2)
    # Two samples of true class 0 were predicted as 1 -> row 0, column 1.
    assert cm.tolist() == [[1, 2], [0, 1]]
    assert np.array_equal(cm, skm.confusion_matrix(y_true, y_pred, labels=[0, 1]))


def test_confusion_out_of_range_raises():
    with pytest.raises(ValueError):
        confusion_matrix([0, 3], [0, 1], 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn_with_unpredicted_class(seed):
    y_true, y_pred = _random_labels(seed)
    assert 3 not in y_pred and 3 in y_true
    m = classification_metrics(y_true, y_pred, NAMES)
    assert m["overall_accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert m["kappa"] == pytest.approx(skm.cohen_kappa_score(y_true, y_pred))
    assert m["macro_f1"] == pytest.approx(
        skm.f1_score(y_true, y_pred, average="macro", zero_division=0)
    )
    assert m["weighted_f1"] == pytest.approx(
        skm.f1_score(y_true, y_pred, average="weighted", zero_division=0)
    )
    assert m["miou"] == pytest.approx(
        skm.jaccard_score(y_true, y_pred, average="macro", zero_division=0)
    )
    per_f1 = skm.f1_score(y_true, y_pred, average=None, labels=range(5), zero_division=0)
    per_iou = skm.jaccard_score(y_true, y_pred, average=None, labels=range(5), zero_division=0)
    per_p = skm.precision_score(y_true, y_pred, average=None, labels=range(5), zero_division=0)
    per_r = skm.recall_score(y_true, y_pred, average=None, labels=range(5), zero_division=0)
    for k, name in enumerate(NAMES):
        pc = m["per_class"][name]
        assert pc["f1"] == pytest.approx(per_f1[k])
        assert pc["iou"] == pytest.approx(per_iou[k])
        assert pc["precision"] == pytest.approx(per_p[k])
        assert pc["recall"] == pytest.approx(per_r[k])
        assert pc["support"] == int((y_true == k).sum())
    assert m["per_class"]["grass"]["f1"] == 0.0
    assert m["per_class"]["grass"]["iou"] == 0.0
    assert m["n_samples"] == len(y_true)
    assert m["confusion_matrix_axes"] == "rows=true, columns=predicted"
    assert m["confusion_matrix"] == skm.confusion_matrix(y_true, y_pred, labels=range(5)).tolist()


def test_absent_class_excluded_from_macro():
    # Class 4 ("other") never occurs and is never predicted: not averaged.
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 0])
    m = classification_metrics(y_true, y_pred, NAMES)
    assert m["averaged_classes"] == ["wheat", "maize", "rapeseed"]
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y_true, y_pred, average="macro"))
    assert m["per_class"]["other"]["support"] == 0


def test_predicted_only_class_counts_with_zero_f1():
    y_true = np.array([0, 0, 1, 1])
    y_pred = np.array([0, 2, 1, 1])
    m = classification_metrics(y_true, y_pred, ["a", "b", "c"])
    assert "c" in m["averaged_classes"]
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y_true, y_pred, average="macro"))


def test_labels_restrict_macro():
    y_true, y_pred = _random_labels(5)
    m = classification_metrics(y_true, y_pred, NAMES, labels=[0, 1, 2])
    assert m["macro_f1"] == pytest.approx(
        skm.f1_score(y_true, y_pred, labels=[0, 1, 2], average="macro", zero_division=0)
    )
    assert m["miou"] == pytest.approx(
        skm.jaccard_score(y_true, y_pred, labels=[0, 1, 2], average="macro", zero_division=0)
    )
    assert m["weighted_f1"] == pytest.approx(
        skm.f1_score(y_true, y_pred, labels=[0, 1, 2], average="weighted", zero_division=0)
    )
    # Accuracy still covers every sample.
    assert m["overall_accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))


def test_ignore_index_excluded():
    y_true, y_pred = _random_labels(3)
    y_true_ign = y_true.copy()
    y_true_ign[:100] = 255
    keep = y_true_ign != 255
    m = classification_metrics(y_true_ign, y_pred, NAMES, ignore_index=255)
    ref = classification_metrics(y_true[keep], y_pred[keep], NAMES)
    assert m == ref
    assert m["n_samples"] == int(keep.sum())
    assert np.array_equal(
        confusion_matrix(y_true_ign, y_pred, 5, ignore_index=255),
        confusion_matrix(y_true[keep], y_pred[keep], 5),
    )


def test_all_ignored_raises():
    with pytest.raises(ValueError):
        classification_metrics([255, 255], [0, 1], ["a", "b"], ignore_index=255)


def test_single_class_perfect_kappa_is_finite():
    m = classification_metrics([1, 1, 1], [1, 1, 1], ["a", "b"])
    assert m["kappa"] == 1.0
    assert m["overall_accuracy"] == 1.0


def test_json_serialisable_plain_types():
    y_true, y_pred = _random_labels(4)
    m = classification_metrics(np.asarray(y_true, np.int32), np.asarray(y_pred, np.int16), NAMES)
    text = json.dumps(m, allow_nan=False)
    assert json.loads(text) == m

    def check(obj):
        if isinstance(obj, dict):
            for v in obj.values():
                check(v)
        elif isinstance(obj, list):
            for v in obj:
                check(v)
        else:
            assert type(obj) in (int, float, str), type(obj)

    check(m)


def test_summarize_runs_mean_and_sample_std():
    runs = [classification_metrics(*_random_labels(s), NAMES) for s in range(4)]
    summary = summarize_runs(runs)
    assert summary["n_runs"] == 4
    for key in ("overall_accuracy", "kappa", "macro_f1", "weighted_f1", "miou"):
        vals = [r[key] for r in runs]
        assert summary[key]["mean"] == pytest.approx(np.mean(vals))
        assert summary[key]["std"] == pytest.approx(np.std(vals, ddof=1))
    wheat = [r["per_class"]["wheat"]["f1"] for r in runs]
    assert summary["per_class_f1"]["wheat"]["mean"] == pytest.approx(np.mean(wheat))
    assert summary["per_class_f1"]["wheat"]["std"] == pytest.approx(np.std(wheat, ddof=1))
    json.dumps(summary, allow_nan=False)


def test_summarize_single_run_and_empty():
    run = classification_metrics(*_random_labels(0), NAMES)
    s = summarize_runs([run])
    assert s["n_runs"] == 1
    assert s["macro_f1"] == {"mean": run["macro_f1"], "std": 0.0}
    with pytest.raises(ValueError):
        summarize_runs([])


def test_label_metrics_average_over_test_or_predicted_classes():
    from cropmap.models.metrics import CLASS_SET_RULE, label_metrics

    # class "c" is predicted but absent from the test reference: it counts with F1 = 0
    m = label_metrics(["a", "a", "b", "b"], [0, 0, 1, 2], ["a", "b", "c"])
    assert m["averaged_classes"] == ["a", "b", "c"]
    assert m["per_class"]["c"]["f1"] == 0.0
    assert abs(m["macro_f1"] - (1.0 + 2 / 3 + 0.0) / 3) < 1e-9
    # a reference class the model never saw is its own never-predicted class
    m = label_metrics(["a", "z"], [0, 0], ["a", "b"])
    assert m["classes_unseen_in_training"] == ["z"] and m["per_class"]["z"]["f1"] == 0.0
    assert "b" not in m["averaged_classes"]  # neither in test nor predicted
    assert m["class_set_rule"] == CLASS_SET_RULE


def test_runs_and_benchmarks_share_the_metrics_function():
    import inspect
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import accuracy

    from cropmap.pipeline.levels import common

    assert "metrics_for" in inspect.getsource(accuracy.evaluate)
    assert "label_metrics" in inspect.getsource(common.metrics_for)
