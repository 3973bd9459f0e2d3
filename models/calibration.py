"""Confidence calibration: temperature scaling fitted on validation data, ECE and reliability bins.

A classifier trained with class weighting or a focal loss, early-stopped on macro F1, has no
reason to output probabilities that mean what they say: "0.9" on the confidence map should be
right nine times in ten. Temperature scaling (Guo et al. 2017) divides the logits by one scalar
``T > 0`` fitted by minimising the negative log-likelihood of *held-out validation* samples; the
arg-max (the map) does not change, only the confidence. Fitting uses log-probabilities, which
differ from the logits by a per-row constant that softmax ignores, so any model returning
probabilities can be calibrated.

Validation on a small site is a handful of fields, and the pixels of one field are near-copies:
an NLL summed over pixels lets one big field set the temperature, and a temperature fitted on
four fields does not carry to others (the demo once got T = 0.41 to 1.91 over three seeds, and a
worse test ECE). So :func:`fit_temperature` (the one entry point; any model's probabilities or
logits, labels, parcel ids) (1) weights every validation *parcel* equally, (2) puts a Gaussian
prior on ``log T`` centred on 0 (no change), which the data overrule only as parcels accumulate,
(3) chooses the prior's width by leave-one-parcel-out cross-validation on the validation data
(``T = 1`` is one of the candidates, so calibration is skipped when it does not help held-out
parcels), and (4) searches ``log T`` in a bounded interval (:data:`LOG_T_BOUNDS`, scipy's bounded
Brent method, deterministic; the NLL is convex in ``1/T``). Pooling validation pixels over split
seeds is *not* done: one seed's validation parcels can be another seed's test parcels.

Use::

    from cropmap.models.calibration import fit_temperature, scale
    t = fit_temperature(proba_val, y_val, groups=parcel_id_val)["temperature"]
    calibrated = scale(proba_new, t)          # softmax(log(p) / T); the arg-max is unchanged

Expected calibration error (ECE): the top-class probability of each sample is put in one of
:data:`N_BINS` = 15 equal-width bins over ``[0, 1]`` (the common choice since Guo et al.);
ECE = sum over bins of ``(n_bin / N) * |accuracy_bin - mean confidence_bin|``. The reliability
bins (count, mean confidence, accuracy per bin) are returned for the plot.

Never fit on test data: the pipeline fits on the validation split of each seed and reports ECE
before and after on validation and on test.
"""

from __future__ import annotations

from typing import Any

import numpy as np

N_BINS = 15
BINNING = f"{N_BINS} equal-width bins of the top-class probability over [0, 1]; ECE = sum_b n_b/N |accuracy_b - confidence_b|"
LOG_T_BOUNDS = (-np.log(20.0), np.log(20.0))  # T in [0.05, 20]
PRIOR_SDS = (0.0, 0.1, 0.25, 0.5, 1.0, float("inf"))  # candidate sds of the prior on log T (0: T = 1)
MIN_GROUPS = 3  # fewer validation parcels: no cross-validation possible, T = 1
MAX_FOLDS = 10  # leave-one-parcel-out up to 10 parcels, 10 folds of whole parcels beyond


def _log_probs(proba: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(proba, np.float64), 1e-12, None))


def scale(proba: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities after dividing the (log-probability) logits by ``temperature``."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    z = _log_probs(proba) / float(temperature)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def nll(proba: np.ndarray, y: np.ndarray) -> float:
    p = np.asarray(proba, np.float64)[np.arange(len(y)), np.asarray(y, np.int64)]
    return float(-np.log(np.clip(p, 1e-12, None)).mean())


def _valid(proba: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None):
    proba, y = np.asarray(proba), np.asarray(y, np.int64).reshape(-1)
    if proba.ndim != 2 or len(proba) != len(y):
        raise ValueError(f"proba {proba.shape} and labels {y.shape} do not match")
    if groups is not None:
        groups = np.asarray(groups).reshape(-1)
        if len(groups) != len(y):
            raise ValueError(f"groups {groups.shape} and labels {y.shape} do not match")
    keep = (y >= 0) & (y < proba.shape[1])  # labels the model never saw cannot inform its temperature
    return proba[keep], y[keep], (groups[keep] if groups is not None else None)


def _parcel_weights(y: np.ndarray, groups: np.ndarray | None) -> tuple[np.ndarray, int]:
    """Per-sample weights giving every group (parcel) a total weight of 1, and the number of groups.
    Without groups every sample is its own group."""
    if groups is None:
        return np.ones(len(y), np.float64), int(len(y))
    _, inv, counts = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    return 1.0 / counts[inv].astype(np.float64), int(len(counts))


def _group_nll(logp: np.ndarray, y: np.ndarray, w: np.ndarray, log_t: float) -> float:
    """Sum over groups of each group's mean NLL at temperature ``exp(log_t)`` (``w`` from :func:`_parcel_weights`)."""
    z = logp / np.exp(log_t)
    z = z - z.max(axis=1, keepdims=True)
    per = np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]
    return float((w * per).sum())


