"""Pick the parcel models' epochs, batch size and learning rate on validation parcels only.

For each split seed of the demo benchmark (``benchmarks/parcel_fusion.py``), the split's test
parcels are set aside untouched; a quarter of its *training* parcels (class-stratified, seed
100 + split seed) is held out as validation, the grid is trained on the rest and scored on that
validation set. Prints one line per run and the grid ranked by mean validation OA. The chosen
setting then goes into the site file (``parcel:``) and the benchmark.

    python benchmarks/parcel_tuning.py [--fusion none] [--sensors s2] [--seeds 0 1 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fusion", default="none", choices=["none", "early", "pse", "tsa", "decision"])
    ap.add_argument("--sensors", default="s2", choices=["s2", "s1", "s1+s2"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, nargs="+", default=[30, 100, 300])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/cropmap-parcel-bench"))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import torch
    from parcel_fusion import demo_parcels

    from cropmap.models.parcel.training import ParcelFitConfig
    from cropmap.pipeline.levels.parcel.train import ParcelOptions, evaluate_parcel_model, train_parcel_model
    from cropmap.pipeline.splits import parcel_split

    torch.set_num_threads(args.threads or torch.get_num_threads())
    site, samples = demo_parcels(args.cache)
    tr, pc = site.training, site.parcel
    trained = {t.id for t in site.local.tiles if t.year <= 2019}
    table = samples.table[samples.table["tile"].isin(trained)][["parcel_id", "label", "class_name"]]
    pos = {int(p): i for i, p in enumerate(samples.table["parcel_id"])}
    grid = list(itertools.product(args.epochs, args.batch_sizes, args.lrs))
    scores: dict[tuple, list[tuple[float, float]]] = {g: [] for g in grid}
    for seed in args.seeds:
        split = parcel_split(table, seed, tr.test_fraction, 0.0)
        train_ids = [p for p, s in split.assignment.items() if s == "train"]
        inner = parcel_split(table[table.parcel_id.isin(train_ids)], 100 + seed, 0.25, 0.0)
        side = {k: np.array(sorted(pos[p] for p, s in inner.assignment.items() if s == k), np.int64) for k in ("train", "test")}
        for g in grid:
            epochs, bs, lr = g
            opts = ParcelOptions("psetae", args.fusion, args.sensors, pc.alignment, None, None)
            cfg = ParcelFitConfig(epochs=epochs, batch_size=bs, lr=lr, loss=pc.loss, focal_gamma=pc.focal_gamma,
                                  class_weighting=pc.class_weighting, sample_pixels=pc.sample_pixels, seed=seed)
            mdir = args.cache / "tuning" / f"{args.fusion}-{args.sensors}-{epochs}-{bs}-{lr}-{seed}"
            t = time.perf_counter()
            train_parcel_model(samples, side["train"], np.array([], np.int64), mdir, opts, cfg)
            m = evaluate_parcel_model(mdir, samples.subset(side["test"]))
            scores[g].append((m["overall_accuracy"], m["macro_f1"]))
            print(f"{args.fusion} {args.sensors} epochs {epochs} batch {bs} lr {lr:g} seed {seed}: {len(side['train'])} train / "
                  f"{len(side['test'])} validation parcels, val OA {m['overall_accuracy']:.3f}, val macro F1 {m['macro_f1']:.3f} "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
    print("\nranked by mean validation OA:")
    for g, v in sorted(scores.items(), key=lambda kv: -np.mean([x[0] for x in kv[1]])):
        print(f"  epochs {g[0]:>4} batch {g[1]:>3} lr {g[2]:g}: val OA {np.mean([x[0] for x in v]):.3f}, "
              f"val macro F1 {np.mean([x[1] for x in v]):.3f} ({len(v)} seeds)")


if __name__ == "__main__":
    main()
