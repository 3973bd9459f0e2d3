"""Peak memory of mapping a site vs. its area: 1x, 4x and 16x the tiles (memory must be bounded by the tile).

Usage:  python benchmarks/memory_scaling.py [--tile-px 256] [--base 1] [--s2-dates 12] [--s1-dates 8] [--model tempcnn]
                                            [--modes single dask] [--json benchmarks/results/memory_scaling.json]

For each scale k in 1, 4, 16 it generates a synthetic site of ``k * base`` tiles of ``--tile-px``
pixels (:mod:`cropmap.pipeline.synthetic`, on one UTM grid, square layout) and maps it in a fresh
child process (``python memory_scaling.py --child ...``), so every measurement starts from the
same imports:

* ``single``: :func:`cropmap.pipeline.levels.pixel.predict.predict_site` (row blocks into the MapWriter, then
  overviews + COG); peak RSS = the child's ``ru_maxrss``;
* ``dask``: :func:`cropmap.pipeline.levels.pixel.distributed.predict_site_distributed` on a LocalCluster of 1
  worker process; the parent's peak RSS (it merges the parts into the map) and the worker's
  (``RUSAGE_CHILDREN`` after the cluster is closed: the largest of the nanny and worker processes).

Pass criterion of the issue: peak memory at 16x within 20 % of 1x.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def make_site(root: Path, tiles: int, a):
    """The generated site and an (untrained) model directory, written before any measurement."""
    sys.path.insert(0, str(HERE))
    from throughput import model_dir

    from cropmap.pipeline.cube import open_cube
    from cropmap.pipeline.levels.pixel.tensors import cube_bands
    from cropmap.pipeline.synthetic import make_synthetic_site

    side = int(math.isqrt(tiles))
    site = make_synthetic_site(root, tiles_x=side, tiles_y=tiles // side, tile_px=a.tile_px, s2_dates=a.s2_dates, s1_dates=a.s1_dates)
    return site, model_dir(root, a.model, cube_bands(open_cube(site.cube(site.tiles[0]))), 48)


def child(a) -> None:
    import torch

    torch.set_num_threads(1)
    site, model = make_site(a.root, a.tiles, a)  # already on disk: only reopened here
    cubes = [site.cube(t) for t in site.tiles]
    out = a.root / f"map-{a.mode}"
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    if a.mode == "single":
        from cropmap.pipeline.levels.pixel.predict import predict_site

        predict_site(site.site(), site.legend(), cubes, model, out / "crops.tif", out / "conf.tif", device="cpu")
    else:
        from cropmap.pipeline.levels.pixel import distributed as D

        with D.cluster_client(D.cluster_spec(1)) as client:
            D.predict_site_distributed(site.site(), site.legend(), cubes, model, out / "crops.tif", out / "conf.tif", client=client,
                                       tiles_dir=a.root / "tiles", device="cpu")
    seconds = time.perf_counter() - t
    print(json.dumps({"mode": a.mode, "tiles": len(site.tiles), "pixels": site.pixels, "seconds": seconds,
                      "rss_before_kib": rss0, "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "peak_children_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tile-px", type=int, default=256)
    ap.add_argument("--base", type=int, default=1, help="Tiles of the 1x site (a square number keeps the layouts square).")
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--s2-dates", type=int, default=12)
    ap.add_argument("--s1-dates", type=int, default=8)
    ap.add_argument("--model", default="tempcnn")
    ap.add_argument("--modes", nargs="+", default=["single", "dask"], choices=["single", "dask"])
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--tiles", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a)
        return
    tmp = tempfile.TemporaryDirectory(prefix="cropmap-memory-")
    work = a.work or Path(tmp.name)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GDAL_CACHEMAX": os.environ.get("GDAL_CACHEMAX", "256")}
    rows = []
    print(f"tiles of {a.tile_px} px, {a.s2_dates} S2 + {a.s1_dates} S1 dates, model {a.model} (1 torch thread), GDAL_CACHEMAX {env['GDAL_CACHEMAX']} MB\n")
    print("| mode | scale | tiles | pixels | seconds | peak RSS (MiB) | worker peak RSS (MiB) |\n|---|---|---|---|---|---|---|")
    for mode in a.modes:
        for k in a.scales:
            root = work / f"site-{k * a.base}"
            make_site(root, k * a.base, a)  # generated here, so generating never counts in the child's peak
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--root", str(root), "--tiles", str(k * a.base), "--mode", mode,
                   "--tile-px", str(a.tile_px), "--s2-dates", str(a.s2_dates), "--s1-dates", str(a.s1_dates), "--model", a.model]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                sys.exit(f"child failed: {proc.stderr[-2000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1]) | {"scale": k}
            rows.append(r)
            worker = f"{r['peak_children_kib'] / 1024:.0f}" if mode == "dask" else "-"
            print(f"| {mode} | {k}x | {r['tiles']} | {r['pixels']:,} | {r['seconds']:.1f} | {r['peak_rss_kib'] / 1024:.0f} | {worker} |", flush=True)
    print()
    verdicts = {}
    for mode in a.modes:
        mine = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["scale"])
        for key, what in (("peak_rss_kib", "peak RSS"), *([("peak_children_kib", "worker peak RSS")] if mode == "dask" else [])):
            lo, hi = mine[0][key], mine[-1][key]
            growth = hi / lo - 1
            verdicts[f"{mode} {what}"] = growth
            print(f"{mode}: {what} {mine[-1]['scale']}x vs {mine[0]['scale']}x: {100 * growth:+.1f} % "
                  f"({'flat, within 20 %' if abs(growth) <= 0.2 else 'NOT within 20 %'})")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"tile_px": a.tile_px, "s2_dates": a.s2_dates, "s1_dates": a.s1_dates, "model": a.model,
                                      "rows": rows, "growth": verdicts}, indent=2) + "\n")


if __name__ == "__main__":
    main()
