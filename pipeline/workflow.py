"""The pixel-level workflow of ``cropmap run``: which stages, in which order, on which files.

ingest -> labels -> tensors -> [pretrain] -> train -> predict -> evaluate -> report, each a function of a
:class:`~cropmap.pipeline.runner.StageContext` writing under the run directory
``OUT/SITE/YEAR/``:

    cube/<tile>.zarr          ingest: raw S2/S1 acquisitions on the 10 m grid, cloud mask
    labels/                   labels: class + parcel rasters per tile, parcels.parquet
    samples/pixels/           tensors: labelled pixel series (sample store)
    samples/unlabelled/       pretrain (training.pretrain.method set): random pixels of every tile
    pretrain/encoder/         pretrain: the self-supervised (MoCo) encoder the train stage starts from
    models/seed-<s>/          train: one model per parcel-disjoint split seed (seed 0 maps)
    baselines/                train: random-forest predictions on the same splits
    map/crops.tif ...         predict: class COG, confidence COG, preview PNG
    metrics.json              evaluate: held-out parcel metrics, model vs random forest
    report.html               report: one self-contained page
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import rasterio

from cropmap.models.forest import binned_features, make_forest
from cropmap.models.calibration import summarize_calibration
from cropmap.models.metrics import CLASS_SET_RULE, summarize_runs
from cropmap.models.training import FitConfig

from . import report as report_mod
from . import season, transfer
from .cube import open_cube, write_cube
from .errors import StageError
from .evaluate import calibration_of_seed, metrics_for, predict_samples
from .fsio import atomic_path, write_json
from .ingest.local import find_tile_files, read_label_raster, read_tile
from .labels import tile_labels
from .maps import write_preview
from .predict import predict_site
from .pretrain import pretrain_encoder
from .runner import Stage, StageContext
from .samples import load_store, save_store
from .sites import Legend, Site, load_legend
from .splits import ParcelSplit, split_for
from .stac import write_map_item
from .tensors import concat_samples, cube_bands, labelled_samples, unlabelled_samples
from .train import as_series, class_table, encode_labels, train_model

log = logging.getLogger(__name__)

PROTOCOL = (
    "Split: {split}. Pixel-level metrics on the test pixels only. Parcels (connected regions of one "
    "crop in the label raster) never straddle sides: about {test:.0%} of each "
    "class's parcels are held out for test, the rest train{val}; a class without a test "
    "parcel is train-only and not evaluated. Training uses at most {cap} random pixels per parcel. Repeated "
    "over split seeds {seeds}; figures are mean and sample standard deviation over the seeds; "
    "{class_rule}. The random forest baseline is trained "
    "on exactly the same pixels and evaluated on the same test pixels. The map is made with the "
    "model of seed {seed0}."
)


def run_tiles(site: Site, year: int) -> list[tuple[str, int]]:
    """Tiles mapped for ``year``."""
    if site.source == "gee":
        from .ingest.gee.tiles import site_tiles

        return [(t.name, year) for t in site_tiles(site)]
    return [(t.id, t.year) for t in site.local.tiles if t.year == year]


def training_tiles(site: Site, year: int) -> list[tuple[str, int]]:
    """Labelled tiles used for training: the run year's, or every year up to it with ``pool_years`` (local sites)."""
    if site.training.pool_years and site.source == "local":
        return [(t.id, t.year) for t in site.local.tiles if t.year <= year]
    return run_tiles(site, year)