def _map_log_t(logp: np.ndarray, y: np.ndarray, w: np.ndarray, prior_sd: float) -> tuple[float, float]:
    """``log T`` minimising the group-weighted NLL plus the Gaussian prior ``(log T)^2 / (2 prior_sd^2)``
    (bounded 1-D search); ``prior_sd == 0`` is ``T = 1``. Returns (log T, objective)."""
    from scipy.optimize import minimize_scalar

    if prior_sd == 0:
        return 0.0, _group_nll(logp, y, w, 0.0)
    penalty = 0.0 if np.isinf(prior_sd) else 1.0 / (2.0 * prior_sd ** 2)
    res = minimize_scalar(lambda lt: _group_nll(logp, y, w, lt) + penalty * lt * lt, bounds=LOG_T_BOUNDS,
                          method="bounded", options={"xatol": 1e-4})
    return float(res.x), float(res.fun)


def fit_temperature(proba: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None, *,
                    prior_sds: tuple[float, ...] = PRIOR_SDS, min_groups: int = MIN_GROUPS) -> dict[str, Any]:
    """The temperature for validation probabilities ``proba`` (N, C) against class indices ``y``.

    ``groups`` (N,): the parcel (field) of each sample. Pixels of one field are near-copies, so the
    objective gives **every group the same total weight** (the mean NLL of its pixels) and counts
    the evidence in groups, not pixels. ``log T`` gets a Gaussian prior centred on 0 (``T = 1``, the
    model as trained): the MAP estimate minimises ``sum_groups NLL_g(T) + (log T)^2 / (2 sd^2)``, so
    the prior weighs as much as a fixed number of groups and the data win only as groups accumulate.
    The prior's ``sd`` is chosen among ``prior_sds`` (0 = no scaling, ``inf`` = plain temperature
    scaling) by **leave-one-group-out cross-validation on the validation data** (:data:`MAX_FOLDS` folds of
    whole groups beyond that many groups): for each sd, fit on the other groups and score each
    held-out group's mean NLL; the sd with the lowest mean held-out
    NLL wins (ties go to the stronger prior). With fewer than ``min_groups`` groups there is no
    evidence to cross-validate on and ``T = 1`` is returned. Labels outside ``[0, C)`` are ignored.

    Models that give only probabilities are handled alike: the logits are ``log p`` (softmax of
    ``log p / T``, see :func:`scale`). Returns a dict with ``temperature`` and how it was chosen.
    """
    proba, y, groups = _valid(proba, y, groups)
    if len(y) == 0:
        raise ValueError("no validation sample to fit a temperature on")
    logp = _log_probs(proba)
    w, n_groups = _parcel_weights(y, groups)
    out: dict[str, Any] = {"method": "temperature scaling", "fitted_on": "validation", "n": int(len(y)), "n_groups": n_groups,
                           "weighting": "every parcel the same total weight" if groups is not None else "every sample the same weight",
                           "prior": "log T ~ N(0, sd^2), MAP estimate; sd by leave-one-parcel-out cross-validation on validation",
                           "search": f"bounded 1-D search of log T in {list(LOG_T_BOUNDS)}",
                           "nll_before": _group_nll(logp, y, w, 0.0) / n_groups}
    sds = sorted({float(s) for s in prior_sds})
    if n_groups < min_groups:
        out.update(temperature=1.0, prior_sd=0.0, nll_after=out["nll_before"],
                   cross_validation=f"not run: {n_groups} validation group(s) < {min_groups}; T = 1 (uncalibrated)")
        return out
    # leave-one-group-out, or MAX_FOLDS folds of whole groups (seeded) when there are more groups
    gid = np.unique(groups, return_inverse=True)[1] if groups is not None else np.arange(len(y))
    n_folds = min(n_groups, MAX_FOLDS)
    fold_of_group = np.random.default_rng(0).permutation(n_groups) % n_folds
    fold = fold_of_group[gid]
    held: dict[float, float] = {sd: 0.0 for sd in sds}
    for k in range(n_folds):
        test = fold == k
        wtr, _ = _parcel_weights(y[~test], gid[~test])
        wte, n_te = _parcel_weights(y[test], gid[test])
        for sd in sds:
            lt, _ = _map_log_t(logp[~test], y[~test], wtr, sd)
            held[sd] += _group_nll(logp[test], y[test], wte, lt)  # summed over the held-out groups
    cv = {sd: v / n_groups for sd, v in held.items()}  # mean held-out NLL per group
    best = min(sds, key=lambda sd: (round(cv[sd], 6), sd))  # ties: the stronger prior (smaller sd)
    lt, obj = _map_log_t(logp, y, w, best)
    out.update(temperature=float(np.exp(lt)), prior_sd=best, nll_after=_group_nll(logp, y, w, lt) / n_groups,
               cross_validation={"held_out_nll": {("inf" if np.isinf(sd) else f"{sd:g}"): v for sd, v in cv.items()},
                                 "folds": n_folds, "chosen_sd": "inf" if np.isinf(best) else best})
    return out


