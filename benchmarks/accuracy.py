"""Accuracy of every pixel model, with and without MoCo pre-training, at several label budgets.

Usage:
    python benchmarks/accuracy.py --dataset demo    [--models ...] [--budgets 0.01 0.05 0.2 1] [--seeds 0 1 2]
    python benchmarks/accuracy.py --dataset rpg2023 [...]
    python benchmarks/accuracy.py --summarize results.jsonl [more.jsonl ...]

Datasets (real data, see ../shared/data/README.md):
- ``demo``: the demo site's labelled pixels (built by the ingest/labels/tensors stages into a
  cache). Split per seed by spatial blocks (``--block-size-m``, default 320 m, the site's; see
  :mod:`cropmap.pipeline.splits`: whole blocks to one side, about 30 % of each class's parcels
  held out, parcel-disjoint, pixels of a parcel lying in a block of the other side excluded), at
  most 100 training pixels per parcel; metrics on the test pixels. Pre-training: random pixels of
  every tile of the site.
- ``rpg2023``: the French parcel registry 2023 point table (dekad S2 + S1, 500 parcels), labels
  grouped by WorldCereal's CROPTYPE_INSEASON_FRANCE mapping, classes with >= 10 parcels kept
  (10 classes, 396 parcels). Split per seed by spatial blocks of 10 km (lon/lat projected to UTM),
  about 30 % of each class held out. Pre-training: all 396 series.

``--split parcels`` gives the older per-parcel (demo) / per-sample (RPG) splits.

Protocol: for each seed, a label budget keeps that fraction of each class's training samples
(stratified, seeded, at least one per class). Deep models train for ``--epochs`` epochs and at
least ``--min-steps`` optimizer steps (tiny budgets would otherwise see a handful of steps), with
the site's augmentations, no validation split (fixed schedule), and are evaluated
deterministically. The random forest (500 trees, depth 25, 30-day median features) trains on the
same samples. "moco" rows fine-tune the whole model from a MoCo encoder pre-trained *per seed*
(``--pretrain-per-seed``, the default; seed = the split seed) on unlabelled series of the dataset,
with shuffle-BN (:mod:`cropmap.models.pretrain.moco`). Pre-training sees the test series' *values* but
never a label (the setting of mapping a site: all its pixels are unlabelled input). Both the
"moco" and the "none" rows of a seed normalise with the same statistics: those of the seed's
training-side series (train-only; the budget does not change them), so the measured gain is the
pre-training's alone. Metrics: :func:`cropmap.models.metrics.label_metrics`, the runs' function
(macro F1 over the classes present in test or predicted).

Results are appended as JSON lines to ``--out`` (reruns skip what is there) and summarised as a
table: mean ± sample standard deviation over seeds, and the paired gain of pre-training (mean,
sd, 95 % t interval and Wilcoxon signed-rank test of the paired differences per budget; and per
pre-trained encoder, since all budgets of an encoder share it).
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

from cropmap.models.forest import binned_features, make_forest
from cropmap.models.pretrain.moco import MoCoConfig
from cropmap.models.series import band_statistics
from cropmap.models.training import FitConfig, predict_proba
from cropmap.pipeline.levels.pixel.pretrain import pretrain_encoder
from cropmap.pipeline.levels.pixel.train import as_series, class_table, encode_labels, load_model_dir, subsample_labels, train_model
from cropmap.pipeline.samples import PixelSamples, load_store, read_long_table
from cropmap.pipeline.sites import Training
from cropmap.pipeline.splits import assign_blocks

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
MODELS = ["stnet", "transformer", "ltae", "tempcnn", "lstm", "inceptiontime"]


# --- datasets -------------------------------------------------------------------------------

def demo_dataset(cache: Path) -> tuple[PixelSamples, PixelSamples, dict]:
    """(labelled pixels, unlabelled pixels, site recipe) of the demo site, built once into ``cache``."""
    from cropmap.pipeline.cube import open_cube
    from cropmap.pipeline.levels.pixel.tensors import concat_samples, unlabelled_samples
    from cropmap.pipeline.runner import Runner
    from cropmap.pipeline.sites import load_site
    from cropmap.pipeline.workflow import build_stages

    site = load_site("demo")
    year = site.resolve_year(None)
    run_dir = cache / "demo" / str(year)
    stages, _ = build_stages(site, year)
    wanted = [s for s in stages if s.name in ("ingest", "labels", "tensors")]
    Runner(run_dir, {"site": site.name, "year": year}).run(wanted, lambda done: {})
    labelled = load_store(run_dir / "samples" / "pixels", mmap=False)
    unl = cache / "demo-unlabelled"
    if not (unl / "table.parquet").exists() and not unl.is_dir():
        rng = np.random.default_rng(0)
        cubes = sorted((run_dir / "cube").glob("*.zarr"))
        parts = [unlabelled_samples(open_cube(c), 10**9, rng, site.tensors.s1_window_days) for c in cubes]
        from cropmap.pipeline.samples import save_store

        save_store(concat_samples(parts), unl)
    recipe = {"model_options": {"stnet": dict(site.training.model_options)}, "max_len": site.training.max_len,
              "augment": site.training, "batch_size": site.training.batch_size, "group": "parcel_id",
              "max_per_group": site.training.max_pixels_per_parcel, "block_size_m": site.training.block_size_m}
    return labelled, load_store(unl, mmap=False), recipe


def rpg2023_dataset(path: Path, mapping: Path, min_count: int = 10) -> tuple[PixelSamples, PixelSamples, dict]:
    groups = json.loads(mapping.read_text())["CROPTYPE_INSEASON_FRANCE"]
    df = pd.read_parquet(path)
    df["label"] = df["label"].astype(str).map(groups)
    df = df[df["label"].notna()]
    counts = df.groupby("sample_id")["label"].first().value_counts()
    df = df[df["label"].isin(counts[counts >= min_count].index)]
    samples = read_long_table_frame(df)
    recipe = {"model_options": {}, "max_len": 48, "augment": Training(), "batch_size": 64, "group": None, "max_per_group": None,
              "block_size_m": 10_000.0}
    return samples, samples, recipe


def read_long_table_frame(df: pd.DataFrame) -> PixelSamples:
    with tempfile.TemporaryDirectory() as d:
        df.to_parquet(Path(d) / "t.parquet")
        return read_long_table(Path(d) / "t.parquet")


# --- splits ---------------------------------------------------------------------------------

def split(samples: PixelSamples, seed: int, recipe: dict, test_fraction: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """(train pool, test) indices: by group (parcel) when the dataset has groups, else by sample; stratified per class."""
    t = samples.table
    rng = np.random.default_rng(seed)
    key = t[recipe["group"]].to_numpy() if recipe["group"] else np.arange(len(t))
    units = pd.DataFrame({"unit": key, "label": t["label"].astype(str).to_numpy()}).drop_duplicates("unit")
    test_units = set()
    for _, g in units.groupby("label"):
        ids = g["unit"].to_numpy()[rng.permutation(len(g))]
        n_test = int(round(len(ids) * test_fraction)) if len(ids) >= 2 else 0
        test_units.update(ids[:max(n_test, 1 if len(ids) >= 2 else 0)].tolist())
    is_test = np.array([u in test_units for u in key])
    return _cap_per_group(np.nonzero(~is_test)[0], key, recipe, rng), np.nonzero(is_test)[0]


def _cap_per_group(train: np.ndarray, key: np.ndarray, recipe: dict, rng: np.random.Generator) -> np.ndarray:
    if recipe["max_per_group"] and len(train):
        keep = []
        for _, idx in pd.Series(train).groupby(key[train]):
            idx = idx.to_numpy()
            keep.append(rng.choice(idx, size=min(recipe["max_per_group"], len(idx)), replace=False))
        train = np.sort(np.concatenate(keep))
    return train


def block_sides(samples: PixelSamples, seed: int, recipe: dict, block_size_m: float, test_fraction: float = 0.3,
                val_fraction: float = 0.0) -> np.ndarray:
    """Per sample: train/val/test/excluded by spatial blocks (:func:`cropmap.pipeline.splits.assign_blocks`)."""
    t = samples.table
    key = t[recipe["group"]].to_numpy() if recipe["group"] else t["sample_id"].to_numpy()
    epsg = int(t["epsg"].iloc[0]) if "epsg" in t.columns else None
    return assign_blocks(key, t["label"].astype(str).to_numpy(), t["x"].to_numpy(), t["y"].to_numpy(), block_size_m=block_size_m,
                         seed=seed, test_fraction=test_fraction, val_fraction=val_fraction, epsg=epsg).side


def spatial_split(samples: PixelSamples, seed: int, recipe: dict, block_size_m: float,
                  val_fraction: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train pool, val, test) indices by spatial blocks; the pool capped per parcel as :func:`split`."""
    side = block_sides(samples, seed, recipe, block_size_m, val_fraction=val_fraction)
    key = samples.table[recipe["group"]].to_numpy() if recipe["group"] else np.arange(len(samples))
    pool = _cap_per_group(np.nonzero(side == "train")[0], key, recipe, np.random.default_rng(seed))
    return pool, np.nonzero(side == "val")[0], np.nonzero(side == "test")[0]


