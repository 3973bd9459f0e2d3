"""Prediction throughput (pixels/s): the reference (old) and vectorised (new) series + inference paths, side by side.

Usage:  python benchmarks/throughput.py [--tile-px 128] [--s2-dates 36] [--s1-dates 30] [--threads 1] [--models ...]
                                        [--json benchmarks/results/throughput.json]

On one generated tile of the state-like synthetic site (:mod:`cropmap.pipeline.synthetic`, the
ingest stage's zarr format; 36 Sentinel-2 and 30 Sentinel-1 dates by default, like a season of
raw acquisitions) it measures, in one process with ``--threads`` torch threads, every figure for
the OLD path and the NEW path in the same run (timings alternate old / new, so a change of machine
load hits both), as wall-clock pixels/s and as pixels per CPU-second (the process's CPU time,
reader thread included: on a loaded shared machine wall time understates what a core does):

* **matmul**: fp32 2048^3 ``torch.mm`` GFLOP/s, the hardware limit (``benchmarks/speed.py``);
* **read**: opening the tile cube and decompressing every variable: the I/O limit (OLD through
  xarray + dask, NEW with zarr directly, as the new reader does);
* **series** (no model), from cube chunks to the model's padded batches: OLD = :func:`cube_series`
  on each row block of the lazily opened cube (as the predict stage did: each 32-row block re-reads
  its zarr chunk), then ``predict_proba``'s batch building (interleaved views per pixel,
  ``pad_batch`` per view); NEW = chunk-aligned strips
  decompressed once, :func:`~cropmap.pipeline.levels.pixel.predict.dense_block` and
  :func:`~cropmap.models.inference.dense_views` per block (the model's padded, length-sorted
  batches). Also **series only** (cube already decoded in memory): the cost of building series itself;
* per model, **predict**: OLD = :meth:`TilePredictor.rows_reference` per block (cube_series +
  ``predict_proba``: a Python loop per pixel and per view, fused attention kernel), NEW =
  :meth:`TilePredictor.blocks` (prefetching reader thread, bucketed batches, ``inference_mode``,
  plain attention ops on CPU); untrained weights (the cost does not depend on them); FLOPs per
  pixel (``torch.utils.flop_counter`` on the new path) give GFLOP/s and the fraction of the matmul limit;
* **merge**: the distributed parent's serial part per pixel, copying a tile part (2-band float32
  GeoTIFF) into the site :class:`MapWriter`, plus the overviews + COG conversion at the end.

The figures feed ``benchmarks/iowa_projection.py`` through ``--json`` (the NEW path's figures).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import matmul_gflops  # noqa: E402

from cropmap.models.checkpoint import save_model  # noqa: E402
from cropmap.models.registry import build_model, fitted_without_gradients, model_names  # noqa: E402
from cropmap.models.series import Series, interleaved_views, pad_batch  # noqa: E402
from cropmap.pipeline.cube import open_cube  # noqa: E402
from cropmap.pipeline.levels.pixel.predict import ROWS_PER_BLOCK, TilePredictor, _strip_rows, strip_reader  # noqa: E402
from cropmap.pipeline.levels.pixel.tensors import cube_bands, cube_series  # noqa: E402
from cropmap.pipeline.synthetic import CLASSES, make_synthetic_site  # noqa: E402


def timed(fn, min_seconds: float, warm=None) -> tuple[float, float, int]:
    """Wall and CPU seconds per call of ``fn`` (repeated until ``min_seconds``), and the number of calls."""
    (warm or fn)()  # warm-up (imports, allocator, caches)
    t, c, n = time.perf_counter(), time.process_time(), 0
    while n < 1 or time.perf_counter() - t < min_seconds:
        fn()
        n += 1
    return (time.perf_counter() - t) / n, (time.process_time() - c) / n, n


def matmul_gflops_cpu(n: int = 2048, repeats: int = 5) -> float:
    """fp32 ``torch.mm`` GFLOP per CPU-second of this process (the limit the per-CPU-second model rates are compared with)."""
    x, y = torch.randn(n, n), torch.randn(n, n)
    x @ y
    c = time.process_time()
    for _ in range(repeats):
        x @ y
    return 2 * n**3 * repeats / (time.process_time() - c) / 1e9


def paired(old, new, min_seconds: float, rounds: int = 2, warm_old=None, warm_new=None) -> dict[str, float]:
    """Old and new timed in alternation (``rounds`` times each, best round kept): wall and CPU seconds per call."""
    (warm_old or old)()
    (warm_new or new)()
    best = {"old_wall": float("inf"), "old_cpu": float("inf"), "new_wall": float("inf"), "new_cpu": float("inf")}
    for _ in range(rounds):
        for key, fn in (("old", old), ("new", new)):
            w, c, _ = timed(fn, min_seconds / rounds, warm=lambda: None)
            best[f"{key}_wall"], best[f"{key}_cpu"] = min(best[f"{key}_wall"], w), min(best[f"{key}_cpu"], c)
    return best


def model_dir(root: Path, name: str, bands: list[str], max_len: int) -> Path:
    torch.manual_seed(0)
    model, config = build_model(name, bands=bands, n_classes=len(CLASSES), mean=[0.0] * len(bands), std=[1.0] * len(bands))
    d = root / f"model-{name}"
    d.mkdir(parents=True, exist_ok=True)
    save_model(d, model, {"model": name, "model_config": config, "bands": bands,
                          "normalisation": {"mean": [0.1] * len(bands), "std": [0.1] * len(bands)},
                          "classes": [{"index": i, "label": c, "name": n} for i, (c, n, _) in enumerate(CLASSES)], "max_len": max_len})
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tile-px", type=int, default=128)
    ap.add_argument("--s2-dates", type=int, default=36)
    ap.add_argument("--s1-dates", type=int, default=30)
    ap.add_argument("--max-len", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--min-seconds", type=float, default=3.0)
    ap.add_argument("--models", nargs="+", default=[n for n in model_names("pixel") if n not in fitted_without_gradients()])
    ap.add_argument("--merge-px", type=int, default=2048, help="Side of the map the merge is measured on.")
    ap.add_argument("--work", type=Path, default=None, help="Where the generated tile goes (default: a temporary folder).")
    ap.add_argument("--json", type=Path, default=None, help="Also write the figures here (input of iowa_projection.py).")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tmp = tempfile.TemporaryDirectory(prefix="cropmap-throughput-")
    work = a.work or Path(tmp.name)
    site = make_synthetic_site(work / "site", tiles_x=1, tiles_y=1, tile_px=a.tile_px, s2_dates=a.s2_dates, s1_dates=a.s1_dates)
    cube_path = site.cube(site.tiles[0])
    px = a.tile_px**2
    rows = ROWS_PER_BLOCK
    peak_wall = matmul_gflops("cpu")
    peak = matmul_gflops_cpu()  # per CPU-second, like the models' figures below: load-independent
    print(f"CPU, {a.threads} torch thread(s) (os.cpu_count() = {os.cpu_count()}); torch {torch.__version__}; "
          f"fp32 matmul 2048^3: {peak_wall:.1f} GFLOP/s wall, {peak:.1f} GFLOP per CPU-s")
    print(f"tile: {a.tile_px} x {a.tile_px} px, {a.s2_dates} S2 dates x 10 bands + {a.s1_dates} S1 dates x 2 bands "
          f"(synthetic, zarr as ingested); row blocks of {rows}; model max_len {a.max_len}\n")

    def read_all():
        c = open_cube(cube_path)
        for v in ("s2", "s2_clear", "s1"):
            c[v].values  # noqa: B018 - decompress

    def read_zarr():
        strip_reader(open_cube(cube_path))(0, a.tile_px)

    bands = cube_bands(open_cube(cube_path))
    probe = TilePredictor(site.legend(), model_dir(work, "tempcnn", bands, a.max_len), "cpu")

    def old_batches(values, days, lengths):
        """The reference path's batch building (predict_proba without the model): views per pixel, pad_batch."""
        has = lengths > 0
        series = Series(values[np.repeat(has, lengths)], days[np.repeat(has, lengths)], np.concatenate([[0], np.cumsum(lengths[has])]))
        picks = [series.offsets[i] + view for i in range(len(series)) for view in interleaved_views(int(series.lengths[i]), a.max_len)]
        for s0 in range(0, len(picks), 2048):
            pad_batch(series, picks[s0:s0 + 2048], probe.mean, probe.std)

    def series_old():
        c = open_cube(cube_path)
        for r0 in range(0, a.tile_px, rows):
            old_batches(*cube_series(c, rows=slice(r0, min(a.tile_px, r0 + rows))))

    def series_new():
        c = open_cube(cube_path)
        d2, d1 = probe._days(c)
        strip, read = _strip_rows(c, rows), strip_reader(c)
        for s0 in range(0, a.tile_px, strip):
            dn, clear, s1 = read(s0, min(a.tile_px, s0 + strip))
            for r0 in range(0, dn.shape[2], rows):
                sl = slice(r0, r0 + rows)
                probe.prepare(dn[:, :, sl], clear[:, sl], s1[:, :, sl], d2, d1)

    mem = open_cube(cube_path).load()  # decoded: the series-building cost alone
    arrays = (mem["s2"].values, mem["s2_clear"].values, mem["s1"].values)
    d2m, d1m = probe._days(mem)

    def only_old():
        for r0 in range(0, a.tile_px, rows):
            old_batches(*cube_series(mem, rows=slice(r0, min(a.tile_px, r0 + rows))))

    def only_new():
        for r0 in range(0, a.tile_px, rows):
            sl = slice(r0, r0 + rows)
            probe.prepare(arrays[0][:, :, sl], arrays[1][:, sl], arrays[2][:, :, sl], d2m, d1m)

    t_read, c_read, _ = timed(read_all, a.min_seconds)
    t_zread, c_zread, _ = timed(read_zarr, a.min_seconds)
    ser = paired(series_old, series_new, a.min_seconds)
    only = paired(only_old, only_new, a.min_seconds)
    _, _, lengths = cube_series(mem, rows=slice(0, rows))
    figures = {"threads": a.threads, "cpu_count": os.cpu_count(), "torch": torch.__version__, "matmul_gflops": peak, "matmul_gflops_wall": peak_wall,
               "tile_px": a.tile_px, "s2_dates": a.s2_dates, "s1_dates": a.s1_dates, "max_len": a.max_len,
               "mean_observations_per_pixel": float(lengths.mean()), "load_before": os.getloadavg(),
               "read_px_s": px / t_read, "read_px_cpu_s": px / c_read, "read_zarr_px_s": px / t_zread, "read_zarr_px_cpu_s": px / c_zread,
               "old_read_series_px_s": px / ser["old_wall"], "read_series_px_s": px / ser["new_wall"],
               "old_read_series_px_cpu_s": px / ser["old_cpu"], "read_series_px_cpu_s": px / ser["new_cpu"],
               "old_series_only_px_s": px / only["old_wall"], "series_only_px_s": px / only["new_wall"],
               "old_series_only_px_cpu_s": px / only["old_cpu"], "series_only_px_cpu_s": px / only["new_cpu"], "models": {}}

    def line(what: str, old: float, new: float, old_c: float, new_c: float, note: str = "") -> None:
        print(f"| {what} | {old:,.0f} | {new:,.0f} | **{new / old:.1f}x** | {old_c:,.0f} | {new_c:,.0f} | **{new_c / old_c:.1f}x** | {note} |", flush=True)

    print(f"load average before: {os.getloadavg()[0]:.1f}\n")
    print("| stage | OLD px/s | NEW px/s | NEW/OLD | OLD px/CPU-s | NEW px/CPU-s | NEW/OLD (CPU) | note |\n|---|---|---|---|---|---|---|---|")
    line("read cube (decompress all variables; OLD xarray + dask, NEW zarr)", px / t_read, px / t_zread, px / c_read, px / c_zread, "I/O limit")
    line("read + series (to padded model batches)", px / ser["old_wall"], px / ser["new_wall"], px / ser["old_cpu"], px / ser["new_cpu"],
         f"the most any model can map; mean {lengths.mean():.1f} observations per pixel")
    line("series only (cube decoded in memory)", px / only["old_wall"], px / only["new_wall"], px / only["old_cpu"], px / only["new_cpu"],
         "series-building cost alone")

    print("\n| model | OLD predict px/s | NEW predict px/s | NEW/OLD | OLD px/CPU-s | NEW px/CPU-s | NEW/OLD (CPU) | MFLOP/px | NEW GFLOP/s per CPU-s (% of matmul) | NEW % of read + series |"
          "\n|---|---|---|---|---|---|---|---|---|---|")
    for name in a.models:
        predictor = TilePredictor(site.legend(), model_dir(work, name, bands, a.max_len), "cpu")

        def old(predictor=predictor):
            cube = open_cube(cube_path)
            for r0 in range(0, a.tile_px, rows):
                predictor.rows_reference(cube, r0, min(a.tile_px, r0 + rows))

        def new(predictor=predictor):
            for _ in predictor.blocks(open_cube(cube_path), rows):
                pass

        warm_old = lambda predictor=predictor: predictor.rows_reference(open_cube(cube_path), 0, rows)  # noqa: E731
        warm_new = lambda predictor=predictor: predictor.rows(open_cube(cube_path), 0, rows)  # noqa: E731
        with FlopCounterMode(display=False) as fc:  # the new path runs without the fused attention kernel the counter cannot see
            predictor.rows(open_cube(cube_path), 0, rows)
        mflop_px = fc.get_total_flops() / (rows * a.tile_px) / 1e6
        t = paired(old, new, a.min_seconds, rounds=1, warm_old=warm_old, warm_new=warm_new)
        o, n_, oc, nc = px / t["old_wall"], px / t["new_wall"], px / t["old_cpu"], px / t["new_cpu"]
        gf = mflop_px * 1e6 * nc / 1e9
        figures["models"][name] = {"predict_px_s": n_, "predict_px_cpu_s": nc, "old_predict_px_s": o, "old_predict_px_cpu_s": oc,
                                   "mflop_per_px": mflop_px, "gflops": gf, "matmul_fraction": gf / peak}
        counted = f"{gf:.1f} ({100 * gf / peak:.0f} %)" if mflop_px > 0 else "(not counted)"
        print(f"| {name} | {o:,.0f} | {n_:,.0f} | **{n_ / o:.2f}x** | {oc:,.0f} | {nc:,.0f} | **{nc / oc:.2f}x** | {mflop_px:.2f} | {counted} | "
              f"{100 * nc / (px / ser['new_cpu']):.0f} % |", flush=True)

    # the distributed parent's serial share: part -> MapWriter, then overviews + COG
    from rasterio.windows import Window

    from cropmap.pipeline.levels.pixel.distributed import TileJob, TileLedger, predict_tile, run_tiled
    from cropmap.pipeline.levels.pixel.predict import map_classes, site_grid
    from cropmap.pipeline.stages.maps import MapWriter

    ledger = TileLedger(work / "parts", ".tif")
    name = "tempcnn" if "tempcnn" in a.models else a.models[0]
    run_tiled(None, predict_tile, [TileJob(site.tiles[0], "bench", (site.site(), site.legend(), cube_path, work / f"model-{name}", "cpu", rows))],
              ledger)
    import rasterio
    from affine import Affine

    k = max(1, a.merge_px // a.tile_px)  # the part copied k x k times: a map big enough that fixed costs do not dominate
    transform, _, _ = site_grid(site.site())

    def merge():
        w = h = k * a.tile_px
        with MapWriter(work / "m" / "crops.tif", work / "m" / "conf.tif", crs=site.site().crs, transform=Affine(*transform[:6]),
                       width=w, height=h, classes=map_classes(site.legend())) as writer:
            for i in range(k * k):
                col, row = (i % k) * a.tile_px, (i // k) * a.tile_px
                with rasterio.open(ledger.part(site.tiles[0])) as ds:
                    for r0 in range(0, a.tile_px, 8 * rows):
                        n = min(a.tile_px, r0 + 8 * rows) - r0
                        win = Window(0, r0, a.tile_px, n)
                        writer.write(Window(col, row + r0, a.tile_px, n), ds.read(1, window=win).astype(np.uint8), ds.read(2, window=win))

    t_merge, _, _ = timed(merge, a.min_seconds)
    figures["merge_px_s"] = px * k * k / t_merge
    figures["merge_map_px"] = k * a.tile_px
    figures["load_after"] = os.getloadavg()
    print(f"\nparent merge (parts -> MapWriter -> overviews + COG, {k * a.tile_px} x {k * a.tile_px} px map): "
          f"{figures['merge_px_s']:,.0f} pixels/s")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"figures written to {a.json}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
