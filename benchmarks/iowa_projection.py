"""Wall time and cost of mapping Iowa, projected from the measured per-pixel figures of ``throughput.py``.

Usage:  python benchmarks/throughput.py --json benchmarks/results/throughput.json
        python benchmarks/iowa_projection.py [--json benchmarks/results/throughput.json] [--workers 64] [...assumptions]

Every number that is not measured is a command-line option with its default printed, so the
projection can be redone with other prices or machines. What is projected is the predict stage
(the only stage whose work grows with every pixel of the state; training uses a fixed sample
budget, ingestion runs in Earth Engine):

    CPU-seconds per pixel = 1 / (model pixels/s per core)          [workers: read cube + series + model]
    parent seconds per pixel = 1 / (merge pixels/s)                 [serial: part -> MapWriter, overviews, COG]

(a) this CPU: every core runs a worker; the parent shares the cores.
    wall = pixels x (1/model + 1/merge) / cores
(b) one modern GPU: the model runs on the GPU at ``--gpu-tflops`` sustained (bf16 autocast, as the
    predict path does on CUDA), fed by ``--gpu-host-cores`` CPU cores building series at the measured
    read + series rate per core; the parent merge stays serial on one core.
    wall = pixels x max(FLOP/px / gpu rate, 1 / (cores x series rate), 1 / merge)
    With ``--gpu-json`` (the output of ``benchmarks/gpu_check.py --device cuda --json ...``) the
    GPU rate is the *measured* inference px/s of each model (best of fp32 / AMP / compiled) and
    the host series rate the measured per-core rate of the vectorised path on that machine.
(c) a dask cluster of N single-core workers (``--scheduler``), each at the measured per-core rate;
    the parent merge is serial and overlaps with the workers.
    wall = pixels x max(1 / (N x model), 1 / merge)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def hms(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=HERE / "results" / "throughput.json")
    ap.add_argument("--pixels", type=float, default=1.5e9,
                    help="Pixels to map (DESIGN.md: Iowa at 10 m ~1.5e9; 145,746 km2 of land is 1.46e9 plus edge tiles).")
    ap.add_argument("--cores", type=int, default=None, help="(a) cores of this machine (default: from the figures).")
    ap.add_argument("--core-hour-usd", type=float, default=0.045, help="Price of one vCPU-hour (on-demand compute-optimised VM, 2025).")
    ap.add_argument("--gpu-tflops", type=float, default=100.0,
                    help="(b) sustained bf16 TFLOP/s of the GPU on these small models (~10 %% of an H100's 989 dense peak).")
    ap.add_argument("--gpu-host-cores", type=int, default=16, help="(b) CPU cores of the GPU machine building series.")
    ap.add_argument("--gpu-hour-usd", type=float, default=4.0, help="(b) price of a 1-GPU H100 VM per hour.")
    ap.add_argument("--workers", type=int, nargs="+", default=[16, 64, 256], help="(c) single-core dask workers.")
    ap.add_argument("--gpu-json", type=Path, default=None, help="(b) measured GPU figures (benchmarks/gpu_check.py --json) instead of --gpu-tflops.")
    a = ap.parse_args()
    f = json.loads(a.json.read_text())
    gpu = json.loads(a.gpu_json.read_text()) if a.gpu_json else None
    if gpu is not None and gpu.get("device") != "cuda":
        raise SystemExit(f"error: {a.gpu_json} was measured on {gpu.get('device')!r}, not a GPU; rerun gpu_check.py --device cuda")
    cores = a.cores or f["cpu_count"]
    px = a.pixels
    merge = f["merge_px_s"]
    series = f["read_series_px_s"]
    print(f"measured ({a.json.name}): {f['threads']} torch thread per process, tile {f['tile_px']} px, {f['s2_dates']} S2 + {f['s1_dates']} S1 dates "
          f"({f['mean_observations_per_pixel']:.1f} observations per pixel), matmul {f['matmul_gflops']:.0f} GFLOP/s per core")
    print(f"  read + series {series:,.0f} px/s per core; parent merge {merge:,.0f} px/s (serial)")
    if gpu is not None:
        print(f"GPU measured ({a.gpu_json.name}): {gpu['device_name']}, bf16 matmul {gpu['matmul_tflops']['bf16']:.0f} TFLOP/s, "
              f"host series {gpu['host_series_px_s_per_core']:,.0f} px/s per core")
    print(f"assumed: {px:.2e} pixels; {cores} cores here; ${a.core_hour_usd}/vCPU-h; GPU "
          f"{'measured per model' if gpu else f'{a.gpu_tflops:.0f} TFLOP/s sustained'}, "
          f"{a.gpu_host_cores} host cores, ${a.gpu_hour_usd}/h; workers {a.workers}\n")
    head = ["model", "px/s per core", f"(a) this CPU, {cores} cores", "(b) 1 GPU: wall, cost, limit"]
    head += [f"(c) {n} workers: wall, cost" for n in a.workers]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    rows = {}
    for name, m in f["models"].items():
        rate = m["predict_px_s"]
        wall_a = px * (1 / rate + 1 / merge) / cores
        cost_a = wall_a / 3600 * cores * a.core_hour_usd
        limits = {"GPU": m["mflop_per_px"] * 1e6 / (a.gpu_tflops * 1e12) if m["mflop_per_px"] > 0 else float("nan"),
                  "host series": 1 / (a.gpu_host_cores * series), "parent merge": 1 / merge}
        if gpu is not None:
            g = next((r for r in gpu["models"] if r["model"] == name), None)
            limits["GPU"] = 1 / max(v for k, v in g.items() if k.startswith("infer_pps")) if g else float("nan")
            limits["host series"] = 1 / (a.gpu_host_cores * gpu["host_series_px_s_per_core"])
        lim = max((k for k in limits if limits[k] == limits[k]), key=lambda k: limits[k])
        wall_b = px * limits[lim]
        cost_b = wall_b / 3600 * a.gpu_hour_usd
        cells = [name, f"{rate:,.0f}", f"{hms(wall_a)}, ${cost_a:,.0f}", f"{hms(wall_b)}, ${cost_b:,.0f}, {lim}"]
        rows[name] = {"a": wall_a, "b": wall_b, "b_limit": lim}
        for n in a.workers:
            wall_c = px * max(1 / (n * rate), 1 / merge)
            cost_c = wall_c / 3600 * (n + 1) * a.core_hour_usd  # + the parent's core
            cells.append(f"{hms(wall_c)}, ${cost_c:,.0f}" + (" (merge-bound)" if 1 / merge > 1 / (n * rate) else ""))
            rows[name][f"c{n}"] = wall_c
        print("| " + " | ".join(cells) + " |")
    print("\nCosts are compute only (no storage, no Earth Engine). '(merge-bound)': the serial parent merge, not the workers, "
          "sets the wall time.")


if __name__ == "__main__":
    main()
