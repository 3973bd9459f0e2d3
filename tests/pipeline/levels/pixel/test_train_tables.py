"""`cropmap train`/`evaluate` on long tables of any bands and time axis, with every registered model."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TEST_DATA

from cropmap.models.registry import model_names
from cropmap.models.training import FitConfig
from cropmap.pipeline.levels.pixel.evaluate import evaluate_model
from cropmap.pipeline.levels.pixel.train import default_split, train_model
from cropmap.pipeline.samples import long_table_to_samples, read_long_table

TABLE = TEST_DATA / "rpg2023_dekad_long_60.parquet"


def ndvi_doy_table(n=60, seed=0) -> pd.DataFrame:
    """One band (NDVI), integer day-of-year, irregular dates, two phenologies."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        doy = np.sort(rng.choice(np.arange(1, 366), size=rng.integers(8, 30), replace=False))
        peak = 130 if i % 2 else 220
        ndvi = 0.2 + 0.6 * np.exp(-((doy - peak) / 35.0) ** 2) + rng.normal(0, 0.03, len(doy))
        rows.append(pd.DataFrame({"sample_id": f"s{i}", "doy": doy, "NDVI": ndvi, "label": "early" if i % 2 else "late"}))
    return pd.concat(rows, ignore_index=True)


@pytest.mark.parametrize("name", model_names("pixel"))
def test_every_model_trains_and_evaluates_on_an_ndvi_doy_table(name, tmp_path):
    samples = long_table_to_samples(ndvi_doy_table())
    assert samples.bands == ["NDVI"]
    tr, va = default_split(samples, 0)
    torch.manual_seed(0)
    meta = train_model(samples, tr, va, tmp_path / name, model_name=name,
                       fit_config=FitConfig(epochs=25, batch_size=16, max_len=32, seed=0))
    assert meta["bands"] == ["NDVI"] and meta["model"] == name
    m = evaluate_model(tmp_path / name, samples)
    assert m["overall_accuracy"] > 0.8, (name, m["overall_accuracy"])  # two easy phenologies


def test_s2_only_table_with_dates(tmp_path):
    df = pd.read_parquet(TABLE).drop(columns=["VV", "VH"])
    samples = long_table_to_samples(df)
    assert "VV" not in samples.bands and len(samples.bands) == 9
    tr, va = default_split(samples, 0)
    train_model(samples, tr, va, tmp_path / "m", model_name="tempcnn", fit_config=FitConfig(epochs=1, batch_size=16, max_len=24))
    assert evaluate_model(tmp_path / "m", read_long_table(TABLE))["n_samples"] == 60  # extra bands in the table are ignored


def test_cli_on_an_ndvi_table(tmp_path):
    ndvi_doy_table().to_parquet(tmp_path / "ndvi.parquet")
    env = os.environ
    run = lambda *a: subprocess.run([sys.executable, "-m", "cropmap.pipeline.cli", *map(str, a)], capture_output=True, text=True, env=env, timeout=600)  # noqa: E731
    proc = run("train", "--samples", tmp_path / "ndvi.parquet", "--model", "ltae", "--out", tmp_path / "m", "--epochs", "2", "--batch-size", "16")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m" / "history.csv").read_text().count("\n") == 3
    assert list((tmp_path / "m" / "tensorboard").glob("events.out.tfevents.*"))
    proc = run("evaluate", "--model", tmp_path / "m", "--samples", tmp_path / "ndvi.parquet", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["n_samples"] == 60


def test_a_failing_compiled_model_falls_back_to_eager(monkeypatch):
    import cropmap.models.training as training

    class Broken(torch.nn.Module):
        def forward(self, **batch):
            raise RuntimeError("inductor exploded")

    monkeypatch.setattr(training, "maybe_compile", lambda model, device, enabled: Broken())
    samples = long_table_to_samples(ndvi_doy_table(20))
    tr, va = default_split(samples, 0)
    from cropmap.models.registry import build_model
    from cropmap.pipeline.levels.pixel.train import as_series, class_table, encode_labels

    y = encode_labels(samples, class_table(samples, tr))
    model, _ = build_model("ltae", bands=["NDVI"], n_classes=2, mean=[0.4], std=[0.2])
    result = training.fit(model, as_series(samples), y, np.array([0.4], np.float32), np.array([0.2], np.float32),
                          FitConfig(epochs=2, batch_size=8, max_len=16))
    assert len(result.history) == 2
