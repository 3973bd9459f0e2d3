"""The pixel-level stages of ``cropmap run`` (after the shared ingest and labels stages):

tensors -> [pretrain] -> train -> [transfer] -> predict -> evaluate, each a function of a
:class:`~cropmap.pipeline.runner.StageContext` writing under the run directory:

    samples/pixels/           tensors: labelled pixel series (sample store)
    samples/unlabelled/       pretrain (training.pretrain.method set): random pixels of every tile
    pretrain/encoder/         pretrain: the self-supervised (MoCo) encoder the train stage starts from
    models/seed-<s>/          train: one model per parcel-disjoint split seed (seed 0 maps)
    baselines/                train: random-forest predictions on the same splits
    map/crops.tif ...         predict: class COG, confidence COG, preview PNG
    metrics.json              evaluate: held-out parcel metrics, model vs random forest
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import rasterio

from cropmap.models.calibration import fit_temperature, summarize_calibration
from cropmap.models.forest import binned_features
from cropmap.models.metrics import CLASS_SET_RULE
from cropmap.models.registry import fitted_without_gradients
from cropmap.models.training import FitConfig
from cropmap.pipeline.cube import open_cube
from cropmap.pipeline.errors import StageError
from cropmap.pipeline.fsio import write_json
from cropmap.pipeline.levels import RunInputs
from cropmap.pipeline.levels.common import (
    baseline_metrics,
    class_table,
    encode_labels,
    held_out,
    metrics_document,
    metrics_for,
    write_baseline,
    write_boosting_baseline,
    write_forest_baseline,
)
from cropmap.pipeline.levels.pixel import transfer
from cropmap.pipeline.levels.pixel.evaluate import calibration_of_seed, predict_samples
from cropmap.pipeline.levels.pixel.predict import predict_site
from cropmap.pipeline.levels.pixel.pretrain import pretrain_encoder
from cropmap.pipeline.levels.pixel.tensors import concat_samples, cube_bands, labelled_samples, unlabelled_samples
from cropmap.pipeline.levels.pixel.train import as_series, train_model
from cropmap.pipeline.levels.selection import BLEND, CandidateResult, candidate_table, choice_document, validation_outputs, validation_scores
from cropmap.pipeline.runner import Stage, StageContext
from cropmap.pipeline.samples import load_store, save_store
from cropmap.pipeline.sites import Candidate, Legend
from cropmap.pipeline.splits import ParcelSplit, split_for
from cropmap.pipeline.stages.maps import write_preview
from cropmap.pipeline.stages.stac import write_map_item

log = logging.getLogger(__name__)

PROTOCOL = (
    "Split: {split}. Pixel-level metrics on the test pixels only. Parcels (connected regions of one "
    "crop in the label raster) never straddle sides: about {test:.0%} of each "
    "class's parcels are held out for test, the rest train{val}; a class without a test "
    "parcel is train-only and not evaluated. Training uses at most {cap} random pixels per parcel. Repeated "
    "over split seeds {seeds}; figures are mean and sample standard deviation over the seeds; "
    "{class_rule}. The random forest baseline is trained "
    "on exactly the same pixels and evaluated on the same test pixels. {mapping}"
)


def pixel_stages(run: RunInputs) -> list[Stage]:
    """The pixel stages that follow ingest and labels."""
    site, year, legend, device = run.site, run.year, run.legend, run.device
    tiles, mapped, trained, cluster, common = run.tiles, run.mapped, run.trained, run.cluster, run.common
    transfer_from, compare_scratch, gee_src = run.transfer_from, run.compare_scratch, run.gee_source
    tr = site.training
    if run.epochs is not None:
        tr = tr.model_copy(update={"epochs": run.epochs})
    legend_doc = legend.model_dump()

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
            from cropmap.pipeline.levels.pixel import distributed

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

    def split_indices(samples, split: ParcelSplit, seed: int, cap: int | None = None) -> dict[str, np.ndarray]:
        """Train (at most ``cap``, default the site's ``max_pixels_per_parcel``, random pixels per parcel), val and test rows.

        A smaller cap keeps the first pixels of the same random draw: a candidate with fewer
        pixels per parcel trains on a subset of the others' pixels."""
        side = split.row_sides(samples.table)
        rng = np.random.default_rng(seed)
        keep = min(cap or tr.max_pixels_per_parcel, tr.max_pixels_per_parcel)
        train = []
        for _, g in samples.table[side == "train"].groupby("parcel_id"):
            idx = g.index.to_numpy()
            train.append(rng.choice(idx, size=min(tr.max_pixels_per_parcel, len(idx)), replace=False)[:keep])
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

    def fit_config(seed: int, cand: Candidate | None = None) -> FitConfig:
        c = cand or Candidate(model=tr.model if not tr.auto else "ltae")
        return FitConfig(epochs=c.epochs or tr.epochs, batch_size=c.batch_size or tr.batch_size, lr=c.lr or tr.lr,
                         max_len=c.max_len or tr.max_len, seed=seed,
                         device=device, class_weighting=tr.class_weighting, loss=tr.loss,
                         focal_gamma=tr.focal_gamma, patience=tr.patience, freeze_encoder=pretraining and pre.freeze_encoder,
                         augment=tr.augment())

    candidates = tr.candidate_list()
    trained_epochs = sum((c.epochs or tr.epochs) for c in candidates if c.model not in fitted_without_gradients())

    def train(ctx: StageContext) -> dict[str, str]:
        samples = load_store(ctx.upstream["tensors"]["samples"], mmap=False)
        encoder = ctx.upstream["pretrain"]["encoder"] if pretraining else None
        parcels = parcels_of(samples)
        models_dir, base_dir = ctx.path("models"), ctx.path("baselines")
        tick = ctx.progress("train", max(1, trained_epochs) * len(tr.split_seeds)) if ctx.progress else None
        blending = tr.auto and tr.blend and len(candidates) > 1
        report, results = {}, {c.model: CandidateResult(c.model) for c in candidates}
        blend_t: dict[str, dict] = {}
        if blending:
            results[BLEND] = CandidateResult(BLEND)
        for seed in tr.split_seeds:
            rows = samples.table[samples.table["parcel_id"].isin(parcels["parcel_id"])]
            split = split_for(rows, seed, tr.test_fraction, tr.val_fraction, tr.block_size_m if tr.split == "blocks" else None,
                              samples.class_names, parcels=parcels)
            idx = split_indices(samples, split, seed)
            classes = class_table(samples, idx["train"])
            y = encode_labels(samples, classes)
            test_ids = samples.table["sample_id"].to_numpy()[idx["test"]]
            seed_report = {"n_train": int(len(idx["train"])), "n_val": int(len(idx["val"])), "n_test": int(len(idx["test"])),
                           "train_only_classes": split.train_only}
            val_proba = {}
            for cand in candidates:
                out = models_dir / f"seed-{seed}" / cand.model if tr.auto else models_dir / f"seed-{seed}"
                train_idx = split_indices(samples, split, seed, cand.max_pixels_per_parcel)["train"] if cand.max_pixels_per_parcel else idx["train"]
                init = transfer.init_for_seed(transfer_from, seed) if transfer_from is not None else encoder
                meta = train_model(samples, train_idx, idx["val"], out, model_name=cand.model,
                                   model_options=cand.model_options, fit_config=fit_config(seed, cand), pretrained=init,
                                   extra_files={"split.json": split.to_dict()},
                                   extra_meta={"inputs": {"s1_window_days": site.tensors.s1_window_days}},
                                   on_epoch=(lambda row: tick(1)) if tick else None, early_stopping=not tr.auto)
                gradient = cand.model not in fitted_without_gradients()
                if tick and gradient:
                    tick((cand.epochs or tr.epochs) - meta["fit"]["epochs_run"])
                fit_row = {"best_epoch": meta["fit"]["best_epoch"], "seconds": meta["fit"]["seconds"], "n_train": int(len(train_idx))}
                if not tr.auto:
                    seed_report.update(fit_row)
                    continue
                seed_report[cand.model] = fit_row
                res = results[cand.model]
                res.seconds += float(meta["fit"]["seconds"])
                if len(idx["val"]):  # the choice reads the validation pixels' labels, never the test pixels'
                    proba_val, vmeta, aligned = predict_samples(out, samples.subset(idx["val"]), device)
                    y_val, val_parcels = encode_labels(aligned, vmeta["classes"]), aligned.table["parcel_id"].to_numpy()
                    res.validation.append({"seed": seed, **validation_scores(y_val, np.arange(len(y_val)), proba_val)})
                    res.outputs.append(validation_outputs(y_val, proba_val, val_parcels))
                    val_proba[cand.model] = proba_val  # raw: the blend is calibrated as a whole
                if cand.model in ("forest", "boosting"):  # the candidate is the baseline: its test predictions, once
                    proba_test, _, _ = predict_samples(out, samples.subset(idx["test"]), device)
                    write_baseline(base_dir / f"{cand.model}-seed-{seed}.parquet", "sample_id", test_ids, proba_test)
            if blending and len(val_proba) == len(candidates):
                # the mean of the members' raw probabilities; its own temperature (which cannot change its
                # arg-max, so not the choice) is fitted on the same validation pixels, every parcel weighted alike
                blend_val = np.mean(list(val_proba.values()), axis=0)
                results[BLEND].validation.append({"seed": seed, **validation_scores(y_val, np.arange(len(y_val)), blend_val)})
                results[BLEND].outputs.append(validation_outputs(y_val, blend_val, val_parcels))
                blend_t[str(seed)] = fit_temperature(blend_val, y_val, val_parcels)
            # the random-forest and boosting baselines on exactly the same training pixels and test pixels
            # (with auto they are candidates and were written above)
            missing = [k for k in ("forest", "boosting") if not (tr.auto and any(c.model == k for c in candidates))]
            if missing:
                feats = {k: binned_features(as_series(samples.subset(idx[k]))) for k in ("train", "val", "test")}
                if "forest" in missing:
                    write_forest_baseline(base_dir / f"forest-seed-{seed}.parquet", seed, feats["train"], y[idx["train"]], feats["test"],
                                          len(classes), "sample_id", test_ids)
                if "boosting" in missing:  # early stopping on the validation pixels
                    write_boosting_baseline(base_dir / f"boosting-seed-{seed}.parquet", seed, feats["train"], y[idx["train"]], feats["test"],
                                            len(classes), "sample_id", test_ids, feats["val"], y[idx["val"]])
            report[f"seed-{seed}"] = seed_report
        outputs = {"models": "models", "model": f"models/seed-{tr.split_seeds[0]}", "baselines": "baselines"}
        if tr.auto:
            doc = choice_document(list(results.values()), [c.model for c in candidates], tr.split_seeds,
                                  lambda s, m: f"models/seed-{s}/{m}", [c.model_dump() for c in candidates])
            winner, members = doc["winner"], doc["members"]
            if blend_t:
                doc["blend_calibration"] = blend_t
            write_json(models_dir / "choice.json", doc)
            report["choice"] = {"winner": winner, "reason": doc["reason"]}
            outputs.update(model=f"models/seed-{tr.split_seeds[0]}/{members[0]}", choice="models/choice.json")
        ctx.report.update(report)
        return outputs

    def predict(ctx: StageContext) -> dict[str, str]:
        cube_dir = ctx.upstream["ingest"]["cube"]
        model_dir = ctx.upstream["train"]["model"]
        model_name = tr.model
        map_kw_extra: dict = {}
        if "choice" in ctx.upstream["train"]:  # auto: the winner's split-seed models, averaged
            choice = json.loads(ctx.upstream["train"]["choice"].read_text())
            model_dir = [ctx.run_dir / d for d in choice["ensemble"]]
            if choice["winner"] == BLEND:  # per split seed: the raw mean of its members, scaled by the blend's own temperature
                k = len(choice["members"])
                map_kw_extra = {"groups": [list(range(i, i + k)) for i in range(0, len(model_dir), k)],
                                "group_temperatures": [choice["blend_calibration"][str(s)]["temperature"] for s in tr.split_seeds]}
            model_name = f"{choice['winner']} (auto: mean of {len(model_dir)} split-seed models{': ' + ', '.join(choice['members']) if choice['winner'] == BLEND else ''})"
        tick = ctx.progress("predict pixels", sum(_tile_pixels(cube_dir / f"{t}.zarr") for t, _ in mapped)) if ctx.progress else None
        map_args = (site, legend, [cube_dir / f"{t}.zarr" for t, _ in mapped], model_dir, ctx.path("map/crops.tif"),
                    ctx.path("map/confidence.tif"))
        map_kw = dict(device=device, tags={"site": site.name, "year": str(year), "model": model_name}, on_block=tick)
        if cluster is not None and cluster.distributed:
            from cropmap.pipeline.levels.pixel.distributed import cluster_client, predict_site_distributed

            with cluster_client(cluster) as client:
                summary = predict_site_distributed(*map_args, client=client, tiles_dir=ctx.path("tiles/predict"), retries=cluster.retries,
                                                   **map_kw, **map_kw_extra)
            summary["cluster"] = cluster.describe()
        else:
            summary = predict_site(*map_args, **map_kw, **map_kw_extra)
        windows = [(t["tile"], t) for t in summary["tiles"]]
        write_preview(ctx.path("map/crops.tif"), ctx.path("map/preview.png"), title=f"{site.name} {year}: crop map",
                      windows=[(name, (w["col_off"], w["row_off"], w["width"], w["height"])) for name, w in windows])
        write_map_item(ctx.path("map/crops.tif"), ctx.path("map/confidence.tif"), ctx.path("map/preview.png"),
                       item_id=f"{site.name}-{year}-crops", year=year, properties={"cropmap:site": site.name, "cropmap:model": model_name})
        ctx.report.update(summary)
        return {"map": "map/crops.tif", "confidence": "map/confidence.tif", "preview": "map/preview.png",
                "classes": "map/crops.tif.classes.json", "stac": "map/crops.stac.json"}

    def evaluate(ctx: StageContext) -> dict[str, str]:
        samples = load_store(ctx.upstream["tensors"]["samples"], mmap=False)
        models_dir, base_dir = ctx.upstream["train"]["models"], ctx.upstream["train"]["baselines"]
        choice = json.loads(ctx.upstream["train"]["choice"].read_text()) if "choice" in ctx.upstream["train"] else None
        runs, calibration = [], {}
        scored = {c["name"]: CandidateResult(c["name"], validation=c["validation"], seconds=c["seconds"]) for c in (choice or {}).get("candidates", [])}
        for seed in tr.split_seeds:
            seed_dir = models_dir / f"seed-{seed}"
            mdir = seed_dir / choice["members"][0] if choice else seed_dir
            split, test, evaluated = held_out(samples, mdir, samples.class_names)
            side = split.row_sides(samples.table)
            test_samples = samples.subset(test)
            val = np.nonzero(side == "val")[0]
            per_candidate = {}
            if choice is not None:  # every candidate on the same test pixels, after the choice (each predicted once)
                base = [n for n in scored if n != BLEND]
                test_p = {n: predict_samples(seed_dir / n, test_samples, device) for n in base}
            if choice is None or choice["winner"] != BLEND:
                proba, meta, aligned = test_p[choice["winner"]] if choice is not None else predict_samples(mdir, test_samples, device)
                model_m = metrics_for(aligned, proba, meta["classes"], evaluated)
                cal = calibration_of_seed(mdir, meta, samples.subset(val) if len(val) else None, proba, aligned, device)
            if choice is not None:
                aligned, classes = test_p[base[0]][2], test_p[base[0]][1]["classes"]
                for n in base:
                    per_candidate[n] = metrics_for(aligned, test_p[n][0], classes, evaluated)
                if BLEND in scored:
                    blend_raw = np.mean([p for p, _, _ in test_p.values()], axis=0)
                    per_candidate[BLEND] = metrics_for(aligned, blend_raw, classes, evaluated)
                    if choice["winner"] == BLEND:
                        model_m, meta = per_candidate[BLEND], test_p[base[0]][1]
                        cal = _blend_calibration(seed_dir, base, samples.subset(val) if len(val) else None, test_p, device,
                                                 choice["blend_calibration"][str(seed)]["temperature"])
                for n, m in per_candidate.items():
                    scored[n].test.append({"seed": seed, **{k: float(m[k]) for k in ("overall_accuracy", "macro_f1", "kappa")}})
                per_candidate = {n: {k: m[k] for k in ("overall_accuracy", "macro_f1", "kappa")} for n, m in per_candidate.items()}
            if cal is not None:
                calibration[f"seed-{seed}"] = cal
            baselines = baseline_metrics(base_dir, seed, "sample_id", test_samples, meta["classes"], evaluated, "pixels")
            runs.append({"seed": seed, "evaluated_classes": evaluated, "train_only_classes": split.train_only,
                         "parcels_per_class": split.parcels_per_class, "split": split.protocol, "blocks": split.blocks,
                         "pixels": {k: int((side == k).sum()) for k in ("train", "val", "test", "excluded")},
                         "model": model_m, **baselines, **({"candidates": per_candidate} if choice else {})})
        doc = _metrics_document(runs, tr, legend, choice)
        if choice:
            doc["choice"] = {k: choice[k] for k in ("winner", "members", "criterion", "reason", "ranking", "ensemble", "note", "bootstrap") if k in choice}
            doc["candidates"] = candidate_table(choice, list(scored.values()))
        if calibration:
            doc["calibration"] = summarize_calibration(calibration)
        write_json(ctx.path("metrics.json"), doc)
        ctx.report.update({k: doc[k] for k in ("overall_accuracy", "macro_f1", "kappa")},
                          baseline_overall_accuracy=doc["baseline"]["overall_accuracy"], comparison=doc["comparison"],
                          **({"winner": choice["winner"]} if choice else {}))
        return {"metrics": "metrics.json"}

    return [
        Stage("tensors", tensors, after=["ingest", "labels"], config={"tiles": trained, **site.tensors.model_dump(),
                                                                      **({"samples": site.gee.model_dump(include={"samples", "samples_per_class", "table_rows_per_tile",
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
    ]


def pixel_outputs(done: dict) -> dict[str, str]:
    """run.json ``outputs`` of the pixel level."""
    return {"map": done["predict"]["map"], "confidence": done["predict"]["confidence"], "preview": done["predict"]["preview"],
            "metrics": done["evaluate"]["metrics"], "model": done["train"]["model"], "report": done["report"]["report"],
            "samples": done["tensors"]["samples"], **({"stac": done["predict"]["stac"]} if "stac" in done["predict"] else {}),
            **({"encoder": done["pretrain"]["encoder"]} if "pretrain" in done else {}),
            **({"transfer": done["transfer"]["transfer"]} if "transfer" in done else {})}


def _tile_pixels(path: Path) -> int:
    c = open_cube(path)
    return int(c.sizes["y"] * c.sizes["x"])


def _blend_calibration(seed_dir: Path, names: list[str], val_samples, test_p: dict, device: str, temperature: float) -> dict:
    """ECE of the blend (the mean of its members' raw probabilities) before and after its own temperature."""
    from cropmap.models.calibration import seed_calibration

    def mean_and_labels(preds: dict) -> tuple[np.ndarray, np.ndarray]:
        aligned, classes = preds[names[0]][2], preds[names[0]][1]["classes"]
        return np.mean([p for p, _, _ in preds.values()], axis=0), encode_labels(aligned, classes)

    pt, yt = mean_and_labels(test_p)
    pv = yv = None
    if val_samples is not None and len(val_samples):
        pv, yv = mean_and_labels({n: predict_samples(seed_dir / n, val_samples, device) for n in names})
    return seed_calibration(temperature, pv, yv, pt, yt)


def _metrics_document(runs: list[dict], tr, legend: Legend, choice: dict | None = None) -> dict:
    split = runs[0].get("split", "parcel-disjoint")
    if choice:
        mapping = (f"The model is chosen among the candidates ({', '.join(r['name'] for r in choice['candidates'])}) by "
                   f"{choice['criterion']}, read on the validation pixels only (with auto the candidates train on fixed schedules: "
                   "no early stopping on the validation pixels, which only fit each model's temperature); every candidate is then "
                   "scored on the same test pixels. "
                   f"The map averages the probabilities of the winner's models of all split seeds ({len(choice['ensemble'])} models; "
                   "blend: every candidate's); "
                   "the figures are those of each seed's model on its own test pixels (the ensemble has no held-out pixels of its own).")
    else:
        mapping = f"The map is made with the model of seed {tr.split_seeds[0]}."
    protocol = PROTOCOL.format(
        split=split, class_rule=CLASS_SET_RULE, test=tr.test_fraction, cap=tr.max_pixels_per_parcel, seeds=tr.split_seeds, mapping=mapping,
        val=(f" (about {tr.val_fraction:.0%} of them held out for validation and early stopping where a class keeps three or more)"
             if tr.val_fraction > 0 else f" for a fixed {tr.epochs} epochs (no validation split)"))
    model = choice["winner"] if choice else tr.model
    return metrics_document(runs, protocol=protocol, head={"split": split, "model": model, **({"selection": "auto"} if choice else {}),
                                                           "pretraining": tr.pretrain.method},
                            baseline_model="random_forest (500 trees, depth 25, 30-day median features)")
