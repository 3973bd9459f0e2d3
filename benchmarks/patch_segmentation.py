"""Patch segmentation on the demo site: STCLN from scratch, STCLN after masked pre-training, U-TAE;
label budgets x split seeds; and the activation memory of the STA head against the patch size.

Usage (CPU, one thread):
    python benchmarks/patch_segmentation.py [--budgets 2 8 all] [--seeds 0 1] [--epochs 20] [--pretrain-epochs 15]
    python benchmarks/patch_segmentation.py --memory-only

Data (real): the three demo tiles (64 x 64 px, S2 + S1, parcel labels), composited on 15-day
bins, cut into 16 x 16 px patches (48); whole blocks of 2 x 2 patches are split per seed
(about 30 % of the blocks test, the rest train, no validation: fixed schedule). A label budget
keeps N labelled training patches (seeded draw; ``all`` = every training patch). Background
policy ``class``: label 0 (outside the registry's parcels) is a background class, so mIoU is
reported without background (STCLN's convention) and with it (U-TAE's); OA and macro F1 count
background as a class.

Pre-training: masked spatiotemporal reconstruction (mask ratio 0.4, no vegetation gate) of an
STCLN, once (seed 0), on every demo patch *and* the unlabelled WorldCereal Belgian cube
(``belgium_cube_*_preprocessed_inputs.nc``: 100 x 100 px, 12 monthly composites, 36 patches).
It sees the test patches' inputs but never a label (the setting of mapping a site, where every
pixel is unlabelled input). Fine-tuning starts from it with the same schedule as from scratch.
Deep models train for ``--epochs`` epochs and at least ``--min-steps`` optimiser steps.

Memory: the activation memory (bytes of the tensors saved for backward, exact) of one
forward + backward of the STA head, windowed (8 x 8 windows) and full (HW x HW; measured up to
64 px, extrapolated beyond), and of the whole STCLN, at 16 / 32 / 64 / 128 px, batch 1, T = 24,
plus the process's peak RSS growth for the windowed head (one fresh process per size).

Rows are appended to ``benchmarks/results/patch_segmentation.jsonl`` (reruns skip what is there).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "patch_segmentation.jsonl"
WORLDCEREAL = Path("/work/shared/data/worldcereal/points/belgium_cube_2020-11_2021-10_preprocessed_inputs.nc")
STCLN_OPTS = {"conv_dim": 16, "d_model": 32, "n_heads": 4, "n_layers": 2, "d_ff": 64, "sta_dim": 4, "sta_window": 8}


def demo_patches(background_size: int = 16):
    from cropmap.pipeline.ingest.local import read_label_raster, read_tile
    from cropmap.pipeline.levels.patch.patches import concat_patches, cut_patches, tile_composite
    from cropmap.pipeline.sites import load_legend, load_site
    from cropmap.pipeline.stages.labels import tile_labels

    site = load_site("demo")
    legend = load_legend(site.legend)
    names = {c.code: c.name for c in legend.classes}
    parts = []
    for i, t in enumerate(site.local.tiles):
        cube, _ = read_tile(site, t.id, t.year)
        codes, grid = read_label_raster(site, t.id)
        tl = tile_labels(codes, legend, tile=t.id, tile_index=i, year=t.year, transform=grid.transform)
        parts.append(cut_patches(tile_composite(cube, 15), background_size, tl.classes, 2, names))
    return concat_patches(parts)


def done_keys() -> set:
    if not OUT.exists():
        return set()
    return {json.dumps(json.loads(line)["key"]) for line in OUT.read_text().splitlines() if line.strip()}


def append(row: dict) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("a") as f:
        f.write(json.dumps(row) + "\n")


def accuracy(args) -> None:
    from cropmap.models.patch.training import PatchFitConfig
    from cropmap.models.pretrain.masked import MaskedConfig
    from cropmap.pipeline.levels.patch.patches import budget_patches, concat_patches, cut_patches, netcdf_composite, patch_split
    from cropmap.pipeline.levels.patch.train import evaluate_patch_model, pretrain_patch_encoder, train_patch_model

    ps = demo_patches()
    done = done_keys()
    work = Path(tempfile.mkdtemp(prefix="patchbench-"))
    enc = work / "encoder"
    pre_meta = None

    def encoder():
        nonlocal pre_meta
        if pre_meta is None:
            unl = ps.subset(range(len(ps)))
            unl.labels = None
            wc = cut_patches(netcdf_composite(WORLDCEREAL, ps.bands), 16)
            pool = concat_patches([unl, wc])
            t0 = time.perf_counter()
            pre_meta = pretrain_patch_encoder(pool, enc, model_name="stcln", model_options=STCLN_OPTS,
                                              config=MaskedConfig(epochs=args.pretrain_epochs, batch_size=4, lr=1e-3, mask_ratio=0.4, seed=0))
            p = pre_meta["pretrain"]
            print(f"pre-trained on {len(pool)} patches ({len(ps)} demo + {len(wc)} WorldCereal) in {time.perf_counter() - t0:.0f} s, "
                  f"best epoch {p['best_epoch']}, val masked MSE {min(r['val_mse'] for r in p['history']):.4f} "
                  f"(epoch 1: {p['history'][0]['val_mse']:.4f})", flush=True)
        return enc

    for seed in args.seeds:
        split = patch_split(ps.table, seed, 0.3, 0.0)
        for budget in args.budgets:
            n = None if budget == "all" else int(budget)
            train = budget_patches(ps.labels, split.train, n, seed)
            for variant in ("stcln", "stcln+masked", "utae"):
                key = {"variant": variant, "budget": budget, "seed": seed, "epochs": args.epochs, "pretrain_epochs": args.pretrain_epochs}
                if json.dumps(key) in done:
                    continue
                model = "utae" if variant == "utae" else "stcln"
                steps = math.ceil(len(train) / 4)
                epochs = max(args.epochs, math.ceil(args.min_steps / steps))
                cfg = PatchFitConfig(epochs=epochs, batch_size=4, lr=1e-3, seed=seed, class_weighting="sqrt")
                t0 = time.perf_counter()
                out = work / f"{variant}-{budget}-{seed}"
                meta = train_patch_model(ps, train, [], out, model_name=model, model_options=STCLN_OPTS if model == "stcln" and variant == "stcln" else {},
                                         fit_config=cfg, background="class", pretrained=encoder() if variant == "stcln+masked" else None)
                seconds = time.perf_counter() - t0
                m = evaluate_patch_model(out, ps, split.test)
                row = {"key": key, "n_train_patches": len(train), "n_test_patches": len(split.test), "epochs_run": epochs,
                       "train_seconds": round(seconds, 1), "n_parameters": meta["n_parameters"],
                       **{k: round(m[k], 4) for k in ("overall_accuracy", "kappa", "macro_f1", "miou", "miou_with_background")},
                       "per_class_iou": {k: round(v["iou"], 4) for k, v in m["per_class"].items()}}
                append(row)
                print(f"seed {seed} budget {budget:>3} {variant:<13} OA {row['overall_accuracy']:.3f} mIoU {row['miou']:.3f} "
                      f"(with bg {row['miou_with_background']:.3f}) mF1 {row['macro_f1']:.3f}  [{seconds:.0f} s]", flush=True)


def saved_bytes(fn, *args) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    out.float().sum().backward()
    return total


def sta_inputs(size: int, t: int = 24, d: int = 32):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, t, size, size, d, generator=g, requires_grad=True)
    f = torch.randn(1, t, size, size, d, generator=g, requires_grad=True)
    valid = torch.ones(1, t, size, size, dtype=torch.bool)
    return h, f, valid


def rss_child(size: int) -> None:
    """Run in a fresh process: peak RSS growth (KiB) of one windowed STA forward + backward."""
    from cropmap.models.patch.stcln import STAHead

    torch.set_num_threads(1)
    head = STAHead(32, 16, 7, 4, 8)
    h, f, valid = sta_inputs(size)
    base = vm_hwm_kib()
    head(h, f, valid).sum().backward()
    print(vm_hwm_kib() - base)


def vm_hwm_kib() -> int:
    """This process's peak RSS (VmHWM; unlike ru_maxrss it is not inherited from the parent across fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory(args) -> None:
    from cropmap.models.patch.checkpoint import build_patch_model
    from cropmap.models.patch.stcln import STAHead

    done = done_keys()
    for size in (16, 32, 64, 128):
        key = {"memory": "sta", "size": size}
        if json.dumps(key) in done:
            continue
        torch.manual_seed(0)
        windowed = STAHead(32, 16, 7, 4, 8)
        row = {"key": key, "T": 24, "d_model": 32, "sta_dim": 4, "sta_window": 8}
        row["sta_windowed_bytes"] = saved_bytes(windowed, *sta_inputs(size))
        if size <= 64:
            full = STAHead(32, 16, 7, 4, size)  # one window = the whole patch: the original HW x HW attention
            row["sta_full_bytes"] = saved_bytes(full, *sta_inputs(size))
        else:
            row["sta_full_bytes_extrapolated"] = None  # filled below from the 64 px measurement (x (HW)^2)
        m, _ = build_patch_model("stcln", bands=[f"b{i}" for i in range(12)], n_classes=7, mean=[0.0] * 12, std=[1.0] * 12, **STCLN_OPTS)
        x = torch.randn(1, 24, 12, size, size)
        days = torch.arange(24, dtype=torch.float32)[None] * 15
        valid = torch.ones(1, 24, size, size, dtype=torch.bool)
        row["stcln_total_bytes"] = saved_bytes(m, x, days, valid)
        rss = subprocess.run([sys.executable, __file__, "--rss-child", str(size)], capture_output=True, text=True, check=True)
        row["sta_windowed_peak_rss_growth_kib"] = int(rss.stdout.strip().splitlines()[-1])
        append(row)
    rows = [json.loads(line) for line in OUT.read_text().splitlines() if '"memory"' in line]
    ref = next(r for r in rows if r["key"]["size"] == 64)
    print("\nSTA head activation memory, forward + backward, batch 1, T = 24, d_model 32 (MiB):")
    print(f"{'patch':>7} {'windowed 8x8':>13} {'full HW x HW':>13} {'whole STCLN':>12} {'peak RSS +':>11}")
    for r in sorted(rows, key=lambda r: r["key"]["size"]):
        s = r["key"]["size"]
        full = r.get("sta_full_bytes") or ref["sta_full_bytes"] * (s * s / 64 ** 2) ** 2
        mark = "" if "sta_full_bytes" in r else " (extrap.)"
        print(f"{s:>4} px {r['sta_windowed_bytes'] / 2**20:>13.1f} {full / 2**20:>13.1f}{mark} {r['stcln_total_bytes'] / 2**20:>12.1f} "
              f"{r['sta_windowed_peak_rss_growth_kib'] / 1024:>11.1f}")


