"""Every mapping candidate vs the random forest vs gradient boosting, on every real labelled set.

Usage:
    python benchmarks/candidates.py --datasets demo demo-parcel rpg2023 corsica2022 flanders2021 africa2017 \
        [--candidates forest boosting ltae stnet tempcnn presto presto-embed] [--budgets 1 0.05] [--seeds 0 1 2] \
        [--out benchmarks/results/candidates.jsonl]
    python benchmarks/candidates.py --summarize benchmarks/results/candidates.jsonl

Datasets (real data; ../shared/data/README.md):
- ``demo``: the demo site's labelled pixels (as ``benchmarks/accuracy.py``), split by *parcel*;
- ``demo-parcel``: one series per demo parcel, the mean of its pixels per date (the parcel level);
- ``rpg2023``: the RPG 2023 dekad points, crop groups of CROPTYPE_INSEASON_FRANCE, classes >= 10;
- ``corsica2022``, ``flanders2021``, ``africa2017``: the WorldCereal monthly / wide point tables
  converted by ``benchmarks/convert_points.py``, labels = WorldCereal ``ewoc_code``, classes with
  >= 10 samples. Samples are points of distinct parcels, so a sample split is parcel-disjoint.

Protocol, per seed: 30 % of each class's parcels (samples) are *test*; the label budget keeps a
stratified seeded fraction of the rest (at least two per class, so that validation gets one); 20 % of each class's budgeted
parcels are carved out as *validation*; the candidates train on what is left, with a fixed
schedule (the recipes of ``benchmarks/tuning.py``; validation does not stop training). Each
candidate is scored on validation and on test. ``auto`` is what ``training.model: auto`` does:
:func:`cropmap.pipeline.levels.selection.choose` over the candidates' *validation* scores of that
seed; its test figures are the winner's. Test labels never reach a fitter or the choice (the
fitters get :class:`~cropmap.pipeline.levels.selection.GuardedLabels`).

Candidates: ``forest`` (500 trees, depth 25, 30-day medians: the project's baseline), ``boosting``
(``cropmap.models.boosting`` when present, else scikit-learn's histogram gradient boosting on the
same features; the row says which), the deep pixel models by registry name (``ltae``, ``stnet``,
``tempcnn``, ``transformer`` ...) and ``presto`` / ``presto-embed`` when the Presto model is
installed (``cropmap.models.pixel.presto``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import SHARED, demo_dataset, read_long_table_frame, rpg2023_dataset, split  # noqa: E402
from convert_points import convert_all  # noqa: E402

from cropmap.models.forest import binned_features, make_forest  # noqa: E402
from cropmap.models.training import FitConfig, predict_proba  # noqa: E402
from cropmap.pipeline.levels.pixel.evaluate import predict_samples  # noqa: E402
from cropmap.pipeline.levels.pixel.train import as_series, class_table, encode_labels, train_model  # noqa: E402
from cropmap.pipeline.levels.selection import BLEND as RUN_BLEND  # noqa: E402
from cropmap.pipeline.levels.selection import (  # noqa: E402
    BLEND_CONFIDENCE,
    CandidateResult,
    GuardedLabels,
    _scores,
    bootstrap_lead,
    choose,
    validation_outputs,
    validation_scores,
)
from cropmap.pipeline.sites import Training  # noqa: E402

POINT_SETS = ("corsica2022", "flanders2021", "africa2017")
DATASETS = ("demo", "demo-parcel", "rpg2023", *POINT_SETS)
BASELINES = ("forest", "boosting")
BLEND = ("forest", "boosting", "presto-embed-plus")

# Deep-model recipes: fixed schedules chosen on validation (benchmarks/tuning.py, RESULTS.md).
DEEP_RECIPES: dict[str, dict] = {
    "tempcnn": {"options": {"grid_days": 10}, "max_len": 256, "epochs": 20},
    "ltae": {"epochs": 20},
    "stnet": {"epochs": 20},
    "transformer": {"epochs": 20},
}


# --- datasets -------------------------------------------------------------------------------

def parcel_mean_samples(pixels):
    """One series per parcel: the mean of its pixels' values per date and band (NaN-aware)."""
    from cropmap.pipeline.samples import to_long_table

    df = to_long_table(pixels)
    day = "date" if "date" in df.columns else "doy"
    bands = list(pixels.bands)
    g = df.groupby(["parcel_id", day], sort=True)
    out = g[bands].mean().reset_index()
    first = df.groupby("parcel_id").first()
    out["label"] = out["parcel_id"].map(first["label"])
    out["sample_id"] = out["parcel_id"].astype(str)
    for c in ("season_year", "tile"):
        if c in first.columns:
            out[c] = out["parcel_id"].map(first[c])
    s = read_long_table_frame(out)
    s.class_names.update(pixels.class_names)
    return s


