"""Choosing the mapping model on validation data only (``training.model: auto``).

A run trains several *candidates* (the best deep model, Presto fine-tuned, Presto embeddings +
boosting, the random forest, gradient boosting) on the same split seeds. Each split seed has
three disjoint index sets of the labelled samples: ``train`` (fits the model), ``val`` (carved
out of the training parcels: early stopping *and* the choice) and ``test`` (held-out parcels:
reported only). This module is the pure part of that:

* :func:`validation_scores` scores a candidate's probabilities on the validation indices,
  reading the labels at those indices and nowhere else;
* :func:`choose` ranks candidates by mean validation macro F1 over split seeds, ties (within
  ``tie_tolerance``) by mean validation overall accuracy, then by the order the candidates were
  given (cheapest first), and says why the winner won. When the candidates include the
  :data:`BLEND` (the mean of every candidate's probabilities) and a single model ranks above it,
  the single model wins only if its lead is larger than validation noise: a paired bootstrap over
  the validation parcels (:func:`bootstrap_lead`) must give it a higher mean macro F1 than the blend
  in at least :data:`BLEND_CONFIDENCE` of the draws; otherwise the blend is kept. Averaging the
  candidates is what minimises the risk of a wrong pick when validation cannot tell them apart
  (model averaging); validation sets of a few dozen parcels rarely can;
* :func:`select_and_report` runs candidate fitters over the splits, chooses on validation, and
  only *then* scores every candidate on test; the fitters see the labels through
  :class:`GuardedLabels`, which raises on any read of that split's test indices, so the choice
  cannot depend on a test label;
* :func:`ensemble_proba` averages the split-seed models' probabilities (the map's ensemble).

Nothing here touches files or models: the stages give it fitters and predictions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cropmap.models.metrics import classification_metrics

__all__ = [
    "AUTO",
    "BLEND",
    "choice_document",
    "Split",
    "CandidateResult",
    "GuardedLabels",
    "ForbiddenLabelRead",
    "validation_scores",
    "validation_outputs",
    "bootstrap_lead",
    "BLEND_CONFIDENCE",
    "choose",
    "select_and_report",
    "ensemble_proba",
    "candidate_table",
]

AUTO = "auto"
BLEND = "blend"
"""The candidate that is the mean of every other candidate's (calibrated) probabilities."""
PRIMARY, SECONDARY = "macro_f1", "overall_accuracy"
BLEND_CONFIDENCE = 0.95
"""A single model replaces the blend only when it beats it in this share of the bootstrap draws."""
BOOTSTRAP_DRAWS = 2000


class ForbiddenLabelRead(RuntimeError):
    """A label the selection must not see (a test label) was read."""


class GuardedLabels:
    """Integer class labels that refuse to be read at ``forbidden`` indices.

    Indexing with ints, int arrays, boolean masks or slices is checked; converting the whole
    array (``np.asarray``) is refused too, since that would expose the forbidden labels.
    """

    def __init__(self, y: np.ndarray, forbidden: np.ndarray) -> None:
        self._y = np.asarray(y)
        self._bad = np.zeros(len(self._y), bool)
        self._bad[np.asarray(forbidden, np.int64)] = True
        self.reads = 0

    def __len__(self) -> int:
        return len(self._y)

    @property
    def shape(self) -> tuple[int, ...]:
        return self._y.shape

    def __getitem__(self, idx: Any) -> np.ndarray:
        if isinstance(idx, slice):
            pos = np.arange(len(self._y))[idx]
        else:
            arr = np.asarray(idx)
            pos = np.nonzero(arr)[0] if arr.dtype == bool else arr.reshape(-1).astype(np.int64)
        if pos.size and self._bad[pos].any():
            raise ForbiddenLabelRead(f"read of {int(self._bad[pos].sum())} forbidden (test) label(s)")
        self.reads += 1
        return self._y[idx]

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise ForbiddenLabelRead("the whole label array was requested (it holds test labels)")


@dataclass(frozen=True)
class Split:
    """Index sets of one split seed (disjoint)."""

    seed: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