def table() -> None:
    rows = [json.loads(line) for line in OUT.read_text().splitlines() if line.strip() and '"variant"' in line]
    if not rows:
        return
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["key"]["budget"], r["key"]["variant"]), []).append(r)
    order = {"stcln": 0, "stcln+masked": 1, "utae": 2}
    print("\nHeld-out blocks of the demo (mean ± sd over seeds; background policy 'class'):")
    print(f"{'budget':>7} {'model':<13} {'seeds':>5} {'mIoU (no bg)':>14} {'mIoU (with bg)':>15} {'OA':>13} {'macro F1':>13}")

    def ms(v):
        return f"{np.mean(v):.3f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.3f}"

    for (budget, variant), g in sorted(groups.items(), key=lambda kv: (999 if kv[0][0] == "all" else int(kv[0][0]), order[kv[0][1]])):
        n = g[0]["n_train_patches"] if budget != "all" else f"all({g[0]['n_train_patches']})"
        print(f"{n!s:>7} {variant:<13} {len(g):>5} {ms([r['miou'] for r in g]):>14} {ms([r['miou_with_background'] for r in g]):>15} "
              f"{ms([r['overall_accuracy'] for r in g]):>13} {ms([r['macro_f1'] for r in g]):>13}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", nargs="+", default=["2", "8", "all"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--min-steps", type=int, default=60)
    ap.add_argument("--pretrain-epochs", type=int, default=15)
    ap.add_argument("--memory-only", action="store_true")
    ap.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.rss_child:
        rss_child(args.rss_child)
        return
    memory(args)
    if not args.memory_only:
        accuracy(args)
    table()


if __name__ == "__main__":
    main()
