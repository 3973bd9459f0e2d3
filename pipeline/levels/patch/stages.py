"""The patch-level stages of ``cropmap run`` (``--level patch`` or the site's ``level: patch``).

ingest -> labels -> patch_tensors -> [patch_pretrain] -> patch_train -> patch_predict -> patch_evaluate -> report:

    samples/patches/          patch_tensors: labelled T x C x H x W patches of the training tiles (cropmap.patch-samples/1)
    pretrain/patch_encoder/   patch_pretrain (patch.pretrain.method: masked): STCLN masked spatiotemporal pre-training
                              on the site's patches (labels unused) plus patch.pretrain.extra_cubes
    patch_models/seed-<s>/    patch_train: one model per block-disjoint split seed (seed 0 maps)
    patch_baselines/          patch_train: random forest on the same training pixels, predictions on the test pixels
    map/crops.tif ...         patch_predict: sliding-window map (class COG, confidence COG, preview)
    metrics.json              patch_evaluate: held-out block metrics (mIoU with and without background), model vs forest
    report.html               report
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import rasterio

from cropmap.models.metrics import CLASS_SET_RULE
from cropmap.models.patch.training import PatchFitConfig
from cropmap.models.pretrain.masked import MaskedConfig
from cropmap.pipeline.cube import open_cube
from cropmap.pipeline.errors import StageError
from cropmap.pipeline.fsio import write_json
from cropmap.pipeline.levels import RunInputs
from cropmap.pipeline.levels.common import metrics_document, summary
from cropmap.pipeline.levels.patch.patches import (
    PatchSplit,
    budget_patches,
    concat_patches,
    cut_patches,
    load_patch_store,
    load_unlabelled,
    patch_split,
    save_patch_store,
    tile_composite,
)
from cropmap.pipeline.levels.patch.predict import predict_patch_site
from cropmap.pipeline.levels.patch.train import (
    evaluate_patch_model,
    pretrain_patch_encoder,
    seed_threads,
    segmentation_metrics,
    train_seed_with_forest,
)
from cropmap.pipeline.runner import Stage, StageContext
from cropmap.pipeline.stages.maps import write_preview

log = logging.getLogger(__name__)

PROTOCOL = (
    "Patch-level segmentation metrics on the pixels of held-out patches. Patches of {size} x {size} px are cut on a grid of "
    "the training tiles; whole blocks of {block} x {block} patches are assigned with a seeded shuffle: about {test:.0%} of the "
    "blocks are held out for test{val}, the rest train{budget}. Background policy '{background}': {policy} mIoU excludes "
    "background (STCLN's convention); mIoU with background (U-TAE's) is reported next to it. Macro F1 and mIoU average over the crop "
    "classes in the test reference or in the predictions (a predicted class absent from test counts 0). Model: {model}{pre}. Repeated "
    "over split seeds {seeds}; figures are mean and sample standard deviation over the seeds. The random forest baseline "
    "(30-day medians per pixel) is trained on up to {rf_pixels} pixels of the same training patches and tested on the same "
    "pixels. The map is made with the model of seed {seed0}, by {window} px sliding windows overlapping by {overlap} px (overlap cropped)."
)
RF_PIXELS = 5000


def patch_stages(run: RunInputs) -> list[Stage]:
    """The patch stages that follow ingest and labels."""
    site, year, legend, mapped, trained, device, epochs, common = (
        run.site, run.year, run.legend, run.mapped, run.trained, run.device, run.epochs, run.common)
    tr, pc = site.training, site.patch
    val_fraction = pc.split_val_fraction(tr)
    pre = pc.pretrain
    pretraining = pre.method != "none"
    n_epochs = epochs if epochs is not None else pc.epochs
    names = {c.code: c.name for c in legend.classes}
    dev = device

    def patch_tensors(ctx: StageContext) -> dict[str, str]:
        cube_dir, label_dir = ctx.upstream["ingest"]["cube"], ctx.upstream["labels"]["labels"]
        parts = []
        for tid, _ in trained:
            with rasterio.open(label_dir / f"{tid}_class.tif") as ds:
                classes = ds.read(1)
            comp = tile_composite(open_cube(cube_dir / f"{tid}.zarr"), pc.composite_days)
            parts.append(cut_patches(comp, pc.patch_size, classes, pc.block, names))
        ps = concat_patches(parts)
        save_patch_store(ps, ctx.path("samples/patches"))
        labelled = ps.labels > 0
        ctx.report.update(n_patches=len(ps), patch_size=pc.patch_size, dates=int(ps.x.shape[1]), blocks=int(ps.table["block"].nunique()),
                          labelled_pixel_fraction=round(float(labelled.mean()), 3),
                          valid_cell_fraction=round(float(ps.valid.mean()), 3),
                          per_class={names[int(c)]: int(n) for c, n in zip(*np.unique(ps.labels[labelled], return_counts=True))})
        return {"samples": "samples/patches"}

    def patch_pretrain(ctx: StageContext) -> dict[str, str]:
        store = ctx.upstream["patch_tensors"]["samples"]
        ps = load_unlabelled([store, *pre.resolved_cubes()], load_patch_store(store, labelled=False).bands, pc.patch_size)
        cfg = MaskedConfig(epochs=pre.epochs, batch_size=pre.batch_size, lr=pre.lr, mask_ratio=pre.mask_ratio, gate=pre.gate, device=dev)
        tick = ctx.progress("pretrain patches", pre.epochs) if ctx.progress else None
        meta = pretrain_patch_encoder(ps, ctx.path("pretrain/patch_encoder"), model_name=pc.model, model_options=pc.model_options,
                                      config=cfg, on_epoch=(lambda r: tick(1)) if tick else None)
        p = meta["pretrain"]
        ctx.report.update(n_patches=len(ps), extra_cubes=[str(c) for c in pre.resolved_cubes()], best_epoch=p["best_epoch"],
                          epochs_run=p["epochs_run"], seconds=p["seconds"], maskable_date_fraction=p["maskable_date_fraction"],
                          best_val_mse=min((r["val_mse"] for r in p["history"] if "val_mse" in r), default=None))
        return {"encoder": "pretrain/patch_encoder"}

    def split_for(ps, seed: int) -> tuple[PatchSplit, list[int]]:
        split = patch_split(ps.table, seed, tr.test_fraction, val_fraction)
        return split, budget_patches(ps.labels, split.train, pc.label_patches, seed)

    def patch_train(ctx: StageContext) -> dict[str, str]:
        ps = load_patch_store(ctx.upstream["patch_tensors"]["samples"])
        encoder = ctx.upstream["patch_pretrain"]["encoder"] if pretraining else None
        models_dir, base_dir = ctx.path("patch_models"), ctx.path("patch_baselines")
        tick = ctx.progress("train patches", n_epochs * len(tr.split_seeds)) if ctx.progress else None
        jobs = []
        for seed in tr.split_seeds:
            split, budget = split_for(ps, seed)
            cfg = PatchFitConfig(epochs=n_epochs, batch_size=pc.batch_size, lr=pc.lr, class_weighting=pc.class_weighting, seed=seed, device=dev)
            jobs.append((seed, dict(ps=ps, seed=seed, split=split.to_dict(), budget=budget, model_dir=models_dir / f"seed-{seed}",
                                    forest_path=base_dir / f"forest-seed-{seed}.npz", model_name=pc.model, model_options=pc.model_options,
                                    fit_config=cfg, background=pc.background, pretrained=encoder,
                                    extra_meta={"inputs": {"composite_days": pc.composite_days, "patch_size": pc.patch_size}},
                                    rf_pixels=RF_PIXELS)))
        workers, threads = seed_threads(len(jobs)) if dev == "cpu" else (1, None)
        t0 = time.perf_counter()
        if workers > 1:  # independent seeds on separate cores (spawned: no OpenMP state crosses a fork)
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = {seed: pool.submit(train_seed_with_forest, **kw, threads=threads) for seed, kw in jobs}
                report = {}
                for seed, fut in futures.items():
                    report[f"seed-{seed}"] = fut.result()
                    if tick:
                        tick(n_epochs)
        else:
            report = {f"seed-{seed}": train_seed_with_forest(**kw, threads=threads, on_epoch=(lambda r: tick(1)) if tick else None)
                      for seed, kw in jobs}
        report["parallel"] = {"worker_processes": workers, "torch_threads": threads, "seconds": round(time.perf_counter() - t0, 1)}
        ctx.report.update(report)
        return {"models": "patch_models", "model": f"patch_models/seed-{tr.split_seeds[0]}", "baselines": "patch_baselines"}

    def patch_predict(ctx: StageContext) -> dict[str, str]:
        cube_dir = ctx.upstream["ingest"]["cube"]
        tick = ctx.progress("predict tiles", len(mapped)) if ctx.progress else None
        summary = predict_patch_site(site, legend, [cube_dir / f"{t}.zarr" for t, _ in mapped], ctx.upstream["patch_train"]["model"],
                                     ctx.path("map/crops.tif"), ctx.path("map/confidence.tif"), window=pc.window, overlap=pc.overlap,
                                     composite_days=pc.composite_days, device=dev, on_tile=tick,
                                     tags={"site": site.name, "year": str(year), "model": pc.model, "level": "patch"})
        write_preview(ctx.path("map/crops.tif"), ctx.path("map/preview.png"), title=f"{site.name} {year}: patch crop map ({pc.model})",
                      windows=[(t["tile"], (t["col_off"], t["row_off"], t["width"], t["height"])) for t in summary["tiles"]])
        ctx.report.update(summary)
        return {"map": "map/crops.tif", "confidence": "map/confidence.tif", "preview": "map/preview.png", "classes": "map/crops.tif.classes.json"}

    def patch_evaluate(ctx: StageContext) -> dict[str, str]:
        ps = load_patch_store(ctx.upstream["patch_tensors"]["samples"])
        models_dir, base_dir = ctx.upstream["patch_train"]["models"], ctx.upstream["patch_train"]["baselines"]
        runs = []
        split_text = (f"spatial blocks of {pc.block} x {pc.block} patches of {pc.patch_size} px, whole blocks to train/val/test by a "
                      "seeded shuffle (no test patch shares a block with a training or validation patch)")
        for seed in tr.split_seeds:
            split = PatchSplit.from_dict(json.loads((models_dir / f"seed-{seed}" / "split.json").read_text()))
            model_m = evaluate_patch_model(models_dir / f"seed-{seed}", ps, split.test, dev, pc.background)
            base = np.load(base_dir / f"forest-seed-{seed}.npz")
            if list(base["test"]) != list(split.test):
                raise StageError(f"baseline predictions of seed {seed} do not match its test patches", fix="rerun with --force")
            sub = ps.subset(split.test)
            keep = sub.valid.any(1) & ((sub.labels > 0) if pc.background == "void" else True)
            evaluated = sorted(int(c) for c in np.unique(sub.labels[keep]) if c > 0)
            base_m = segmentation_metrics(sub.labels, base["codes"], keep, names, evaluated)
            boost_path = base_dir / f"boosting-seed-{seed}.npz"
            boost_m = {}
            if boost_path.is_file():
                boost = np.load(boost_path)
                if list(boost["test"]) != list(split.test):
                    raise StageError(f"boosting predictions of seed {seed} do not match its test patches", fix="rerun with --force")
                boost_m = {"boosting": segmentation_metrics(sub.labels, boost["codes"], keep, names, evaluated)}
            runs.append({"seed": seed, "evaluated_classes": [names[c] for c in evaluated], "train_only_classes": [],
                         "split": split_text, "blocks": {k: int(ps.table["block"].iloc[getattr(split, k)].nunique()) for k in ("train", "val", "test")},
                         "n_test_patches": len(split.test), "model": model_m, "baseline": base_m, **boost_m})
        model, base = summary([r["model"] for r in runs]), summary([r["baseline"] for r in runs])
        boosted = summary([r["boosting"] for r in runs]) if all("boosting" in r for r in runs) else None
        for doc, key in ((model, "model"), (base, "baseline"), *(((boosted, "boosting"),) if boosted is not None else ())):
            vals = [r[key]["miou_with_background"] for r in runs]
            doc["miou_with_background"] = round(float(np.mean(vals)), 4)
            doc["miou_with_background_std"] = round(float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, 4)
        policy = ("label 0 and unobserved pixels are void (ignored in loss and metrics), so both mIoUs are equal;"
                  if pc.background == "void" else "label 0 on observed pixels is a trained and evaluated background class;")
        protocol = PROTOCOL.format(size=pc.patch_size, block=pc.block, test=tr.test_fraction,
                                        val=f", about {val_fraction:.0%} for validation (best validation OA)" if val_fraction > 0 else
                                        f" (no validation: a fixed {n_epochs} epochs)",
                                        budget=f", of which {pc.label_patches} labelled patches are used (label budget)" if pc.label_patches else "",
                                        background=pc.background, policy=policy, model=pc.model,
                                        pre=" fine-tuned from masked spatiotemporal pre-training" if pretraining else " from scratch",
                                        seeds=tr.split_seeds, rf_pixels=RF_PIXELS, seed0=tr.split_seeds[0], window=pc.window, overlap=pc.overlap)
        head = {"level": "patch", "model": pc.model, "pretraining": pre.method, "background_policy": pc.background, "split": split_text,
                "class_set_rule": CLASS_SET_RULE + "; background (code 0) excluded except in the *_with_background figures"}
        doc = metrics_document(runs, protocol=protocol, head=head, model_summary=model, baseline_summary=base, boosting_summary=boosted,
                               baseline_model="random_forest (200 trees, depth 25, 30-day median features per pixel)")
        write_json(ctx.path("metrics.json"), doc)
        ctx.report.update({k: doc[k] for k in ("overall_accuracy", "macro_f1", "miou", "miou_with_background")},
                          baseline_overall_accuracy=doc["baseline"]["overall_accuracy"], comparison=doc["comparison"])
        return {"metrics": "metrics.json"}

    pcfg = {"patch": pc.model_dump(), "epochs": n_epochs}
    return [
        Stage("patch_tensors", patch_tensors, after=["ingest", "labels"],
              config={"tiles": trained, "patch_size": pc.patch_size, "block": pc.block, "composite_days": pc.composite_days}),
        *([Stage("patch_pretrain", patch_pretrain, after=["patch_tensors"], inputs=pre.resolved_cubes(),
                 config={"pretrain": pre.model_dump(), "model": pc.model, "model_options": pc.model_options})] if pretraining else []),
        Stage("patch_train", patch_train, after=["patch_tensors", *(["patch_pretrain"] if pretraining else [])],
              config={**pcfg, "seeds": tr.split_seeds, "test_fraction": tr.test_fraction, "val_fraction": val_fraction}),
        Stage("patch_predict", patch_predict, after=["ingest", "patch_train"],
              config={**common, "tiles": mapped, "extent": list(site.extent), "crs": site.crs, "legend": legend.model_dump()}),
        Stage("patch_evaluate", patch_evaluate, after=["patch_tensors", "patch_train"], config={"seeds": tr.split_seeds}),
    ]


def patch_outputs(done: dict) -> dict[str, str]:
    """run.json ``outputs`` of the patch path (the pixel path's keys)."""
    p = done["patch_predict"]
    return {"map": p["map"], "confidence": p["confidence"], "preview": p["preview"], "metrics": done["patch_evaluate"]["metrics"],
            "model": done["patch_train"]["model"], "report": done["report"]["report"], "samples": done["patch_tensors"]["samples"],
            **({"encoder": done["patch_pretrain"]["encoder"]} if "patch_pretrain" in done else {})}
