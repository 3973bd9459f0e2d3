"""Parcel pixel sets from the real demo data: label-raster and polygon parcels, bad parcel input,
the parcel store, `cropmap train/evaluate` on parcels and `cropmap run --level parcel`."""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pytest
from conftest import TILE_FULL, assert_one_line_error, cropmap, demo_doc, write_site
from shapely.geometry import Polygon, box

from cropmap.pipeline.errors import DataError, SamplesError
from cropmap.pipeline.ingest.local import read_label_raster, read_tile
from cropmap.pipeline.levels.parcel.parcels import (
    load_parcel_store,
    polygon_parcel_samples,
    read_parcel_polygons,
    save_parcel_store,
    tile_parcel_sets,
)
from cropmap.pipeline.levels.parcel.stages import _polygonise
from cropmap.pipeline.sites import load_legend, load_site
from cropmap.pipeline.stages.labels import tile_labels
from cropmap.pipeline.stages.maps import validate_cog


@pytest.fixture(scope="module")
def demo_tile():
    site = load_site("demo")
    legend = load_legend(site.legend)
    cube, _ = read_tile(site, TILE_FULL, 2019)
    codes, grid = read_label_raster(site, TILE_FULL)
    tl = tile_labels(codes, legend, tile=TILE_FULL, tile_index=1, year=2019, transform=grid.transform)
    return site, legend, cube, tl


def test_raster_parcels_become_pixel_sets_and_round_trip(demo_tile, tmp_path):
    _, legend, cube, tl = demo_tile
    table = tl.parcel_table.rename(columns={"class_code": "label"})[["parcel_id", "label", "class_name"]]
    samples, skipped = tile_parcel_sets(cube, tl.parcels, table, max_pixels=16, s1_window=12)
    assert len(samples) + sum(skipped.values()) == len(table)  # every parcel kept or counted
    s2, s1 = samples.sets.sensors["s2"], samples.sets.sensors["s1"]
    assert s2.values.shape[1:] == (10, 16) and s1.values.shape[1:] == (2, 16)
    assert (s2.lengths > 0).all() and (s1.lengths > 0).all()
    assert not np.array_equal(s2.days[: s2.lengths[0]], s1.days[: s1.lengths[0]])  # each sensor on its own dates
    n = samples.table["n_pixels"].to_numpy()
    np.testing.assert_array_equal(samples.sets.n_pixels, np.minimum(n, 16))
    np.testing.assert_allclose(samples.table["area_m2"], n * 100.0)
    real = s2.values[: s2.lengths[0], :, : samples.sets.n_pixels[0]]
    assert not np.isnan(real).any()  # cloudy pixels of kept dates are filled, padding stays NaN
    save_parcel_store(samples, tmp_path / "store")
    back = load_parcel_store(tmp_path / "store")
    np.testing.assert_array_equal(np.asarray(back.sets.sensors["s2"].values), s2.values)
    assert list(back.table["parcel_id"]) == list(samples.table["parcel_id"])
    (tmp_path / "store" / "s1_offsets.npy").write_bytes(b"broken")
    with pytest.raises(SamplesError, match="damaged"):
        load_parcel_store(tmp_path / "store")


def _polygons(demo_tile):
    site, _, cube, tl = demo_tile
    from cropmap.pipeline.cube import grid_of

    polys = _polygonise({TILE_FULL: tl.parcels}, {TILE_FULL: cube})
    codes = dict(zip(tl.parcel_table["parcel_id"], tl.parcel_table["source_code"]))
    polys["CODE_GROUP"] = polys["parcel_id"].map(codes)
    polys["ID_PARCEL"] = [f"P{i}" for i in polys["parcel_id"]]
    g = grid_of(cube)
    x0, y0 = g.transform.c, g.transform.f
    extra = gpd.GeoDataFrame({
        "parcel_id": [0, 0, 0, 0, 0], "CODE_GROUP": [1200, 1200, 1200, 9999, 1200], "ID_PARCEL": ["bowtie", "far", "tiny", "odd", "edge"],
    }, geometry=[
        Polygon([(x0 + 5, y0 - 5), (x0 + 55, y0 - 55), (x0 + 55, y0 - 5), (x0 + 5, y0 - 55)]),  # self-intersecting: repaired
        box(x0 + 1e5, y0, x0 + 1e5 + 50, y0 + 50),  # far outside the tile
        box(x0 + 301, y0 - 309, x0 + 304, y0 - 306),  # 3 m x 3 m: smaller than a pixel
        box(x0 + 100, y0 - 100, x0 + 140, y0 - 140),  # code not in the legend
        box(x0 - 50, y0 - 200, x0 + 30, y0 - 260),  # crosses the tile's west edge
    ], crs=polys.crs)
    return gpd.GeoDataFrame(pd_concat([polys, extra]), crs=polys.crs)


def pd_concat(frames):
    import pandas as pd

    return pd.concat(frames, ignore_index=True)


def test_polygon_parcels_count_every_skip_and_fix(demo_tile, tmp_path):
    site, legend, cube, _ = demo_tile
    gdf = _polygons(demo_tile)
    path = tmp_path / "rpg.gpkg"
    gdf.to_crs("EPSG:4326").to_file(path)  # another CRS: reprojected
    parcels, report = read_parcel_polygons(path, code_column="CODE_GROUP", id_column="ID_PARCEL", crs=site.crs)
    assert report["reprojected_from"].endswith("4326") and report["repaired_geometries"] == 1
    samples, rasters, rep = polygon_parcel_samples(parcels, {TILE_FULL: cube}, legend.source_lookup(),
                                                   {c.code: c.name for c in legend.classes}, max_pixels=8, s1_window=12)
    assert rep["skipped"]["outside_tiles"] == 1 and rep["skipped"]["unmapped_code"] == 1
    assert rep["smaller_than_pixel"] == 1
    assert rep["parcels_kept"] + sum(rep["skipped"].values()) == len(parcels)
    ids = set(samples.table["source_parcel_id"])
    assert {"bowtie", "tiny", "edge"} <= ids and "far" not in ids and "odd" not in ids
    row = samples.table.set_index("source_parcel_id").loc["edge"]
    assert row["cover_ratio"] < 0.7  # only the part inside the tile has pixels
    assert (rasters[TILE_FULL] > 0).sum() == samples.table["n_pixels"].sum()


