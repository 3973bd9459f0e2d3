"""The gee ingest and labels stages end to end on REAL pixels: the fake client serves the demo
tile's data as Earth Engine would export it, the read-back builds the local source's cube format,
and the tensors stage consumes it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import rasterio
from conftest import TILE_FULL, gee_demo_doc, write_site

from cropmap.pipeline.cube import open_cube
from cropmap.pipeline.errors import DataError
from cropmap.pipeline.ingest.gee import builders as b
from cropmap.pipeline.ingest.gee.fake import DemoServer, FakeClient, write_shards
from cropmap.pipeline.ingest.gee.readback import block_split, read_shards, samples_from_table
from cropmap.pipeline.ingest.gee.source import GeeSource, parcel_ids, rasterize_parcels, read_parcels
from cropmap.pipeline.ingest.gee.tiles import site_tiles
from cropmap.pipeline.ingest.local import read_label_raster, read_tile
from cropmap.pipeline.runner import Runner
from cropmap.pipeline.sites import load_legend, load_site
from cropmap.pipeline.workflow import build_stages


@pytest.fixture
def demo_local():
    site = load_site("demo")
    cube, _ = read_tile(site, TILE_FULL, 2019)
    return site, cube, read_label_raster(site, TILE_FULL)


def _client_factory(folder, demo_local, **kw):
    _, cube, labels = demo_local

    def cdl_info(expr):
        text = str(expr)
        return ["2018", "2019"] if "AggregateFeatureCollection" in text else ["cropland", "confidence"]

    def factory(site):
        return FakeClient(folder, DemoServer(site, 2019, [cube], [labels], shard=kw.pop("shard", None)),
                          info=cdl_info, script=kw.pop("script", None))

    return factory


def test_ingest_labels_tensors_on_demo_pixels(tmp_path, sites_dir, demo_local, ee_offline):
    write_site(sites_dir, gee_demo_doc(tmp_path / "exports"))
    site = load_site("demo-gee")
    clients = []
    factory = _client_factory(tmp_path / "exports", demo_local, script={"/s2/": ["memory"]})
    stages, legend = build_stages(site, 2019, gee_client=lambda s: clients.append(factory(s)) or clients[-1])
    run_dir = tmp_path / "run"
    manifest = Runner(run_dir, {"site": site.name, "year": 2019}).run(stages[:3], lambda done: {})
    assert manifest["status"] == "succeeded"
    ingest = manifest["stages"]["ingest"]["report"]
    assert ingest["exports"] == 5 and ingest["eecu_hours"] > 0  # S2 split into 4 quadrants after a memory error, + S1

    _, local, (codes, lgrid) = demo_local
    cube = open_cube(run_dir / "cube" / "x0000y0000.zarr").load()
    # the cube format of the local source: same variables, dims, dtypes, grid and band attributes
    for var in ("s2", "s2_clear", "s1"):
        assert cube[var].dims == local[var].dims and cube[var].dtype == local[var].dtype
    for key in ("epsg", "transform", "bands_s2", "bands_s1", "missing_bands", "s2_scale"):
        assert cube.attrs[key] == local.attrs[key], key
    np.testing.assert_allclose(cube.x.values, local.x.values) and np.testing.assert_allclose(cube.y.values, local.y.values)
    assert cube.attrs["temporal"] == "composite" and cube.sizes["time_s2"] == 37

    # pixel values: independent recomputation of one period from the raw demo acquisitions
    periods = b.composite_periods(site.gee, 2019)
    t = local.time_s2.values
    counts = [((t >= np.datetime64(p.start)) & (t < np.datetime64(p.end))).sum() for p in periods]
    i = int(np.argmax(counts))
    sel = (t >= np.datetime64(periods[i].start)) & (t < np.datetime64(periods[i].end))
    clear = local.s2_clear.values[sel]
    assert cube.s2_clear.values[i].sum() > 0
    r, c = np.argwhere(clear.any(axis=0))[0]
    expected = np.median(local.s2.values[sel][clear[:, r, c], :, r, c].astype(float), axis=0)
    np.testing.assert_array_equal(cube.s2.values[i, :, r, c], np.floor(expected + 0.5).astype(np.uint16))
    assert not cube.s2_clear.values[[k for k, n in enumerate(counts) if n == 0]].any()
    s1t = local.time_s1.values
    s1sel = (s1t >= np.datetime64(periods[i].start)) & (s1t < np.datetime64(periods[i].end))
    if s1sel.any():
        lin = np.nanmean(10 ** (local.s1.values[s1sel, :, r, c].astype(float) / 10), axis=0)
        np.testing.assert_allclose(cube.s1.values[i, :, r, c], 10 * np.log10(lin), rtol=1e-5)

    # labels: CDL-style export read back, mapped through the legend, parcels recovered
    labels_report = manifest["stages"]["labels"]["report"]
    assert any("confidence > 95" in n for n in labels_report["notes"])
    with rasterio.open(run_dir / "labels" / "x0000y0000_class.tif") as ds:
        classes = ds.read(1)
        assert ds.transform == lgrid.transform
    lookup = load_legend("demo").source_lookup()
    np.testing.assert_array_equal(classes, np.vectorize(lambda v: lookup.get(int(v), 0))(codes))
    assert labels_report["parcels"] > 5

    # tensors consumed the composite cube
    tensors = manifest["stages"]["tensors"]["report"]
    assert tensors["n_samples"] > 100 and tensors["mean_length"] > 5

    # rerun: stages unchanged are skipped, no export submitted again
    started = sum(len(cl.started) for cl in clients)
    manifest2 = Runner(run_dir, {"site": site.name, "year": 2019}).run(stages[:3], lambda done: {})
    assert all(st.get("skipped") for st in manifest2["stages"].values())
    stages3, _ = build_stages(site, 2019, gee_client=lambda s: clients.append(factory(s)) or clients[-1])
    Runner(run_dir, {"site": site.name, "year": 2019}, force=True).run(stages3[:2], lambda done: {})
    assert sum(len(cl.started) for cl in clients) == started  # forced rerun: outputs exist, nothing resubmitted


def test_cdl_year_not_published_is_one_clear_error(tmp_path, sites_dir, demo_local, ee_offline):
    write_site(sites_dir, gee_demo_doc(tmp_path / "exports"))
    site = load_site("demo-gee").model_copy(update={"years": [2019, 2025]})
    src = GeeSource(site, 2025, lambda s: FakeClient(tmp_path, info=lambda expr: ["2023", "2024"]))
    with pytest.raises(DataError, match=r"USDA CDL 2025 is not in Earth Engine yet \(latest: 2024.*run an earlier --year \(e.g. 2024\)"):
        src.check_cdl()
    src = GeeSource(site, 2024, lambda s: FakeClient(tmp_path, info=lambda expr: ["2024"] if "Aggregate" in str(expr) else ["cropland"]))
    has_conf, note = src.check_cdl()
    assert not has_conf and "no confidence band" in note


@pytest.mark.parametrize("s1_window", [0, 12])
def test_sample_table_read_back_matches_demo_pixels(tmp_path, sites_dir, demo_local, ee_offline, s1_window):
    """Exported rows (raw S2 clear acquisitions + raw S1) read back give, per sampled pixel, exactly
    the series the cube path cuts from the raw demo cube (same bands, days, S1 windows)."""
    from cropmap.pipeline.levels.pixel.tensors import cube_series

    write_site(sites_dir, gee_demo_doc(tmp_path / "exports"))
    site = load_site("demo-gee")
    _, cube, labels = demo_local
    server = DemoServer(site, 2019, [cube], [labels], seed=3)
    server.serve_samples("cropmap/demo-gee/2019/samples/x0000y0000", {"selectors": b.sample_columns(site)}, tmp_path)
    table = pd.read_csv(tmp_path / "cropmap/demo-gee/2019/samples/x0000y0000.csv")
    samples = samples_from_table(table, site, load_legend("demo"), 2019, s1_window=s1_window, tile="x0000y0000")
    assert len(samples) > 20 and set(samples.table["split"]) <= {"train", "val", "test"}
    assert samples.bands == [*site.bands.s2, *site.bands.s1]
    for i in range(0, len(samples), max(1, len(samples) // 5)):
        _, r, c = samples.table["sample_id"].iloc[i].rsplit("_", 2)
        mask = np.zeros((cube.sizes["y"], cube.sizes["x"]), bool)
        mask[int(r), int(c)] = True
        values, days, lengths = cube_series(cube, pixel_mask=mask, s1_window=s1_window)
        got_values, got_days = samples.series(i)
        np.testing.assert_array_equal(got_days, days)
        np.testing.assert_allclose(got_values, values, rtol=1e-5)


def test_block_split_keeps_blocks_together():
    bx, by = np.repeat(np.arange(40), 5), np.tile(np.arange(5), 40)
    s = block_split(bx, by, 0, 0.3, 0.1)
    again = block_split(bx, by, 0, 0.3, 0.1)
    assert (s == again).all() and {"train", "test"} <= set(s)
    assert (block_split(np.array([3, 3]), np.array([4, 4]), 1, 0.3, 0.1)[0] == block_split(np.array([3]), np.array([4]), 1, 0.3, 0.1)).all()


def test_read_shards_checks_grid_and_coverage(tmp_path):
    from affine import Affine

    from cropmap.pipeline.cube import TileGrid

    grid = TileGrid(32631, Affine(10, 0, 1000, 0, -10, 2000), 4, 6)
    data = np.arange(2 * 4 * 6, dtype=np.uint16).reshape(2, 4, 6)
    paths = write_shards(data, grid.transform, 32631, "e/t", tmp_path, shard=4)
    assert len(paths) == 2 and paths[1].name == "t-0000000000-0000000004.tif"
    np.testing.assert_array_equal(read_shards(paths, grid), data)
    with pytest.raises(DataError, match="cover 66.7% of the tile"):
        read_shards(paths[:1], grid)
    off = write_shards(data, Affine(10, 0, 1005, 0, -10, 2000), 32631, "f/t", tmp_path, shard=8)
    with pytest.raises(DataError, match="not on the tile's pixel grid"):
        read_shards(off, grid)
    other = write_shards(data, grid.transform, 32632, "g/t", tmp_path, shard=8)
    with pytest.raises(DataError, match="EPSG:32632, the tile is in EPSG:32631"):
        read_shards(other, grid)


def test_parcels_rasterised_on_the_tile_grid(tmp_path, sites_dir):
    import geopandas as gpd
    from shapely.geometry import box

    gdf = gpd.GeoDataFrame({"CODE_GROUP": ["1", "18"], "ID_PARCEL": [10, 11]},
                           geometry=[box(574700, 5622300, 574800, 5622400), box(575000, 5621900, 575100, 5622000)], crs="EPSG:32631")
    gdf.to_crs("EPSG:2154").to_file(tmp_path / "rpg.gpkg")  # RPG is in Lambert-93
    doc = gee_demo_doc(tmp_path / "exports")
    doc.update(label_source="parcels", legend="rpg", parcels={"path": str(tmp_path / "rpg.gpkg"), "id_column": "ID_PARCEL"})
    write_site(sites_dir, doc)
    site = load_site("demo-gee")
    parcels = read_parcels(site)
    grid = site_tiles(site)[0].grid
    assert (grid.epsg, grid.width, grid.height, grid.transform.c, grid.transform.f) == (32631, 64, 64, 574680, 5622440)
    codes = rasterize_parcels(parcels, grid, "CODE_GROUP")
    assert (codes == 1).sum() == pytest.approx(100, abs=12) and (codes == 18).sum() == pytest.approx(100, abs=12)
    bad = dict(doc, parcels={"path": str(tmp_path / "rpg.gpkg"), "code_column": "CODE_CULTU"})
    write_site(sites_dir, bad)
    with pytest.raises(DataError, match=r"no column\(s\) \['CODE_CULTU'\].*set parcels.code_column"):
        read_parcels(load_site("demo-gee"))


def test_parcel_ids_come_from_the_id_column(tmp_path, sites_dir, demo_local, ee_offline):
    """RPG-style parcels (ID_PARCEL digit strings) built from the demo's own fields: the labels
    stage keeps the file's ids, even for two adjacent fields of one crop that connected-region
    recovery would merge into one parcel."""
    import geopandas as gpd
    from rasterio.features import geometry_mask, shapes
    from shapely.geometry import box, shape

    from cropmap.pipeline.stages.labels import recover_parcels

    _, _, (codes, lgrid) = demo_local
    polys = [(shape(g), int(v)) for g, v in shapes(codes.astype(np.int32), mask=codes > 0, transform=lgrid.transform, connectivity=4)]
    big, code = max(polys, key=lambda p: p[0].area)
    xmin, ymin, xmax, ymax = big.bounds
    xcut = xmin + round((xmax - xmin) / 20) * 10  # on a pixel edge
    halves = [big.intersection(box(xmin, ymin, xcut, ymax)), big.intersection(box(xcut, ymin, xmax, ymax))]
    rows = [(g, c) for g, c in polys if g is not big] + [(h, code) for h in halves]
    ids = [f"{1_000_000 + 7 * k:09d}" for k in range(len(rows))]
    gdf = gpd.GeoDataFrame({"ID_PARCEL": ids, "CODE": [c for _, c in rows]}, geometry=[g for g, _ in rows], crs="EPSG:32631")
    gdf.to_file(tmp_path / "parcels.gpkg")
    doc = gee_demo_doc(tmp_path / "exports")
    doc.update(label_source="parcels", parcels={"path": str(tmp_path / "parcels.gpkg"), "code_column": "CODE", "id_column": "ID_PARCEL"})
    write_site(sites_dir, doc)
    site = load_site("demo-gee")
    stages, _ = build_stages(site, 2019, gee_client=_client_factory(tmp_path / "exports", demo_local))
    run_dir = tmp_path / "run"
    manifest = Runner(run_dir, {"site": site.name, "year": 2019}).run([s for s in stages if s.name == "labels"], lambda done: {})
    report = manifest["stages"]["labels"]["report"]
    assert any("parcel ids from column ID_PARCEL" in n for n in report["notes"])
    with rasterio.open(run_dir / "labels" / "x0000y0000_parcel.tif") as ds:
        parcels = ds.read(1)
    with rasterio.open(run_dir / "labels" / "x0000y0000_class.tif") as ds:
        classes = ds.read(1)
    lookup = load_legend("demo").source_lookup()
    np.testing.assert_array_equal(classes, np.vectorize(lambda v: lookup.get(int(v), 0))(codes))
    # every labelled pixel carries the id of the file's parcel that holds it
    expected = np.zeros(codes.shape, np.int64)
    for k, (g, _) in enumerate(rows):
        expected[geometry_mask([g], codes.shape, lgrid.transform, invert=True)] = int(ids[k])
    np.testing.assert_array_equal(parcels, np.where(classes > 0, expected, 0))
    table = pd.read_parquet(run_dir / "labels" / "parcels.parquet")
    assert set(table["parcel_id"]) == set(np.unique(parcels[parcels > 0])) <= {int(i) for i in ids}
    left, right = int(ids[-2]), int(ids[-1])
    assert lookup.get(code)  # the split field is of a mapped class
    assert (parcels == left).sum() > 20 and (parcels == right).sum() > 20  # ... and stays two parcels
    recovered = recover_parcels(np.where(classes > 0, codes, 0), 0)
    assert len(np.unique(recovered[(parcels == left) | (parcels == right)])) == 1  # connected regions would merge them
    assert report["parcels"] == len(table)
    assert list(parcel_ids(pd.Series(["A-1", "7", "A-1"]), "f", "c")) == [1, 2, 1]  # non-numeric ids: numbered
    with pytest.raises(DataError, match="column ID has 1 empty id.*unset parcels.id_column"):
        parcel_ids(pd.Series(["1", None]), "f.gpkg", "ID")


def test_run_with_exported_sample_tables(tmp_path, sites_dir, demo_local, ee_offline):
    """``gee.samples: table`` through the Runner: the tensors stage exports per-tile stratified sample
    tables (fake client, real demo pixels) and builds the sample store from them."""
    from cropmap.pipeline.errors import SiteError
    from cropmap.pipeline.ingest.gee.readback import block_parcel_id
    from cropmap.pipeline.samples import load_store

    write_site(sites_dir, gee_demo_doc(tmp_path / "exports", samples="table", block_size_m=160))
    site = load_site("demo-gee")
    clients = []
    factory = _client_factory(tmp_path / "exports", demo_local)
    stages, _ = build_stages(site, 2019, gee_client=lambda s: clients.append(factory(s)) or clients[-1])
    run_dir = tmp_path / "run"
    manifest = Runner(run_dir, {"site": site.name, "year": 2019}).run(stages[:3], lambda done: {})
    report = manifest["stages"]["tensors"]["report"]
    assert report["samples_from"].startswith("Earth Engine sample tables") and report["exports"] == 1 and report["eecu_hours"] > 0
    assert any("/samples/x0000y0000" in n for c in clients for n in c.started)
    samples = load_store(run_dir / "samples" / "pixels", mmap=False)
    _, cube, (codes, _) = demo_local
    lookup = load_legend("demo").source_lookup()
    mapped = {lookup[int(v)] for v in np.unique(codes) if int(v) in lookup}
    counts = samples.table["label"].value_counts()
    sources = pd.Series([lookup[int(v)] for v in np.unique(codes) if int(v) in lookup]).value_counts()
    assert set(counts.index) == mapped  # stratified per source code (several CDL codes can make one class)
    assert (counts <= site.gee.samples_per_class * sources.reindex(counts.index)).all()
    assert samples.bands == [*site.bands.s2, *site.bands.s1]
    t = samples.table
    np.testing.assert_array_equal(t["parcel_id"], block_parcel_id(np.floor(t["x"] / 160), np.floor(t["y"] / 160)))
    assert t["parcel_id"].nunique() >= 8  # blocks are the split unit: several per 640 m tile
    r, c = (int(v) for v in t["sample_id"].iloc[0].rsplit("_", 2)[1:])
    values, _ = samples.series(0)
    s2 = values[:, :len(site.bands.s2)]
    s2 = s2[~np.isnan(s2).all(axis=1)]
    clear = cube.s2_clear.values[:, r, c]
    np.testing.assert_allclose(s2, cube.s2.values[clear, :, r, c] * 1e-4, rtol=1e-6)  # raw clear acquisitions
    assert (codes[r, c] in lookup) and lookup[int(codes[r, c])] == t["label"].iloc[0]

    doc = gee_demo_doc(tmp_path / "exports", samples="table")
    doc.update(label_source="parcels", legend="rpg", parcels={"path": str(tmp_path / "p.gpkg")})
    write_site(sites_dir, doc)
    with pytest.raises(SiteError, match="gee.samples: table samples CDL labels.*use gee.samples: cube"):
        load_site("demo-gee")
