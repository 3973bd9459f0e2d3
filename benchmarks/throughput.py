"""Prediction throughput (pixels/s) of every pixel model vs. the hardware limit and vs. the cost of reading the cube.

Usage:  python benchmarks/throughput.py [--tile-px 128] [--s2-dates 36] [--s1-dates 30] [--threads 1] [--models ...]
                                        [--json benchmarks/results/throughput.json]

On one generated tile of the state-like synthetic site (:mod:`cropmap.pipeline.synthetic`, the
ingest stage's zarr format; 36 Sentinel-2 and 30 Sentinel-1 dates by default, like a season of
raw acquisitions) it measures, in one process with ``--threads`` torch threads:

* **matmul**: fp32 2048^3 ``torch.mm`` GFLOP/s, the hardware limit (``benchmarks/speed.py``);
* **read**: opening the tile cube and decompressing every variable (pixels/s): the I/O limit;
* **read + series**: reading plus :func:`cube_series` in the predict stage's row blocks (merging
  optical and radar dates, dropping cloudy ones): the most any model can map on this machine;
* per model, **predict**: the predict stage's own per-block code
  (:class:`cropmap.pipeline.levels.pixel.predict.TilePredictor`, untrained weights: the cost does not depend on
  them) in pixels/s; its FLOPs per pixel (``torch.utils.flop_counter``, interleaved views
  included) give GFLOP/s and the fraction of the matmul limit; pixels/s over "read + series" is
  the fraction of the I/O limit;
* **merge**: the distributed parent's serial part per pixel, copying a tile part (2-band float32
  GeoTIFF) into the site :class:`MapWriter`, plus the overviews + COG conversion at the end.

The figures feed ``benchmarks/iowa_projection.py`` through ``--json``.
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
from cropmap.models.registry import build_model, model_names  # noqa: E402
from cropmap.pipeline.cube import open_cube  # noqa: E402
from cropmap.pipeline.levels.pixel.predict import ROWS_PER_BLOCK, TilePredictor  # noqa: E402
from cropmap.pipeline.levels.pixel.tensors import cube_bands, cube_series  # noqa: E402
from cropmap.pipeline.synthetic import CLASSES, make_synthetic_site  # noqa: E402


def timed(fn, min_seconds: float) -> tuple[float, int]:
    """Seconds per call of ``fn`` (repeated until ``min_seconds``), and the number of calls."""
    fn()  # warm-up (imports, allocator, caches)
    t, n = time.perf_counter(), 0
    while n < 1 or time.perf_counter() - t < min_seconds:
        fn()
        n += 1
    return (time.perf_counter() - t) / n, n


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
    ap.add_argument("--models", nargs="+", default=model_names("pixel"))
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
    peak = matmul_gflops("cpu")
    print(f"CPU, {a.threads} torch thread(s) (os.cpu_count() = {os.cpu_count()}); torch {torch.__version__}; "
          f"fp32 matmul 2048^3: {peak:.1f} GFLOP/s")
    print(f"tile: {a.tile_px} x {a.tile_px} px, {a.s2_dates} S2 dates x 10 bands + {a.s1_dates} S1 dates x 2 bands "
          f"(synthetic, zarr as ingested); row blocks of {rows}; model max_len {a.max_len}\n")

    def read_all():
        c = open_cube(cube_path)
        for v in ("s2", "s2_clear", "s1"):
            c[v].values  # noqa: B018 - decompress

    def read_series():
        c = open_cube(cube_path)
        for r0 in range(0, a.tile_px, rows):
            cube_series(c, rows=slice(r0, min(a.tile_px, r0 + rows)))

    t_read, _ = timed(read_all, a.min_seconds)
    t_series, _ = timed(read_series, a.min_seconds)
    c = open_cube(cube_path)
    _, _, lengths = cube_series(c, rows=slice(0, rows))
    figures = {"threads": a.threads, "cpu_count": os.cpu_count(), "torch": torch.__version__, "matmul_gflops": peak,
               "tile_px": a.tile_px, "s2_dates": a.s2_dates, "s1_dates": a.s1_dates, "max_len": a.max_len,
               "mean_observations_per_pixel": float(lengths.mean()),
               "read_px_s": px / t_read, "read_series_px_s": px / t_series, "models": {}}
    print("| stage | pixels/s | note |\n|---|---|---|")
    print(f"| read cube (decompress all variables) | {px / t_read:,.0f} | I/O limit |")
    print(f"| read + per-pixel series | {px / t_series:,.0f} | the most any model can map (mean {lengths.mean():.1f} observations per pixel) |")

    bands = cube_bands(c)
    print("\n| model | predict pixels/s | forward MFLOP/pixel | GFLOP/s (% of matmul) | % of read + series |\n|---|---|---|---|---|")
    for name in a.models:
        predictor = TilePredictor(site.legend(), model_dir(work, name, bands, a.max_len), "cpu")

        def predict(predictor=predictor):
            cube = open_cube(cube_path)
            for r0 in range(0, a.tile_px, rows):
                predictor.rows(cube, r0, min(a.tile_px, r0 + rows))

        # the eval-mode fast path of nn.MultiheadAttention is one fused op the counter does not see: off while counting
        fast = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        with FlopCounterMode(display=False) as fc:
            predictor.rows(open_cube(cube_path), 0, rows)
        torch.backends.mha.set_fastpath_enabled(fast)
        mflop_px = fc.get_total_flops() / (rows * a.tile_px) / 1e6
        t_pred, _ = timed(predict, a.min_seconds)
        pps = px / t_pred
        gf = mflop_px * 1e6 * pps / 1e9
        figures["models"][name] = {"predict_px_s": pps, "mflop_per_px": mflop_px, "gflops": gf}
        counted = f"{gf:.1f} ({100 * gf / peak:.0f} %)" if mflop_px > 0 else "(not counted)"
        print(f"| {name} | {pps:,.0f} | {mflop_px:.2f} | {counted} | {100 * pps / (px / t_series):.0f} % |", flush=True)

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

    t_merge, _ = timed(merge, a.min_seconds)
    figures["merge_px_s"] = px * k * k / t_merge
    figures["merge_map_px"] = k * a.tile_px
    print(f"\nparent merge (parts -> MapWriter -> overviews + COG, {k * a.tile_px} x {k * a.tile_px} px map): "
          f"{figures['merge_px_s']:,.0f} pixels/s")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"figures written to {a.json}")


if __name__ == "__main__":
    main()
