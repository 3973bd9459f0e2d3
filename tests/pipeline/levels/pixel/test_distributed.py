"""Tiled stages on dask.distributed: identical maps, per-tile resume, killed workers, bad cluster options."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio

from cropmap.models.training import FitConfig
from cropmap.pipeline.cube import open_cube
from cropmap.pipeline.errors import StageError
from cropmap.pipeline.levels.pixel import distributed as D
from cropmap.pipeline.levels.pixel.predict import predict_site
from cropmap.pipeline.levels.pixel.tensors import concat_samples, labelled_samples
from cropmap.pipeline.levels.pixel.train import train_model
from cropmap.pipeline.stages.maps import read_class_table, validate_cog
from cropmap.pipeline.stages.stac import write_map_item
from cropmap.pipeline.synthetic import make_synthetic_site


def _samples(site, tiles):
    names = {c.code: c.name for c in site.legend().classes}
    parts = []
    for t in tiles:
        with rasterio.open(site.class_raster(t)) as ds:
            classes = ds.read(1)
        with rasterio.open(site.parcel_raster(t)) as ds:
            parcels = ds.read(1)
        parts.append(labelled_samples(open_cube(site.cube(t)), classes, parcels, names))
    return concat_samples(parts)


def _train(samples, out, epochs: int = 1):
    idx = np.arange(len(samples))
    train_model(samples, idx[::12], idx[5::61], out, model_name="tempcnn", fit_config=FitConfig(epochs=epochs, batch_size=128, max_len=16, seed=0))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2 x 2 tile synthetic site of 40 px tiles and a small model trained on it."""
    root = tmp_path_factory.mktemp("synthetic")
    site = make_synthetic_site(root, tiles_x=2, tiles_y=2, tile_px=40, s2_dates=8, s1_dates=5)
    model = _train(_samples(site, site.tiles), root / "model")
    return site, model


def _read(path):
    with rasterio.open(path) as ds:
        return ds.read(1)


def test_distributed_map_equals_single_process_map(tiny, tmp_path):
    site, model = tiny
    cubes = [site.cube(t) for t in site.tiles]
    a = predict_site(site.site(), site.legend(), cubes, model, tmp_path / "a" / "crops.tif", tmp_path / "a" / "conf.tif")
    with D.cluster_client(D.cluster_spec(2, processes=False)) as client:
        b = D.predict_site_distributed(site.site(), site.legend(), cubes, model, tmp_path / "b" / "crops.tif", tmp_path / "b" / "conf.tif",
                                       client=client, tiles_dir=tmp_path / "tiles")
    for name in ("crops.tif", "conf.tif"):
        np.testing.assert_array_equal(_read(tmp_path / "a" / name), _read(tmp_path / "b" / name))
        assert validate_cog(tmp_path / "b" / name) == []
    assert a["pixels_per_class"] == b["pixels_per_class"] and a["tiles"] == b["tiles"]
    assert sum(a["pixels_per_class"].values()) > 0.9 * site.pixels  # the map is filled, not nodata
    assert b["tiles_computed"] == 4 and b["tiles_reused"] == 0
    assert not (tmp_path / "tiles").exists()  # parts removed once the map is complete
    assert read_class_table(tmp_path / "b" / "crops.tif")[0].name == "maize"


def test_an_existing_cluster_by_scheduler_address(tiny, tmp_path):
    """--scheduler: the tiles go to a cluster started elsewhere (here a LocalCluster of this process)."""
    from dask.distributed import LocalCluster

    site, model = tiny
    cubes = [site.cube(t) for t in site.tiles[:2]]
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp://", dashboard_address=None) as cluster:
        spec = D.cluster_spec(None, cluster.scheduler_address)
        assert spec.describe() == f"dask scheduler {cluster.scheduler_address}"
        with D.cluster_client(spec) as client:
            got = D.predict_site_distributed(site.site(), site.legend(), cubes, model, tmp_path / "crops.tif", tmp_path / "conf.tif",
                                             client=client, tiles_dir=tmp_path / "tiles")
        assert len(cluster.scheduler.workers) == 1  # the cluster outlives the run's client
    assert got["tiles_computed"] == 2 and validate_cog(tmp_path / "crops.tif") == []


