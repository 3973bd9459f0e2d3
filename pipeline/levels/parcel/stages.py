"""The parcel-level stages of ``cropmap run`` (``--level parcel`` or the site's ``level: parcel``).

ingest -> labels -> parcel_tensors -> parcel_train -> parcel_predict -> parcel_evaluate -> report:

    samples/parcels/          parcel_tensors: parcel pixel sets (cropmap.parcel-samples/1)
    samples/parcel_geometry/  parcel_tensors: per-tile parcel rasters + parcels.gpkg (geometry of every parcel)
    parcel_models/seed-<s>/   parcel_train: one PSE-TSA model per parcel-disjoint split seed (seed 0 maps)
    parcel_baselines/         parcel_train: random forest on parcel-mean series, same splits
    map/parcels.gpkg          parcel_predict: the parcel crop map (id, class, probability per class), site CRS
    map/crops.tif ...         parcel_predict: the same map rasterised (class COG, confidence COG, preview)
    metrics.json              parcel_evaluate: held-out parcel metrics, model vs random forest
    report.html               report

Parcels come from the labels stage's parcel rasters, or from the site's polygon file
(``parcels:`` section) when it has one.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import rasterio
from rasterio.windows import Window

from cropmap.models.forest import binned_features
from cropmap.models.metrics import CLASS_SET_RULE
from cropmap.models.parcel.batch import ParcelSets
from cropmap.models.parcel.training import ParcelFitConfig
from cropmap.models.series import Series
from cropmap.pipeline.cube import grid_of, open_cube
from cropmap.pipeline.errors import StageError
from cropmap.pipeline.fsio import atomic_path, write_json
from cropmap.pipeline.grid import site_grid, tile_window
from cropmap.pipeline.levels import RunInputs
from cropmap.pipeline.levels.common import (
    baseline_metrics,
    class_table,
    encode_labels,
    held_out,
    metrics_document,
    metrics_for,
    write_boosting_baseline,
    write_forest_baseline,
)
from cropmap.pipeline.levels.parcel.parcels import (
    concat_parcels,
    load_parcel_store,
    polygon_parcel_samples,
    read_parcel_polygons,
    save_parcel_store,
    tile_parcel_sets,
)
from cropmap.pipeline.levels.parcel.train import ParcelOptions, predict_parcels, train_parcel_model
from cropmap.pipeline.runner import Stage, StageContext
from cropmap.pipeline.sites import Site
from cropmap.pipeline.splits import split_for
from cropmap.pipeline.stages.maps import MapClass, MapWriter, write_preview

log = logging.getLogger(__name__)

PROTOCOL = (
    "Split: {split} (a parcel's block is that of its centroid). Parcel-level metrics: one prediction per held-out parcel; about "
    "{test:.0%} of each class's parcels are held out for test, the rest train{val}; a class without a test "
    "parcel is train-only and not evaluated. Model: {model} ({fusion} fusion, sensors {sensors}{exp}). Repeated over split "
    "seeds {seeds}; figures are mean and sample standard deviation over the seeds; {class_rule}. The random forest baseline (30-day medians of the parcel-mean optical and radar series) is trained "
    "and tested on the same parcels. The map is made with the model of seed {seed0}."
)


def parcel_options(site: Site) -> ParcelOptions:
    p = site.parcel
    return ParcelOptions(p.model, p.fusion, p.sensors, p.alignment, p.s2_date_fraction, p.until)


def parcel_mean_features(sets: ParcelSets) -> np.ndarray:
    """Random-forest features of parcels: 30-day medians of the parcel-mean series of each sensor."""
    feats = []
    for name in ("s2", "s1"):
        s = sets.sensors[name]
        vals = np.asarray(s.values)
        npx = np.repeat(sets.n_pixels, s.lengths)
        slot = np.arange(vals.shape[2])[None, None, :] < npx[:, None, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.nansum(np.where(slot, vals, 0), axis=2) / np.maximum((slot & ~np.isnan(vals)).sum(axis=2), 1)
        mean[(slot & ~np.isnan(vals)).sum(axis=2) == 0] = np.nan
        feats.append(binned_features(Series(mean.astype(np.float32), np.asarray(s.days), s.offsets)))
    return np.concatenate(feats, axis=1)


def parcel_stages(run: RunInputs) -> list[Stage]:
    """The parcel stages that follow ingest and labels."""
    site, year, legend, tiles, mapped, trained, device, epochs, common = (
        run.site, run.year, run.legend, run.tiles, run.mapped, run.trained, run.device, run.epochs, run.common)
    tr, pc = site.training, site.parcel
    opts = parcel_options(site)
    opts.check()
    n_epochs = epochs if epochs is not None else pc.epochs
    names = {c.code: c.name for c in legend.classes}
    mapped_ids = {t for t, _ in mapped}
    trained_ids = {t for t, _ in trained}
    build = {"max_pixels": pc.max_pixels, "min_clear_fraction": pc.min_clear_fraction, "s1_window": pc.s1_window_days}

    def parcel_tensors(ctx: StageContext) -> dict[str, str]:
        cube_dir, label_dir = ctx.upstream["ingest"]["cube"], ctx.upstream["labels"]["labels"]
        cubes = {tid: open_cube(cube_dir / f"{tid}.zarr") for tid, _ in tiles}
        geo = ctx.path("samples/parcel_geometry")
        with atomic_path(geo, is_dir=True) as tmp:
            if site.parcels is not None:
                gdf, read_report = read_parcel_polygons(site.parcels.resolved(), code_column=site.parcels.code_column, crs=site.crs,
                                                        id_column=site.parcels.id_column, layer=site.parcels.layer)
                samples, rasters, report = polygon_parcel_samples(gdf, cubes, legend.source_lookup(), names, **build)
                report = {**read_report, **report, "skipped": {**read_report["skipped"], **report["skipped"]}}
                kept = samples.table["parcel_id"].to_numpy()
                polys = gdf.iloc[kept - 1][["geometry"]].assign(parcel_id=kept)
            else:
                table = pd.read_parquet(label_dir / "parcels.parquet").rename(columns={"class_code": "label"})
                parts, skipped, rasters = [], {}, {}
                for tid, _ in tiles:
                    with rasterio.open(label_dir / f"{tid}_parcel.tif") as ds:
                        rasters[tid] = ds.read(1)
                    part, sk = tile_parcel_sets(cubes[tid], rasters[tid], table[table["tile"] == tid][["parcel_id", "label", "class_name", "source_code"]],
                                                **build)
                    parts.append(part)
                    for k, v in sk.items():
                        skipped[k] = skipped.get(k, 0) + v
                samples = concat_parcels(parts)
                samples.class_names = dict(names)
                report = {"parcels_read": int(len(table)), "parcels_kept": len(samples), "skipped": skipped, "source": "label raster"}
                polys = _polygonise(rasters, cubes)
            for tid, r in rasters.items():
                g = grid_of(cubes[tid])
                with rasterio.open(tmp / f"{tid}_parcel.tif", "w", driver="GTiff", width=g.width, height=g.height, count=1, dtype="int64",
                                   nodata=0, crs=f"EPSG:{g.epsg}", transform=g.transform, compress="deflate") as ds:
                    ds.write(r.astype(np.int64), 1)
            polys.to_file(tmp / "parcels.gpkg", driver="GPKG")
        samples.report = report
        save_parcel_store(samples, ctx.path("samples/parcels"))
        notes = [f"{v} parcel(s) left out: {k.replace('_', ' ')}" for k, v in report["skipped"].items() if v]
        for k in ("clipped_at_tile_edge", "smaller_than_pixel", "repaired_geometries"):
            if report.get(k):
                notes.append(f"{report[k]} parcel(s) {k.replace('_', ' ')}")
        if report.get("reprojected_from"):
            notes.append(f"parcel file reprojected from {report['reprojected_from']} to {site.crs}")
        ctx.report.update(report, notes=notes, per_class=samples.table["class_name"].value_counts().to_dict(),
                          mean_s2_dates=round(float(samples.table["s2_dates"].mean()), 1),
                          mean_s1_dates=round(float(samples.table["s1_dates"].mean()), 1))
        return {"samples": "samples/parcels", "geometry": "samples/parcel_geometry"}

    def trained_parcels(samples) -> pd.DataFrame:
        t = samples.table
        cols = ["parcel_id", "label", "class_name", *(c for c in ("x", "y", "epsg") if c in t.columns)]
        return t[t["tile"].isin(trained_ids)][cols]

    def parcel_train(ctx: StageContext) -> dict[str, str]:
        samples = load_parcel_store(ctx.upstream["parcel_tensors"]["samples"])
        pos = {int(p): i for i, p in enumerate(samples.table["parcel_id"])}
        models_dir, base_dir = ctx.path("parcel_models"), ctx.path("parcel_baselines")
        tick = ctx.progress("train parcels", n_epochs * len(tr.split_seeds)) if ctx.progress else None
        feats = parcel_mean_features(samples.sets)
        report = {}
        for seed in tr.split_seeds:
            table = trained_parcels(samples)
            split = split_for(table, seed, tr.test_fraction, tr.val_fraction, tr.block_size_m if tr.split == "blocks" else None,
                              dict(zip(table["label"], table["class_name"])), parcels=table)
            side = {k: np.array(sorted(pos[p] for p, s in split.assignment.items() if s == k), np.int64) for k in ("train", "val", "test")}
            cfg = ParcelFitConfig(epochs=n_epochs, batch_size=pc.batch_size, lr=pc.lr, loss=pc.loss, focal_gamma=pc.focal_gamma,
                                  class_weighting=pc.class_weighting, sample_pixels=pc.sample_pixels, patience=pc.patience,
                                  seed=seed, device=device)
            meta = train_parcel_model(samples, side["train"], side["val"], models_dir / f"seed-{seed}", opts, cfg,
                                      extra_files={"split.json": split.to_dict()},
                                      on_epoch=(lambda row: tick(1)) if tick else None)
            if tick:
                tick(n_epochs - meta["fit"]["epochs_run"])
            classes = class_table(samples, side["train"])
            y = encode_labels(samples, classes)
            write_forest_baseline(base_dir / f"forest-seed-{seed}.parquet", seed, feats[side["train"]], y[side["train"]], feats[side["test"]],
                                  len(classes), "parcel_id", samples.table["parcel_id"].to_numpy()[side["test"]])
            write_boosting_baseline(base_dir / f"boosting-seed-{seed}.parquet", seed, feats[side["train"]], y[side["train"]], feats[side["test"]],
                                    len(classes), "parcel_id", samples.table["parcel_id"].to_numpy()[side["test"]], feats[side["val"]], y[side["val"]])
            report[f"seed-{seed}"] = {"n_train": int(len(side["train"])), "n_val": int(len(side["val"])), "n_test": int(len(side["test"])),
                                      "best_epoch": meta["fit"]["best_epoch"], "seconds": meta["fit"]["seconds"],
                                      "train_only_classes": split.train_only, "n_parameters": meta["n_parameters"]}
        ctx.report.update(report)
        return {"models": "parcel_models", "model": f"parcel_models/seed-{tr.split_seeds[0]}", "baselines": "parcel_baselines"}

    def parcel_predict(ctx: StageContext) -> dict[str, str]:
        import geopandas as gpd

        samples = load_parcel_store(ctx.upstream["parcel_tensors"]["samples"])
        geo_dir = ctx.upstream["parcel_tensors"]["geometry"]
        on_map = np.nonzero(samples.table["tile"].isin(mapped_ids).to_numpy())[0]
        sub = samples.subset(on_map)
        proba, meta, keep = predict_parcels(ctx.upstream["parcel_train"]["model"], sub)
        classes = meta["classes"]
        t = sub.table.iloc[keep].reset_index(drop=True)
        codes = np.array([int(classes[k]["label"]) for k in proba.argmax(1)], np.uint8)
        out = pd.DataFrame({"parcel_id": t["parcel_id"].to_numpy(), "tile": t["tile"].to_numpy(), "class_code": codes,
                            "class_name": [names[int(c)] for c in codes], "probability": proba.max(1).astype(np.float64),
                            "reference_class": t["class_name"].to_numpy()})
        for c in classes:
            out[f"p_{c['name'].replace(' ', '_')}"] = proba[:, c["index"]].astype(np.float64)
        polys = gpd.read_file(geo_dir / "parcels.gpkg")
        gdf = polys.merge(out, on="parcel_id", how="inner")
        if len(gdf) != len(out):
            raise StageError(f"{len(out) - len(gdf)} predicted parcel(s) have no geometry", fix="rerun with --force")
        unpredicted = int(len(sub) - len(keep))
        with atomic_path(ctx.path("map/parcels.gpkg")) as tmp:
            gdf.to_file(tmp, driver="GPKG", layer="parcels")
        # the same map rasterised in the pixel path's COG format
        lut_code = dict(zip(out["parcel_id"].astype(np.int64), out["class_code"]))
        lut_conf = dict(zip(out["parcel_id"].astype(np.int64), out["probability"]))
        transform, width, height = site_grid(site)
        windows = []
        with MapWriter(ctx.path("map/crops.tif"), ctx.path("map/confidence.tif"), crs=site.crs, transform=transform, width=width,
                       height=height, classes=[MapClass(c.code, c.name, c.color) for c in legend.classes],
                       tags={"site": site.name, "year": str(year), "model": f"psetae-{opts.fusion}", "level": "parcel"}) as writer:
            for tid, _ in mapped:
                with rasterio.open(geo_dir / f"{tid}_parcel.tif") as ds:
                    r, tile_transform = ds.read(1), ds.transform
                origin = tile_window(site, tile_transform)
                ids = np.unique(r[r > 0])
                cls = np.zeros(r.shape, np.uint8)
                conf = np.full(r.shape, np.nan, np.float32)
                for pid in ids:
                    if int(pid) in lut_code:
                        m = r == pid
                        cls[m] = lut_code[int(pid)]
                        conf[m] = lut_conf[int(pid)]
                win = Window(origin.col_off, origin.row_off, r.shape[1], r.shape[0])
                writer.write(win, cls, conf)
                windows.append((tid, (int(win.col_off), int(win.row_off), int(win.width), int(win.height))))
        write_preview(ctx.path("map/crops.tif"), ctx.path("map/preview.png"), title=f"{site.name} {year}: parcel crop map", windows=windows)
        ctx.report.update(parcels_mapped=int(len(gdf)), parcels_without_dates=unpredicted,
                          parcels_per_class=out["class_name"].value_counts().to_dict(), crs=site.crs)
        if unpredicted:
            ctx.report["notes"] = [f"{unpredicted} parcel(s) have no date of a sensor the model uses: not mapped"]
        return {"parcel_map": "map/parcels.gpkg", "map": "map/crops.tif", "confidence": "map/confidence.tif",
                "preview": "map/preview.png", "classes": "map/crops.tif.classes.json"}

    def parcel_evaluate(ctx: StageContext) -> dict[str, str]:
        samples = load_parcel_store(ctx.upstream["parcel_tensors"]["samples"])
        models_dir, base_dir = ctx.upstream["parcel_train"]["models"], ctx.upstream["parcel_train"]["baselines"]
        runs = []
        for seed in tr.split_seeds:
            mdir = models_dir / f"seed-{seed}"
            split, test, evaluated = held_out(samples, mdir, names)
            test_samples = samples.subset(test)
            proba, meta, keep = predict_parcels(mdir, test_samples)
            if len(keep) != len(test):  # a parcel the model cannot see counts as an error, never hidden
                full = np.zeros((len(test), proba.shape[1]), np.float32)
                full[keep] = proba
                proba = full
            model_m = metrics_for(test_samples, proba, meta["classes"], evaluated)
            baselines = baseline_metrics(base_dir, seed, "parcel_id", test_samples, meta["classes"], evaluated, "parcels")
            runs.append({"seed": seed, "evaluated_classes": evaluated, "train_only_classes": split.train_only, "split": split.protocol,
                         "parcels_per_class": split.parcels_per_class, "test_parcels_without_dates": int(len(test) - len(keep)),
                         "model": model_m, **baselines})
        exp = "".join([f", {opts.s2_date_fraction:.0%} of the S2 dates" if opts.s2_date_fraction else "",
                       f", series up to {opts.until}" if opts.until else ""])
        protocol = PROTOCOL.format(split=runs[0].get("split", "parcel-disjoint"), class_rule=CLASS_SET_RULE, test=tr.test_fraction, seeds=tr.split_seeds, seed0=tr.split_seeds[0], model=opts.model,
                                   fusion=opts.fusion, sensors=opts.sensors, exp=exp,
                                   val=(f" (about {tr.val_fraction:.0%} held out for validation: best validation mIoU)" if tr.val_fraction > 0
                                        else f" for a fixed {n_epochs} epochs (no validation split)"))
        head = {"level": "parcel", "model": f"psetae-{opts.fusion}" if opts.fusion != "none" else f"psetae-{opts.sensors}",
                "options": {"fusion": opts.fusion, "sensors": opts.sensors, "alignment": opts.alignment,
                            "s2_date_fraction": opts.s2_date_fraction, "until": opts.until},
                "pretraining": "none"}
        doc = metrics_document(runs, protocol=protocol, head=head,
                               baseline_model="random_forest (500 trees, depth 25, 30-day medians of parcel-mean series)")
        write_json(ctx.path("metrics.json"), doc)
        ctx.report.update({k: doc[k] for k in ("overall_accuracy", "macro_f1", "kappa", "miou")},
                          baseline_overall_accuracy=doc["baseline"]["overall_accuracy"], comparison=doc["comparison"])
        return {"metrics": "metrics.json"}

    pcfg = {"parcel": pc.model_dump(), "epochs": n_epochs}
    return [
        Stage("parcel_tensors", parcel_tensors, after=["ingest", "labels"],
              inputs=[site.parcels.resolved()] if site.parcels is not None else [],
              config={"tiles": tiles, **build, "parcels": site.parcels.model_dump() if site.parcels else None}),
        Stage("parcel_train", parcel_train, after=["parcel_tensors"],
              config={**pcfg, "trained": trained, "seeds": tr.split_seeds, "test_fraction": tr.test_fraction, "val_fraction": tr.val_fraction}),
        Stage("parcel_predict", parcel_predict, after=["parcel_tensors", "parcel_train"],
              config={**common, "tiles": mapped, "extent": list(site.extent), "crs": site.crs, "legend": legend.model_dump()}),
        Stage("parcel_evaluate", parcel_evaluate, after=["parcel_tensors", "parcel_train"], config={"seeds": tr.split_seeds}),
    ]


def parcel_outputs(done: dict) -> dict[str, str]:
    """run.json ``outputs`` of the parcel path (the pixel path's keys, plus ``parcel_map``)."""
    p = done["parcel_predict"]
    return {"map": p["map"], "confidence": p["confidence"], "preview": p["preview"], "parcel_map": p["parcel_map"],
            "metrics": done["parcel_evaluate"]["metrics"], "model": done["parcel_train"]["model"], "report": done["report"]["report"],
            "samples": done["parcel_tensors"]["samples"]}


def _polygonise(rasters: dict, cubes: dict):
    """Parcel polygons (site CRS) from per-tile parcel-id rasters."""
    import geopandas as gpd
    from rasterio import features
    from shapely.geometry import shape
    from shapely.ops import unary_union

    ids, geoms, crs = [], [], None
    for tid, r in rasters.items():
        g = grid_of(cubes[tid])
        crs = f"EPSG:{g.epsg}"
        parts: dict[int, list] = {}
        for geom, value in features.shapes(r.astype(np.int32), mask=r > 0, transform=g.transform):
            parts.setdefault(int(value), []).append(shape(geom))
        for pid, ps in parts.items():
            ids.append(pid)
            geoms.append(unary_union(ps))
    return gpd.GeoDataFrame({"parcel_id": np.asarray(ids, np.int64)}, geometry=geoms, crs=crs)

