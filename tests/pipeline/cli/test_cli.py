"""The `cropmap` command end to end on the real demo data (a cheap training recipe), and its errors."""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest
import rasterio
from conftest import assert_one_line_error, cropmap, demo_doc, write_site

from cropmap.pipeline.stages.maps import validate_cog

STAGES = ["ingest", "labels", "tensors", "train", "predict", "evaluate", "report"]


@pytest.fixture(scope="module")
def fast_env(tmp_path_factory):
    d = tmp_path_factory.mktemp("sites")
    write_site(d, demo_doc("demo-fast"))
    return {"CROPMAP_SITES_DIR": str(d)}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, fast_env):
    out = tmp_path_factory.mktemp("runs")
    proc = cropmap("run", "--site", "demo-fast", "--out", out, env=fast_env)
    assert proc.returncode == 0, proc.stderr
    return out / "demo-fast" / "2019", proc


def manifest(run_dir):
    return json.loads((run_dir / "run.json").read_text())


def test_run_writes_the_manifest_contract(demo_run):
    run_dir, proc = demo_run
    m = manifest(run_dir)
    assert m["site"] == "demo-fast" and m["year"] == 2019 and m["status"] == "succeeded"
    assert list(m["stages"]) == STAGES
    for st in m["stages"].values():
        assert st["status"] == "done" and st["started"] and st["finished"] and st["outputs"]
    for key in ("map", "metrics", "model", "report", "preview", "confidence"):
        assert (run_dir / m["outputs"][key]).exists(), key
    assert m["environment"]["torch"] and m["environment"]["gdal"]
    assert "map" in proc.stderr and str(run_dir / "map" / "crops.tif") in proc.stderr.replace("\n", "")
    # the missing 10 m export of one tile is reported, never silent
    assert any("no S2 10 m export" in n for n in m["stages"]["ingest"]["report"]["notes"])