def point_dataset(name: str, cache: Path, min_count: int = 10):
    path = convert_all(cache / "points", names=[name])[name]
    df = pd.read_parquet(path)
    counts = df.groupby("sample_id")["label"].first().value_counts()
    df = df[df["label"].isin(counts[counts >= min_count].index)]
    legend = pd.read_csv(SHARED / "worldcereal" / "points" / "ewoc_legend_eurocrops_map_wcr_edition.csv", sep=None, engine="python")
    codes = pd.to_numeric(legend["ewoc_code"].astype(str).str.replace("-", ""), errors="coerce")
    names = {int(c): str(n) for c, n in zip(codes, legend["croptype_name"]) if pd.notna(c)}
    s = read_long_table_frame(df)
    s.class_names.update({int(k): names.get(int(k), str(k)) for k in counts.index})
    recipe = {"model_options": {}, "max_len": 48, "augment": Training(), "batch_size": 32, "group": None, "max_per_group": None}
    return s, recipe


def load_dataset(name: str, cache: Path):
    if name in ("demo", "demo-parcel"):
        labelled, _, recipe = demo_dataset(cache)
        if name == "demo-parcel":
            labelled = parcel_mean_samples(labelled)
            recipe = {**recipe, "group": None, "max_per_group": None, "batch_size": 16}
        return labelled, recipe
    if name == "rpg2023":
        s, _, recipe = rpg2023_dataset(SHARED / "examples" / "rpg2023_dekad_long.parquet",
                                       SHARED / "worldcereal" / "points" / "class_mappings.json")
        return s, recipe
    return point_dataset(name, cache)


# --- splits ---------------------------------------------------------------------------------