@dataclass
class CandidateResult:
    """One candidate's scores per split seed; ``test`` is filled only after the choice."""

    name: str
    validation: list[dict] = field(default_factory=list)
    test: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    outputs: list[dict] = field(default_factory=list, repr=False)
    """Per split seed, in the order of ``validation``: :func:`validation_outputs` (labels, predicted
    classes and parcel groups of the validation samples) for the bootstrap; not serialised."""

    def mean(self, which: str, key: str) -> float:
        rows = self.validation if which == "validation" else self.test
        vals = [r[key] for r in rows if key in r]
        return float(np.mean(vals)) if vals else float("nan")

    def sd(self, which: str, key: str) -> float:
        rows = self.validation if which == "validation" else self.test
        vals = [r[key] for r in rows if key in r]
        return float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def _scores(y_true: np.ndarray, proba: np.ndarray, n_classes: int) -> dict:
    y_true = np.asarray(y_true, np.int64)
    keep = y_true >= 0
    if not keep.any():
        raise ValueError("no labelled samples to score")
    pred = np.asarray(proba).argmax(1)
    names = [str(i) for i in range(n_classes)]
    labels = sorted({int(v) for v in y_true[keep]})
    m = classification_metrics(y_true[keep], pred[keep], names, labels=labels)
    return {"overall_accuracy": float(m["overall_accuracy"]), "macro_f1": float(m["macro_f1"]),
            "kappa": float(m["kappa"]), "n": int(keep.sum())}


def validation_scores(y: Any, val_idx: np.ndarray, proba_val: np.ndarray) -> dict:
    """OA / macro F1 of ``proba_val`` (rows = ``val_idx``) against ``y[val_idx]`` (only those labels are read)."""
    val_idx = np.asarray(val_idx, np.int64)
    if len(val_idx) == 0:
        raise ValueError("the selection needs validation samples: none were carved out of the training parcels")
    if len(proba_val) != len(val_idx):
        raise ValueError(f"{len(proba_val)} predictions for {len(val_idx)} validation samples")
    return _scores(y[val_idx], proba_val, np.asarray(proba_val).shape[1])


def validation_outputs(y_val: Any, proba_val: np.ndarray, groups: np.ndarray | None = None) -> dict:
    """What :func:`bootstrap_lead` resamples for one split seed: the validation labels (already read
    through the guard by the caller), the predicted classes, and the group (parcel) of each sample
    (``None``: every sample is its own group)."""
    y = np.asarray(y_val, np.int64).reshape(-1)
    pred = np.asarray(proba_val).argmax(1).astype(np.int64)
    if len(pred) != len(y):
        raise ValueError(f"{len(pred)} predictions for {len(y)} validation labels")
    g = np.arange(len(y)) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1].reshape(-1)
    return {"y": y, "pred": pred, "groups": g.astype(np.int64)}


def _weighted_macro_f1(y: np.ndarray, pred: np.ndarray, w: np.ndarray, k: int) -> np.ndarray:
    """Macro F1 (over the classes with reference weight > 0, as :func:`_scores`) for each row of weights ``w`` (B, n)."""
    b = w.shape[0]
    ref = np.zeros((b, k))
    hit = np.zeros((b, k))
    out = np.zeros((b, k))
    for c in range(k):
        ref[:, c] = w[:, y == c].sum(1)
        out[:, c] = w[:, pred == c].sum(1)
        hit[:, c] = w[:, (y == c) & (pred == c)].sum(1)
    denom = ref + out
    f1 = np.divide(2 * hit, denom, out=np.zeros_like(hit), where=denom > 0)
    present = ref > 0
    return (f1 * present).sum(1) / np.maximum(present.sum(1), 1)


def bootstrap_lead(a: Sequence[dict], b: Sequence[dict], draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> float:
    """Share of paired bootstrap draws in which candidate ``a`` has the higher mean validation macro F1
    over the split seeds than ``b`` (ties count half).

    ``a`` and ``b``: :func:`validation_outputs` of the same validation samples, one per split seed.
    Each draw resamples, in every seed, the validation *groups* (parcels) with replacement and scores
    both candidates on the same resampled pixels: pixels of one parcel are not independent evidence.
    """
    if len(a) != len(b) or not a:
        raise ValueError("the bootstrap needs the two candidates' validation outputs of the same split seeds")
    rng = np.random.default_rng(seed)
    diff = np.zeros(draws)
    for oa, ob in zip(a, b):
        if not np.array_equal(oa["y"], ob["y"]) or not np.array_equal(oa["groups"], ob["groups"]):
            raise ValueError("the two candidates were scored on different validation samples")
        g = oa["groups"]
        n_groups = int(g.max()) + 1
        counts = np.stack([np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups) for _ in range(draws)])
        w = counts[:, g].astype(np.float64)  # (draws, n): a sample's weight is its group's multiplicity
        k = int(max(oa["y"].max(), oa["pred"].max(), ob["pred"].max())) + 1
        diff += _weighted_macro_f1(oa["y"], oa["pred"], w, k) - _weighted_macro_f1(ob["y"], ob["pred"], w, k)
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / draws)


