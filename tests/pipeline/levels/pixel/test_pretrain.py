"""`cropmap pretrain` and fine-tuning from its encoder, on the vendored real RPG 2023 long table."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TEST_DATA
from safetensors.torch import load_file

from cropmap.models.pretrain.moco import MoCoConfig
from cropmap.models.training import FitConfig
from cropmap.pipeline.errors import ModelError
from cropmap.pipeline.levels.pixel.pretrain import pretrain_encoder
from cropmap.pipeline.levels.pixel.train import default_split, train_model
from cropmap.pipeline.samples import load_samples

TABLE = TEST_DATA / "rpg2023_dekad_long_60.parquet"
QUICK = dict(epochs=2, batch_size=16, queue_size=32, view_length=24)


def cropmap(*args):
    return subprocess.run([sys.executable, "-m", "cropmap.pipeline.cli", *map(str, args)], capture_output=True, text=True,
                          env=os.environ, timeout=600)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "encoder"
    meta = pretrain_encoder(load_samples(TABLE, labelled=False), out, model_name="stnet", config=MoCoConfig(**QUICK))
    assert meta["pretrain"]["epochs_run"] == 2
    return out


def test_encoder_directory_holds_no_decoder_and_no_leftovers(encoder_dir):
    state = load_file(str(encoder_dir / "encoder.safetensors"))
    assert state and not any(k.startswith("decoder.") for k in state)
    meta = json.loads((encoder_dir / "config.json").read_text())
    assert meta["format"] == "cropmap.encoder/1" and meta["model"] == "stnet" and "classes" not in meta
    assert meta["pretrain"]["method"] == "moco" and meta["pretrain"]["config"]["temperature"] == 0.07
    assert (encoder_dir / "history.csv").read_text().startswith("epoch,")
    assert not (encoder_dir.parent / "encoder.training").exists()


def test_fine_tuning_with_a_frozen_pretrained_encoder_keeps_its_weights(encoder_dir, tmp_path):
    samples = load_samples(TABLE)
    tr, va = default_split(samples, 0)
    meta = train_model(samples, tr, va, tmp_path / "m", model_name="stnet", pretrained=encoder_dir,
                       fit_config=FitConfig(epochs=1, batch_size=16, max_len=24, freeze_encoder=True))
    enc = json.loads((encoder_dir / "config.json").read_text())
    assert meta["normalisation"]["mean"] == enc["normalisation"]["mean"]  # the encoder's input statistics
    pre = load_file(str(encoder_dir / "encoder.safetensors"))
    tuned = load_file(str(tmp_path / "m" / "model.safetensors"))
    for k, v in pre.items():
        assert torch.equal(v, tuned[k]), k
    assert not (tmp_path / "m.training").exists() and (tmp_path / "m" / "history.csv").is_file()


def test_pretrained_must_match_model_and_bands(encoder_dir, tmp_path):
    samples = load_samples(TABLE)
    tr, va = default_split(samples, 0)
    with pytest.raises(ModelError, match="holds a 'stnet' model"):
        train_model(samples, tr, va, tmp_path / "m", model_name="tempcnn", pretrained=encoder_dir)
    fewer = load_samples(TABLE)
    df = pd.read_parquet(TABLE).drop(columns=["VV", "VH"])
    df.to_parquet(tmp_path / "s2.parquet")
    fewer = load_samples(tmp_path / "s2.parquet")
    with pytest.raises(ModelError, match="trained on bands"):
        train_model(fewer, *default_split(fewer, 0), tmp_path / "m", model_name="stnet", pretrained=encoder_dir)
    assert not (tmp_path / "m").exists()


def test_unlabelled_tables_are_accepted_for_pretraining_only(tmp_path):
    df = pd.read_parquet(TABLE).drop(columns=["label"])
    df.to_parquet(tmp_path / "unlabelled.parquet")
    s = load_samples(tmp_path / "unlabelled.parquet", labelled=False)
    assert len(s) == 60 and set(s.table["label"]) == {"unlabelled"}
    proc = cropmap("train", "--samples", tmp_path / "unlabelled.parquet", "--out", tmp_path / "m")
    assert proc.returncode == 2 and "lacks column(s) label" in proc.stderr


def test_cli_pretrain_then_train_then_evaluate(tmp_path):
    proc = cropmap("pretrain", "--method", "moco", "--samples", TABLE, "--out", tmp_path / "enc", "--model", "transformer",
                   "--epochs", "2", "--batch-size", "16", "--queue-size", "32", "--view-length", "24", "--temperature", "0.2")
    assert proc.returncode == 0, proc.stderr
    assert "encoder written to" in proc.stderr
    proc = cropmap("train", "--samples", TABLE, "--pretrained", tmp_path / "enc", "--out", tmp_path / "m", "--epochs", "1",
                   "--batch-size", "16", "--max-len", "24", "--loss", "focal")
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["model"] == "transformer" and meta["fit"]["pretrained"] == str(tmp_path / "enc") and meta["fit"]["loss"] == "focal"
    proc = cropmap("evaluate", "--model", tmp_path / "m", "--samples", TABLE, "--json")
    assert proc.returncode == 0, proc.stderr
    assert 0 <= json.loads(proc.stdout)["overall_accuracy"] <= 1
    proc = cropmap("pretrain", "--method", "simclr", "--samples", TABLE, "--out", tmp_path / "x")
    assert proc.returncode == 2 and "unknown --method 'simclr'" in proc.stderr


def test_label_budget_is_stratified_and_seeded():
    from cropmap.pipeline.levels.pixel.train import class_table, encode_labels, subsample_labels

    samples = load_samples(TABLE)
    idx = np.arange(len(samples))
    y = encode_labels(samples, class_table(samples, idx))
    a = subsample_labels(y, idx, seed=0, fraction=0.2)
    assert set(y[a]) == set(y)  # every class keeps at least one label
    assert list(a) == list(subsample_labels(y, idx, seed=0, fraction=0.2))
    assert list(a) != list(subsample_labels(y, idx, seed=1, fraction=0.2))


def test_run_pretrains_on_the_site_pixels_then_fine_tunes(tmp_path, monkeypatch):
    """`training.pretrain.method: moco` adds a pretrain stage whose encoder the train stage starts from."""
    from conftest import demo_doc, write_site

    sites = tmp_path / "sites"
    doc = demo_doc("demo-moco", model="ltae", model_options={}, split_seeds=[0],
                   pretrain={"method": "moco", "pixels": 300, "epochs": 2, "batch_size": 32, "queue_size": 64, "view_length": 24})
    write_site(sites, doc)
    monkeypatch.setenv("CROPMAP_SITES_DIR", str(sites))
    proc = subprocess.run([sys.executable, "-m", "cropmap.pipeline.cli", "run", "--site", "demo-moco", "--out", tmp_path / "runs"],
                          capture_output=True, text=True, env=os.environ, timeout=900)
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "runs" / "demo-moco" / "2019"
    m = json.loads((run_dir / "run.json").read_text())
    assert list(m["stages"])[:5] == ["ingest", "labels", "tensors", "pretrain", "train"]
    assert m["stages"]["pretrain"]["report"]["n_series"] >= 290  # 300 drawn, minus pixels never observed
    assert (run_dir / m["outputs"]["encoder"] / "encoder.safetensors").is_file()
    meta = json.loads((run_dir / "models" / "seed-0" / "config.json").read_text())
    assert meta["model"] == "ltae" and meta["fit"]["pretrained"].endswith("pretrain/encoder")
    assert json.loads((run_dir / "metrics.json").read_text())["pretraining"] == "moco"
