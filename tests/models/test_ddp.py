"""Data-parallel training (torchrun/DDP) on CPU with gloo: 2 ranks keep identical weights, rank 0 alone writes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_samples(seed: int = 0):
    from cropmap.pipeline.samples import from_ragged

    rng = np.random.default_rng(seed)
    n, bands = 240, ["B04", "B08", "VV"]
    lengths = rng.integers(4, 10, size=n)
    labels = rng.integers(1, 4, size=n)
    days = np.concatenate([np.sort(rng.choice(300, size=k, replace=False)) for k in lengths]).astype(np.float32)
    values = (np.repeat(labels, lengths)[:, None] * 0.1 + rng.normal(0, 0.05, size=(int(lengths.sum()), len(bands)))).astype(np.float32)
    table = pd.DataFrame({"sample_id": [f"s{i}" for i in range(n)], "label": labels, "parcel_id": np.arange(n) // 4})
    return from_ragged(bands, values, days, lengths, table, {1: "a", 2: "b", 3: "c"})


def _rank_main(rank: int, world: int, port: int, out: str, what: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import torch

    torch.set_num_threads(1)
    from cropmap.models import ddp
    from cropmap.models.pretrain.moco import MoCoConfig
    from cropmap.models.training import FitConfig
    from cropmap.pipeline.levels import series_models as train_mod
    from cropmap.pipeline.levels.pixel import pretrain as pretrain_mod

    ctx = ddp.init_from_env("cpu")
    out = Path(out)
    written = []
    for mod in (train_mod, pretrain_mod):
        real = mod.write_directory

        def spy(*a, _real=real, **kw):
            written.append(rank)
            return _real(*a, **kw)

        mod.write_directory = spy
    samples = _tiny_samples()
    captured = {}
    import cropmap.models.training as training

    real_fit = training.fit

    def fit(model, *a, **kw):  # keep the trained module to compare weights across ranks
        captured["model"] = model
        return real_fit(model, *a, **kw)

    train_mod.fit = fit
    idx = np.arange(len(samples))
    if what == "train":
        meta = train_mod.train_model(samples, idx[idx % 5 != 0], idx[idx % 5 == 0], out / "model", model_name="tempcnn",
                                     fit_config=FitConfig(epochs=3, batch_size=32, max_len=8, device="cpu", patience=10, seed=3))
        digest, extra = ddp.weights_digest(captured["model"]), {"ranks": meta["fit"].get("data_parallel_ranks")}
    else:
        real_moco = pretrain_mod.pretrain_moco

        def moco(model, *a, **kw):
            captured["model"] = model
            return real_moco(model, *a, **kw)

        pretrain_mod.pretrain_moco = moco
        meta = pretrain_mod.pretrain_encoder(samples, out / "encoder", model_name="tempcnn",
                                             config=MoCoConfig(epochs=2, batch_size=32, view_length=8, queue_size=64, device="cpu", seed=1))
        digest, extra = ddp.weights_digest(captured["model"]), {}
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": ctx.rank, "world": ctx.world_size, "digest": digest,
                                                      "wrote": written, **extra}))
    ddp.shutdown()


def _spawn(tmp_path, what):
    mp.start_processes(_rank_main, args=(2, _free_port(), str(tmp_path), what), nprocs=2, join=True, start_method="spawn")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_two_gloo_ranks_train_identical_weights_and_only_rank_0_writes(tmp_path):
    r0, r1 = _spawn(tmp_path, "train")
    assert (r0["world"], r1["world"]) == (2, 2)
    assert r0["digest"] == r1["digest"]
    assert r0["wrote"] == [0] and r1["wrote"] == []
    assert (tmp_path / "model" / "model.safetensors").is_file() and r0["ranks"] == 2
    meta = json.loads((tmp_path / "model" / "config.json").read_text())
    assert meta["fit"]["data_parallel_ranks"] == 2
    history = (tmp_path / "model" / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 3  # header + one row per epoch, written once (by rank 0)
    assert not (tmp_path / "model.training").exists()


def test_two_gloo_ranks_pretrain_moco_with_identical_encoders(tmp_path):
    r0, r1 = _spawn(tmp_path, "pretrain")
    assert r0["digest"] == r1["digest"]
    assert r0["wrote"] == [0] and r1["wrote"] == []
    assert (tmp_path / "encoder" / "config.json").is_file()


def test_torchrun_cropmap_train_on_a_long_table(tmp_path):
    """The real launcher: `torchrun --nproc_per_node 2 -m cropmap.pipeline.cli train` on a tiny Parquet table."""
    from cropmap.pipeline.samples import write_long_table

    table = tmp_path / "tiny.parquet"
    write_long_table(_tiny_samples(), table)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
                           "-m", "cropmap.pipeline.cli", "train", "--samples", table, "--model", "tempcnn", "--out", tmp_path / "m",
                           "--epochs", "2", "--device", "cpu", "--max-len", "8", "--batch-size", "32"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = " ".join(proc.stderr.split())  # rich wraps long lines at the console width
    assert said.count("model written to") == 1 and "2 data-parallel ranks" in said
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["fit"]["data_parallel_ranks"] == 2
