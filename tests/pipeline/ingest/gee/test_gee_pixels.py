"""computePixels on REAL demo pixels: the fake client answers NPY bytes on the requested grid, the
request tiler stays under the documented limits, retries 429s, splits out-of-memory requests,
and assembles the same cube as the batch exports."""

from __future__ import annotations

import io

import numpy as np
import pytest
from affine import Affine
from conftest import TILE_FULL, gee_demo_doc, write_site

from cropmap.pipeline.cube import TileGrid, open_cube
from cropmap.pipeline.errors import DataError, SiteError
from cropmap.pipeline.ingest.gee import builders as b
from cropmap.pipeline.ingest.gee.fake import DemoServer, FakeClient
from cropmap.pipeline.ingest.gee.pixels import MAX_REQUEST_BYTES, MAX_REQUEST_SIDE, FetchStats, Window, decode_npy, fetch_pixels, grid_request, plan_windows
from cropmap.pipeline.ingest.gee.source import GeeSource
from cropmap.pipeline.ingest.local import read_label_raster, read_tile
from cropmap.pipeline.runner import Runner
from cropmap.pipeline.sites import load_site
from cropmap.pipeline.workflow import build_stages


@pytest.fixture(scope="module")
def demo_local():
    site = load_site("demo")
    cube, _ = read_tile(site, TILE_FULL, 2019)
    return cube.load(), read_label_raster(site, TILE_FULL)


@pytest.fixture
def gee_site(tmp_path, sites_dir):
    def make(**gee):
        write_site(sites_dir, gee_demo_doc(tmp_path / "exports", **gee))
        return load_site("demo-gee")
    return make


def _covered(windows, height, width) -> np.ndarray:
    hits = np.zeros((height, width), np.int32)
    for w in windows:
        hits[w.row:w.row + w.height, w.col:w.col + w.width] += 1
    return hits


@pytest.mark.parametrize("height, width, bpp", [(3000, 3000, 37 * 11 * 2), (5, 100_000, 1), (70_000, 3, 1), (64, 64, 4), (1, 1, 814)])
def test_request_plan_stays_under_the_limits_and_covers_exactly(height, width, bpp):
    windows = plan_windows(height, width, bpp)
    for w in windows:
        assert w.height * w.width * bpp <= MAX_REQUEST_BYTES
        assert max(w.height, w.width) <= MAX_REQUEST_SIDE
    assert (_covered(windows, height, width) == 1).all()  # every pixel exactly once
    if height * width * bpp <= MAX_REQUEST_BYTES and max(height, width) <= MAX_REQUEST_SIDE:
        assert len(windows) == 1


def test_request_plan_for_a_state_tile_and_too_many_bands():
    # a 30 km tile of 37 ten-day periods x (10 S2 bands + clear), uint16: ~7.3 GB -> requests of <= 48 MB
    windows = plan_windows(3000, 3000, 37 * 11 * 2)
    assert len(windows) >= 3000 * 3000 * 37 * 11 * 2 / MAX_REQUEST_BYTES
    assert len(windows) <= 2 * 3000 * 3000 * 37 * 11 * 2 / MAX_REQUEST_BYTES
    with pytest.raises(DataError, match="over the 48000000-byte request limit; request fewer bands"):
        plan_windows(10, 10, MAX_REQUEST_BYTES + 1)


def test_fake_compute_pixels_answers_real_demo_pixels_as_npy(tmp_path, gee_site, demo_local, ee_offline):
    site = gee_site()
    cube, labels = demo_local
    client = FakeClient(tmp_path, DemoServer(site, 2019, [cube], [labels]))
    periods = b.composite_periods(site.gee, 2019)
    tile = GeeSource(site, 2019, lambda s: client).tiles[0]
    image = b.s2_composites(b.tile_geometry(tile), periods, site.gee, list(site.bands.s2))
    # a 20 x 30 window starting 5 px left of and 3 px above the demo tile: partly outside the data
    grid = TileGrid(site.epsg, tile.transform @ Affine.translation(-5, -3), 20, 30)
    i = 20  # a summer period
    bands = [f"p{i:03d}_{x}" for x in [*site.bands.s2, "clear"]]
    payload = client.compute_pixels(grid_request(image, grid, Window(0, 0, 20, 30), bands))
    arr = np.load(io.BytesIO(payload))
    assert arr.shape == (20, 30) and list(arr.dtype.names) == bands and arr.dtype[bands[0]] == np.uint16
    assert client.pixel_requests[0]["grid"]["crsCode"] == "EPSG:32631" and client.pixel_requests[0]["fileFormat"] == "NPY"
    data = decode_npy(payload, bands, (20, 30))
    assert not data[:, :3].any() and not data[:, :, :5].any()  # outside the demo tile: no data
    # inside: the median of the clear raw acquisitions of that period, recomputed from the demo cube
    t = cube.time_s2.values
    sel = (t >= np.datetime64(periods[i].start)) & (t < np.datetime64(periods[i].end))
    clear = cube.s2_clear.values[sel]
    checked = 0
    for r, c in np.argwhere(clear.any(axis=0)[:17, :25])[:: 37]:
        med = np.median(cube.s2.values[sel][clear[:, r, c], :, r, c].astype(float), axis=0)
        np.testing.assert_array_equal(data[:-1, r + 3, c + 5], np.floor(med + 0.5))
        assert data[-1, r + 3, c + 5] == clear[:, r, c].sum()
        checked += 1
    assert checked >= 3
    with pytest.raises(ee_offline.EEException, match="did not match any bands"):
        client.compute_pixels(grid_request(image, grid, Window(0, 0, 2, 2), ["p999_B02"]))