def build_stages(site: Site, year: int, *, device: str | None = None, epochs: int | None = None,
                 gee_client=None, level: str | None = None, until: str | None = None, transfer_from: Path | None = None,
                 compare_scratch: bool = True, previous_map: Path | None = None, cluster=None) -> tuple[list[Stage], Legend]:
    """The stages of ``cropmap run``; ``gee_client`` (a factory site -> client) replaces the real
    Earth Engine client of a ``source: gee`` site (tests use the fake one). ``level`` (default: the
    site's ``level``) ``parcel`` replaces the stages after labels by the parcel stages
    (:mod:`cropmap.pipeline.parcel_workflow`), ``patch`` by the patch stages (:mod:`cropmap.pipeline.patch_workflow`). ``until`` (MM-DD) cuts every series at that day of its
    year (early season, :mod:`.season`); ``transfer_from`` (last year's ``models/``) initialises
    training and adds the ``transfer`` comparison stage (:mod:`.transfer`; pixel level);
    ``previous_map`` (last year's crop map) adds year-over-year changes to the report. ``cluster`` (a
    :class:`~cropmap.pipeline.distributed.ClusterSpec`) runs the per-tile work of tensors and predict as dask
    tasks (same outputs; not part of any stage fingerprint)."""
    legend = load_legend(site.legend)
    tr = site.training
    if epochs is not None:
        tr = tr.model_copy(update={"epochs": epochs})
    mapped = run_tiles(site, year)
    trained = training_tiles(site, year)
    if not mapped:
        raise StageError(f"site {site.name!r} lists no tile for year {year}", fix=f"add tiles with year {year} to its site file")
    order = [t for t, _ in mapped] if site.source == "gee" else [x.id for x in site.local.tiles]
    tiles = sorted(set(mapped) | set(trained), key=lambda t: order.index(t[0]))
    tile_index = {tid: i for i, tid in enumerate(order)}
    if site.source == "gee":
        from .ingest.gee.source import GeeSource, make_client

        gee_src = GeeSource(site, year, gee_client or make_client)
        source_files, label_files = [], ([site.parcels.resolved()] if site.label_source == "parcels" else [])
        read_cube, read_codes = _gee_readers(site, gee_src, legend)
    else:
        files = {tid: find_tile_files(site, tid) for tid, _ in tiles}
        source_files = [p for f in files.values() for p in f.existing() if p != f.labels]
        label_files = [f.labels for tid, f in files.items() if f.labels is not None]

        def read_cube(ctx, tid, tyear):
            return read_tile(site, tid, tyear)

        def read_codes(ctx, tid):
            return (*read_label_raster(site, tid), None)

    cut = season.parse_until(until)
    if cut is not None:
        read_full = read_cube

        def read_cube(ctx, tid, tyear):
            cube, notes = read_full(ctx, tid, tyear)
            cube, note = season.cut_cube(cube, tyear, cut)
            return cube, notes + note

    legend_doc = legend.model_dump()

    def ingest(ctx: StageContext) -> dict[str, str]:
        out = ctx.path("cube")
        out.mkdir(parents=True, exist_ok=True)
        keep = {f"{tid}.zarr" for tid, _ in tiles}
        for stale in out.iterdir():  # tiles of an earlier configuration
            if stale.name in keep:
                continue
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink()
        notes, sizes = [], {}
        tick = ctx.progress("ingest tiles", len(tiles)) if ctx.progress else None
        for tid, tyear in tiles:
            cube, tile_notes = read_cube(ctx, tid, tyear)
            write_cube(cube, out / f"{tid}.zarr")
            notes += tile_notes
            sizes[tid] = {"s2_dates": int(cube.sizes["time_s2"]), "s1_dates": int(cube.sizes["time_s1"]),
                          "clear_fraction": round(float(cube["s2_clear"].mean()), 3), "missing_bands": list(cube.attrs["missing_bands"])}
            if tick:
                tick(1)
        ctx.report.update(tiles=sizes, notes=notes, **ctx.report.pop("gee", {}))
        return {"cube": "cube"}

    def labels(ctx: StageContext) -> dict[str, str]:
        out = ctx.path("labels")
        tables, unmapped = [], {}
        with atomic_path(out, is_dir=True) as tmp:
            for tid, tyear in tiles:
                codes, grid, parcel_ids = read_codes(ctx, tid)
                tl = tile_labels(codes, legend, tile=tid, tile_index=tile_index[tid], year=tyear, transform=grid.transform,
                                 parcel_ids=parcel_ids)
                profile = dict(driver="GTiff", width=grid.width, height=grid.height, count=1, crs=f"EPSG:{grid.epsg}",
                               transform=grid.transform, compress="deflate")
                with rasterio.open(tmp / f"{tid}_class.tif", "w", dtype="uint8", nodata=0, **profile) as ds:
                    ds.write(tl.classes, 1)
                with rasterio.open(tmp / f"{tid}_parcel.tif", "w", dtype="int64", nodata=0, **profile) as ds:
                    ds.write(tl.parcels, 1)
                tables.append(tl.parcel_table)
                if tl.unmapped:
                    unmapped[tid] = {str(k): v for k, v in tl.unmapped.items()}
            parcels = pd.concat(tables, ignore_index=True)
            parcels.to_parquet(tmp / "parcels.parquet", index=False)
        per_class = parcels.groupby("class_name").agg(parcels=("parcel_id", "size"), pixels=("n_pixels", "sum"))
        ctx.report.update(parcels=int(parcels["parcel_id"].nunique()), per_class=per_class.to_dict(orient="index"),
                          unmapped_source_codes=unmapped)
        ctx.report.update(ctx.report.pop("gee", {}))
        if unmapped:
            ctx.report["notes"] = ctx.report.get("notes", []) + [f"tile {t}: source codes not in legend {legend.name!r} (pixels): {u}" for t, u in unmapped.items()]
        return {"labels": "labels"}

    sample_tables = site.source == "gee" and site.gee.samples == "table"

    def tensors(ctx: StageContext) -> dict[str, str]:
        cube_dir, label_dir = ctx.upstream["ingest"]["cube"], ctx.upstream["labels"]["labels"]
        names = {c.code: c.name for c in legend.classes}
        if sample_tables:  # stratified, spatially blocked sample tables exported by Earth Engine
            leaves = gee_src.export_samples(ctx.run_dir)
            samples = gee_src.read_samples(leaves, ctx.run_dir / "gee" / "files", legend, s1_window=site.tensors.s1_window_days)
            cube_bands_ = cube_bands(open_cube(cube_dir / f"{trained[0][0]}.zarr"))
            if samples.bands != cube_bands_:
                raise StageError(f"exported sample tables have bands {samples.bands}, the cubes {cube_bands_}",
                                 fix="delete RUN/gee/files and the samples exports, then rerun")
            ctx.report.update(samples_from="Earth Engine sample tables (split unit: spatial blocks of gee.block_size_m)",
                              exports=sum(len(v) for v in leaves.values()), eecu_hours=round(gee_src.samples_eecu_seconds / 3600, 4))
        elif cluster is not None and cluster.distributed:
            from . import distributed

            with distributed.cluster_client(cluster) as client:
                samples, res = distributed.samples_distributed(
                    [(tid, cube_dir / f"{tid}.zarr", label_dir / f"{tid}_class.tif", label_dir / f"{tid}_parcel.tif") for tid, _ in trained],
                    names, site.tensors.s1_window_days, client=client, tiles_dir=ctx.path("tiles/tensors"), retries=cluster.retries)
            ctx.report.update(cluster=cluster.describe(), tiles_computed=len(res.computed), tiles_reused=len(res.reused))
        else:
            parts = []
            for tid, _ in trained:
                with rasterio.open(label_dir / f"{tid}_class.tif") as ds:
                    classes = ds.read(1)
                with rasterio.open(label_dir / f"{tid}_parcel.tif") as ds:
                    parcels = ds.read(1)
                parts.append(labelled_samples(open_cube(cube_dir / f"{tid}.zarr"), classes, parcels, names,
                                              s1_window=site.tensors.s1_window_days))
            samples = concat_samples(parts)
        save_store(samples, ctx.path("samples/pixels"))
        shutil.rmtree(ctx.path("tiles/tensors"), ignore_errors=True)  # per-tile parts, now in the store
        ctx.report.update(n_samples=len(samples), n_observations=int(samples.offsets[-1]),
                          mean_length=round(float(samples.lengths.mean()), 1), tiles=[t for t, _ in trained],
                          per_class={names[int(k)]: int(v) for k, v in samples.table["label"].value_counts().sort_index().items()})
        return {"samples": "samples/pixels"}

    def parcels_of(samples) -> pd.DataFrame:
        t = samples.table
        p = t.groupby("parcel_id").agg(label=("label", "first"), n_pixels=("label", "size")).reset_index()
        p = p[p.n_pixels >= tr.min_parcel_pixels]
        p["class_name"] = p["label"].map(lambda c: samples.class_names.get(int(c), str(c)))
        return p

    def split_indices(samples, split: ParcelSplit, seed: int) -> dict[str, np.ndarray]:
        side = split.row_sides(samples.table)
        rng = np.random.default_rng(seed)
        train = []
        for _, g in samples.table[side == "train"].groupby("parcel_id"):
            idx = g.index.to_numpy()
            train.append(rng.choice(idx, size=min(tr.max_pixels_per_parcel, len(idx)), replace=False))
        return {"train": np.sort(np.concatenate(train)), "val": np.nonzero(side == "val")[0], "test": np.nonzero(side == "test")[0]}

    pre = tr.pretrain
    pretraining = pre.method != "none"

    def pretrain(ctx: StageContext) -> dict[str, str]:
        cube_dir = ctx.upstream["ingest"]["cube"]
        rng = np.random.default_rng(0)
        per_tile = -(-pre.pixels // len(tiles))
        parts = [unlabelled_samples(open_cube(cube_dir / f"{tid}.zarr"), per_tile, rng, site.tensors.s1_window_days) for tid, _ in tiles]
        samples = concat_samples(parts)
        save_store(samples, ctx.path("samples/unlabelled"))
        tick = ctx.progress("pretrain", pre.epochs) if ctx.progress else None
        meta = pretrain_encoder(samples, ctx.path("pretrain/encoder"), method=pre.method, model_name=tr.model,
                                model_options=tr.model_options, config=pre.moco_config(device),
                                on_epoch=(lambda row: tick(1)) if tick else None)
        p = meta["pretrain"]
        if tick:
            tick(pre.epochs - p["epochs_run"])
        ctx.report.update(n_series=len(samples), method=pre.method, best_epoch=p["best_epoch"], epochs_run=p["epochs_run"],
                          queue_size=p["queue_size"], best_val_infonce=p["best_val_infonce"], seconds=p["seconds"])
        return {"encoder": "pretrain/encoder", "unlabelled": "samples/unlabelled"}

    def fit_config(seed: int) -> FitConfig:
        return FitConfig(epochs=tr.epochs, batch_size=tr.batch_size, lr=tr.lr, max_len=tr.max_len, seed=seed,
                         device=device or "auto", class_weighting=tr.class_weighting, loss=tr.loss,
                         focal_gamma=tr.focal_gamma, patience=tr.patience, freeze_encoder=pretraining and pre.freeze_encoder,
                         augment=tr.augment())

    def train(ctx: StageContext) -> dict[str, str]:
        samples = load_store(ctx.upstream["tensors"]["samples"], mmap=False)
        encoder = ctx.upstream["pretrain"]["encoder"] if pretraining else None
        parcels = parcels_of(samples)
        models_dir, base_dir = ctx.path("models"), ctx.path("baselines")
        tick = ctx.progress("train", tr.epochs * len(tr.split_seeds)) if ctx.progress else None
        report = {}
        for seed in tr.split_seeds:
            rows = samples.table[samples.table["parcel_id"].isin(parcels["parcel_id"])]
            split = split_for(rows, seed, tr.test_fraction, tr.val_fraction, tr.block_size_m if tr.split == "blocks" else None,
                              samples.class_names, parcels=parcels)
            idx = split_indices(samples, split, seed)
            cfg = fit_config(seed)
            init = transfer.init_for_seed(transfer_from, seed) if transfer_from is not None else encoder
            meta = train_model(samples, idx["train"], idx["val"], models_dir / f"seed-{seed}", model_name=tr.model,
                               model_options=tr.model_options, fit_config=cfg, pretrained=init,
                               extra_files={"split.json": split.to_dict()},
                               extra_meta={"inputs": {"s1_window_days": site.tensors.s1_window_days}},
                               on_epoch=(lambda row: tick(1)) if tick else None)
            if tick:
                tick(tr.epochs - meta["fit"]["epochs_run"])
            # the random-forest baseline on exactly the same training pixels and test pixels
            classes = class_table(samples, idx["train"])
            y = encode_labels(samples, classes)
            forest = make_forest(seed).fit(binned_features(as_series(samples.subset(idx["train"]))), y[idx["train"]])
            proba = forest.predict_proba(binned_features(as_series(samples.subset(idx["test"]))))
            full = np.zeros((len(idx["test"]), len(classes)), dtype=np.float32)
            full[:, forest.classes_] = proba
            base = pd.DataFrame({"sample_id": samples.table["sample_id"].to_numpy()[idx["test"]]})
            base[[f"p{i}" for i in range(len(classes))]] = full
            with atomic_path(base_dir / f"forest-seed-{seed}.parquet") as tmp:
                base.to_parquet(tmp, index=False)
            report[f"seed-{seed}"] = {"n_train": int(len(idx["train"])), "n_val": int(len(idx["val"])), "n_test": int(len(idx["test"])),
                                      "best_epoch": meta["fit"]["best_epoch"], "seconds": meta["fit"]["seconds"],
                                      "train_only_classes": split.train_only}
        ctx.report.update(report)
        return {"models": "models", "model": f"models/seed-{tr.split_seeds[0]}", "baselines": "baselines"}

    def predict(ctx: StageContext) -> dict[str, str]:
        cube_dir = ctx.upstream["ingest"]["cube"]
        model_dir = ctx.upstream["train"]["model"]
        tick = ctx.progress("predict pixels", sum(_tile_pixels(cube_dir / f"{t}.zarr") for t, _ in mapped)) if ctx.progress else None
        map_args = (site, legend, [cube_dir / f"{t}.zarr" for t, _ in mapped], model_dir, ctx.path("map/crops.tif"),
                    ctx.path("map/confidence.tif"))
        map_kw = dict(device=device, tags={"site": site.name, "year": str(year), "model": tr.model}, on_block=tick)
        if cluster is not None and cluster.distributed:
            from .distributed import cluster_client, predict_site_distributed

            with cluster_client(cluster) as client:
                summary = predict_site_distributed(*map_args, client=client, tiles_dir=ctx.path("tiles/predict"), retries=cluster.retries,
                                                   **map_kw)
            summary["cluster"] = cluster.describe()
        else:
            summary = predict_site(*map_args, **map_kw)
        windows = [(t["tile"], t) for t in summary["tiles"]]
        write_preview(ctx.path("map/crops.tif"), ctx.path("map/preview.png"), title=f"{site.name} {year}: crop map",
                      windows=[(name, (w["col_off"], w["row_off"], w["width"], w["height"])) for name, w in windows])
        write_map_item(ctx.path("map/crops.tif"), ctx.path("map/confidence.tif"), ctx.path("map/preview.png"),
                       item_id=f"{site.name}-{year}-crops", year=year, properties={"cropmap:site": site.name, "cropmap:model": tr.model})
        ctx.report.update(summary)
        return {"map": "map/crops.tif", "confidence": "map/confidence.tif", "preview": "map/preview.png",
                "classes": "map/crops.tif.classes.json", "stac": "map/crops.stac.json"}

    def evaluate(ctx: StageContext) -> dict[str, str]:
        samples = load_store(ctx.upstream["tensors"]["samples"], mmap=False)
        models_dir, base_dir = ctx.upstream["train"]["models"], ctx.upstream["train"]["baselines"]
        runs, calibration = [], {}
        for seed in tr.split_seeds:
            mdir = models_dir / f"seed-{seed}"
            split = ParcelSplit.from_dict(json.loads((mdir / "split.json").read_text()))
            side = split.row_sides(samples.table)
            test = np.nonzero(side == "test")[0]
            test_samples = samples.subset(test)
            evaluated = sorted({samples.class_names.get(int(c), str(c)) for c in test_samples.table["label"]})
            proba, meta, aligned = predict_samples(mdir, test_samples, device)
            model_m = metrics_for(aligned, proba, meta["classes"], evaluated)
            val = np.nonzero(side == "val")[0]
            cal = calibration_of_seed(mdir, meta, samples.subset(val) if len(val) else None, proba, aligned, device)
            if cal is not None:
                calibration[f"seed-{seed}"] = cal
            base = pd.read_parquet(base_dir / f"forest-seed-{seed}.parquet")
            if list(base["sample_id"]) != list(test_samples.table["sample_id"]):
                raise StageError(f"baseline predictions of seed {seed} do not match its test pixels", fix="rerun with --force")
            base_m = metrics_for(test_samples, base[[f"p{i}" for i in range(len(meta["classes"]))]].to_numpy(), meta["classes"], evaluated)
            runs.append({"seed": seed, "evaluated_classes": evaluated, "train_only_classes": split.train_only,
                         "parcels_per_class": split.parcels_per_class, "split": split.protocol, "blocks": split.blocks,
                         "pixels": {k: int((side == k).sum()) for k in ("train", "val", "test", "excluded")},
                         "model": model_m, "baseline": base_m})
        doc = _metrics_document(runs, tr, legend)
        if calibration:
            doc["calibration"] = summarize_calibration(calibration)
        write_json(ctx.path("metrics.json"), doc)
        ctx.report.update({k: doc[k] for k in ("overall_accuracy", "macro_f1", "kappa")},
                          baseline_overall_accuracy=doc["baseline"]["overall_accuracy"], comparison=doc["comparison"])
        return {"metrics": "metrics.json"}

    def report(ctx: StageContext) -> dict[str, str]:
        lvl = next(p for p in ("", "parcel_", "patch_") if f"{p}evaluate" in ctx.upstream)
        evaluated, predicted = ctx.upstream[f"{lvl}evaluate"], ctx.upstream[f"{lvl}predict"]
        metrics = json.loads(evaluated["metrics"].read_text())
        report_mod.write_report(ctx.path("report.html"), site=site, year=year, legend=legend, metrics=metrics,
                                preview=predicted["preview"], run_dir=ctx.run_dir, map_path=predicted.get("map"),
                                labels_dir=ctx.upstream["labels"]["labels"] if "labels" in ctx.upstream else None,
                                label_tiles=[t for t, _ in mapped], previous_map=previous_map,
                                transfer=ctx.upstream["transfer"]["transfer"] if "transfer" in ctx.upstream else None)
        return {"report": "report.html"}

    common = {"site": site.name, "year": year}
    source_cfg = ({"gee": site.gee.model_dump(exclude={"samples"}), "parcels": site.parcels.model_dump() if site.parcels else None}
                  if site.source == "gee" else {"label_variable": site.local.label_variable})
    stages = [
        Stage("ingest", ingest, inputs=source_files, config={**common, "tiles": tiles, "bands": site.bands.model_dump(), **({"until": list(cut)} if cut else {}),
                                                              "cloud_mask": site.cloud_mask.model_dump(), **source_cfg}),
        Stage("labels", labels, inputs=label_files, config={**common, "tiles": tiles, "legend": legend_doc, **source_cfg}),
        Stage("tensors", tensors, after=["ingest", "labels"], config={"tiles": trained, **site.tensors.model_dump(),
                                                                      **({"samples": site.gee.model_dump(include={"samples", "samples_per_class",
                                                                          "block_size_m"})} if sample_tables else {})}),
        *([Stage("pretrain", pretrain, after=["ingest"], config={"tiles": tiles, "pretrain": pre.model_dump(), "model": tr.model,
                                                                 "model_options": tr.model_options, **site.tensors.model_dump()})]
          if pretraining else []),
        Stage("train", train, after=["tensors", *(["pretrain"] if pretraining else [])], config={"training": tr.model_dump(),
              **({"transfer_from": str(transfer_from)} if transfer_from is not None else {})},
              inputs=[transfer_from] if transfer_from is not None else []),
        *([transfer.transfer_stage(year=year, year_tiles={t for t, _ in mapped}, seeds=tr.split_seeds, previous=transfer_from,
                                   split_indices=split_indices, fit_config=fit_config, device=device,
                                   train=lambda ctx, smp, a, b, out, cfg: train_model(
                                       smp, a, b, out, model_name=tr.model, model_options=tr.model_options, fit_config=cfg,
                                       pretrained=ctx.upstream["pretrain"]["encoder"] if pretraining else None),
                                   after=["tensors", "train", *(["pretrain"] if pretraining else [])], config={"seeds": tr.split_seeds, "training": tr.model_dump()})]
          if transfer_from is not None and compare_scratch else []),
        Stage("predict", predict, after=["ingest", "train"], config={**common, "tiles": mapped, "extent": list(site.extent),
                                                                      "crs": site.crs, "legend": legend_doc}, version="2"),  # 2: + STAC item
        Stage("evaluate", evaluate, after=["tensors", "train"], config={"seeds": tr.split_seeds}),
        Stage("report", report, after=["labels", "predict", "evaluate", *(["transfer"] if transfer_from is not None and compare_scratch else [])],
              config={**common, "report": report_mod.REPORT_VERSION}, inputs=[previous_map] if previous_map is not None else []),
    ]
    if (level or site.level) == "parcel":
        from .parcel_workflow import parcel_stages

        stages = [*stages[:2], *parcel_stages(site, year, legend, tiles=tiles, mapped=mapped, trained=trained, device=device,
                                              epochs=epochs, common=common),
                  Stage("report", report, after=["parcel_predict", "parcel_evaluate"], config={**common, "level": "parcel"})]
    elif (level or site.level) == "patch":
        from .patch_workflow import patch_stages

        stages = [*stages[:2], *patch_stages(site, year, legend, tiles=tiles, mapped=mapped, trained=trained, device=device,
                                             epochs=epochs, common=common),
                  Stage("report", report, after=["labels", "patch_predict", "patch_evaluate"], config={**common, "level": "patch",
                                                                                                   "report": report_mod.REPORT_VERSION})]
    return stages, legend


def _gee_readers(site: Site, src, legend: Legend):
    """read_cube / read_codes of a ``source: gee`` site: the first call of a stage runs its exports
    (task manager, resumable), then each tile is read back from the exported files."""
    from .ingest.gee.source import PARCEL_ID, burn_parcels, read_parcels

    tiles = {t.name: t for t in src.tiles}
    exported: dict[str, dict] = {}

    def read_cube(ctx: StageContext, tid: str, tyear: int):
        if site.gee.cubes == "pixels":
            cube = src.pixels_cube(tiles[tid])
            st = src.pixel_stats
            ctx.report["gee"] = {"pixel_requests": st.requests, "pixel_retries": st.retries, "pixel_splits": st.splits}
            return cube, []
        if "cubes" not in exported:
            exported["cubes"] = src.export_cubes(ctx.run_dir)
            ctx.report["gee"] = {"exports": sum(len(v) for t in exported["cubes"].values() for v in t.values()),
                                 "eecu_hours": round(src.eecu_seconds / 3600, 4)}
        cube = src.read_cube(tiles[tid], exported["cubes"][tid], ctx.run_dir / "gee" / "files")
        return cube, []

    def read_codes(ctx: StageContext, tid: str):
        tile = tiles[tid]
        if site.label_source == "parcels":
            if "parcels" not in exported:
                exported["parcels"] = read_parcels(site)
                if site.parcels.id_column:
                    ctx.report["gee"] = {"notes": [f"parcel ids from column {site.parcels.id_column} of {site.parcels.resolved().name}"]}
            codes, ids = burn_parcels(exported["parcels"], tile.grid, site.parcels.code_column,
                                      PARCEL_ID if site.parcels.id_column else None)
            return codes, tile.grid, ids
        if "cdl" not in exported:
            exported["cdl"], note = src.export_cdl(ctx.run_dir)
            ctx.report["gee"] = {"notes": [note]}
        return src.read_cdl(tile, exported["cdl"][tid], ctx.run_dir / "gee" / "files"), tile.grid, None

    return read_cube, read_codes


def _tile_pixels(path: Path) -> int:
    c = open_cube(path)
    return int(c.sizes["y"] * c.sizes["x"])


SCALARS = ("overall_accuracy", "kappa", "macro_f1", "weighted_f1", "miou")


def _summary(metric_runs: list[dict]) -> dict:
    s = summarize_runs(metric_runs)
    out = {}
    for k in SCALARS:
        out[k] = round(s[k]["mean"], 4)
        out[f"{k}_std"] = round(s[k]["std"], 4)
    names = sorted({n for m in metric_runs for n in m["per_class"]})
    per_class = {}
    for n in names:
        rows = [m["per_class"][n] for m in metric_runs if n in m["per_class"] and m["per_class"][n]["support"] > 0]
        if rows:
            per_class[n] = {
                "f1": round(float(np.mean([r["f1"] for r in rows])), 4),
                "f1_std": round(float(np.std([r["f1"] for r in rows], ddof=1)) if len(rows) > 1 else 0.0, 4),
                "iou": round(float(np.mean([r["iou"] for r in rows])), 4),
                "precision": round(float(np.mean([r["precision"] for r in rows])), 4),
                "recall": round(float(np.mean([r["recall"] for r in rows])), 4),
                "support": int(sum(r["support"] for r in rows)),
                "runs_evaluated": len(rows),
            }
    out["per_class"] = per_class
    out["n_samples"] = int(sum(m["n_samples"] for m in metric_runs))
    return out


def model_vs_baseline(runs: list[dict]) -> dict:
    """Paired gain of the model over the random-forest baseline across split runs (``runs[i]["model"|"baseline"]``)."""
    oa_gain = [r["model"]["overall_accuracy"] - r["baseline"]["overall_accuracy"] for r in runs]
    f1_gain = [r["model"]["macro_f1"] - r["baseline"]["macro_f1"] for r in runs]
    return {
        "overall_accuracy_gain": round(float(np.mean(oa_gain)), 4),
        "overall_accuracy_gain_std": round(float(np.std(oa_gain, ddof=1)) if len(oa_gain) > 1 else 0.0, 4),
        "macro_f1_gain": round(float(np.mean(f1_gain)), 4),
        "model_better_overall_accuracy_runs": f"{sum(g > 0 for g in oa_gain)}/{len(runs)}",
    }


def _metrics_document(runs: list[dict], tr, legend: Legend) -> dict:
    model = _summary([r["model"] for r in runs])
    base = _summary([r["baseline"] for r in runs])
    train_only = sorted({c for r in runs for c in r["train_only_classes"]})
    return {
        "protocol": PROTOCOL.format(
            split=runs[0].get("split", "parcel-disjoint"), class_rule=CLASS_SET_RULE,
            test=tr.test_fraction, cap=tr.max_pixels_per_parcel, seeds=tr.split_seeds, seed0=tr.split_seeds[0],
            val=(f" (about {tr.val_fraction:.0%} of them held out for validation and early stopping where a class keeps three or more)"
                 if tr.val_fraction > 0 else f" for a fixed {tr.epochs} epochs (no validation split)")),
        "split": runs[0].get("split", "parcel-disjoint"),
        "model": tr.model,
        "pretraining": tr.pretrain.method,
        **model,
        "n_runs": len(runs),
        "evaluated_classes": sorted({c for r in runs for c in r["evaluated_classes"]}),
        "train_only_classes": train_only,
        "baseline": {"model": "random_forest (500 trees, depth 25, 30-day median features)", **base},
        "comparison": model_vs_baseline(runs),
        "runs": runs,
    }