def splits_for(samples, recipe: dict, seed: int, budget: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) indices: test by parcel, budget on the rest, validation carved from the budget."""
    pool, test = split(samples, seed, recipe)
    if budget < 1:  # stratified, seeded; at least 2 per class so that validation gets one of each
        y = encode_labels(samples, class_table(samples, pool))
        rng = np.random.default_rng(seed)
        keep = []
        for c in np.unique(y[pool]):
            members = pool[y[pool] == c]
            k = min(len(members), max(2, int(round(len(members) * budget))))
            keep.append(rng.choice(members, size=k, replace=False))
        pool = np.sort(np.concatenate(keep))
    rest, held = split(samples.subset(pool), seed + 1000, {**recipe, "max_per_group": None}, test_fraction=0.2)
    return pool[rest], pool[held], test


# --- candidates -----------------------------------------------------------------------------

def _boosting_model(seed: int):
    try:
        from cropmap.models import boosting  # the project's gradient boosting (issue 14, part 2)

        return boosting.make_boosting(seed=seed, n_jobs=1), f"cropmap.models.boosting ({boosting.__name__})"
    except (ImportError, AttributeError):
        from sklearn.ensemble import HistGradientBoostingClassifier

        return (HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05, max_leaf_nodes=31, l2_regularization=1.0, min_samples_leaf=5,
                                               class_weight="balanced", random_state=seed),
                "sklearn HistGradientBoosting (fallback: cropmap.models.boosting not installed)")


def fit_features(name: str, samples, train: np.ndarray, y_seen, seed: int, feats: np.ndarray, n_classes: int):
    if name == "forest":
        model, impl = make_forest(seed, n_jobs=1), "random forest 500 x depth 25"
    else:
        model, impl = _boosting_model(seed)
    cols = np.isfinite(feats[train]).any(0)  # features never observed in training carry nothing
    model.fit(feats[train][:, cols], y_seen[train])

    def predict(idx):
        p = np.zeros((len(idx), n_classes), np.float32)
        p[:, model.classes_] = model.predict_proba(feats[idx][:, cols])
        return p
    return predict, impl


MIN_STEPS_FOR: dict[str, int] = {}
"""Per-candidate floors on optimiser steps (``--model-min-steps ltae=800``), above ``--min-steps``."""


def fit_deep(name: str, samples, train, y_seen, seed, recipe, work: Path, n_classes: int, min_steps: int):
    min_steps = max(min_steps, MIN_STEPS_FOR.get(name, 0))
    r = DEEP_RECIPES.get(name, {})
    batch = r.get("batch_size", recipe["batch_size"])
    per_epoch = max(1, math.ceil(len(train) / batch))
    epochs = max(r.get("epochs", 20), math.ceil(min_steps / per_epoch))
    cfg = FitConfig(epochs=epochs, batch_size=batch, max_len=r.get("max_len", recipe["max_len"]), seed=seed, device="cpu",
                    patience=10**6, lr=r.get("lr", 1e-3), weight_decay=r.get("weight_decay", 1e-4),
                    augment=recipe["augment"].augment())
    y_seen[train]  # training labels only (the guard refuses test indices)
    out = work / f"{name}-{seed}-{os.getpid()}-{time.monotonic_ns()}"
    options = {**recipe["model_options"].get(name, {}), **r.get("options", {})}
    train_model(samples, train, np.zeros(0, np.int64), out, model_name=name, fit_config=cfg, model_options=options)
    cache: dict[bytes, np.ndarray] = {}

    def predict(idx):
        key = np.asarray(idx).tobytes()
        if key not in cache:  # the evaluate stage's own prediction of the saved model
            cache[key] = predict_samples(out, samples.subset(idx), "cpu")[0]
        return cache[key]
    return predict, f"{name}, {epochs} epochs, {DEEP_RECIPES.get(name, {})}"


PRESTO_RECIPE = {"epochs": 20, "lr": 3e-4, "batch_size": 32, "weight_decay": 1e-4}
"""Fine-tuning schedule of ``presto`` (a pre-trained encoder: a lower learning rate than from scratch)."""
_STATS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def fit_presto(name: str, samples, train, y_seen, seed, recipe, work, n_classes, min_steps):
    """``presto-embed``: frozen published encoder, embeddings of every series once per dataset,
    LightGBM on the training embeddings (fixed rounds: validation only scores). ``presto``: the
    encoder + MLP head fine-tuned end to end with :func:`cropmap.models.training.fit`."""
    from cropmap.models.boosting import fit_boosting, proba_for_classes
    from cropmap.models.pixel.presto import PrestoClassifier, data_options, embed_series
    from cropmap.models.series import band_statistics

    series = as_series(samples)
    # input statistics of all series (values only, no label): Presto undoes them to its own scaling
    if id(samples) not in _STATS:
        _STATS[id(samples)] = band_statistics(series)
    mean, std = _STATS[id(samples)]
    opts = data_options(days=series.days, table=samples.table)
    y_tr = np.asarray(y_seen[train])
    if name in ("presto-embed", "presto-embed-plus"):
        model = PrestoClassifier(len(samples.bands), n_classes, band_names=list(samples.bands), mean=mean.tolist(),
                                 std=std.tolist(), head="boosting", **opts)
        emb = embed_series(model, series, mean, std)  # cached by content: once per dataset
        impl = "presto-embed: frozen Presto + LightGBM (300 rounds)"
        if name == "presto-embed-plus":  # the embeddings next to the forest's monthly features
            emb = np.concatenate([emb, binned_features(series)], axis=1)
            impl = "presto-embed-plus: LightGBM on frozen Presto embeddings + 30-day medians"
        clf = fit_boosting(emb[train], y_tr, seed=seed, n_jobs=1)
        return (lambda idx: proba_for_classes(clf, emb[idx], n_classes)), impl
    r = PRESTO_RECIPE
    per_epoch = max(1, math.ceil(len(train) / r["batch_size"]))
    epochs = max(r["epochs"], math.ceil(min_steps / per_epoch))
    cfg = FitConfig(epochs=epochs, batch_size=r["batch_size"], max_len=recipe["max_len"], seed=seed, device="cpu",
                    patience=10**6, lr=r["lr"], weight_decay=r["weight_decay"], augment=recipe["augment"].augment())
    torch.manual_seed(seed)
    model = PrestoClassifier(len(samples.bands), n_classes, band_names=list(samples.bands), mean=mean.tolist(),
                             std=std.tolist(), head="mlp", **opts)
    from cropmap.models.training import fit

    fit(model, series_subset(series, train), y_tr, mean, std, cfg, n_classes=n_classes)
    model.eval()
    cache: dict[bytes, np.ndarray] = {}

    def predict(idx):
        key = np.asarray(idx).tobytes()
        if key not in cache:
            cache[key] = predict_proba(model, series_subset(series, idx), mean, std, recipe["max_len"], 1024, "cpu")
        return cache[key]
    return predict, f"presto fine-tuned, {epochs} epochs, {r}"


def series_subset(series, idx):
    from cropmap.models.series import Series, ragged_rows

    idx = np.asarray(idx, np.int64)
    lengths = series.lengths[idx]
    rows = ragged_rows(series.offsets[idx], lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(series.offsets.dtype)
    return Series(np.asarray(series.values)[rows], np.asarray(series.days)[rows], offsets)


def run_one(samples, recipe, dataset: str, budget: float, seed: int, candidates: list[str], work: Path, min_steps: int,
            skip: set | None = None) -> list[dict]:
    """One row per candidate (validation and test figures) of one dataset, budget and seed."""
    train, val, test = splits_for(samples, recipe, seed, budget)
    classes = class_table(samples, train)
    y = encode_labels(samples, classes)
    n_classes = len(classes)
    seen = GuardedLabels(y, forbidden=test)  # the fitters and the validation scores cannot read a test label
    feats = binned_features(as_series(samples)) if any(c in BASELINES for c in candidates) else None
    rows = []
    predictors: dict[str, object] = {}
    val_out: dict[str, dict] = {}  # validation outputs and macro F1 of the candidates fitted so far (blend-pruned reads them)
    val_f1: dict[str, float] = {}
    for name in candidates:
        if skip and name in skip and not (name in BLEND and "blend" in candidates):
            continue
        t0 = time.perf_counter()
        try:
            if name == "blend":  # mean probabilities of the feature-based candidates of this run
                members = [m for m in BLEND if m in predictors]
                if len(members) < 2:
                    raise NotImplementedError(f"blend needs two of {BLEND} in the same run, has {members}")
                parts = [predictors[m] for m in members]
                predict, impl = (lambda idx, parts=parts: np.mean([p(idx) for p in parts], axis=0)), f"blend: mean of {members}"
            elif name == "blend-all":  # what a run's `training.blend` does: the mean of every candidate fitted before it
                members = [m for m in predictors if m not in ("blend", "blend-all")]
                if len(members) < 2:
                    raise NotImplementedError(f"blend-all needs two candidates before it, has {members}")
                parts = [predictors[m] for m in members]
                predict, impl = (lambda idx, parts=parts: np.mean([p(idx) for p in parts], axis=0)), f"blend-all: mean of {members}"
            elif name == "blend-pruned":  # blend-all without the members validation finds clearly below the best one
                singles = [m for m in predictors if not m.startswith("blend") and m in val_out]
                if len(singles) < 2:
                    raise NotImplementedError(f"blend-pruned needs two scored candidates before it, has {singles}")
                best = max(singles, key=lambda m: val_f1[m])
                members = [m for m in singles if m == best or bootstrap_lead([val_out[best]], [val_out[m]]) < BLEND_CONFIDENCE]
                parts = [predictors[m] for m in members]
                predict, impl = ((lambda idx, parts=parts: np.mean([p(idx) for p in parts], axis=0)),
                                 f"blend-pruned: mean of {members} (dropped: {[m for m in singles if m not in members]})")
            elif name in BASELINES:
                predict, impl = fit_features(name, samples, train, seen, seed, feats, n_classes)
            elif name.startswith("presto"):
                predict, impl = fit_presto(name, samples, train, seen, seed, recipe, work, n_classes, min_steps)
            else:
                predict, impl = fit_deep(name, samples, train, seen, seed, recipe, work, n_classes, min_steps)
            predictors[name] = predict
            if skip and name in skip:
                continue
            pv = predict(val)
            v = validation_scores(seen, val, pv)
            groups = samples.table["parcel_id"].to_numpy()[val] if "parcel_id" in samples.table else None  # point tables: a sample each
            vo = validation_outputs(seen[val], pv, groups)  # the bootstrap resamples parcels
            val_out[name], val_f1[name] = vo, v["macro_f1"]
        except (ImportError, NotImplementedError) as exc:
            print(f"# {dataset} {budget} {seed} {name}: skipped ({type(exc).__name__}: {exc})", flush=True)
            continue
        # test figures: after fitting and validation scoring, from the plain labels; never used by the choice
        t = _scores(y[test], predict(test), n_classes)
        rows.append({"dataset": dataset, "budget": budget, "seed": seed, "candidate": name, "impl": impl,
                     "n_train": int(len(train)), "n_val": int(len(val)), "n_test": int(len(test)),
                     "val_overall_accuracy": round(v["overall_accuracy"], 4), "val_macro_f1": round(v["macro_f1"], 4),
                     "test_overall_accuracy": round(t["overall_accuracy"], 4), "test_macro_f1": round(t["macro_f1"], 4),
                     "seconds": round(time.perf_counter() - t0, 1), "load": round(os.getloadavg()[0], 2),
                     # validation labels, predicted classes and parcel groups: what the choice's bootstrap resamples
                     "val_outputs": {k: vo[k].tolist() for k in ("y", "pred", "groups")}})
        print(json.dumps({k: val for k, val in rows[-1].items() if k != "val_outputs"}), flush=True)
    return rows


def _outputs(rows: list[dict]) -> list[dict]:
    """The rows' validation outputs (sorted by seed) for the choice's bootstrap; [] when a row lacks them
    (rows written before they were recorded: the ranking alone decides)."""
    rows = sorted(rows, key=lambda r: r["seed"])
    if not all("val_outputs" in r for r in rows):
        return []
    return [{k: np.asarray(r["val_outputs"][k], np.int64) for k in ("y", "pred", "groups")} for r in rows]


def _choose(results: list[CandidateResult]) -> dict:
    """:func:`choose` with this harness's ``blend-all`` playing the run's blend (the mean of every candidate):
    the blend rule of the choice applies to it (``blend``, the older three-model mean, is not the run's)."""
    run_like = any(r.name == "blend-all" for r in results) and not any(r.name == RUN_BLEND for r in results)
    if run_like:
        for r in results:
            if r.name == "blend-all":
                r.name = RUN_BLEND
    choice = choose(results)
    if run_like:
        for r in results:
            if r.name == RUN_BLEND:
                r.name = "blend-all"
        def rename(n: str) -> str:
            return "blend-all" if n == RUN_BLEND else n
        choice = {**choice, "winner": rename(choice["winner"]),
                  "ranking": [{**x, "name": rename(x["name"])} for x in choice["ranking"]]}
    return choice


def with_auto(rows: list[dict], exclude: tuple[str, ...] = ()) -> list[dict]:
    """Add one ``auto`` row per (dataset, budget, seed): the candidate :func:`choose` picks on validation."""
    df = [r for r in rows if r["candidate"] != "auto"]
    out = list(df)
    keys = sorted({(r["dataset"], r["budget"], r["seed"]) for r in df}, key=str)
    for key in keys:
        group = [r for r in df if (r["dataset"], r["budget"], r["seed"]) == key and r["candidate"] not in exclude]
        if not group:
            continue
        # the choice sees validation figures only (the test fields are not passed)
        results = [CandidateResult(r["candidate"], validation=[{"macro_f1": r["val_macro_f1"], "overall_accuracy": r["val_overall_accuracy"]}],
                                   outputs=_outputs([r])) for r in group]
        choice = _choose(results)
        win = next(r for r in group if r["candidate"] == choice["winner"])
        out.append({**win, "candidate": "auto", "picked": choice["winner"], "reason": choice["reason"], "impl": "auto", "seconds": 0.0})
    # what a run does: ONE candidate for all its split seeds, by mean validation macro F1 over them
    for dataset, budget in sorted({(r["dataset"], r["budget"]) for r in df}, key=str):
        group = [r for r in df if (r["dataset"], r["budget"]) == (dataset, budget) and r["candidate"] not in exclude]
        seeds = sorted({r["seed"] for r in group})
        names = [c for c in dict.fromkeys(r["candidate"] for r in group)
                 if {r["seed"] for r in group if r["candidate"] == c} == set(seeds)]  # measured on every seed
        if not names:
            continue
        results = [CandidateResult(c, validation=[{"macro_f1": r["val_macro_f1"], "overall_accuracy": r["val_overall_accuracy"]}
                                                  for r in group if r["candidate"] == c],
                                   outputs=_outputs([r for r in group if r["candidate"] == c])) for c in names]
        choice = _choose(results)
        for r in group:
            if r["candidate"] == choice["winner"]:
                out.append({**r, "candidate": "auto-run", "picked": choice["winner"], "reason": choice["reason"], "impl": "auto-run",
                            "seconds": 0.0})
    return out


# --- summary --------------------------------------------------------------------------------

def _ms(s: pd.Series) -> str:
    return f"{s.mean():.3f} ± {s.std(ddof=1) if len(s) > 1 else 0:.3f}"


def dedupe(rows: list[dict]) -> list[dict]:
    """One row per (dataset, budget, seed, candidate): the last measured (passes may overlap)."""
    last = {(r["dataset"], r["budget"], r["seed"], r["candidate"]): r for r in rows if r["candidate"] != "auto"}
    return list(last.values())


def summarize(rows: list[dict]) -> str:
    df = pd.DataFrame(with_auto(dedupe(rows)))
    out = []
    verdicts = []
    for dataset in [d for d in DATASETS if d in set(df.dataset)]:
        d = df[df.dataset == dataset]
        budgets = sorted(d.budget.unique(), reverse=True)
        out.append(f"\n### {dataset}: test OA / macro F1, mean ± sd over seeds (n); validation macro F1 in brackets\n")
        out.append("| candidate | " + " | ".join(f"{b:.0%} labels" for b in budgets) + " |")
        out.append("|---|" + "---|" * len(budgets))
        order = ["auto-run", "auto", *BASELINES] + sorted(set(d.candidate) - {"auto", "auto-run", *BASELINES})
        for c in [c for c in order if c in set(d.candidate)]:
            cells = []
            for b in budgets:
                r = d[(d.candidate == c) & (d.budget == b)]
                cells.append("" if r.empty else f"{_ms(r.test_overall_accuracy)} / {_ms(r.test_macro_f1)} "
                             f"[{r.val_macro_f1.mean():.3f}] ({len(r)})")
            out.append(f"| {c} | " + " | ".join(cells) + " |")
        for b in budgets:
            a = d[(d.candidate == "auto") & (d.budget == b)]
            if not a.empty:
                picks = a.picked.value_counts().to_dict()
                run = d[(d.candidate == "auto-run") & (d.budget == b)]
                out.append(f"\n{b:.0%} labels: auto (per split) picked {', '.join(f'{k} ({v}x)' for k, v in picks.items())}; "
                           f"auto-run (one model for the run, mean validation over its split seeds) picked "
                           f"{run.picked.iloc[0] if not run.empty else '-'}.")
            pv = d[d.budget == b].pivot_table(index="seed", columns="candidate", values=["test_overall_accuracy", "test_macro_f1"])
            for auto, base in [(a_, b_) for a_ in ("auto-run", "auto") for b_ in BASELINES]:
                if ("test_overall_accuracy", auto) in pv.columns and ("test_overall_accuracy", base) in pv.columns:
                    goa = (pv["test_overall_accuracy"][auto] - pv["test_overall_accuracy"][base]).dropna()
                    gf1 = (pv["test_macro_f1"][auto] - pv["test_macro_f1"][base]).dropna()
                    out.append(f"- {auto} - {base}: OA {goa.mean():+.3f} ± {goa.std(ddof=1) if len(goa) > 1 else 0:.3f} "
                               f"(better in {(goa > 0).sum()}/{len(goa)}), macro F1 {gf1.mean():+.3f} ± "
                               f"{gf1.std(ddof=1) if len(gf1) > 1 else 0:.3f} (better in {(gf1 > 0).sum()}/{len(gf1)})")
        full = d[d.budget == 1.0].groupby("candidate")[["test_overall_accuracy", "test_macro_f1"]].mean()
        if "auto-run" in full.index and set(BASELINES) <= set(full.index):
            ok = all(full.loc["auto-run", k] > full.loc[b, k] for b in BASELINES for k in full.columns)
            picked = d[(d.candidate == "auto-run") & (d.budget == 1.0)].picked.iloc[0]
            verdicts.append(f"- {dataset}, 100 % labels: auto-run ({picked}) {'BEATS' if ok else 'does NOT beat'} both forest and boosting on "
                            f"mean test OA and macro F1 (auto-run {full.loc['auto-run', 'test_overall_accuracy']:.3f} / "
                            f"{full.loc['auto-run', 'test_macro_f1']:.3f}, forest {full.loc['forest', 'test_overall_accuracy']:.3f} / "
                            f"{full.loc['forest', 'test_macro_f1']:.3f}, boosting {full.loc['boosting', 'test_overall_accuracy']:.3f} / "
                            f"{full.loc['boosting', 'test_macro_f1']:.3f})")
        small = d[d.budget == 0.05].groupby("candidate")[["test_overall_accuracy", "test_macro_f1"]].mean()
        deep = [c for c in small.index if c not in (*BASELINES, "auto", "auto-run", "blend", "blend-all") and not c.startswith("presto")]
        presto = [c for c in small.index if c.startswith("presto")]
        if deep:
            best = small.loc[deep, "test_overall_accuracy"].idxmax()  # the best on TEST: the harder comparison for Presto
            if presto:
                p = small.loc[presto, "test_overall_accuracy"].idxmax()
                verdicts.append(f"- {dataset}, 5 % labels: {p} {small.loc[p, 'test_overall_accuracy']:.3f} OA vs the best from-scratch "
                                f"deep model {best} {small.loc[best, 'test_overall_accuracy']:.3f}: "
                                f"{'Presto ahead' if small.loc[p, 'test_overall_accuracy'] > small.loc[best, 'test_overall_accuracy'] else 'Presto NOT ahead'}")
            else:
                verdicts.append(f"- {dataset}, 5 % labels: no Presto row (not measured); best from-scratch deep model {best} "
                                f"{small.loc[best, 'test_overall_accuracy']:.3f} OA")
    if verdicts:
        out.append("\n### What the tables show\n")
        out.extend(verdicts)
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    ap.add_argument("--candidates", nargs="+", default=["forest", "boosting", "ltae", "stnet", "tempcnn", "presto", "presto-embed"])
    ap.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.05])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--min-steps", type=int, default=100)
    ap.add_argument("--model-min-steps", nargs="*", default=[], metavar="NAME=STEPS",
                    help="Per-candidate floors on optimiser steps, e.g. ltae=800 (benchmarks/results/tuning-ltae-rpg2023.jsonl).")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/candidates.jsonl"))
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cropmap-candidates")
    ap.add_argument("--summarize", type=Path, nargs="+")
    args = ap.parse_args()
    if args.summarize:
        rows = [json.loads(line) for p in args.summarize for line in p.read_text().splitlines() if line.strip()]
        print(summarize(rows))
        return
    torch.set_num_threads(args.threads)
    MIN_STEPS_FOR.update({k: int(v) for k, v in (x.split("=", 1) for x in args.model_min_steps)})
    args.work.mkdir(parents=True, exist_ok=True)
    done = set()  # (dataset, budget, seed, candidate, impl) already measured
    if args.out.exists():
        for line in args.out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["dataset"], r["budget"], r["seed"], r["candidate"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for dataset in args.datasets:
        samples, recipe = load_dataset(dataset, args.work / "cache")
        print(f"# {dataset}: {len(samples)} labelled series, {samples.table['label'].nunique()} classes, bands {samples.bands}", flush=True)
        for budget in args.budgets:
            for seed in args.seeds:
                skip = {c for c in args.candidates if (dataset, budget, seed, c) in done}
                if skip == set(args.candidates):
                    continue
                rows = run_one(samples, recipe, dataset, budget, seed, args.candidates, args.work, args.min_steps, skip)
                with open(args.out, "a") as fh:
                    for r in rows:
                        fh.write(json.dumps(r) + "\n")
    rows = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
    print(summarize(rows))


if __name__ == "__main__":
    main()
