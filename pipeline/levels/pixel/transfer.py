"""Cross-year transfer: start this year's models from last year's, and measure what it brings.

``previous_models`` finds the model directories of the previous year's current run version
(``DIR/SITE/YEAR-1``); the train stage then initialises each split seed's model from the previous
year's model of the same seed (``train_model(pretrained=...)``: encoder weights and normalisation,
and the classifier when the classes match). With ``compare_scratch`` the ``transfer`` stage
trains the same splits from scratch and evaluates both on the test pixels of the *run year's* tiles
only: last year's models never saw those parcels, while test parcels of pooled earlier tiles may
have been in last year's training set, which would flatter the transfer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cropmap.pipeline.fsio import write_json
from cropmap.pipeline.levels.pixel.evaluate import metrics_for, predict_samples
from cropmap.pipeline.runner import Stage, StageContext, load_manifest
from cropmap.pipeline.samples import load_store
from cropmap.pipeline.splits import ParcelSplit

SCALARS = ("overall_accuracy", "kappa", "macro_f1", "miou")


def previous_models(out: Path, site: str, year: int) -> Path | None:
    """``models/`` of the current version of ``out/site/year-1``, resolved (no links), or None."""
    ydir = Path(out) / site / str(year - 1)
    doc = load_manifest(ydir)
    if not doc or doc.get("status") != "succeeded" or "model" not in doc.get("outputs", {}):
        return None
    model = (ydir / doc["outputs"]["model"]).resolve()
    models = model.parent
    return models if (model / "config.json").is_file() else None


def init_for_seed(models: Path, seed: int) -> Path:
    """Last year's model of the same split seed, else its mapping model (the first seed's)."""
    same = Path(models) / f"seed-{seed}"
    if (same / "config.json").is_file():
        return same
    return sorted(p for p in Path(models).iterdir() if (p / "config.json").is_file())[0]


def transfer_stage(*, year: int, year_tiles: set[str], seeds: list[int], previous: Path, split_indices: Callable, fit_config: Callable[[int], object],
                   train: Callable[..., dict], device: str | None, after: list[str], config: dict) -> Stage:
    """The ``transfer`` stage: scratch models (the same start as without transfer: random, or the MoCo encoder) on
    the train stage's splits, both evaluated on run-year test pixels."""

    def run(ctx: StageContext) -> dict[str, str]:
        samples = load_store(ctx.upstream["tensors"]["samples"], mmap=False)
        models_dir = ctx.upstream["train"]["models"]
        rows = []
        for seed in seeds:
            mdir = models_dir / f"seed-{seed}"
            split = ParcelSplit.from_dict(json.loads((mdir / "split.json").read_text()))
            idx = split_indices(samples, split, seed)
            scratch = ctx.path(f"transfer/scratch-seed-{seed}")
            meta = train(ctx, samples, idx["train"], idx["val"], scratch, fit_config(seed))
            side = split.row_sides(samples.table)
            on_year = samples.table["tile"].isin(year_tiles).to_numpy()
            test = np.nonzero((side == "test") & on_year)[0]
            if len(test) == 0:
                rows.append({"seed": seed, "n_test": 0, "note": f"no test parcel on a {year} tile in this split"})
                continue
            ts = samples.subset(test)
            evaluated = sorted({samples.class_names.get(int(c), str(c)) for c in ts.table["label"]})
            row = {"seed": seed, "n_test": int(len(test)), "initialised_from": str(init_for_seed(previous, seed)),
                   "scratch_best_epoch": meta["fit"]["best_epoch"]}
            for name, d in (("transfer", mdir), ("scratch", scratch)):
                proba, m, aligned = predict_samples(d, ts, device)
                met = metrics_for(aligned, proba, m["classes"], evaluated)
                row[name] = {k: round(float(met[k]), 4) for k in SCALARS}
            rows.append(row)
        scored = [r for r in rows if r.get("n_test")]
        gain = {k: round(float(np.mean([r["transfer"][k] - r["scratch"][k] for r in scored])), 4) for k in SCALARS} if scored else {}
        doc = {
            "previous_models": str(previous),
            "protocol": (f"Each split seed's model initialised from last year's model is compared with the same model trained "
                         f"from scratch on the same pixels and epochs; both are evaluated on held-out pixels of the {year} tiles "
                         "only (never seen by last year's model). Gain = transfer - scratch, mean over seeds."),
            "runs": rows,
            "mean_gain": gain,
            "transfer_mean": {k: round(float(np.mean([r["transfer"][k] for r in scored])), 4) for k in SCALARS} if scored else {},
            "scratch_mean": {k: round(float(np.mean([r["scratch"][k] for r in scored])), 4) for k in SCALARS} if scored else {},
        }
        write_json(ctx.path("transfer.json"), doc)
        ctx.report.update(mean_gain=gain, seeds_scored=len(scored))
        return {"transfer": "transfer.json", "scratch_models": "transfer"}

    return Stage("transfer", run, after=after, config=config)

