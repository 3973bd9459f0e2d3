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

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import rasterio
from rasterio.windows import Window

from cropmap.models.forest import binned_features
from cropmap.models.metrics import CLASS_SET_RULE
from cropmap.models.parcel.batch import ParcelSets
from cropmap.models.parcel.training import ParcelFitConfig
from cropmap.models.training import FitConfig
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
from cropmap.pipeline.levels.parcel.train import (
    ParcelOptions,
    candidate_proba,
    parcel_mean_samples,
    predict_parcels,
    sensor_means,
    train_parcel_model,
)
from cropmap.pipeline.levels.selection import BLEND, CandidateResult, candidate_table, choice_document, validation_outputs, validation_scores
from cropmap.pipeline.levels.series_models import train_model
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
    return ParcelOptions("psetae", p.fusion, p.sensors, p.alignment, p.s2_date_fraction, p.until)


def parcel_mean_features(sets: ParcelSets) -> np.ndarray:
    """Random-forest features of parcels: 30-day medians of the parcel-mean series of each sensor."""
    return np.concatenate([binned_features(mean) for mean in sensor_means(sets).values()], axis=1)


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

    cands = pc.candidate_list()
    auto = pc.model == "auto"
    blending = auto and pc.blend and len(cands) > 1

    def series_config(seed: int) -> FitConfig:
        """The fit of a series candidate (a pixel model on parcel-mean series): the site's pixel recipe."""
        return FitConfig(epochs=tr.epochs, batch_size=min(tr.batch_size, 32), lr=tr.lr, max_len=tr.max_len, seed=seed, device=device,
                         class_weighting=tr.class_weighting, loss=tr.loss, focal_gamma=tr.focal_gamma, patience=tr.patience,
                         augment=tr.augment())

    def parcel_train(ctx: StageContext) -> dict[str, str]:
        samples = load_parcel_store(ctx.upstream["parcel_tensors"]["samples"])
        pos = {int(p): i for i, p in enumerate(samples.table["parcel_id"])}
        models_dir, base_dir = ctx.path("parcel_models"), ctx.path("parcel_baselines")
        tick = ctx.progress("train parcels", n_epochs * len(tr.split_seeds)) if ctx.progress and "psetae" in cands else None
        feats = parcel_mean_features(samples.sets)
        means = parcel_mean_samples(samples) if any(c != "psetae" for c in cands) else None
        results = {c: CandidateResult(c) for c in cands}
        if blending:
            results[BLEND] = CandidateResult(BLEND)
        report = {}
        for seed in tr.split_seeds:
            table = trained_parcels(samples)
            split = split_for(table, seed, tr.test_fraction, tr.val_fraction, tr.block_size_m if tr.split == "blocks" else None,
                              dict(zip(table["label"], table["class_name"])), parcels=table)
            side = {k: np.array(sorted(pos[p] for p, s in split.assignment.items() if s == k), np.int64) for k in ("train", "val", "test")}
            classes = class_table(samples, side["train"])
            y = encode_labels(samples, classes)
            seed_report = {"n_train": int(len(side["train"])), "n_val": int(len(side["val"])), "n_test": int(len(side["test"])),
                           "train_only_classes": split.train_only}
            val_p = {}
            for cand in cands:
                out = models_dir / f"seed-{seed}" / cand if auto else models_dir / f"seed-{seed}"
                if cand == "psetae":
                    cfg = ParcelFitConfig(epochs=n_epochs, batch_size=pc.batch_size, lr=pc.lr, loss=pc.loss, focal_gamma=pc.focal_gamma,
                                          class_weighting=pc.class_weighting, sample_pixels=pc.sample_pixels, patience=pc.patience,
                                          seed=seed, device=device)
                    # auto: a fixed schedule, so that the validation parcels stay a fair basis for the choice
                    meta = train_parcel_model(samples, side["train"], side["val"] if not auto else side["val"][:0], out, opts, cfg,
                                              extra_files={"split.json": split.to_dict()},
                                              on_epoch=(lambda row: tick(1)) if tick else None)
                    if tick:
                        tick(n_epochs - meta["fit"]["epochs_run"])
                    row = {"best_epoch": meta["fit"]["best_epoch"], "seconds": meta["fit"]["seconds"], "n_parameters": meta["n_parameters"]}
                else:
                    seen = means.lengths > 0
                    meta = train_model(means, side["train"][seen[side["train"]]], side["val"][seen[side["val"]]], out, model_name=cand,
                                       fit_config=series_config(seed), extra_files={"split.json": split.to_dict()},
                                       extra_meta={"inputs": {"parcel_mean_series": True}}, early_stopping=False)
                    row = {"best_epoch": meta["fit"]["best_epoch"], "seconds": meta["fit"]["seconds"]}
                    if [c["label"] for c in meta["classes"]] != [c["label"] for c in classes]:
                        raise StageError(f"candidate {cand} of seed {seed} has other classes than the split", fix="rerun with --force")
                if not auto:
                    seed_report.update(row)
                    continue
                seed_report[cand] = row
                results[cand].seconds += float(meta["fit"]["seconds"])
                if len(side["val"]):  # the choice reads the validation parcels' labels, never the test parcels'
                    val_p[cand], _ = candidate_proba(cand, out, samples.subset(side["val"]), means.subset(side["val"]) if means else None, device)
                    results[cand].validation.append({"seed": seed, **validation_scores(y[side["val"]], np.arange(len(side["val"])), val_p[cand])})
                    results[cand].outputs.append(validation_outputs(y[side["val"]], val_p[cand]))  # one parcel per sample
            if blending and len(val_p) == len(cands):
                blend = np.mean(list(val_p.values()), axis=0)
                results[BLEND].validation.append({"seed": seed, **validation_scores(y[side["val"]], np.arange(len(side["val"])), blend)})
                results[BLEND].outputs.append(validation_outputs(y[side["val"]], blend))
            test_ids = samples.table["parcel_id"].to_numpy()[side["test"]]
            write_forest_baseline(base_dir / f"forest-seed-{seed}.parquet", seed, feats[side["train"]], y[side["train"]], feats[side["test"]],
                                  len(classes), "parcel_id", test_ids)
            write_boosting_baseline(base_dir / f"boosting-seed-{seed}.parquet", seed, feats[side["train"]], y[side["train"]], feats[side["test"]],
                                    len(classes), "parcel_id", test_ids, feats[side["val"]], y[side["val"]])
            report[f"seed-{seed}"] = seed_report
        outputs = {"models": "parcel_models", "model": f"parcel_models/seed-{tr.split_seeds[0]}", "baselines": "parcel_baselines"}
        if auto:
            doc = choice_document(list(results.values()), cands, tr.split_seeds, lambda s, m: f"parcel_models/seed-{s}/{m}",
                                  list(cands), unit="parcels")
            write_json(models_dir / "choice.json", doc)
            report["choice"] = {"winner": doc["winner"], "reason": doc["reason"]}
            outputs.update(model=f"parcel_models/seed-{tr.split_seeds[0]}/{doc['members'][0]}", choice="parcel_models/choice.json")
        ctx.report.update(report)
        return outputs

    def mapped_proba(ctx: StageContext, sub, means_sub) -> tuple[np.ndarray, list[dict], np.ndarray, str]:
        """Probabilities of the parcels ``sub`` by the run's model (auto: the winner's split-seed models averaged,
        classes aligned by label), its class table, the positions predicted, and the model's name for the map."""
        if "choice" not in ctx.upstream["parcel_train"]:
            proba, meta, keep = predict_parcels(ctx.upstream["parcel_train"]["model"], sub)
            return proba, meta["classes"], keep, f"psetae-{opts.fusion}"
        choice = json.loads(ctx.upstream["parcel_train"]["choice"].read_text())
        parts = []
        for rel in choice["ensemble"]:
            name = Path(rel).name
            parts.append(candidate_proba(name, ctx.run_dir / rel, sub, means_sub, device))
        labels = sorted({c["label"] for _, classes in parts for c in classes}, key=lambda v: (str(type(v)), v))
        names_of = {c["label"]: c["name"] for _, classes in parts for c in classes}
        acc = np.zeros((len(sub), len(labels)), np.float64)
        for proba, classes in parts:
            acc[:, [labels.index(c["label"]) for c in classes]] += proba
        acc /= len(parts)
        keep = np.nonzero(acc.sum(1) > 0)[0]
        classes = [{"index": i, "label": lab, "name": names_of[lab]} for i, lab in enumerate(labels)]
        return acc[keep].astype(np.float32), classes, keep, f"{choice['winner']} (auto: mean of {len(parts)} split-seed models)"

    def parcel_predict(ctx: StageContext) -> dict[str, str]:
        import geopandas as gpd

        samples = load_parcel_store(ctx.upstream["parcel_tensors"]["samples"])
        geo_dir = ctx.upstream["parcel_tensors"]["geometry"]
        on_map = np.nonzero(samples.table["tile"].isin(mapped_ids).to_numpy())[0]
        sub = samples.subset(on_map)
        proba, classes, keep, model_name = mapped_proba(ctx, sub, parcel_mean_samples(sub) if auto else None)
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
                       tags={"site": site.name, "year": str(year), "model": model_name, "level": "parcel"}) as writer:
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
        choice = json.loads(ctx.upstream["parcel_train"]["choice"].read_text()) if "choice" in ctx.upstream["parcel_train"] else None
        scored = {c["name"]: CandidateResult(c["name"], validation=c["validation"], seconds=c["seconds"]) for c in (choice or {}).get("candidates", [])}
        runs = []
        for seed in tr.split_seeds:
            seed_dir = models_dir / f"seed-{seed}"
            mdir = seed_dir / choice["members"][0] if choice else seed_dir
            split, test, evaluated = held_out(samples, mdir, names)
            test_samples = samples.subset(test)
            extra = {}
            if choice is None:
                proba, meta, keep = predict_parcels(mdir, test_samples)
                if len(keep) != len(test):  # a parcel the model cannot see counts as an error, never hidden
                    full = np.zeros((len(test), proba.shape[1]), np.float32)
                    full[keep] = proba
                    proba = full
                classes, unseen = meta["classes"], int(len(test) - len(keep))
                model_m = metrics_for(test_samples, proba, classes, evaluated)
            else:  # every candidate on the same test parcels, after the choice
                means = parcel_mean_samples(test_samples) if any(n not in ("psetae", BLEND) for n in scored) else None
                probs = {n: candidate_proba(n, seed_dir / n, test_samples, means, device) for n in scored if n != BLEND}
                classes = next(iter(probs.values()))[1]
                if BLEND in scored:
                    probs[BLEND] = (np.mean([p for p, _ in probs.values()], axis=0), classes)
                per = {n: metrics_for(test_samples, p, classes, evaluated) for n, (p, _) in probs.items()}
                for n, m in per.items():
                    scored[n].test.append({"seed": seed, **{k: float(m[k]) for k in ("overall_accuracy", "macro_f1", "kappa")}})
                model_m = per[choice["winner"]]
                unseen = int((probs[choice["winner"]][0].sum(1) == 0).sum())
                extra = {"candidates": {n: {k: m[k] for k in ("overall_accuracy", "macro_f1", "kappa")} for n, m in per.items()}}
            baselines = baseline_metrics(base_dir, seed, "parcel_id", test_samples, classes, evaluated, "parcels")
            runs.append({"seed": seed, "evaluated_classes": evaluated, "train_only_classes": split.train_only, "split": split.protocol,
                         "parcels_per_class": split.parcels_per_class, "test_parcels_without_dates": unseen,
                         "model": model_m, **baselines, **extra})
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
        if choice:
            protocol += (f" Auto: the model is chosen among {', '.join(scored)} by {choice['criterion']}, read on the validation "
                         "parcels only (series candidates are pixel models fitted on each parcel's mean series); every candidate is "
                         f"then scored on the same test parcels; the map averages the winner's {len(choice['ensemble'])} split-seed models.")
            head = {**head, "model": choice["winner"], "selection": "auto"}
        doc = metrics_document(runs, protocol=protocol, head=head,
                               baseline_model="random_forest (500 trees, depth 25, 30-day medians of parcel-mean series)")
        if choice:
            doc["choice"] = {k: choice[k] for k in ("winner", "members", "criterion", "reason", "ranking", "ensemble", "note", "bootstrap") if k in choice}
            doc["candidates"] = candidate_table(choice, list(scored.values()))
        write_json(ctx.path("metrics.json"), doc)
        ctx.report.update({k: doc[k] for k in ("overall_accuracy", "macro_f1", "kappa", "miou")},
                          baseline_overall_accuracy=doc["baseline"]["overall_accuracy"], comparison=doc["comparison"])
        return {"metrics": "metrics.json"}

    pcfg = {"parcel": pc.model_dump(), "epochs": n_epochs, **({"series_training": tr.model_dump(exclude={"candidates"})} if auto else {})}
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

