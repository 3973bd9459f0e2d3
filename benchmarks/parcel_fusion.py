"""Parcel-level optical + radar fusion on the demo site: S2-only, S1-only and the four PSE-TSA fusion variants.

Builds the demo's parcel store once (the ingest, labels and parcel_tensors stages of
``cropmap run --site demo --level parcel``, cached), then for each variant and split seed trains
on the training parcels of a parcel-disjoint class-stratified split (the run's splits: same seeds,
test fraction, train-only single-parcel classes) and evaluates on its held-out parcels. Prints a
table of OA / mIoU / kappa / macro F1 (mean ± sample std over seeds), for all S2 dates and for
sparse S2 (``--s2-date-fraction``, default 20 % of each parcel's dates, seeded random).

``--dataset rpg2023`` runs the same protocol and recipe on the French RPG 2023 points (one pixel per
parcel, 390 parcels in 10 crop groups, 46 % of the optical dekads missing): the sparse-optical
condition where the fusion study expects radar to matter most.

    python benchmarks/parcel_fusion.py [--dataset demo|rpg2023] [--seeds 0 1 2] [--epochs 30] [--sample-pixels 32] [--threads 1] [--cache /tmp/cropmap-parcel-bench]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

VARIANTS = [("S2", "none", "s2"), ("S1", "none", "s1"), ("early (nn)", "early", "s1+s2"), ("PSE", "pse", "s1+s2"),
            ("TSA", "tsa", "s1+s2"), ("decision (avg)", "decision", "s1+s2")]
SPARSE = [("S2", "none", "s2"), ("early (nn)", "early", "s1+s2"), ("PSE", "pse", "s1+s2"), ("TSA", "tsa", "s1+s2"),
          ("decision (avg)", "decision", "s1+s2")]  # S1-only does not depend on the S2 dates: see the first table
FOREST = ("random forest", "forest", "s1+s2")  # the run's baseline: 30-day medians of the parcel-mean S2 and S1 series


def forest_metrics(samples, train, test, opts, seed: int) -> dict:
    """The baseline of ``cropmap run --level parcel`` on the same split and date experiment."""
    from cropmap.models.forest import make_forest
    from cropmap.pipeline.levels.parcel.stages import parcel_mean_features
    from cropmap.pipeline.levels.parcel.train import experiment_sets
    from cropmap.pipeline.levels.pixel.evaluate import metrics_for
    from cropmap.pipeline.levels.pixel.train import class_table, encode_labels

    feats = parcel_mean_features(experiment_sets(samples, opts, seed))
    classes = class_table(samples, train)
    y = encode_labels(samples, classes)
    forest = make_forest(seed).fit(feats[train], y[train])
    proba = np.zeros((len(test), len(classes)), np.float32)
    proba[:, forest.classes_] = forest.predict_proba(feats[test])
    return metrics_for(samples.subset(test), proba, classes)


def demo_parcels(cache: Path):
    from cropmap.pipeline.levels.parcel.parcels import load_parcel_store
    from cropmap.pipeline.runner import Runner
    from cropmap.pipeline.sites import load_site
    from cropmap.pipeline.workflow import build_stages

    site = load_site("demo")
    stages, _ = build_stages(site, 2019, level="parcel")
    keep = [s for s in stages if s.name in ("ingest", "labels", "parcel_tensors")]
    run_dir = cache / "demo" / "2019"
    Runner(run_dir, {"site": "demo", "year": 2019}).run(keep, lambda done: {})
    return site, load_parcel_store(run_dir / "samples" / "parcels")


def rpg2023_parcels(path: Path, mapping: Path, min_count: int = 10):
    """The RPG 2023 point table (``../shared/data/examples``, WorldCereal extractions, MIT) as parcel
    pixel sets of one pixel each: S2 rows where the optical bands are present (46 % of the dekads are
    missing: clouds), S1 rows where the radar is present, days since 1 January of the season year
    (2023), no geometric features (points). The labels are the CROPTYPE_INSEASON_FRANCE groups with
    at least ``min_count`` parcels, as in ``benchmarks/accuracy.py --dataset rpg2023``."""
    import pandas as pd

    from cropmap.models.parcel.batch import ParcelSets, SensorSets
    from cropmap.pipeline.levels.parcel.parcels import ParcelSamples

    groups = json.loads(mapping.read_text())["CROPTYPE_INSEASON_FRANCE"]
    df = pd.read_parquet(path)
    df["group"] = df["label"].astype(str).map(groups)
    df = df[df["group"].notna()]
    counts = df.groupby("sample_id")["group"].first().value_counts()
    df = df[df["group"].isin(counts[counts >= min_count].index)].sort_values(["sample_id", "date"])
    names = sorted(df["group"].unique())
    code = {n: i + 1 for i, n in enumerate(names)}
    s2b, s1b = ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B11", "B12"], ["VV", "VH"]
    rows, parts = [], {"s2": ([], [], [0]), "s1": ([], [], [0])}
    for i, (sid, g) in enumerate(df.groupby("sample_id", sort=True)):
        days = (pd.to_datetime(g["date"]).to_numpy().astype("datetime64[D]") - np.datetime64("2023-01-01", "D")).astype(np.float32)
        for name, bands in (("s2", s2b), ("s1", s1b)):
            v = g[bands].to_numpy(np.float32)
            ok = ~np.isnan(v).any(axis=1)
            vals, ds, offs = parts[name]
            vals.append(v[ok][:, :, None])
            ds.append(days[ok])
            offs.append(offs[-1] + int(ok.sum()))
        grp = g["group"].iloc[0]
        rows.append({"parcel_id": i + 1, "sample_id": sid, "label": code[grp], "class_name": grp, "tile": "rpg2023",
                     "season_year": 2023, "n_pixels": 1, "s2_dates": parts["s2"][2][-1] - parts["s2"][2][-2],
                     "s1_dates": parts["s1"][2][-1] - parts["s1"][2][-2]})
    table = pd.DataFrame(rows)
    keep = (table["s2_dates"] > 0) & (table["s1_dates"] > 0)
    sensors = {name: SensorSets(list(bands), np.concatenate(parts[name][0]), np.concatenate(parts[name][1]), np.asarray(parts[name][2], np.int64))
               for name, bands in (("s2", s2b), ("s1", s1b))}
    sets = ParcelSets(sensors, np.ones(len(table), np.int64), np.zeros((len(table), 0)), [])
    samples = ParcelSamples(sets, table, {code[n]: n for n in names}, {"source": str(path)})
    return samples.subset(np.nonzero(keep.to_numpy())[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=["demo", "rpg2023"], default="demo",
                    help="demo: the demo site's registry parcels; rpg2023: the RPG 2023 points, one pixel per parcel")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=None, help="default: the demo site's parcel.epochs")
    ap.add_argument("--s2-date-fraction", type=float, default=0.2)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/cropmap-parcel-bench"))
    ap.add_argument("--out", type=Path, default=None, help="default: results/parcel_fusion.json (demo), results/parcel_fusion_rpg2023.json")
    ap.add_argument("--sample-pixels", type=int, default=None, help="pixels drawn per parcel and step (default: the site's)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.out is None:
        args.out = Path(__file__).parent / "results" / ("parcel_fusion.json" if args.dataset == "demo" else f"parcel_fusion_{args.dataset}.json")

    import torch

    from cropmap.models.parcel.training import ParcelFitConfig
    from cropmap.pipeline.levels.parcel.train import ParcelOptions, evaluate_parcel_model, train_parcel_model
    from cropmap.pipeline.splits import parcel_split

    torch.set_num_threads(args.threads or torch.get_num_threads())
    t00 = time.perf_counter()
    site, samples = demo_parcels(args.cache)
    tr, pc = site.training, site.parcel
    epochs = args.epochs or pc.epochs
    trained_tiles = {t.id for t in site.local.tiles if t.year <= 2019}
    if args.dataset == "rpg2023":  # the demo's recipe, on the French points
        shared = Path(__file__).resolve().parents[1].parent / "shared" / "data"
        samples = rpg2023_parcels(shared / "examples" / "rpg2023_dekad_long.parquet", shared / "worldcereal" / "points" / "class_mappings.json")
        trained_tiles = {"rpg2023"}
    table = samples.table[samples.table["tile"].isin(trained_tiles)][["parcel_id", "label", "class_name"]]
    pos = {int(p): i for i, p in enumerate(samples.table["parcel_id"])}
    results = []
    for setting, variants, fraction in (("all S2 dates", VARIANTS, None), (f"{args.s2_date_fraction:.0%} of S2 dates", SPARSE, args.s2_date_fraction)):
        for label, fusion, sensors in [*variants, FOREST]:
            runs = []
            t0 = time.perf_counter()
            for seed in args.seeds:
                split = parcel_split(table, seed, tr.test_fraction, tr.val_fraction)
                side = {k: np.array(sorted(pos[p] for p, s in split.assignment.items() if s == k), np.int64) for k in ("train", "val", "test")}
                opts = ParcelOptions("psetae", "none" if fusion == "forest" else fusion, sensors, pc.alignment, fraction, None)
                if fusion == "forest":
                    m = forest_metrics(samples, side["train"], side["test"], opts, seed)
                    runs.append({"seed": seed, "n_test": int(len(side["test"])), "n_parameters": None,
                                 **{k: m[k] for k in ("overall_accuracy", "miou", "kappa", "macro_f1")}})
                    continue
                cfg = ParcelFitConfig(epochs=epochs, batch_size=pc.batch_size, lr=pc.lr, loss=pc.loss, focal_gamma=pc.focal_gamma,
                                      class_weighting=pc.class_weighting, sample_pixels=args.sample_pixels or pc.sample_pixels, seed=seed, device=args.device)
                mdir = args.cache / "models" / args.dataset / f"{fusion}-{sensors}-{fraction}-{seed}"
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
    args.out.write_text(json.dumps({"dataset": args.dataset, "n_parcels": int(len(table)), "seeds": args.seeds, "epochs": epochs,
                                    "threads": torch.get_num_threads(), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