def test_map_is_a_valid_cog_of_the_site(demo_run):
    run_dir, _ = demo_run
    path = run_dir / "map" / "crops.tif"
    assert validate_cog(path) == []
    with rasterio.open(path) as ds:
        assert ds.crs.to_epsg() == 32631 and ds.dtypes[0] == "uint8" and ds.nodata == 0
        assert ds.overviews(1)  # 7396 x 4840 px
        cmap = ds.colormap(1)
        assert cmap[0][3] == 0 and cmap[1][:3] == (0xf5, 0xc4, 0x00)
        assert "maize" in ds.tags(1).get("cropmap_classes", "")
        tile = ds.read(1, window=rasterio.windows.from_bounds(574680, 5621800, 575320, 5622440, ds.transform))
        assert tile.shape == (64, 64) and (tile > 0).mean() > 0.95 and set(np.unique(tile)) <= set(range(0, 7))
        # the 2018 tile is not mapped in the 2019 map
        old = ds.read(1, window=rasterio.windows.from_bounds(501360, 5629040, 502000, 5629680, ds.transform))
        assert (old == 0).all()
    with rasterio.open(run_dir / "map" / "confidence.tif") as ds:
        conf = ds.read(1)
        assert conf[conf != ds.nodata].max() <= 100
    png = (run_dir / "map" / "preview.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_are_honest_and_compare_to_the_forest(demo_run):
    run_dir, _ = demo_run
    m = json.loads((run_dir / "metrics.json").read_text())
    for k in ("overall_accuracy", "kappa", "macro_f1", "weighted_f1", "miou", "per_class", "n_samples", "protocol"):
        assert k in m
    assert "spatial blocks of 320 m" in m["protocol"] and "spatial blocks" in m["split"]
    assert "absent from the test set counts with F1 = 0" in m["protocol"]
    assert m["n_runs"] == 2 and m["train_only_classes"] == ["sugar beet"]
    assert "sugar beet" not in m["evaluated_classes"] and "maize" in m["evaluated_classes"]
    assert 0 <= m["baseline"]["overall_accuracy"] <= 1 and "overall_accuracy_gain" in m["comparison"]
    # gradient boosting on the forest's features, reported beside it, with its own paired comparison
    assert m["boosting"]["model"].startswith("lightgbm") and 0 <= m["boosting"]["overall_accuracy"] <= 1
    assert "macro_f1_gain" in m["boosting"]["comparison"] and all("boosting" in r for r in m["runs"])
    # parcel-disjoint: no test parcel was seen in training
    for r in m["runs"]:
        split = json.loads((run_dir / "models" / f"seed-{r['seed']}" / "split.json").read_text())
        sides = {}
        for pid, side in split["parcels"].items():
            sides.setdefault(side, set()).add(pid)
        assert sides["test"] and not (sides["test"] & sides["train"])
    model_cfg = json.loads((run_dir / "models" / "seed-0" / "config.json").read_text())
    assert model_cfg["model"] == "stnet" and len(model_cfg["normalisation"]["mean"]) == 12
    # calibrated on validation pixels, ECE before/after on validation and test (15 bins)
    assert model_cfg["calibration"]["fitted_on"] == "validation" and model_cfg["calibration"]["temperature"] > 0
    cal = m["calibration"]
    assert set(cal["ece"]) == {"validation", "test"} and "15 equal-width bins" in cal["binning"]
    for part in ("validation", "test"):
        assert 0 <= cal["ece"][part]["after"] <= 1 and 0 <= cal["ece"][part]["before"] <= 1
    with rasterio.open(run_dir / "map" / "confidence.tif") as ds:
        assert "temperature scaling" in ds.tags()["cropmap_confidence_calibration"]


def test_no_test_pixel_shares_a_spatial_block_with_training_or_validation_pixels(demo_run):
    """On the real demo run: by the pixels' own coordinates, every 320 m block used holds one side only."""
    from cropmap.pipeline.samples import load_store
    from cropmap.pipeline.splits import ParcelSplit

    run_dir, _ = demo_run
    samples = load_store(run_dir / "samples" / "pixels", mmap=False)
    t = samples.table
    block = np.floor(t["x"] / 320).astype(int).astype(str) + ":" + np.floor(t["y"] / 320).astype(int).astype(str)
    for seed in (0, 1):
        split = ParcelSplit.from_dict(json.loads((run_dir / "models" / f"seed-{seed}" / "split.json").read_text()))
        side = split.row_sides(t)
        blocks = {s: set(block[side == s]) for s in ("train", "val", "test")}
        assert blocks["test"] and blocks["train"] and blocks["val"]
        assert not blocks["test"] & (blocks["train"] | blocks["val"]), seed
        assert not blocks["val"] & blocks["train"], seed
        # and no parcel has pixels on two sides
        used = pd.DataFrame({"p": t["parcel_id"], "s": side})[side != "excluded"]
        assert (used.groupby("p")["s"].nunique() == 1).all()
    assert "<html" in (run_dir / "report.html").read_text()


def test_second_run_skips_everything_and_deleting_an_output_reruns_its_stage(demo_run, fast_env):
    run_dir, _ = demo_run
    out = run_dir.parent.parent
    t0 = time.perf_counter()
    proc = cropmap("run", "--site", "demo-fast", "--out", out, env=fast_env)
    assert proc.returncode == 0, proc.stderr
    assert time.perf_counter() - t0 < 60
    assert all(s["skipped"] for s in manifest(run_dir)["stages"].values())
    (run_dir / "map" / "preview.png").unlink()
    proc = cropmap("run", "--site", "demo-fast", "--out", out, env=fast_env)
    assert proc.returncode == 0, proc.stderr
    stages = manifest(run_dir)["stages"]
    ran = [name for name, s in stages.items() if not s["skipped"]]
    assert "predict" in ran and not {"ingest", "labels", "tensors", "train", "evaluate"} & set(ran)
    assert (run_dir / "map" / "preview.png").exists()


def test_sites_lists_the_catalogue():
    proc = cropmap("sites")
    assert proc.returncode == 0 and "demo" in proc.stdout and "2018,2019" in proc.stdout


def test_unknown_site():
    assert_one_line_error(cropmap("run", "--site", "atlantis"), "unknown site 'atlantis'", "demo")


def test_malformed_site_file(tmp_path):
    d = tmp_path / "sites"
    d.mkdir()
    (d / "broken.yaml").write_text("name: broken\ncrs: EPSG:32631\nyears: [2019\n")
    assert_one_line_error(cropmap("run", "--site", "broken", env={"CROPMAP_SITES_DIR": str(d)}), "not valid YAML", "broken.yaml")


def test_missing_data_folder(tmp_path):
    d = tmp_path / "sites"
    doc = demo_doc("moved")
    doc["local"]["root"] = str(tmp_path / "nowhere")
    write_site(d, doc)
    assert_one_line_error(cropmap("run", "--site", "moved", "--out", tmp_path / "o", env={"CROPMAP_SITES_DIR": str(d)}),
                          "does not exist", "CROPMAP_DATA_ROOT")


def test_truncated_data_file(tmp_path, data_copy):
    f = next((data_copy / "0000280849BAC91C").glob("S1_GRD-*.nc"))
    f.write_bytes(f.read_bytes()[:2048])
    d = tmp_path / "sites"
    doc = demo_doc("damaged")
    doc["local"]["root"] = str(data_copy)
    write_site(d, doc)
    proc = cropmap("run", "--site", "damaged", "--out", tmp_path / "o", env={"CROPMAP_SITES_DIR": str(d)})
    assert_one_line_error(proc, f.name, "truncated")
    m = json.loads((tmp_path / "o" / "damaged" / "2019" / "run.json").read_text())
    assert m["status"] == "failed" and m["stages"]["ingest"]["status"] == "failed"


def test_unwritable_output_dir(tmp_path, fast_env):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert_one_line_error(cropmap("run", "--site", "demo-fast", "--out", blocker / "runs", env=fast_env), "cannot create output directory")


@pytest.fixture(scope="module")
def long_tables(tmp_path_factory, demo_run):
    """A small long table exported from the demo run's sample store, split by parcel."""
    run_dir, _ = demo_run
    d = tmp_path_factory.mktemp("long")
    proc = cropmap("export-samples", run_dir / "samples" / "pixels", d / "all.parquet")
    assert proc.returncode == 0, proc.stderr
    df = pd.read_parquet(d / "all.parquet")
    assert {"sample_id", "date", "B02", "B12", "VV", "VH", "label", "parcel_id", "x", "y", "epsg"} <= set(df.columns)
    ids = df.groupby("sample_id")["parcel_id"].first()
    keep = ids.groupby(ids).head(8).index  # 8 pixels per parcel keeps it quick
    df = df[df.sample_id.isin(keep)]
    test = df.parcel_id % 3 == 0
    df[~test].to_parquet(d / "train.parquet")
    df[test].to_parquet(d / "test.parquet")
    return d


def test_train_and_evaluate_on_long_tables(long_tables, tmp_path):
    proc = cropmap("train", "--samples", long_tables / "train.parquet", "--model", "stnet", "--out", tmp_path / "m",
                   "--epochs", "1", "--seed", "0", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m" / "model.safetensors").exists()
    proc = cropmap("evaluate", "--model", tmp_path / "m", "--samples", long_tables / "test.parquet", "--json")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    m = json.loads(lines[0])
    for k in ("overall_accuracy", "kappa", "macro_f1", "weighted_f1", "miou", "per_class", "n_samples"):
        assert k in m
    assert m["n_samples"] == pd.read_parquet(long_tables / "test.parquet").sample_id.nunique()


def test_samples_with_missing_columns(long_tables, tmp_path):
    bad = tmp_path / "bad.parquet"
    pd.read_parquet(long_tables / "train.parquet").drop(columns=["label"]).to_parquet(bad)
    assert_one_line_error(cropmap("train", "--samples", bad, "--model", "stnet", "--out", tmp_path / "m"), "lacks column(s) label")
    assert_one_line_error(cropmap("evaluate", "--model", tmp_path / "m", "--samples", bad, "--json"))


def test_evaluate_needs_a_model_directory(long_tables, tmp_path):
    assert_one_line_error(cropmap("evaluate", "--model", tmp_path, "--samples", long_tables / "test.parquet", "--json"),
                          "not a model directory")


def test_unknown_model_name(long_tables, tmp_path):
    assert_one_line_error(cropmap("train", "--samples", long_tables / "train.parquet", "--model", "resnet", "--out", tmp_path / "m"),
                          "unknown model 'resnet'", "stnet")


def test_prediction_does_not_depend_on_the_block_size(demo_run, fast_env, tmp_path, monkeypatch):
    """Memory is bounded by the block of rows; the map must not change with it."""
    from cropmap.pipeline.levels.pixel.predict import predict_site
    from cropmap.pipeline.sites import load_legend, load_site

    run_dir, _ = demo_run
    monkeypatch.setenv("CROPMAP_SITES_DIR", fast_env["CROPMAP_SITES_DIR"])
    site = load_site("demo-fast")
    cubes = [run_dir / "cube" / f"{t.id}.zarr" for t in site.local.tiles if t.year == 2019]
    predict_site(site, load_legend(site.legend), cubes, run_dir / "models" / "seed-0", tmp_path / "m.tif", tmp_path / "c.tif",
                 rows_per_block=5)
    with rasterio.open(tmp_path / "m.tif") as a, rasterio.open(run_dir / "map" / "crops.tif") as b:
        np.testing.assert_array_equal(a.read(1), b.read(1))


def test_label_budgets_and_pretrained_initialisation(long_tables, tmp_path):
    base = cropmap("train", "--samples", long_tables / "train.parquet", "--out", tmp_path / "a", "--epochs", "1", "--no-augment")
    assert base.returncode == 0, base.stderr
    proc = cropmap("train", "--samples", long_tables / "train.parquet", "--out", tmp_path / "b", "--epochs", "1",
                   "--labels-per-class", "5", "--pretrained", tmp_path / "a")
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "b" / "config.json").read_text())
    assert max(meta["data"]["train_per_class"].values()) <= 5
    assert meta["fit"]["pretrained"] == str(tmp_path / "a")
    both = cropmap("train", "--samples", long_tables / "train.parquet", "--out", tmp_path / "c",
                   "--labels-per-class", "5", "--label-fraction", "0.5")
    assert_one_line_error(both, "exclusive")


def test_pretrained_must_be_a_model_directory(long_tables, tmp_path):
    assert_one_line_error(cropmap("train", "--samples", long_tables / "train.parquet", "--out", tmp_path / "m",
                                  "--pretrained", tmp_path), "is not a model or encoder directory")
