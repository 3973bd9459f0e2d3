"""Parcel-level optical + radar fusion on the demo site: S2-only, S1-only and the four PSE-TSA fusion variants.

Builds the demo's parcel store once (the ingest, labels and parcel_tensors stages of
``cropmap run --site demo --level parcel``, cached), then for each variant and split seed trains
on the training parcels of a parcel-disjoint class-stratified split (the run's splits: same seeds,
test fraction, train-only single-parcel classes) and evaluates on its held-out parcels. Prints a
table of OA / mIoU / kappa / macro F1 (mean ± sample std over seeds), for all S2 dates and for
sparse S2 (``--s2-date-fraction``, default 20 % of each parcel's dates, seeded random).

    python benchmarks/parcel_fusion.py [--seeds 0 1 2] [--epochs 30] [--sample-pixels 32] [--threads 1] [--cache /tmp/cropmap-parcel-bench]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

VARIANTS = [("S2", "none", "s2"), ("S1", "none", "s1"), ("early (nn)", "early", "s1+s2"), ("PSE", "pse", "s1+s2"),
            ("TSA", "tsa", "s1+s2"), ("decision (avg)", "decision", "s1+s2")]
SPARSE = [("S2", "none", "s2"), ("early (nn)", "early", "s1+s2"), ("TSA", "tsa", "s1+s2"), ("decision (avg)", "decision", "s1+s2")]


def demo_parcels(cache: Path):
    from cropmap.pipeline.parcels import load_parcel_store
    from cropmap.pipeline.runner import Runner
    from cropmap.pipeline.sites import load_site
    from cropmap.pipeline.workflow import build_stages

    site = load_site("demo")
    stages, _ = build_stages(site, 2019, level="parcel")
    keep = [s for s in stages if s.name in ("ingest", "labels", "parcel_tensors")]
    run_dir = cache / "demo" / "2019"
    Runner(run_dir, {"site": "demo", "year": 2019}).run(keep, lambda done: {})
    return site, load_parcel_store(run_dir / "samples" / "parcels")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=None, help="default: the demo site's parcel.epochs")
    ap.add_argument("--s2-date-fraction", type=float, default=0.2)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/cropmap-parcel-bench"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "parcel_fusion.json")
    ap.add_argument("--sample-pixels", type=int, default=None, help="pixels drawn per parcel and step (default: the site's)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()

    import torch

    from cropmap.models.parcel_training import ParcelFitConfig
    from cropmap.pipeline.parcel_train import ParcelOptions, evaluate_parcel_model, train_parcel_model
    from cropmap.pipeline.splits import parcel_split

    torch.set_num_threads(args.threads or torch.get_num_threads())
    t00 = time.perf_counter()
    site, samples = demo_parcels(args.cache)
    tr, pc = site.training, site.parcel
    epochs = args.epochs or pc.epochs
    trained_tiles = {t.id for t in site.local.tiles if t.year <= 2019}
    table = samples.table[samples.table["tile"].isin(trained_tiles)][["parcel_id", "label", "class_name"]]
    pos = {int(p): i for i, p in enumerate(samples.table["parcel_id"])}
    results = []
    for setting, variants, fraction in (("all S2 dates", VARIANTS, None), (f"{args.s2_date_fraction:.0%} of S2 dates", SPARSE, args.s2_date_fraction)):
        for label, fusion, sensors in variants:
            runs = []
            t0 = time.perf_counter()
            for seed in args.seeds:
                split = parcel_split(table, seed, tr.test_fraction, tr.val_fraction)
                side = {k: np.array(sorted(pos[p] for p, s in split.assignment.items() if s == k), np.int64) for k in ("train", "val", "test")}
                opts = ParcelOptions("psetae", fusion, sensors, pc.alignment, fraction, None)
                cfg = ParcelFitConfig(epochs=epochs, batch_size=pc.batch_size, lr=pc.lr, loss=pc.loss, focal_gamma=pc.focal_gamma,
                                      class_weighting=pc.class_weighting, sample_pixels=args.sample_pixels or pc.sample_pixels, seed=seed, device=args.device)
                mdir = args.cache / "models" / f"{fusion}-{sensors}-{fraction}-{seed}"
                meta = train_parcel_model(samples, side["train"], side["val"], mdir, opts, cfg)
                m = evaluate_parcel_model(mdir, samples.subset(side["test"]))
                runs.append({"seed": seed, "n_test": int(len(side["test"])), "n_parameters": meta["n_parameters"],
                             **{k: m[k] for k in ("overall_accuracy", "miou", "kappa", "macro_f1")}})
            row = {"setting": setting, "variant": label, "fusion": fusion, "sensors": sensors, "runs": runs,
                   "seconds": round(time.perf_counter() - t0, 1)}
            for k in ("overall_accuracy", "miou", "kappa", "macro_f1"):
                v = np.array([r[k] for r in runs])
                row[k] = [float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0]
            results.append(row)
            print(f"{setting:>18} {label:<15} OA {row['overall_accuracy'][0]:.3f} ± {row['overall_accuracy'][1]:.3f}  "
                  f"mIoU {row['miou'][0]:.3f}  kappa {row['kappa'][0]:.3f}  mF1 {row['macro_f1'][0]:.3f}  ({row['seconds']} s)", flush=True)
    print(f"\n{len(samples)} parcels ({len(table)} in training tiles), seeds {args.seeds}, {epochs} epochs, "
          f"{time.perf_counter() - t00:.0f} s\n")
    print("| S2 dates | variant | OA | mIoU | kappa | macro F1 |\n|---|---|---|---|---|---|")
    for r in results:
        cell = lambda k, r=r: f"{r[k][0]:.3f} ± {r[k][1]:.3f}"  # noqa: E731
        print(f"| {r['setting']} | {r['variant']} | {cell('overall_accuracy')} | {cell('miou')} | {cell('kappa')} | {cell('macro_f1')} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seeds": args.seeds, "epochs": epochs, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
