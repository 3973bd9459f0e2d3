"""Training and inference throughput of every deep pixel model, next to this machine's matmul throughput.

Usage:  python benchmarks/speed.py [--models ...] [--batch 256] [--length 48] [--bands 12] [--threads N] [--device cpu|cuda]

For each model: forward FLOPs per series (counted by ``torch.utils.flop_counter`` on one batch;
matrix multiplies and convolutions, which dominate), training samples/s (forward + backward +
Adam step on a batch of ``--batch`` series of ``--length`` dates; backward counted as 2x
forward), inference series/s (eval, no grad, batches of 2048), and the achieved GFLOP/s as a
fraction of the measured fp32 matrix-multiply throughput (2048^3 ``torch.mm``): the share of the
hardware limit the model reaches. Batches come from :func:`cropmap.models.series.pad_batch`
conventions (S2 and S1 dates interleaved, 40 % radar-only dates).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from cropmap.models.registry import build_model, fitted_without_gradients, model_names

BANDS = ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12", "VV", "VH"]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_gflops(device: str, n: int = 2048, repeats: int = 10) -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


def batch(b: int, t: int, c: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, c, generator=g)
    radar = torch.rand(b, t, generator=g) < 0.4
    present = torch.ones(b, t, c, dtype=torch.bool)
    present[..., :10] &= ~radar[..., None]
    present[..., 10:] &= radar[..., None]
    x = torch.where(present, x, torch.zeros_like(x))
    days = torch.sort(torch.rand(b, t, generator=g) * 480 - 120, dim=1).values
    mask = torch.ones(b, t, dtype=torch.bool)
    return {k: v.to(device) for k, v in {"x": x, "present": present, "days": days, "mask": mask}.items()}


def measure(name: str, args) -> dict:
    c = min(args.bands, len(BANDS))
    torch.manual_seed(0)
    model, _ = build_model(name, bands=BANDS[:c], n_classes=21, mean=[0.0] * c, std=[1.0] * c)
    model.to(args.device)
    params = sum(p.numel() for p in model.parameters())
    train_batch = batch(args.batch, args.length, c, args.device)
    with FlopCounterMode(display=False) as fc:
        model(**train_batch)
    fwd_flops = fc.get_total_flops() / args.batch
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    y = torch.randint(0, 21, (args.batch,), device=args.device)
    model.train()

    def step():
        loss = torch.nn.functional.cross_entropy(model(**train_batch), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    sync(args.device)
    t, n = time.perf_counter(), 0
    while n < args.steps or time.perf_counter() - t < args.min_seconds:
        step()
        n += 1
    sync(args.device)
    train_sps = n * args.batch / (time.perf_counter() - t)

    model.eval()
    infer_batch = batch(2048, args.length, c, args.device, seed=1)
    with torch.no_grad():
        model(**infer_batch)
        sync(args.device)
        t, n = time.perf_counter(), 0
        while n < 3 or time.perf_counter() - t < args.min_seconds:
            model(**infer_batch)
            n += 1
        sync(args.device)
    infer_sps = n * 2048 / (time.perf_counter() - t)
    return {"model": name, "params": params, "mflop": fwd_flops / 1e6, "train_sps": train_sps, "infer_sps": infer_sps,
            "train_gflops": 3 * fwd_flops * train_sps / 1e9, "infer_gflops": fwd_flops * infer_sps / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=[n for n in model_names("pixel") if n not in fitted_without_gradients()])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--length", type=int, default=48)
    ap.add_argument("--bands", type=int, default=12)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--min-seconds", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    peak = matmul_gflops(args.device)
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"device: {dev}; torch {torch.__version__}; fp32 matmul 2048^3: {peak:.1f} GFLOP/s")
    print(f"batch {args.batch} series x {args.length} dates x {args.bands} bands, 21 classes\n")
    print("| model | parameters | forward MFLOP/series | train series/s | inference series/s | train GFLOP/s (% of matmul) | inference GFLOP/s (% of matmul) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        r = measure(name, args)
        print(f"| {name} | {r['params']:,} | {r['mflop']:.2f} | {r['train_sps']:,.0f} | {r['infer_sps']:,.0f} | "
              f"{r['train_gflops']:.1f} ({100 * r['train_gflops'] / peak:.0f} %) | {r['infer_gflops']:.1f} ({100 * r['infer_gflops'] / peak:.0f} %) |",
              flush=True)


if __name__ == "__main__":
    main()
