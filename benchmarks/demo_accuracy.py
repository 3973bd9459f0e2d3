"""Accuracy of the pipeline's model vs a random forest on the demo site, over parcel-disjoint splits.

Usage:  python benchmarks/demo_accuracy.py [--seeds 0 1 2 3 4] [--epochs N] [--out DIR]

Runs `cropmap run --site demo` (with the given split seeds) into a scratch directory and prints a
table per split seed and the mean +- sample standard deviation, plus the wall time of each stage.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from cropmap.pipeline.runner import Runner
from cropmap.pipeline.sites import load_site
from cropmap.pipeline.workflow import build_stages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="split seeds (default: the site's)")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--site", default="demo")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    site = load_site(args.site)
    if args.seeds:
        site = site.model_copy(update={"training": site.training.model_copy(update={"split_seeds": args.seeds})})
    year = site.resolve_year(None)
    out = args.out or Path(tempfile.mkdtemp(prefix="cropmap-bench-"))
    stages, _ = build_stages(site, year, epochs=args.epochs)
    t0 = time.perf_counter()
    m = Runner(out / site.name / str(year), {"site": site.name, "year": year}, force=True).run(
        stages, lambda done: {"metrics": done["evaluate"]["metrics"]})
    wall = time.perf_counter() - t0
    metrics = json.loads((out / site.name / str(year) / "metrics.json").read_text())

    print(f"site {site.name} {year}: {metrics['model']} vs random forest, pixels of held-out parcels")
    print(f"{'seed':>4} {'test px':>8} | {'OA':>6} {'kappa':>6} {'mF1':>6} {'mIoU':>6} | {'RF OA':>6} {'RF mF1':>6}")
    for r in metrics["runs"]:
        a, b = r["model"], r["baseline"]
        print(f"{r['seed']:>4} {a['n_samples']:>8} | {a['overall_accuracy']:6.3f} {a['kappa']:6.3f} {a['macro_f1']:6.3f} {a['miou']:6.3f} | "
              f"{b['overall_accuracy']:6.3f} {b['macro_f1']:6.3f}")
    b = metrics["baseline"]
    for k in ("overall_accuracy", "kappa", "macro_f1", "miou"):
        print(f"{k:>17}: model {metrics[k]:.3f} ± {metrics[k + '_std']:.3f}   random forest {b[k]:.3f} ± {b[k + '_std']:.3f}")
    print(f"gain in OA {metrics['comparison']['overall_accuracy_gain']:+.3f} ± {metrics['comparison']['overall_accuracy_gain_std']:.3f}, "
          f"better in {metrics['comparison']['model_better_overall_accuracy_runs']} splits; train-only classes: {metrics['train_only_classes']}")
    print("stage seconds: " + ", ".join(f"{k} {v['seconds']:.1f}" for k, v in m["stages"].items()) + f"; total {wall:.0f} s")


if __name__ == "__main__":
    main()