def test_fetch_tiles_retries_splits_and_assembles_the_export_cube(tmp_path, gee_site, demo_local, ee_offline):
    site = gee_site()
    cube, labels = demo_local
    server = DemoServer(site, 2019, [cube], [labels])
    client = FakeClient(tmp_path / "exports", server, pixel_script=["429", "429", "memory"])
    src = GeeSource(site, 2019, lambda s: client)
    tile = src.tiles[0]
    periods = b.composite_periods(site.gee, 2019)
    names = b.period_band_names(len(periods), [*site.bands.s2, "clear"])
    image = b.s2_composites(b.tile_geometry(tile), periods, site.gee, list(site.bands.s2))
    stats = FetchStats()
    # limits scaled down so the 64 x 64 tile needs many requests: <= 300 px each
    data = fetch_pixels(client, image, tile.grid, names, np.uint16, concurrency=3, max_bytes=300 * len(names) * 2,
                        stats=stats)
    assert stats.windows == 16 and stats.retries == 2 and stats.splits == 1
    assert stats.requests == 16 + 2 + 4  # 2 retried, 1 replaced by its 4 quadrants
    assert client.max_in_flight <= 3
    for req in client.pixel_requests:
        d = req["grid"]["dimensions"]
        assert d["width"] * d["height"] <= 300 and req["bandIds"] == names
    np.testing.assert_array_equal(data, server.render("s2", tile.grid))

    # the interactive cube equals the cube read back from batch exports of the same tile
    interactive = src.pixels_cube(tile)
    exported = src.read_cube(tile, src.export_cubes(tmp_path / "run")[tile.name], tmp_path / "cache")
    for var in ("s2", "s2_clear", "s1"):
        np.testing.assert_array_equal(interactive[var].values, exported[var].values)
    assert interactive.attrs["transform"] == exported.attrs["transform"]


def test_fatal_and_exhausted_errors_are_one_line(tmp_path, gee_site, demo_local, ee_offline):
    site = gee_site()
    cube, labels = demo_local
    client = FakeClient(tmp_path, DemoServer(site, 2019, [cube], [labels]), pixel_script=["fatal"])
    tile = GeeSource(site, 2019, lambda s: client).tiles[0]
    image = b.cdl_labels(2019, site.gee, has_confidence=True)
    with pytest.raises(DataError, match=r"computePixels failed for rows 0\+64, cols 0\+64: Image.select.*check the site's band lists"):
        fetch_pixels(client, image, tile.grid, ["label"], np.uint16)
    client.pixel_script = ["429"] * 5
    with pytest.raises(DataError, match="Too Many Requests.*lower gee.max_concurrent_requests"):
        fetch_pixels(client, image, tile.grid, ["label"], np.uint16)
    with pytest.raises(ValueError, match="concurrency must be 1..32"):
        fetch_pixels(client, image, tile.grid, ["label"], np.uint16, concurrency=40)
    with pytest.raises(SiteError, match="max_concurrent_requests"):
        gee_site(max_concurrent_requests=40)
    labels_px = fetch_pixels(client, image, tile.grid, ["label"], np.uint16)
    np.testing.assert_array_equal(labels_px[0], labels[0])


def test_run_ingest_with_interactive_cubes(tmp_path, gee_site, demo_local, ee_offline):
    site = gee_site(cubes="pixels", max_concurrent_requests=4)
    cube, labels = demo_local
    clients = []

    def factory(s):
        clients.append(FakeClient(tmp_path / "exports", DemoServer(s, 2019, [cube], [labels])))
        return clients[-1]

    stages, _ = build_stages(site, 2019, gee_client=factory)
    manifest = Runner(tmp_path / "run", {"site": site.name, "year": 2019}).run(stages[:1], lambda done: {})
    report = manifest["stages"]["ingest"]["report"]
    assert report["pixel_requests"] == 2 and report["pixel_retries"] == 0  # one S2 + one S1 request for 64 x 64
    assert clients[0].started == []  # no batch export
    got = open_cube(tmp_path / "run" / "cube" / "x0000y0000.zarr").load()
    server = DemoServer(site, 2019, [cube], [labels])
    n = len(b.composite_periods(site.gee, 2019))
    expected = server.render("s2", GeeSource(site, 2019, factory).tiles[0].grid).reshape(n, -1, 64, 64)
    np.testing.assert_array_equal(got.s2.values, expected[:, :-1])
    assert got.attrs["temporal"] == "composite"