def reliability(proba: np.ndarray, y: np.ndarray, n_bins: int = N_BINS) -> dict[str, Any]:
    """ECE and reliability bins of ``proba`` against class indices ``y`` (a label outside the
    model's classes counts as a wrong prediction at the model's confidence)."""
    proba, y = np.asarray(proba, np.float64), np.asarray(y, np.int64).reshape(-1)
    if len(y) == 0:
        raise ValueError("no sample to measure calibration on")
    conf, pred = proba.max(axis=1), proba.argmax(axis=1)
    correct = (pred == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    b = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    bins, ece = [], 0.0
    for k in range(n_bins):
        m = b == k
        n = int(m.sum())
        if n:
            acc, c = float(correct[m].mean()), float(conf[m].mean())
            ece += n / len(y) * abs(acc - c)
        else:
            acc = c = None
        bins.append({"lo": float(edges[k]), "hi": float(edges[k + 1]), "count": n, "confidence": c, "accuracy": acc})
    return {"ece": float(ece), "n_bins": n_bins, "n": int(len(y)), "accuracy": float(correct.mean()),
            "mean_confidence": float(conf.mean()), "bins": bins}


def before_after(proba: np.ndarray, y: np.ndarray, temperature: float) -> dict[str, Any]:
    """Reliability before and after scaling by ``temperature``."""
    return {"before": reliability(proba, y), "after": reliability(scale(proba, temperature), y)}


def pooled_bins(parts: list[dict]) -> dict[str, Any]:
    """Reliability bins pooled over runs (seeds): counts add, confidence and accuracy are count-weighted."""
    n_bins = parts[0]["n_bins"]
    out, total, ece = [], sum(p["n"] for p in parts), 0.0
    for k in range(n_bins):
        rows = [p["bins"][k] for p in parts if p["bins"][k]["count"]]
        n = sum(r["count"] for r in rows)
        if n:
            c = sum(r["confidence"] * r["count"] for r in rows) / n
            a = sum(r["accuracy"] * r["count"] for r in rows) / n
            ece += n / total * abs(a - c)
        else:
            c = a = None
        out.append({"lo": parts[0]["bins"][k]["lo"], "hi": parts[0]["bins"][k]["hi"], "count": n, "confidence": c, "accuracy": a})
    return {"ece": float(ece), "n_bins": n_bins, "n": int(total), "bins": out}


def reliability_figure(curves: dict[str, dict], title: str = "reliability"):
    """A matplotlib figure: accuracy vs confidence per bin for each named reliability dict, with the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect calibration")
    for (name, rel), style in zip(curves.items(), ("o-", "s-", "^-", "d-")):
        pts = [(b["confidence"], b["accuracy"]) for b in rel["bins"] if b["count"]]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, style, ms=4, label=f"{name} (ECE {rel['ece']:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    fig.set_label(title)
    fig.tight_layout()
    return fig


def seed_calibration(temperature: float, proba_val: np.ndarray | None, y_val: np.ndarray | None,
                     proba_test: np.ndarray, y_test: np.ndarray) -> dict[str, Any]:
    """Reliability before and after ``temperature`` on one seed's validation and test samples."""
    out: dict[str, Any] = {"temperature": float(temperature), "test": before_after(proba_test, y_test, temperature)}
    if proba_val is not None and y_val is not None and len(y_val):
        out["validation"] = before_after(proba_val, y_val, temperature)
    return out


def summarize_calibration(seeds: dict[str, dict]) -> dict[str, Any]:
    """The ``calibration`` block of ``metrics.json`` from :func:`seed_calibration` results per seed:
    mean ECE before/after over seeds on validation and test, and reliability bins pooled over seeds."""
    def mean(values):
        return float(np.mean(values)) if values else None

    ece: dict[str, Any] = {}
    pooled: dict[str, Any] = {}
    for part in ("validation", "test"):
        have = [s[part] for s in seeds.values() if part in s]
        if not have:
            continue
        before, after = [h["before"]["ece"] for h in have], [h["after"]["ece"] for h in have]
        ece[part] = {"before": mean(before), "after": mean(after), "n_seeds": len(have),
                     "lower_after": bool(mean(after) < mean(before)),
                     "per_seed": {k: {"before": s[part]["before"]["ece"], "after": s[part]["after"]["ece"]}
                                  for k, s in seeds.items() if part in s}}
        pooled[part] = {"before": pooled_bins([h["before"] for h in have]), "after": pooled_bins([h["after"] for h in have])}
    return {
        "method": "temperature scaling of the model's log-probabilities, one temperature per seed's model: every validation "
                  "parcel weighted alike, a Gaussian prior on log T centred on 0 whose width is chosen by leave-one-parcel-out "
                  "cross-validation on validation (T = 1 when scaling does not help held-out parcels)",
        "fitted_on": "the validation pixels of each seed (spatial blocks of their own; never test pixels; not pooled over seeds, "
                     "since one seed's validation parcels can be another's test parcels)",
        "binning": BINNING,
        "temperature": {k: s["temperature"] for k, s in seeds.items()},
        "ece": ece,
        "reliability": pooled,
        "applied_to": "the confidence COG (map/confidence.tif) is the top-class probability after scaling; the class map is unchanged",
    }
