"""Recipe tuning of the deep pixel models on VALIDATION samples only (never the test split).

Usage:
    python benchmarks/tuning.py --dataset demo|rpg2023 --model tempcnn \
        --grid '{"name": "base"}' '{"name": "grid10", "options": {"grid_days": 10}, "max_len": 256}' ... \
        [--seeds 0 1] [--out benchmarks/results/tuning.jsonl]

For each seed the labelled samples are split exactly as ``benchmarks/accuracy.py`` and
``benchmarks/candidates.py`` do (30 % of each class's parcels / samples held out as *test*); the
test part is then dropped, and a validation set (20 % of each class's remaining parcels) is carved
out of the training pool. Every variant trains on the rest and is scored on that validation set:
the rows hold validation figures only, so nothing chosen from them has seen a test label.

A variant is a JSON object: ``name``; ``options`` (model hyper-parameters); and any of ``epochs``,
``lr``, ``batch_size``, ``weight_decay``, ``max_len``, ``class_weighting``, ``label_smoothing``
(the fit schedule); ``augment`` (``"site"`` = the demo site's augmentations, ``"none"``, or an
object of :class:`cropmap.models.series.Augment` fields); ``normalise`` (``"zscore"``, the
default per-band statistics, or ``"none"``: identity statistics).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import SHARED, demo_dataset, rpg2023_dataset, split  # noqa: E402

from cropmap.models.series import Augment  # noqa: E402
from cropmap.models.training import FitConfig  # noqa: E402
from cropmap.pipeline.levels.pixel.evaluate import predict_samples  # noqa: E402
from cropmap.pipeline.levels.pixel.train import class_table, encode_labels, train_model  # noqa: E402
from cropmap.pipeline.levels.selection import validation_scores  # noqa: E402


def carve_validation(samples, seed: int, recipe: dict) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices inside the training pool of ``seed`` (the test part is never returned)."""
    pool, _test = split(samples, seed, recipe)
    rest, held = split(samples.subset(pool), seed + 1000, {**recipe, "max_per_group": None}, test_fraction=0.2)
    return pool[rest], pool[held]


def fit_config(variant: dict, recipe: dict, seed: int, threads_device: str = "cpu") -> FitConfig:
    aug = variant.get("augment", "site")
    if aug == "site":
        augment = recipe["augment"].augment()
    elif aug == "none":
        augment = Augment()
    else:
        augment = dataclasses.replace(recipe["augment"].augment(), **aug)
    keys = ("epochs", "lr", "batch_size", "weight_decay", "max_len", "class_weighting", "label_smoothing", "patience")
    base = {"epochs": 20, "batch_size": recipe["batch_size"], "max_len": recipe["max_len"], "patience": 10**6}
    base.update({k: variant[k] for k in keys if k in variant})
    return FitConfig(seed=seed, device=threads_device, augment=augment, **base)


def run_variant(samples, recipe, model: str, variant: dict, seed: int, work: Path) -> dict:
    train, val = carve_validation(samples, seed, recipe)
    classes = class_table(samples, train)
    y = encode_labels(samples, classes)
    cfg = fit_config(variant, recipe, seed)
    t0 = time.perf_counter()
    out = work / f"{model}-{variant['name']}-{seed}"
    options = {**recipe["model_options"].get(model, {}), **variant.get("options", {})}
    # no validation passed to training: a fixed schedule, so the validation set only scores
    train_model(samples, train, np.zeros(0, np.int64), out, model_name=model, fit_config=cfg, model_options=options)
    proba = predict_samples(out, samples.subset(val), "cpu")[0]  # the evaluate stage's own prediction
    s = validation_scores(y, val, proba)
    return {"model": model, "variant": variant["name"], "spec": variant, "seed": seed, "n_train": int(len(train)),
            "n_val": int(len(val)), "val_overall_accuracy": round(s["overall_accuracy"], 4),
            "val_macro_f1": round(s["macro_f1"], 4), "seconds": round(time.perf_counter() - t0, 1)}


def summarize(rows: list[dict]) -> str:
    """Validation OA / macro F1 per variant: mean over seeds, and each seed's figures."""
    import pandas as pd

    df = pd.DataFrame(rows)
    out = ["| dataset | model | variant | what | val OA (mean) | val macro F1 (mean) | per seed OA / F1 | seconds (load) |",
           "|---|---|---|---|---|---|---|---|"]
    for (ds, model, variant), g in df.groupby(["dataset", "model", "variant"], sort=False):
        spec = {k: v for k, v in g["spec"].iloc[0].items() if k != "name"}
        what = json.dumps(spec) + (f"; {g['code'].iloc[0]}" if "code" in g and isinstance(g["code"].iloc[0], str) else "")
        per = ", ".join(f"s{r.seed}: {r.val_overall_accuracy:.3f} / {r.val_macro_f1:.3f}" for r in g.itertuples())
        out.append(f"| {ds} | {model} | {variant} | `{what}` | {g.val_overall_accuracy.mean():.3f} | {g.val_macro_f1.mean():.3f} | {per} | "
                   f"{g.seconds.mean():.0f} ({g['load'].mean():.0f}) |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--summarize", type=Path, nargs="+")
    ap.add_argument("--dataset", choices=["demo", "rpg2023"])
    ap.add_argument("--model")
    ap.add_argument("--grid", nargs="+", help="JSON variants (see the module docstring)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/tuning.jsonl"))
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cropmap-tuning")
    args = ap.parse_args()
    if args.summarize:
        print(summarize([json.loads(line) for p in args.summarize for line in p.read_text().splitlines() if line.strip()]))
        return
    if not (args.dataset and args.model and args.grid):
        ap.error("--dataset, --model and --grid are required (or --summarize)")
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.dataset == "demo":
        samples, _, recipe = demo_dataset(args.work / "cache")
    else:
        samples, _, recipe = rpg2023_dataset(SHARED / "examples" / "rpg2023_dekad_long.parquet",
                                             SHARED / "worldcereal" / "points" / "class_mappings.json")
    variants = [json.loads(g) for g in args.grid]
    done = set()
    if args.out.exists():
        for line in args.out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["dataset"], r["model"], json.dumps(r["spec"], sort_keys=True), r["seed"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for v in variants:
        for seed in args.seeds:
            if (args.dataset, args.model, json.dumps(v, sort_keys=True), seed) in done:
                continue
            r = {"dataset": args.dataset, **run_variant(samples, recipe, args.model, v, seed, args.work)}
            r["load"] = os.getloadavg()[0]
            with open(args.out, "a") as fh:
                fh.write(json.dumps(r) + "\n")
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
