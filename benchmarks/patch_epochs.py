"""How many epochs the demo patch model needs, chosen on *validation* blocks (never the test blocks).

Usage:  python benchmarks/patch_epochs.py --samples RUN/samples/patches [--epochs 30] [--seeds 0 1 2]
                                          [--val-fraction 0.2] [--json benchmarks/results/patch_epochs.json]

For each split seed the test blocks are exactly those of the run (``patch_split`` draws the test
blocks first, whatever ``val_fraction``); validation blocks are then taken out of the run's
training blocks. STCLN is trained with the site's recipe (batch 4, lr 1e-3, sqrt class weights,
augmentations) for ``--epochs`` epochs and the validation OA after each epoch is recorded. The
printed table is the mean validation OA per epoch over the seeds; the suggested epoch count is the
smallest one whose mean validation OA is within ``--tolerance`` of the best. Test pixels are never
predicted here.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from cropmap.models.patch.training import PatchFitConfig
from cropmap.pipeline.levels.patch.patches import budget_patches, load_patch_store, patch_split
from cropmap.pipeline.levels.patch.train import train_patch_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--test-fraction", type=float, default=0.3)
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("/tmp/cropmap-patch-epochs"))
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ps = load_patch_store(a.samples)
    curves, runs = [], []
    for seed in a.seeds:
        split = patch_split(ps.table, seed, a.test_fraction, a.val_fraction)
        budget = budget_patches(ps.labels, split.train, None, seed)
        cfg = PatchFitConfig(epochs=a.epochs, batch_size=4, lr=1e-3, class_weighting="sqrt", seed=seed, device="cpu")
        t = time.perf_counter()
        meta = train_patch_model(ps, budget, split.val, a.work / f"seed-{seed}", model_name="stcln", fit_config=cfg)
        oa = [r["val_overall_accuracy"] for r in meta["fit"]["history"]]
        curves.append(oa)
        runs.append({"seed": seed, "n_train": len(budget), "n_val": len(split.val), "val_oa": oa, "seconds": time.perf_counter() - t})
        print(f"seed {seed}: {len(budget)} train / {len(split.val)} val patches, {time.perf_counter() - t:.0f} s, "
              f"best val OA {max(oa):.3f} at epoch {int(np.argmax(oa)) + 1}", flush=True)
    mean = np.mean(curves, axis=0)
    # a running best: the OA of the weights a run stopped at epoch e would keep (best validation so far)
    kept = np.mean([np.maximum.accumulate(c) for c in curves], axis=0)
    print("\n| epoch | mean val OA | mean best-so-far val OA |\n|---|---|---|")
    for e in range(a.epochs):
        print(f"| {e + 1} | {mean[e]:.3f} | {kept[e]:.3f} |")
    best = float(kept.max())
    pick = int(np.nonzero(kept >= best - a.tolerance)[0][0]) + 1
    print(f"\nsuggested epochs (first within {a.tolerance} of the best best-so-far validation OA {best:.3f}): {pick}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"runs": runs, "mean_val_oa": mean.tolist(), "kept_val_oa": kept.tolist(),
                                      "suggested_epochs": pick, "tolerance": a.tolerance}, indent=2) + "\n")


if __name__ == "__main__":
    main()