def test_bad_parcel_files_are_one_clear_error(demo_tile, tmp_path):
    site = demo_tile[0]
    gdf = _polygons(demo_tile)
    gdf.to_file(tmp_path / "ok.gpkg")
    with pytest.raises(DataError, match="no column 'CODE'"):
        read_parcel_polygons(tmp_path / "ok.gpkg", code_column="CODE", crs=site.crs)
    nocrs = gdf.set_crs(None, allow_override=True)
    nocrs.to_file(tmp_path / "nocrs.shp")
    with pytest.raises(DataError, match="no CRS"):
        read_parcel_polygons(tmp_path / "nocrs.shp", code_column="CODE_GROUP", crs=site.crs)
    with pytest.raises(DataError, match="does not exist"):
        read_parcel_polygons(tmp_path / "missing.gpkg", code_column="CODE_GROUP", crs=site.crs)
    far = gdf.translate(xoff=5e5)
    gpd.GeoDataFrame({"CODE_GROUP": gdf["CODE_GROUP"]}, geometry=far, crs=gdf.crs).to_parquet(tmp_path / "far.parquet")
    parcels, _ = read_parcel_polygons(tmp_path / "far.parquet", code_column="CODE_GROUP", crs=site.crs)
    legend = demo_tile[1]
    with pytest.raises(DataError, match="overlaps the site"):
        polygon_parcel_samples(parcels, {TILE_FULL: demo_tile[2]}, legend.source_lookup(), {c.code: c.name for c in legend.classes})


@pytest.fixture(scope="module")
def parcel_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("sites")
    write_site(d, {**demo_doc("demo-parcel", split_seeds=[0, 1]), "parcel": {"epochs": 2, "max_pixels": 16, "sample_pixels": 8}})
    env = {"CROPMAP_SITES_DIR": str(d)}
    out = tmp_path_factory.mktemp("runs")
    proc = cropmap("run", "--site", "demo-parcel", "--level", "parcel", "--out", out, env=env)
    assert proc.returncode == 0, proc.stderr
    return out / "demo-parcel" / "2019", env


def test_run_level_parcel_writes_a_parcel_map_and_the_pixel_map_format(parcel_run):
    run_dir, _ = parcel_run
    m = json.loads((run_dir / "run.json").read_text())
    assert m["status"] == "succeeded"
    assert {"map", "metrics", "model", "report", "parcel_map"} <= set(m["outputs"])
    assert "train" not in m["stages"] and "parcel_train" in m["stages"]
    gdf = gpd.read_file(run_dir / m["outputs"]["parcel_map"])
    assert gdf.crs.to_epsg() == 32631 and gdf["parcel_id"].is_unique
    report = m["stages"]["parcel_tensors"]["report"]
    assert len(gdf) == m["stages"]["parcel_predict"]["report"]["parcels_mapped"] > 30  # the 2019 tiles' parcels
    assert report["parcels_kept"] + sum(report["skipped"].values()) == report["parcels_read"]
    probs = gdf[[c for c in gdf.columns if c.startswith("p_")]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
    assert validate_cog(run_dir / m["outputs"]["map"]) == [] and validate_cog(run_dir / "map" / "confidence.tif") == []
    metrics = json.loads((run_dir / m["outputs"]["metrics"]).read_text())
    assert metrics["level"] == "parcel" and metrics["n_runs"] == 2
    for k in ("overall_accuracy", "kappa", "macro_f1", "miou", "baseline", "per_class"):
        assert k in metrics
    test_ids = {int(k) for k, v in json.loads((run_dir / m["outputs"]["model"] / "split.json").read_text())["parcels"].items() if v == "test"}
    assert metrics["runs"][0]["model"]["n_samples"] == len(test_ids)  # one prediction per held-out parcel


def test_train_and_evaluate_cli_on_the_parcel_store(parcel_run, tmp_path):
    run_dir, env = parcel_run
    store = run_dir / "samples" / "parcels"
    proc = cropmap("train", "--samples", store, "--model", "psetae", "--fusion", "early", "--sensors", "s1+s2", "--epochs", "1",
                   "--s2-date-fraction", "0.2", "--until", "09-30", "--out", tmp_path / "m", env=env)
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["options"]["s2_date_fraction"] == 0.2 and cfg["options"]["until"] == "09-30" and cfg["fit"]["loss"] == "focal"
    proc = cropmap("evaluate", "--model", tmp_path / "m", "--samples", store, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for k in ("overall_accuracy", "kappa", "macro_f1", "weighted_f1", "miou", "per_class", "n_samples"):
        assert k in out
    assert out["n_samples"] + out["n_parcels_without_dates"] == len(load_parcel_store(store))
    assert_one_line_error(cropmap("train", "--samples", store, "--model", "psetae", "--fusion", "tsa", "--sensors", "s2", "--out", tmp_path / "x", env=env),
                          "needs sensors s1+s2")
    assert_one_line_error(cropmap("train", "--samples", store, "--model", "psetae", "--until", "13-40", "--out", tmp_path / "x", env=env), "MM-DD")
    assert_one_line_error(cropmap("evaluate", "--model", tmp_path / "m", "--samples", run_dir / "samples", env=env), "not a parcel store")