def test_distributed_samples_equal_single_process_samples(tiny, tmp_path):
    site, _ = tiny
    names = {c.code: c.name for c in site.legend().classes}
    jobs = [(t, site.cube(t), site.class_raster(t), site.parcel_raster(t)) for t in site.tiles]
    with D.cluster_client(D.cluster_spec(2, processes=False)) as client:
        got, res = D.samples_distributed(jobs, names, 0, client=client, tiles_dir=tmp_path / "tiles")
    want = _samples(site, site.tiles)
    assert sorted(res.computed) == sorted(site.tiles)
    np.testing.assert_array_equal(np.asarray(got.values), np.asarray(want.values))
    np.testing.assert_array_equal(got.offsets, want.offsets)
    assert list(got.table["sample_id"]) == list(want.table["sample_id"])


FAIL_MARK = "fail-once"


def _flaky_tile(tile: str, part: Path, mark_dir: str, fail: str) -> dict:
    """A tile function that raises for tile ``fail`` while the mark file exists."""
    if tile == fail and (Path(mark_dir) / FAIL_MARK).exists():
        raise RuntimeError(f"tile {tile} failed on purpose")
    part.write_text(f"part of {tile}")
    return {"pid": os.getpid()}


@pytest.mark.parametrize("in_cluster", [False, True])
def test_a_failed_tile_is_redone_alone_on_rerun(tmp_path, in_cluster):
    (tmp_path / FAIL_MARK).write_text("")
    ledger = D.TileLedger(tmp_path / "tiles", ".txt")
    jobs = [D.TileJob(t, "k1", (str(tmp_path), "t2")) for t in ("t0", "t1", "t2", "t3")]
    spec = D.cluster_spec(2 if in_cluster else 0, processes=False)
    with D.cluster_client(spec) as client:
        with pytest.raises(StageError, match=r"1 of 4 tiles failed \(first: tile t2.*the 3 finished tiles are kept"):
            D.run_tiled(client, _flaky_tile, jobs, ledger, retries=1)
        first = {t: json.loads(ledger.record_path(t).read_text()) for t in ("t0", "t1", "t3")}
        assert not ledger.record_path("t2").exists()
        (tmp_path / FAIL_MARK).unlink()
        res = D.run_tiled(client, _flaky_tile, jobs, ledger)
    assert res.computed == ["t2"] and sorted(res.reused) == ["t0", "t1", "t3"]
    for t, rec in first.items():  # finished tiles untouched
        assert json.loads(ledger.record_path(t).read_text()) == rec
    # another key (e.g. a retrained model) redoes every tile; a damaged part redoes its tile
    ledger.part("t1").write_text("damaged")
    assert ledger.finished("t1", "k1") is None and ledger.finished("t0", "k2") is None


def test_workers_get_the_gdal_settings_of_the_parent(monkeypatch):
    monkeypatch.setenv("GDAL_CACHEMAX", "123")
    monkeypatch.setenv("CPL_VSIL_CURL_ALLOWED_EXTENSIONS", ".tif")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "never-forwarded")
    env = D.gdal_env()
    assert env["GDAL_CACHEMAX"] == "123" and env["CPL_VSIL_CURL_ALLOWED_EXTENSIONS"] == ".tif" and "AWS_SECRET_ACCESS_KEY" not in env
    monkeypatch.delenv("GDAL_CACHEMAX")
    D.WorkerSetup(env, None).setup()  # what a worker runs when it starts (or joins an existing cluster)
    assert os.environ["GDAL_CACHEMAX"] == "123"


def test_cluster_options_are_checked():
    for workers in (-1, -3):
        with pytest.raises(D.ClusterError, match=rf"--workers must be a whole number >= 0, got {workers}; use --workers 0"):
            D.cluster_spec(workers)
    with pytest.raises(D.ClusterError, match="both given"):
        D.cluster_spec(2, "tcp://localhost:8786")
    for bad in ("", "tcp://", "localhost", "http//x:1", "tcp://host:99999"):
        with pytest.raises(D.ClusterError, match="--scheduler"):
            D.cluster_spec(None, bad)
    assert D.cluster_spec(None, "10.0.0.5:8786").scheduler == "tcp://10.0.0.5:8786"
    assert not D.cluster_spec(0).distributed and D.cluster_spec(3).distributed