# --- runs -----------------------------------------------------------------------------------

def evaluate(samples: PixelSamples, test: np.ndarray, proba: np.ndarray, classes: list[dict]) -> dict:
    """The runs' metrics (:func:`cropmap.pipeline.levels.pixel.evaluate.metrics_for`, one implementation and class-set rule)."""
    from cropmap.pipeline.levels.pixel.evaluate import metrics_for

    m = metrics_for(samples.subset(test), proba, classes)
    return {k: round(float(m[k]), 4) for k in ("overall_accuracy", "kappa", "macro_f1", "weighted_f1")}


def protocol_name(args) -> str:
    if args.val_fraction > 0:
        base = f"validation early stopping (val {args.val_fraction:.0%} of the pool, <= {args.epochs} epochs, patience {args.patience})"
    else:
        base = f"fixed schedule ({args.epochs} epochs, >= {args.min_steps} steps)"
    if args.split == "parcels" and not args.pretrain_per_seed:
        return base  # the original protocol's name (its rows in benchmarks/results)
    return (f"{base}; {'spatial blocks' if args.split == 'blocks' else 'parcel/sample split'}, "
            f"{'MoCo per seed' if args.pretrain_per_seed else 'one MoCo encoder'} with shuffle-BN x{args.shuffle_bn_groups}, "
            "shared train-only normalisation")


