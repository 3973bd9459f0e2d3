"""Confidence calibration: temperature scaling fitted on validation data, ECE and reliability bins.

A classifier trained with class weighting or a focal loss, early-stopped on macro F1, has no
reason to output probabilities that mean what they say: "0.9" on the confidence map should be
right nine times in ten. Temperature scaling (Guo et al. 2017) divides the logits by one scalar
``T > 0`` fitted by minimising the negative log-likelihood of *held-out validation* samples; the
arg-max (the map) does not change, only the confidence. Fitting uses log-probabilities, which
differ from the logits by a per-row constant that softmax ignores, so any model returning
probabilities can be calibrated.

The fit is a bounded 1-D search over ``log T`` in ``[-4, 4]`` (``T`` in about 0.02 ... 55;
scipy's bounded Brent method, deterministic): the NLL is convex in ``1/T``, a 1-D search finds
its minimum reliably, and it cannot diverge as LBFGS on ``T`` can when ``T`` approaches 0.

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
LOG_T_BOUNDS = (-4.0, 4.0)


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


def _valid(proba: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    proba, y = np.asarray(proba), np.asarray(y, np.int64).reshape(-1)
    if proba.ndim != 2 or len(proba) != len(y):
        raise ValueError(f"proba {proba.shape} and labels {y.shape} do not match")
    keep = (y >= 0) & (y < proba.shape[1])  # labels the model never saw cannot inform its temperature
    return proba[keep], y[keep]


def fit_temperature(proba: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """The temperature minimising the NLL of validation ``proba`` (N, C) against labels ``y`` (class indices)."""
    from scipy.optimize import minimize_scalar

    p, y = _valid(proba, y)
    if len(y) == 0:
        raise ValueError("no validation sample to fit a temperature on")
    logp = _log_probs(p)

    def objective(log_t: float) -> float:
        z = logp / np.exp(log_t)
        z -= z.max(axis=1, keepdims=True)
        return float((np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]).mean())

    res = minimize_scalar(objective, bounds=LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-4})
    t = float(np.exp(res.x))
    return {"method": "temperature scaling", "temperature": t, "fitted_on": "validation", "n": int(len(y)),
            "nll_before": nll(p, y), "nll_after": float(res.fun), "search": f"bounded 1-D search of log T in {list(LOG_T_BOUNDS)}"}


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
        "method": "temperature scaling of the model's log-probabilities, one temperature per seed's model",
        "fitted_on": "the validation pixels of each seed (spatial blocks of their own; never test pixels)",
        "binning": BINNING,
        "temperature": {k: s["temperature"] for k, s in seeds.items()},
        "ece": ece,
        "reliability": pooled,
        "applied_to": "the confidence COG (map/confidence.tif) is the top-class probability after scaling; the class map is unchanged",
    }