def choose(candidates: Sequence[CandidateResult], tie_tolerance: float = 1e-9,
           blend_confidence: float | None = BLEND_CONFIDENCE) -> dict:
    """Rank by mean validation macro F1, ties by mean validation OA, then by the given order; then
    keep the :data:`BLEND` unless the top single model beats it beyond validation noise.

    The last step needs both candidates' ``outputs`` (per-sample validation predictions); without them
    (or with ``blend_confidence`` None) the ranking alone decides. The single model ranked first keeps
    the win if :func:`bootstrap_lead` says it beats the blend in at least ``blend_confidence`` of the
    draws; else the blend is moved to the top of the ranking and wins.

    Returns ``{"winner", "criterion", "ranking": [{name, validation_macro_f1, validation_overall_accuracy}],
    "reason"}``. Candidates that failed (``error``) or have no validation rows are ranked last and
    can only win when nothing else ran.
    """
    usable = [c for c in candidates if c.error is None and c.validation]
    if not usable:
        raise ValueError("no candidate produced validation scores: " +
                         "; ".join(f"{c.name}: {c.error or 'no validation rows'}" for c in candidates))
    order = {c.name: i for i, c in enumerate(candidates)}

    def better(a: CandidateResult, b: CandidateResult) -> bool:
        fa, fb = a.mean("validation", PRIMARY), b.mean("validation", PRIMARY)
        if abs(fa - fb) > tie_tolerance:
            return fa > fb
        oa, ob = a.mean("validation", SECONDARY), b.mean("validation", SECONDARY)
        if abs(oa - ob) > tie_tolerance:
            return oa > ob
        return order[a.name] < order[b.name]

    ranked: list[CandidateResult] = []
    for c in usable:  # insertion sort with the explicit comparison (few candidates)
        i = 0
        while i < len(ranked) and better(ranked[i], c):
            i += 1
        ranked.insert(i, c)
    win = ranked[0]
    blend = next((c for c in ranked if c.name == BLEND), None)
    lead = None
    if (blend is not None and win is not blend and blend_confidence is not None and win.outputs and blend.outputs
            and len(win.outputs) == len(blend.outputs) == len(win.validation) == len(blend.validation)):
        try:
            lead = bootstrap_lead(win.outputs, blend.outputs)
        except ValueError:  # not scored on the same validation samples: the ranking alone decides
            lead = None
        if lead is not None and lead < blend_confidence:
            ranked.remove(blend)
            ranked.insert(0, blend)
    ranking = [{"name": c.name, "validation_macro_f1": round(c.mean("validation", PRIMARY), 4),
                "validation_overall_accuracy": round(c.mean("validation", SECONDARY), 4)} for c in ranked]
    if lead is not None:
        top = win  # the best single model
        gap = top.mean("validation", PRIMARY) - blend.mean("validation", PRIMARY)
        noise = (f"paired bootstrap over the validation parcels, {BOOTSTRAP_DRAWS} draws: {top.name} better in "
                 f"{lead:.0%} of them")
        if lead < blend_confidence:
            win = blend
            reason = (f"{BLEND} kept: {top.name} ranks first on mean validation macro F1 ({top.mean('validation', PRIMARY):.3f} vs "
                      f"{blend.mean('validation', PRIMARY):.3f}, {gap:+.3f}) but its lead is within validation noise ({noise}, "
                      f"below the {blend_confidence:.0%} needed to replace the mean of all candidates)")
        else:
            reason = (f"{top.name} has the highest mean validation macro F1 ({top.mean('validation', PRIMARY):.3f}, "
                      f"{gap:+.3f} over the {BLEND}) and its lead over the {BLEND} is beyond validation noise ({noise}, "
                      f"at least the {blend_confidence:.0%} needed)")
    elif len(ranked) == 1:
        reason = f"{win.name} is the only candidate that produced validation scores"
    else:
        second = ranked[1]
        df = win.mean("validation", PRIMARY) - second.mean("validation", PRIMARY)
        if abs(df) > tie_tolerance:
            reason = (f"{win.name} has the highest mean validation macro F1 "
                      f"({win.mean('validation', PRIMARY):.3f} vs {second.mean('validation', PRIMARY):.3f} "
                      f"for {second.name}, the runner-up)")
        else:
            doa = win.mean("validation", SECONDARY) - second.mean("validation", SECONDARY)
            reason = (f"{win.name} ties {second.name} on validation macro F1 ({win.mean('validation', PRIMARY):.3f}) "
                      + (f"and wins on validation overall accuracy ({win.mean('validation', SECONDARY):.3f} vs "
                         f"{second.mean('validation', SECONDARY):.3f})" if abs(doa) > tie_tolerance
                         else "and on overall accuracy; it comes first in the candidate order"))
    failed = [c.name for c in candidates if c not in usable]
    if failed:
        reason += f"; not ranked (failed or no validation): {', '.join(failed)}"
    criterion = "mean validation macro F1 over split seeds, ties by validation overall accuracy"
    if lead is not None:
        criterion += (f"; the {BLEND} is kept unless the best single model beats it in {blend_confidence:.0%} of a paired "
                      "bootstrap over the validation parcels")
    out = {"winner": win.name, "criterion": criterion, "ranking": ranking, "reason": reason}
    if lead is not None:
        out["bootstrap"] = {"candidate": ranked[1].name if win is blend else win.name, "against": BLEND,
                            "p_candidate_better": round(lead, 4), "needed": blend_confidence, "draws": BOOTSTRAP_DRAWS}
    return out


