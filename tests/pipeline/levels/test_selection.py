"""The model choice of ``training.model: auto`` is made on validation data only."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier

from cropmap.pipeline.levels.selection import (
    CandidateResult,
    ForbiddenLabelRead,
    GuardedLabels,
    Split,
    candidate_table,
    choose,
    ensemble_proba,
    select_and_report,
    validation_scores,
)


def cand(name, f1s, oas):
    return CandidateResult(name, validation=[{"macro_f1": f, "overall_accuracy": o} for f, o in zip(f1s, oas)])


def test_highest_mean_validation_macro_f1_wins():
    c = choose([cand("forest", [0.6, 0.7], [0.9, 0.9]), cand("presto", [0.7, 0.72], [0.8, 0.8])])
    assert c["winner"] == "presto"
    assert [r["name"] for r in c["ranking"]] == ["presto", "forest"]
    assert "highest mean validation macro F1" in c["reason"] and "forest" in c["reason"]


def test_ties_on_macro_f1_go_to_overall_accuracy_then_to_the_given_order():
    c = choose([cand("a", [0.5], [0.70]), cand("b", [0.5], [0.75])])
    assert c["winner"] == "b" and "overall accuracy" in c["reason"]
    c = choose([cand("boosting", [0.5], [0.7]), cand("forest", [0.5], [0.7])])
    assert c["winner"] == "boosting" and "candidate order" in c["reason"]


def test_failed_candidates_are_not_ranked_and_nothing_usable_is_an_error():
    bad = CandidateResult("presto", error="RuntimeError: no weights")
    c = choose([bad, cand("forest", [0.4], [0.5])])
    assert c["winner"] == "forest" and "presto" in c["reason"]
    with pytest.raises(ValueError, match="no candidate"):
        choose([bad])


def test_guarded_labels_refuse_every_kind_of_read_of_a_forbidden_index():
    y = GuardedLabels(np.arange(10), forbidden=np.array([7, 8]))
    assert list(y[np.array([0, 3])]) == [0, 3]
    assert y[2] == 2
    for idx in (7, np.array([1, 8]), np.arange(10) > 6, slice(5, None)):
        with pytest.raises(ForbiddenLabelRead):
            y[idx]
    with pytest.raises(ForbiddenLabelRead):
        np.asarray(y)


def test_validation_scores_need_validation_samples():
    with pytest.raises(ValueError, match="validation samples"):
        validation_scores(np.zeros(3, int), np.zeros(0, int), np.zeros((0, 2)))
    s = validation_scores(np.array([0, 1, 1, 0]), np.array([1, 2]), np.array([[0.2, 0.8], [0.9, 0.1]]))
    assert s["overall_accuracy"] == 0.5 and s["n"] == 2


def _dataset(seed=0, n=300, k=3):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    X = rng.normal(size=(n, 6)) + y[:, None] * np.array([1.0, 0.6, 0.3, 0, 0, 0])
    return X, y


def _splits(n, seeds=(0, 1)):
    out = []
    for s in seeds:
        perm = np.random.default_rng(s).permutation(n)
        out.append(Split(s, np.sort(perm[: n // 2]), np.sort(perm[n // 2: 3 * n // 4]), np.sort(perm[3 * n // 4:])))
    return out


def _fitter(make, X, k):
    def fit(sp, labels):
        model = make().fit(X[sp.train], labels[sp.train])

        def predict(idx):
            p = np.zeros((len(idx), k))
            p[:, model.classes_] = model.predict_proba(X[idx])
            return p
        return predict
    return fit


def _fitters(X):
    return {"forest": _fitter(lambda: RandomForestClassifier(30, random_state=0), X, 3),
            "logistic": _fitter(lambda: LogisticRegression(max_iter=200), X, 3),
            "knn": _fitter(lambda: KNeighborsClassifier(15), X, 3)}


def test_the_choice_does_not_change_when_every_test_label_is_poisoned():
    X, y = _dataset()
    splits = _splits(len(y))
    plain, plain_results, _ = select_and_report(_fitters(X), y, splits, on_error="raise")
    # poison every split's test labels: the test figures change, the choice and validation do not
    for sp in splits:
        poisoned = y.copy()
        poisoned[sp.test] = (poisoned[sp.test] + 1) % 3
        p_choice, p_results, _ = select_and_report(_fitters(X), poisoned, [sp], on_error="raise")
        single, single_results, _ = select_and_report(_fitters(X), y, [sp], on_error="raise")
        assert p_choice == single
        assert [r.validation for r in p_results] == [r.validation for r in single_results]
        assert [r.test for r in p_results] != [r.test for r in single_results]
    table = candidate_table(plain, plain_results)
    assert sum(r["winner"] for r in table) == 1
    assert all("test_macro_f1" in r and "validation_macro_f1" in r for r in table)


def test_the_fitters_see_labels_that_refuse_test_indices():
    X, y = _dataset()
    splits = _splits(len(y))
    seen = []

    def spy(sp, labels):
        seen.append(labels)
        with pytest.raises(ForbiddenLabelRead):
            labels[sp.test]
        with pytest.raises(ForbiddenLabelRead):
            np.asarray(labels)
        return _fitter(lambda: LogisticRegression(max_iter=200), X, 3)(sp, labels)

    select_and_report({"spy": spy}, y, splits, on_error="raise")
    assert len(seen) == len(splits) and all(isinstance(s, GuardedLabels) and s.reads > 0 for s in seen)


def test_a_candidate_that_reads_test_labels_fails_the_selection():
    X, y = _dataset()
    splits = _splits(len(y))

    def cheat(sp, labels):
        labels[np.concatenate([sp.train, sp.test])]  # fits on test labels too
        return lambda idx: np.full((len(idx), 3), 1 / 3)

    # never swallowed as a candidate failure, even with on_error="record"
    with pytest.raises(ForbiddenLabelRead):
        select_and_report({"forest": _fitters(X)["forest"], "cheat": cheat}, y, splits)


def test_ensemble_averages_the_split_seed_models():
    a, b = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    assert np.allclose(ensemble_proba([a, b]), [[0.5, 0.5]])
    with pytest.raises(ValueError):
        ensemble_proba([a, np.zeros((2, 2))])


def scored(name, y, pred, groups=None):
    """A candidate with real per-sample validation outputs (one split seed)."""
    from cropmap.pipeline.levels.selection import validation_outputs

    proba = np.eye(int(max(y.max(), pred.max())) + 1)[pred]
    return CandidateResult(name, validation=[validation_scores(y, np.arange(len(y)), proba)],
                           outputs=[validation_outputs(y, proba, groups)])


def test_the_blend_is_kept_when_a_single_models_lead_is_validation_noise():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 30)
    blend = np.where(rng.random(30) < 0.7, y, (y + 1) % 3)
    single = blend.copy()
    wrong = np.nonzero(single != y)[0][:1]  # one more correct sample of 30: a lead well inside the noise
    single[wrong] = y[wrong]
    c = choose([scored("boosting", y, single), scored("blend", y, blend)])
    assert c["ranking"][0]["name"] == "blend" and c["winner"] == "blend"
    assert 0.5 < c["bootstrap"]["p_candidate_better"] < 0.95 and c["bootstrap"]["candidate"] == "boosting"
    assert "within validation noise" in c["reason"]
    # without per-sample outputs the ranking alone decides (older callers)
    plain = choose([cand("boosting", [c["ranking"][1]["validation_macro_f1"]], [0.8]),
                    cand("blend", [c["ranking"][0]["validation_macro_f1"]], [0.8])])
    assert plain["winner"] == "boosting" and "bootstrap" not in plain


def test_a_single_model_clearly_better_than_the_blend_wins():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 200)
    single = y.copy()
    blend = np.where(rng.random(200) < 0.5, y, (y + 1) % 3)
    c = choose([scored("ltae", y, single), scored("blend", y, blend)])
    assert c["winner"] == "ltae" and c["bootstrap"]["p_candidate_better"] >= 0.95
    assert "beyond validation noise" in c["reason"]


def test_the_bootstrap_resamples_parcels_not_pixels():
    from cropmap.pipeline.levels.selection import bootstrap_lead, validation_outputs

    # 4 parcels of 50 pixels; the single model is better on one parcel only: as pixels that looks like
    # 50 independent wins, as parcels it is one win in four
    y = np.repeat([0, 1, 0, 1], 50)
    a = y.copy()
    b = y.copy()
    b[:50] = 1
    eye = np.eye(2)
    groups = np.repeat(np.arange(4), 50)
    by_pixel = bootstrap_lead([validation_outputs(y, eye[a])], [validation_outputs(y, eye[b])])
    by_parcel = bootstrap_lead([validation_outputs(y, eye[a], groups)], [validation_outputs(y, eye[b], groups)])
    assert by_pixel > 0.99 and by_parcel < 0.95  # parcel 0 is missing from about (3/4)^4 of the draws