def steps_epochs(n_train: int, batch: int, epochs: int, min_steps: int) -> int:
    per_epoch = max(1, math.ceil(n_train / batch))
    return max(epochs, math.ceil(min_steps / per_epoch))


def seed_split(samples, recipe, seed, args) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train pool, val, test) of a seed under ``args.split``."""
    if args.split == "blocks":
        return spatial_split(samples, seed, recipe, args.block_size_m or recipe["block_size_m"], val_fraction=args.val_fraction)
    pool, test = split(samples, seed, recipe)
    val = np.zeros(0, np.int64)
    if args.val_fraction > 0:  # a validation set held out of the pool before the budget (as SITS-MoCo)
        rest, held = split(samples.subset(pool), seed + 1000, {**recipe, "max_per_group": None}, test_fraction=args.val_fraction)
        pool, val = pool[rest], pool[held]
    return pool, val, test


def seed_normalisation(samples, recipe, seed, args) -> tuple[np.ndarray, np.ndarray]:
    """Band statistics of the seed's training pool: shared by its "none" and "moco" rows (and its encoder)."""
    pool, _, _ = seed_split(samples, recipe, seed, args)
    return band_statistics(as_series(samples), pool)


def run_one(samples, unlabelled, recipe, model, pretrain, budget, seed, args, work: Path, encoders: dict) -> dict:
    pool, val, test = seed_split(samples, recipe, seed, args)
    y_all = encode_labels(samples, class_table(samples, pool))
    train = subsample_labels(y_all, pool, seed, fraction=budget) if budget < 1 else pool
    classes = class_table(samples, train)
    t0 = time.perf_counter()
    if model == "rf":
        y = encode_labels(samples, classes)
        forest = make_forest(seed, n_jobs=args.threads).fit(binned_features(as_series(samples.subset(train))), y[train])
        raw = forest.predict_proba(binned_features(as_series(samples.subset(test))))
        proba = np.zeros((len(test), len(classes)), np.float32)
        proba[:, forest.classes_] = raw
        epochs = None
    else:
        batch = recipe["batch_size"]
        epochs = steps_epochs(len(train), batch, args.epochs, args.min_steps)
        cfg = FitConfig(epochs=epochs, batch_size=batch, max_len=recipe["max_len"], seed=seed, device=args.device,
                        patience=args.patience, augment=recipe["augment"].augment())
        enc = encoders[(model, seed if args.pretrain_per_seed else 0)] if pretrain == "moco" else None
        out = work / f"{model}-{pretrain}-{budget}-{seed}"
        norm = seed_normalisation(samples, recipe, seed, args) if args.pretrain_per_seed else None
        meta = train_model(samples, train, val, out, model_name=model, fit_config=cfg, pretrained=enc, normalisation=norm,
                           model_options=recipe["model_options"].get(model, {}) if enc is None else None, resume=False)
        net, meta = load_model_dir(out, args.device)
        norm = meta["normalisation"]
        proba = predict_proba(net, as_series(samples.subset(test)), np.asarray(norm["mean"], np.float32),
                              np.asarray(norm["std"], np.float32), int(meta["max_len"]), 1024, args.device)
    m = evaluate(samples, test, proba, classes)
    if model != "rf":
        epochs = meta["fit"]["epochs_run"]
    return {"model": model, "pretrain": pretrain, "budget": budget, "seed": seed,
            "encoder_seed": (seed if args.pretrain_per_seed else 0) if pretrain == "moco" else None,
            "n_train": int(len(train)), "n_val": int(len(val)),
            "n_test": int(len(test)), "protocol": protocol_name(args), "epochs": epochs, "seconds": round(time.perf_counter() - t0, 1), **m}


