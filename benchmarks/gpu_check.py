"""One-shot accelerator check: matmul, every pixel model (train / infer, AMP, compile), DDP smoke, patch model, Iowa projection.

Usage:  python benchmarks/gpu_check.py [--device auto|cpu|cuda] [--size small|full] [--json out.json]
                                       [--compile-models stnet tempcnn] [--budget-s 270]

Made to run unchanged on the day a GPU is lent (``--device cuda``, full sizes, under 5 minutes on
one GPU) and on this CPU (``--device cpu``: small sizes, the same tables), which is how it is
tested (``tests/benchmarks/test_gpu_check.py``). Every figure is measured in this run:

1. **matmul**: TFLOP/s of square ``torch.mm`` in bf16 and fp32 (8192^2 on CUDA, 1024^2 on CPU);
2. per pixel model (``cropmap.models.registry``, level "pixel"): **training** samples/s (forward + backward + Adam on a
   padded batch) and **inference** px/s on the predict path's own batches
   (:func:`cropmap.models.inference.dense_views` of a dense block with ~60 observations per pixel,
   i.e. two interleaved views of ~30 dates at ``max_len`` 48, then
   :func:`~cropmap.models.inference.predict_views`: ``inference_mode``, length-bucketed batches,
   pinned memory and non-blocking copies on CUDA), each in fp32 and with bf16 autocast (AMP), and
   with ``torch.compile`` for ``--compile-models`` (CUDA only; "n/a" on CPU); inference GFLOP/s as a
   fraction of the measured matmul rate;
3. **host series**: px/s per core of the vectorised cube -> padded-batch path (what feeds the GPU);
4. **DDP smoke**: a 1-process DistributedDataParallel group (NCCL on CUDA, gloo on CPU) training
   STNet for a few steps: samples/s, finite loss, weights in sync;
5. **patch model** (STCLN): training and inference patches/s and peak memory (CUDA: max allocated;
   CPU: growth of the process's peak RSS);
6. **Iowa projection** (1.5e9 px) recomputed from these figures: one device with this machine's
   cores building series, wall = px x max(1 / model px/s, 1 / (cores x host series px/s),
   1 / merge px/s), merge from ``benchmarks/results/throughput.json`` when present.

A global ``--budget-s`` skips (and says so) the remaining compile measurements when time runs short.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cropmap.models.inference import dense_views, mha_fastpath, predict_views  # noqa: E402
from cropmap.models.registry import build_model, fitted_without_gradients, model_names  # noqa: E402

BANDS = ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12", "VV", "VH"]
SIZES = {  # full: one GPU in < 5 min; small: this CPU in < 5 min; tiny: the test
    "full": dict(mm=8192, mm_reps=20, train_batch=1024, train_steps=20, px=65536, dates=66, patch_batch=16, patch_px=64,
                 patch_dates=34, patch_steps=10, ddp_steps=20, min_s=1.0),
    "small": dict(mm=1024, mm_reps=5, train_batch=256, train_steps=3, px=4096, dates=66, patch_batch=4, patch_px=16,
                  patch_dates=34, patch_steps=3, ddp_steps=3, min_s=0.5),
    "tiny": dict(mm=256, mm_reps=2, train_batch=32, train_steps=1, px=256, dates=24, patch_batch=1, patch_px=8,
                 patch_dates=6, patch_steps=1, ddp_steps=1, min_s=0.0),
}


def resolve(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device (torch "
                         f"{torch.__version__}); use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise SystemExit(f"error: --device {device!r} is not auto, cpu or cuda")
    return device


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def amp_ctx(device: str, on: bool):
    return torch.autocast(device_type=device, dtype=torch.bfloat16) if on else contextlib.nullcontext()


def timed(fn, device: str, min_s: float, min_n: int = 1) -> float:
    """Seconds per call (after one warm-up call)."""
    fn()
    sync(device)
    t, n = time.perf_counter(), 0
    while n < min_n or time.perf_counter() - t < min_s:
        fn()
        n += 1
    sync(device)
    return (time.perf_counter() - t) / n


def matmul_tflops(device: str, n: int, reps: int, dtype: torch.dtype) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    s = timed(lambda: a @ b, device, 0.0, reps)
    return 2 * n**3 / s / 1e12


def dense_block(px: int, dates: int, c: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A dense pixels x dates x bands block like a season of raw acquisitions: ~90 % of dates observed,
    S2 and S1 dates interleaved (radar dates lack the optical bands), 5 % of optical values missing."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(px, dates, c)).astype(np.float32)
    radar = rng.random(dates) < 0.45
    x[:, radar, :10] = np.nan
    x[:, ~radar, 10:] = np.nan
    x[rng.random((px, dates, c)) < 0.05] = np.nan
    x[rng.random((px, dates)) < 0.1] = np.nan
    days = np.sort(rng.choice(np.arange(-60, 420), dates, replace=False)).astype(np.float32)
    return x, days


def train_batch(b: int, t: int, c: int, device: str) -> dict[str, torch.Tensor]:
    from speed import batch

    return batch(b, t, c, device)


def measure_model(name: str, device: str, sz: dict, compile_it: bool, views, px: int, peak_fp32: float, deadline: float) -> dict:
    torch.manual_seed(0)
    c = len(BANDS)
    model, _ = build_model(name, bands=BANDS, n_classes=16, mean=[0.0] * c, std=[1.0] * c)
    model.to(device)
    tb = train_batch(sz["train_batch"], 48, c, device)
    y = torch.randint(0, 16, (sz["train_batch"],), device=device)
    out: dict = {"model": name, "params": sum(p.numel() for p in model.parameters())}
    model.eval()
    with FlopCounterMode(display=False) as fc, torch.inference_mode(), mha_fastpath(False):
        predict_views(model, views, 512, device)
    out["mflop_per_px"] = fc.get_total_flops() / px / 1e6

    def train_sps(m, amp: bool) -> float:
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        m.train()

        def step():
            with amp_ctx(device, amp):
                loss = torch.nn.functional.cross_entropy(m(**tb).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return sz["train_batch"] / timed(step, device, sz["min_s"], sz["train_steps"])

    def infer_pps(m, amp: bool) -> float:
        model.eval()
        return px / timed(lambda: predict_views(m, views, 512 if device == "cpu" else 4096, device, amp), device, sz["min_s"], 2)

    for amp in (False, True):
        key = "amp" if amp else "fp32"
        out[f"train_sps_{key}"] = train_sps(model, amp)
        out[f"infer_pps_{key}"] = infer_pps(model, amp)
    if compile_it and device == "cuda" and time.perf_counter() < deadline:
        t0 = time.perf_counter()
        cm = torch.compile(model, dynamic=True)
        out["train_sps_amp_compiled"] = train_sps(cm, True)
        out["infer_pps_amp_compiled"] = infer_pps(cm, True)
        out["compile_s"] = time.perf_counter() - t0
    else:
        out["compile_skipped"] = "n/a (CPU)" if device == "cpu" else ("not asked" if not compile_it else "skipped (time budget)")
    best = max(v for k, v in out.items() if k.startswith("infer_pps"))
    out["infer_gflops"] = out["mflop_per_px"] * 1e6 * best / 1e9
    out["matmul_fraction_fp32"] = out["infer_gflops"] / (peak_fp32 * 1e3)
    return out


def host_series_rate(sz: dict, reps: int = 3) -> float:
    """px/s on one core of the vectorised dense block -> padded views step (normalised, sorted by length)."""
    x, days = dense_block(sz["px"], sz["dates"], len(BANDS), seed=1)
    mean, std = np.zeros(len(BANDS), np.float32), np.ones(len(BANDS), np.float32)
    dense_views(x, days, 48, mean, std)
    t = time.process_time()
    for _ in range(reps):
        dense_views(x, days, 48, mean, std)
    return sz["px"] * reps / max(1e-9, time.process_time() - t)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_smoke(device: str, sz: dict) -> dict:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model, _ = build_model("stnet", bands=BANDS, n_classes=16, mean=[0.0] * 12, std=[1.0] * 12)
        model.to(device)
        ddp = DDP(model, device_ids=[0] if device == "cuda" else None)
        opt = torch.optim.Adam(ddp.parameters(), lr=1e-4)
        tb = train_batch(sz["train_batch"], 48, 12, device)
        y = torch.randint(0, 16, (sz["train_batch"],), device=device)
        losses = []

        def step():
            with amp_ctx(device, device == "cuda"):
                loss = torch.nn.functional.cross_entropy(ddp(**tb).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))

        s = timed(step, device, sz["min_s"], sz["ddp_steps"])
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.zeros_like(flat)]
        dist.all_gather(gathered, flat)
        out = {"backend": backend, "world_size": dist.get_world_size(), "samples_s": sz["train_batch"] / s,
               "loss_finite": bool(np.isfinite(losses).all()), "steps": len(losses),
               "weights_in_sync": bool(torch.equal(gathered[0], flat))}
        # release the DDP reducer (it holds the process group) before the group is destroyed: freed after,
        # its destructor joins the group's threads and can deadlock
        ddp = opt = step = None  # noqa: F841  (drops the closure cells too)
        import gc

        gc.collect()
        return out
    finally:
        dist.destroy_process_group()


def peak_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def patch_check(device: str, sz: dict) -> dict:
    torch.manual_seed(0)
    b, t, s = sz["patch_batch"], sz["patch_dates"], sz["patch_px"]
    model, _ = build_model("stcln", bands=BANDS, n_classes=8, mean=[0.0] * 12, std=[1.0] * 12)
    model.to(device)
    x = torch.randn(b, t, 12, s, s, device=device)
    days = (torch.arange(t, dtype=torch.float32, device=device) * 15).repeat(b, 1)
    valid = torch.rand(b, t, s, s, device=device) > 0.1
    y = torch.randint(0, 8, (b, s, s), device=device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    amp = device == "cuda"
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = peak_mib(device)

    def step():
        model.train()
        with amp_ctx(device, amp):
            loss = torch.nn.functional.cross_entropy(model(x, days, valid).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    train_s = timed(step, device, sz["min_s"], sz["patch_steps"])
    train_peak = peak_mib(device) - (0 if device == "cuda" else before)
    model.eval()

    def infer():
        with torch.inference_mode(), amp_ctx(device, amp):
            model(x, days, valid)

    infer_s = timed(infer, device, sz["min_s"], sz["patch_steps"])
    return {"patch": f"{b} x {t} dates x 12 bands x {s} x {s} px", "train_patches_s": b / train_s, "infer_patches_s": b / infer_s,
            "infer_px_s": b * s * s / infer_s, "peak_mib": train_peak, "amp": amp,
            "peak_kind": "max allocated (CUDA)" if device == "cuda" else "growth of peak RSS (CPU)"}


def hms(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def projection(models: list[dict], host_px_s: float, cores: int, merge_px_s: float | None, pixels: float = 1.5e9) -> list[dict]:
    rows = []
    for m in models:
        rate = max(v for k, v in m.items() if k.startswith("infer_pps"))
        limits = {"model": 1 / rate, "host series": 1 / (cores * host_px_s)}
        if merge_px_s:
            limits["parent merge"] = 1 / merge_px_s
        lim = max(limits, key=limits.get)
        rows.append({"model": m["model"], "device_px_s": rate, "wall_s": pixels * limits[lim], "limit": lim})
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="default: full on CUDA, small on CPU")
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--compile-models", nargs="*", default=["stnet", "tempcnn"],
                    help="models also measured with torch.compile (CUDA; each compile costs tens of seconds)")
    ap.add_argument("--budget-s", type=float, default=270.0, help="skip further compile measurements after this many seconds")
    ap.add_argument("--throughput-json", type=Path, default=HERE / "results" / "throughput.json", help="merge px/s for the projection")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=None, help="CPU torch threads (default: torch's)")
    a = ap.parse_args(argv)
    device = resolve(a.device)
    sz = SIZES[a.size or ("full" if device == "cuda" else "small")]
    if a.threads:
        torch.set_num_threads(a.threads)
    names = a.models or [n for n in model_names("pixel") if n not in fitted_without_gradients()]  # networks only
    unknown = sorted(set(names) - set(model_names("pixel")))
    if unknown:
        raise SystemExit(f"error: unknown model(s) {unknown}; choose from {model_names('pixel')}")
    t_start = time.perf_counter()
    deadline = t_start + a.budget_s
    dev_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    print(f"# cropmap GPU check: {dev_name}; torch {torch.__version__}; sizes '{a.size or ('full' if device == 'cuda' else 'small')}'; "
          f"load average {os.getloadavg()[0]:.1f}\n")
    doc: dict = {"device": device, "device_name": dev_name, "torch": torch.__version__, "size": sz, "load_before": os.getloadavg()}

    mm = {k: matmul_tflops(device, sz["mm"], sz["mm_reps"], dt) for k, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    doc["matmul_tflops"] = mm
    print(f"## matmul ({sz['mm']}^2)\n\n| dtype | TFLOP/s |\n|---|---|\n| fp32 | {mm['fp32']:.3f} |\n| bf16 | {mm['bf16']:.3f} |\n", flush=True)

    x, days = dense_block(sz["px"], sz["dates"], len(BANDS))
    views = dense_views(x, days, 48, np.zeros(12, np.float32), np.ones(12, np.float32))
    print(f"## pixel models\n\ninference block: {sz['px']} px x {sz['dates']} dates -> {len(views)} views of "
          f"{views.lengths.min()}-{views.lengths.max()} dates; training batch {sz['train_batch']} x 48 dates\n")
    print("| model | params | MFLOP/px | train samples/s fp32 | train samples/s AMP | train samples/s AMP+compile | "
          "infer px/s fp32 | infer px/s AMP | infer px/s AMP+compile | infer GFLOP/s (% of fp32 matmul) |\n|" + "---|" * 10)
    doc["models"] = []
    for name in names:
        m = measure_model(name, device, sz, name in (a.compile_models or []), views, sz["px"], mm["fp32"], deadline)
        doc["models"].append(m)
        comp_t = f"{m['train_sps_amp_compiled']:,.0f}" if "train_sps_amp_compiled" in m else m["compile_skipped"]
        comp_i = f"{m['infer_pps_amp_compiled']:,.0f}" if "infer_pps_amp_compiled" in m else m["compile_skipped"]
        print(f"| {name} | {m['params']:,} | {m['mflop_per_px']:.2f} | {m['train_sps_fp32']:,.0f} | {m['train_sps_amp']:,.0f} | {comp_t} | "
              f"{m['infer_pps_fp32']:,.0f} | {m['infer_pps_amp']:,.0f} | {comp_i} | {m['infer_gflops']:.1f} "
              f"({100 * m['matmul_fraction_fp32']:.0f} %) |", flush=True)

    host = host_series_rate(sz)
    doc["host_series_px_s_per_core"] = host
    print(f"\n## host series (vectorised views, one core)\n\n{host:,.0f} px/s per core; {os.cpu_count()} cores\n")

    d = ddp_smoke(device, sz)
    doc["ddp"] = d
    print(f"## DDP smoke (1 process, {d['backend']})\n\n| world size | steps | samples/s | loss finite | weights in sync |\n|---|---|---|---|---|\n"
          f"| {d['world_size']} | {d['steps']} | {d['samples_s']:,.0f} | {d['loss_finite']} | {d['weights_in_sync']} |\n", flush=True)

    p = patch_check(device, sz)
    doc["patch"] = p
    print(f"## patch model (STCLN, {p['patch']}, AMP {p['amp']})\n\n| train patches/s | infer patches/s | infer px/s | peak memory MiB |\n"
          f"|---|---|---|---|\n| {p['train_patches_s']:,.1f} | {p['infer_patches_s']:,.1f} | {p['infer_px_s']:,.0f} | "
          f"{p['peak_mib']:,.0f} ({p['peak_kind']}) |\n", flush=True)

    merge = None
    if a.throughput_json and a.throughput_json.is_file():
        merge = json.loads(a.throughput_json.read_text()).get("merge_px_s")
    rows = projection(doc["models"], host, os.cpu_count() or 1, merge)
    doc["iowa"] = rows
    print(f"## Iowa projection (1.5e9 px, this device, {os.cpu_count()} host cores at {host:,.0f} px/s each"
          + (f", parent merge {merge:,.0f} px/s from {a.throughput_json.name})" if merge else ", no merge figure)") + "\n")
    print("| model | device px/s | wall | limited by |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['device_px_s']:,.0f} | {hms(r['wall_s'])} | {r['limit']} |")
    doc["seconds"] = time.perf_counter() - t_start
    doc["load_after"] = os.getloadavg()
    print(f"\ntotal {doc['seconds']:.0f} s; load average after {os.getloadavg()[0]:.1f}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.json.with_suffix(a.json.suffix + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        tmp.replace(a.json)
    return doc


if __name__ == "__main__":
    main()