# A fitter trains one candidate on one split and returns a predictor: indices -> probabilities (n, K).
Fitter = Callable[[Split, Any], Callable[[np.ndarray], np.ndarray]]


def select_and_report(fitters: Mapping[str, Fitter], labels: np.ndarray, splits: Sequence[Split],
                      report_test: bool = True, on_error: str = "record") -> tuple[dict, list[CandidateResult], dict]:
    """Fit every candidate on every split, choose on validation, then (only then) score on test.

    For each split the fitters and the validation scoring get the labels as a
    :class:`GuardedLabels` that forbids that split's test indices: a candidate that reads a test
    label raises :class:`ForbiddenLabelRead` (never recorded as a mere failure). The plain
    ``labels`` are read at the test indices after the choice, for the report only. Returns
    ``(choice, results, predictors)`` with ``predictors[name]`` the list of per-split predictors
    (the winner's become the map's ensemble).
    """
    import time

    y = np.asarray(labels)
    results: list[CandidateResult] = []
    predictors: dict[str, list] = {}
    for name, fit in fitters.items():
        res = CandidateResult(name)
        t0 = time.perf_counter()
        preds = []
        try:
            for sp in splits:
                seen = GuardedLabels(y, forbidden=sp.test)
                predict = fit(sp, seen)
                res.validation.append({"seed": sp.seed, **validation_scores(seen, sp.val, predict(sp.val))})
                preds.append(predict)
        except ForbiddenLabelRead:
            raise
        except Exception as exc:  # a candidate that cannot run is reported, not fatal
            if on_error == "raise":
                raise
            res.error = f"{type(exc).__name__}: {exc}"
            res.validation = []
        res.seconds = round(time.perf_counter() - t0, 1)
        results.append(res)
        predictors[name] = preds
    choice = choose(results)
    if report_test:
        for res in results:
            if res.error:
                continue
            for sp, predict in zip(splits, predictors[res.name]):
                proba = np.asarray(predict(sp.test))
                res.test.append({"seed": sp.seed, **_scores(y[sp.test], proba, proba.shape[1])})
    return choice, results, predictors


def ensemble_proba(probas: Sequence[np.ndarray]) -> np.ndarray:
    """Mean of the split-seed models' class probabilities (same rows and classes)."""
    if not probas:
        raise ValueError("no model probabilities to average")
    shapes = {np.asarray(p).shape for p in probas}
    if len(shapes) != 1:
        raise ValueError(f"probabilities of different shapes cannot be averaged: {sorted(shapes)}")
    return np.mean(np.stack([np.asarray(p, np.float32) for p in probas]), axis=0)


def candidate_table(choice: dict, results: Sequence[CandidateResult]) -> list[dict]:
    """JSON-ready rows (one per candidate) for metrics.json and the report."""
    rows = []
    for r in results:
        row: dict[str, Any] = {"name": r.name, "winner": r.name == choice["winner"], "seconds": r.seconds}
        if r.error:
            row["error"] = r.error
        for which in ("validation", "test"):
            for key in (PRIMARY, SECONDARY):
                rows_ = r.validation if which == "validation" else r.test
                if rows_:
                    row[f"{which}_{key}"] = round(r.mean(which, key), 4)
                    row[f"{which}_{key}_sd"] = round(r.sd(which, key), 4)
        rows.append(row)
    return rows


def choice_document(results: Sequence[CandidateResult], names: Sequence[str], seeds: Sequence[int],
                    model_path: Callable[[int, str], str], settings: list, unit: str = "pixels") -> dict:
    """The ``choice.json`` of a run: :func:`choose` on the validation rows of ``results``, the winner's
    ``members`` (every candidate in ``names`` for :data:`BLEND`) and the model directories the map
    averages (``model_path(seed, name)`` for every seed and member), each candidate's validation rows."""
    choice = choose(list(results))
    members = list(names) if choice["winner"] == BLEND else [choice["winner"]]
    return {**choice, "members": members, "ensemble": [model_path(s, m) for s in seeds for m in members],
            "candidates": [{"name": r.name, "validation": r.validation, "seconds": round(r.seconds, 1)} for r in results],
            "settings": settings, "note": f"chosen on the validation {unit} of every split seed; the test {unit} were not read"}