class Encoders:
    """MoCo encoders by (model, seed), pre-trained on first use (results come out seed by seed):
    one per split seed (``--pretrain-per-seed``), normalised with that seed's training statistics,
    else one per model (seed 0, statistics of the unlabelled series)."""

    def __init__(self, unlabelled, recipe, args, work: Path, dataset: str, samples) -> None:
        self.unlabelled, self.recipe, self.args, self.work, self.dataset, self.samples = unlabelled, recipe, args, work, dataset, samples

    def __getitem__(self, key: tuple[str, int]) -> Path:
        model, seed = key
        args, recipe, unlabelled = self.args, self.recipe, self.unlabelled
        tag = f"-{args.split}-s{args.shuffle_bn_groups}" if args.pretrain_per_seed else ""
        path = self.work / f"encoder-{self.dataset}-{model}{tag}-seed{seed}"
        if not (path / "config.json").exists():
            t0 = time.perf_counter()
            sub = unlabelled
            if len(unlabelled) > args.pretrain_series:
                sub = unlabelled.subset(np.sort(np.random.default_rng(seed).choice(len(unlabelled), args.pretrain_series, replace=False)))
            cfg = MoCoConfig(epochs=args.pretrain_epochs, batch_size=min(512, max(32, len(sub) // 8)), patience=10,
                             momentum=args.momentum, view_length=recipe["max_len"], device=args.device, seed=seed,
                             shuffle_bn_groups=args.shuffle_bn_groups)
            norm = seed_normalisation(self.samples, recipe, seed, args) if args.pretrain_per_seed else None
            meta = pretrain_encoder(sub, path, model_name=model, model_options=recipe["model_options"].get(model, {}), config=cfg,
                                    normalisation=norm)
            p = meta["pretrain"]
            print(f"# pretrained {model} (seed {seed}) on {p['n_train']}+{p['n_val']} series: best epoch {p['best_epoch']}/{p['epochs_run']}, "
                  f"val InfoNCE {p['best_val_infonce']:.3f}, queue {p['queue_size']}, {time.perf_counter() - t0:.0f} s", flush=True)
        return path


# --- summary --------------------------------------------------------------------------------

def paired(diff: np.ndarray) -> dict:
    """Mean, sd, 95 % t interval, Wilcoxon signed-rank p (two-sided) and wins of paired differences."""
    from scipy import stats

    diff = np.asarray(diff, np.float64)
    n = len(diff)
    mean, sd = float(diff.mean()), float(diff.std(ddof=1)) if n > 1 else 0.0
    half = float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)) if n > 1 else float("nan")
    p = float(stats.wilcoxon(diff).pvalue) if n > 1 and np.any(diff != 0) else float("nan")
    return {"n": n, "mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half, "p": p, "wins": int((diff > 0).sum())}


def gain_tables(d: pd.DataFrame) -> list[str]:
    """Paired gain of MoCo ("moco" - "none", same model, budget, seed and split) per budget, and per
    pre-trained encoder (the differences of all budgets of one encoder averaged: they share it, so
    they are not independent; one encoder per model in the old protocol, per model and seed now)."""
    deep = d[d.model != "rf"]
    if not {"none", "moco"} <= set(deep["pretrain"]):
        return []
    per_seed = deep["protocol"].astype(str).str.contains("MoCo per seed").all()
    out = ["", "Gain of MoCo pre-training (moco - none, paired by model, budget and seed; 95 % t interval; Wilcoxon signed-rank p):", "",
           "| budget | pairs | OA gain mean ± sd [95 % CI] | OA Wilcoxon p | OA better in | macro F1 gain mean ± sd [95 % CI] |",
           "|---|---|---|---|---|---|"]
    wide = {m: deep.pivot_table(index=["model", "budget", "seed"], columns="pretrain", values=m) for m in ("overall_accuracy", "macro_f1")}
    diffs = {m: (w["moco"] - w["none"]).dropna() for m, w in wide.items()}
    fmt = lambda r: f"{r['mean']:+.3f} ± {r['sd']:.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}]"  # noqa: E731
    for b, g in diffs["overall_accuracy"].groupby(level="budget"):
        oa, f1 = paired(g.to_numpy()), paired(diffs["macro_f1"].xs(b, level="budget").to_numpy())
        out.append(f"| {b:.0%} | {oa['n']} | {fmt(oa)} | {oa['p']:.3f} | {oa['wins']}/{oa['n']} | {fmt(f1)} |")
    keys = ["model", "seed"] if per_seed else ["model"]
    enc = {m: v.groupby(level=keys).mean() for m, v in diffs.items()}
    oa, f1 = paired(enc["overall_accuracy"].to_numpy()), paired(enc["macro_f1"].to_numpy())
    out.append(f"| per encoder (all budgets averaged; {'model x seed' if per_seed else 'model: one encoder for all seeds'}) | {oa['n']} | "
               f"{fmt(oa)} | {oa['p']:.3f} | {oa['wins']}/{oa['n']} | {fmt(f1)} |")
    return out


def summarize(rows: list[dict]) -> str:
    df = pd.DataFrame(rows)
    lines = []
    if "protocol" not in df.columns:
        df["protocol"] = "fixed schedule"
    df["protocol"] = df["protocol"].fillna("fixed schedule")
    for (dataset, protocol), d in df.groupby(["dataset", "protocol"], sort=False):
        lines.append(f"\n### {dataset}, {protocol}: overall accuracy / macro F1, mean ± std over seeds (n seeds)\n")
        budgets = sorted(d["budget"].unique())
        lines.append("| model | pre-training | " + " | ".join(f"{b:.0%} labels" for b in budgets) + " |")
        lines.append("|---|---|" + "---|" * len(budgets))
        for (model, pre), g in sorted(d.groupby(["model", "pretrain"]), key=lambda kv: (kv[0][0] != "rf", kv[0])):
            cells = []
            for b in budgets:
                r = g[g.budget == b]
                if r.empty:
                    cells.append("")
                    continue
                sd = lambda s: float(s.std(ddof=1)) if len(s) > 1 else 0.0  # noqa: E731
                cells.append(f"{r.overall_accuracy.mean():.3f} ± {sd(r.overall_accuracy):.3f} / "
                             f"{r.macro_f1.mean():.3f} ± {sd(r.macro_f1):.3f} ({len(r)})")
            lines.append(f"| {model} | {pre} | " + " | ".join(cells) + " |")
        lines.extend(gain_tables(d))
        best = d[(d.model != "rf") & (d.budget == 1.0)].groupby(["model", "pretrain"]).overall_accuracy.mean()
        rf = d[(d.model == "rf") & (d.budget == 1.0)].overall_accuracy
        if len(best) and len(rf):
            (bm, bp), bv = best.idxmax(), best.max()
            lines.append(f"\nBest deep model at 100 % labels: {bm} ({bp}) OA {bv:.3f} vs random forest {rf.mean():.3f}.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=["demo", "rpg2023"])
    ap.add_argument("--models", nargs="+", default=[*MODELS, "rf"])
    ap.add_argument("--pretrain", nargs="+", default=["none", "moco"], choices=["none", "moco"])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.01, 0.05, 0.2, 1.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--min-steps", type=int, default=200)
    ap.add_argument("--val-fraction", type=float, default=0.0,
                    help="hold this fraction of the training pool out for validation (best epoch, early stopping)")
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--pretrain-epochs", type=int, default=30)
    ap.add_argument("--pretrain-series", type=int, default=8000)
    ap.add_argument("--momentum", type=float, default=0.99, help="MoCo key momentum (0.999 needs far more steps than these datasets give)")
    ap.add_argument("--split", choices=["blocks", "parcels"], default="blocks",
                    help="blocks: spatial blocks (default); parcels: the older per-parcel / per-sample split")
    ap.add_argument("--block-size-m", type=float, default=None, help="block side (default: demo the site's, rpg2023 10 km)")
    ap.add_argument("--pretrain-per-seed", action=argparse.BooleanOptionalAction, default=True,
                    help="one MoCo pre-training per split seed with that seed's train-only normalisation (default)")
    ap.add_argument("--shuffle-bn-groups", type=int, default=4, help="MoCo shuffle-BN sub-batches (1: off)")
    ap.add_argument("--max-per-parcel", type=int, default=None, help="demo: training pixels per parcel (default: the site's)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/accuracy.jsonl"))
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cropmap-bench")
    ap.add_argument("--summarize", type=Path, nargs="+")
    args = ap.parse_args()
    if args.summarize:
        rows = [json.loads(line) for p in args.summarize for line in p.read_text().splitlines() if line.strip()]
        # --models / --budgets restrict the summary (e.g. the old rows of the models and budgets re-measured)
        print(summarize([r for r in rows if r["model"] in args.models and any(abs(r["budget"] - b) < 1e-9 for b in args.budgets)]))
        return
    if not args.dataset:
        ap.error("--dataset or --summarize is required")
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.dataset == "demo":
        samples, unlabelled, recipe = demo_dataset(args.work / "cache")
        if args.max_per_parcel:
            recipe["max_per_group"] = args.max_per_parcel
    else:
        samples, unlabelled, recipe = rpg2023_dataset(SHARED / "examples" / "rpg2023_dekad_long.parquet",
                                                      SHARED / "worldcereal" / "points" / "class_mappings.json")
    print(f"# {args.dataset}: {len(samples)} labelled series, {samples.table['label'].nunique()} classes, "
          f"{len(unlabelled)} unlabelled series, bands {samples.bands}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if args.out.exists():
        for line in args.out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["dataset"], r["model"], r["pretrain"], r["budget"], r["seed"], r.get("protocol")))
    encoders = Encoders(unlabelled, recipe, args, args.work, args.dataset, samples)
    jobs = [(m, p, b, s) for s in args.seeds for b in args.budgets for m in args.models
            for p in (["none"] if m == "rf" else args.pretrain)]
    for model, pre, budget, seed in jobs:
        if (args.dataset, model, pre, budget, seed, protocol_name(args)) in done:
            continue
        r = {"dataset": args.dataset, **run_one(samples, unlabelled, recipe, model, pre, budget, seed, args, args.work, encoders)}
        with open(args.out, "a") as fh:
            fh.write(json.dumps(r) + "\n")
        print(json.dumps(r), flush=True)
    rows = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
    print(summarize([r for r in rows if r["dataset"] == args.dataset]))


if __name__ == "__main__":
    sys.exit(main())