def test_unreachable_scheduler_is_one_clear_error():
    spec = D.cluster_spec(None, "tcp://127.0.0.1:9", connect_timeout=1)
    with pytest.raises(D.ClusterError, match=r"cannot reach the dask scheduler at 'tcp://127.0.0.1:9'.*dask scheduler"):
        D.probe(spec)


def test_cli_rejects_negative_workers():
    proc = subprocess.run([sys.executable, "-m", "cropmap.pipeline.cli", "run", "--site", "demo", "--workers", "-2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert lines == ["cropmap: error: --workers must be a whole number >= 0, got -2; use --workers 0 (one process) or --workers N "
                     "(a local dask cluster of N worker processes)"]


def test_stac_item_has_projection_and_classes(tiny, tmp_path):
    site, model = tiny
    predict_site(site.site(), site.legend(), [site.cube(site.tiles[0])], model, tmp_path / "crops.tif", tmp_path / "confidence.tif")
    path = write_map_item(tmp_path / "crops.tif", tmp_path / "confidence.tif", None, item_id="synthetic-2024", year=2024)
    item = json.loads(path.read_text())
    assert path.name == "crops.stac.json" and item["type"] == "Feature" and item["id"] == "synthetic-2024"
    assert any("projection" in e for e in item["stac_extensions"]) and any("classification" in e for e in item["stac_extensions"])
    m = item["assets"]["map"]
    assert m["href"] == "crops.tif" and m["proj:code"] == "EPSG:32615"
    w, h = site.tile_px * 2, site.tile_px * 2
    assert m["proj:shape"] == [h, w]
    assert m["proj:transform"] == [10.0, 0.0, site.extent[0], 0.0, -10.0, site.extent[3]]
    classes = {c["value"]: c for c in m["classification:classes"]}
    assert classes[0]["nodata"] is True and classes[1]["name"] == "maize" and classes[1]["color_hint"] == "F2C94C"
    assert item["assets"]["confidence"]["proj:shape"] == [h, w]
    lon, lat = item["bbox"][0], item["bbox"][1]
    assert -96 < lon < -92 and 41 < lat < 43  # EPSG:32615 400 km E, 4700 km N: Iowa
    assert item["properties"]["start_datetime"].startswith("2024-01-01")


def test_bigtiff_is_decided_by_size():
    from cropmap.pipeline.stages.maps import bigtiff_option

    assert bigtiff_option(55300, 35400) == "NO"  # Iowa at 10 m
    assert bigtiff_option(60000, 60000) == "YES"
    assert bigtiff_option(1000, 1000) == "NO"


@pytest.mark.slow
def test_state_like_site_end_to_end_on_a_process_cluster_with_a_killed_worker(tmp_path):
    """Samples and map of a 4 x 3 tile site on a LocalCluster of 2 processes; one worker is SIGKILLed
    while tiles are being predicted: no finished tile is redone, and the map equals the one-process map."""
    site = make_synthetic_site(tmp_path / "site", tiles_x=4, tiles_y=3, tile_px=96, s2_dates=10, s1_dates=6)
    names = {c.code: c.name for c in site.legend().classes}
    jobs = [(t, site.cube(t), site.class_raster(t), site.parcel_raster(t)) for t in site.tiles]
    cubes = [site.cube(t) for t in site.tiles]
    with D.cluster_client(D.cluster_spec(2)) as client:
        samples, res = D.samples_distributed(jobs, names, 0, client=client, tiles_dir=tmp_path / "tiles-samples")
        assert len(res.computed) == 12
        model = _train(samples, tmp_path / "model", epochs=2)
        tiles_dir = tmp_path / "tiles"
        out: dict = {}

        def run():
            try:
                out["summary"] = D.predict_site_distributed(site.site(), site.legend(), cubes, model, tmp_path / "d" / "crops.tif",
                                                            tmp_path / "d" / "conf.tif", client=client, tiles_dir=tiles_dir, keep_parts=True)
            except BaseException as exc:  # noqa: BLE001
                out["error"] = exc

        th = threading.Thread(target=run)
        th.start()
        deadline = time.time() + 120
        while not list(tiles_dir.glob("*.json")) and time.time() < deadline:
            time.sleep(0.05)
        before = {p.name: json.loads(p.read_text()) for p in tiles_dir.glob("*.json")}
        pids = sorted(client.run(os.getpid).values())
        victim = next((p for p in pids if p not in {r["pid"] for r in before.values()}), pids[0])
        os.kill(victim, signal.SIGKILL)
        th.join(300)
        assert "error" not in out, out.get("error")
    assert before and len(before) < 12
    for name, rec in before.items():  # finished before the kill: never recomputed
        assert json.loads((tiles_dir / name).read_text()) == rec
    summary = out["summary"]
    assert summary["tiles_computed"] + summary["tiles_reused"] == 12
    predict_site(site.site(), site.legend(), cubes, model, tmp_path / "s" / "crops.tif", tmp_path / "s" / "conf.tif")
    for name in ("crops.tif", "conf.tif"):
        np.testing.assert_array_equal(_read(tmp_path / "d" / name), _read(tmp_path / "s" / name))


@pytest.mark.slow
def test_cropmap_run_with_workers_equals_the_one_process_run(tmp_path):
    """`cropmap run --workers 2` on the demo: the same samples and maps as without, tile counts and the STAC item in run.json."""
    from conftest import demo_doc, write_site

    sites = write_site(tmp_path / "sites", demo_doc("demo-fast")).parent
    env = {**os.environ, "CROPMAP_SITES_DIR": str(sites), "OMP_NUM_THREADS": "1"}
    runs = {}
    for label, extra in (("one", []), ("dask", ["--workers", "2"])):
        proc = subprocess.run([sys.executable, "-m", "cropmap.pipeline.cli", "run", "--site", "demo-fast", "--out", tmp_path / label, *extra],
                              capture_output=True, text=True, env=env, timeout=1200)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[label] = tmp_path / label / "demo-fast" / "2019"
    m = json.loads((runs["dask"] / "run.json").read_text())
    assert m["outputs"]["stac"].endswith("map/crops.stac.json")
    assert m["stages"]["predict"]["report"]["cluster"] == "LocalCluster of 2 worker processes"
    assert m["stages"]["predict"]["report"]["tiles_computed"] == 2 and m["stages"]["tensors"]["report"]["tiles_computed"] == 3
    stac = json.loads((runs["dask"] / m["outputs"]["stac"]).read_text())
    assert stac["assets"]["map"]["proj:code"] == "EPSG:32631"
    for name in ("map/crops.tif", "map/confidence.tif"):
        np.testing.assert_array_equal(_read(runs["one"] / name), _read(runs["dask"] / name))
    one = json.loads((runs["one"] / "run.json").read_text())
    assert one["stages"]["tensors"]["outputs"]["samples"]["sha256"] == m["stages"]["tensors"]["outputs"]["samples"]["sha256"]


def test_distributed_blend_map_uses_the_blends_own_temperature(tiny, tmp_path):
    """The auto run's blend maps through groups of members with one temperature per group: the
    distributed path gives the single-process map, and that temperature does change the confidence."""
    site, model = tiny
    cubes = [site.cube(t) for t in site.tiles]
    blend = {"groups": [[0, 1]], "group_temperatures": [2.5]}
    predict_site(site.site(), site.legend(), cubes, [model, model], tmp_path / "a" / "crops.tif", tmp_path / "a" / "conf.tif", **blend)
    predict_site(site.site(), site.legend(), cubes, [model, model], tmp_path / "c" / "crops.tif", tmp_path / "c" / "conf.tif",
                 groups=[[0, 1]], group_temperatures=[1.0])
    with D.cluster_client(D.cluster_spec(2, processes=False)) as client:
        D.predict_site_distributed(site.site(), site.legend(), cubes, [model, model], tmp_path / "b" / "crops.tif",
                                   tmp_path / "b" / "conf.tif", client=client, tiles_dir=tmp_path / "tiles", **blend)
    for name in ("crops.tif", "conf.tif"):
        np.testing.assert_array_equal(_read(tmp_path / "a" / name), _read(tmp_path / "b" / name))
    np.testing.assert_array_equal(_read(tmp_path / "a" / "crops.tif"), _read(tmp_path / "c" / "crops.tif"))
    assert (_read(tmp_path / "a" / "conf.tif") != _read(tmp_path / "c" / "conf.tif")).any()
    with rasterio.open(tmp_path / "a" / "crops.tif") as da, rasterio.open(tmp_path / "b" / "crops.tif") as db:
        assert da.tags().get("cropmap_confidence_calibration") == db.tags().get("cropmap_confidence_calibration")
