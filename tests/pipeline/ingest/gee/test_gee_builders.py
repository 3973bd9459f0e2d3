"""Earth Engine expressions built offline with the real client and checked in serialised form."""

from __future__ import annotations

import json
import re

import pytest

from cropmap.pipeline.ingest.gee import builders as b
from cropmap.pipeline.ingest.gee.fake import export_grid
from cropmap.pipeline.ingest.gee.tiles import ExportTile, export_name, site_tiles, task_description
from cropmap.pipeline.sites import load_site


def _functions(obj) -> list[str]:
    return re.findall(r'"functionName": "([^"]+)"', json.dumps(obj))


def _constants(obj) -> str:
    return json.dumps(obj)


@pytest.fixture
def iowa():
    return load_site("iowa")


def test_offline_fixture_initialises_the_real_client(ee_offline):
    ee = ee_offline
    enc = ee.serializer.encode(ee.Image("USDA/NASS/CDL/2023").select("cropland").add(1), for_cloud_api=True)
    assert "Image.add" in _functions(enc)
    with pytest.raises(ee.EEException):  # algorithm signatures are checked: a wrong argument raises
        ee.ApiFunction.call_("Image.select", ee.Image(1), nonsense=1)


def test_tiles_snap_to_grid_and_cover_the_extent(iowa):
    tiles = site_tiles(iowa)
    assert len({t.name for t in tiles}) == len(tiles)
    for t in tiles:
        assert t.width <= 3000 and t.height <= 3000
        assert (t.x0 % 10, t.y1 % 10) == (0, 0)
    xs = sorted({t.x0 for t in tiles})
    assert xs[0] == 190000 and xs[1] == 210000 and (xs[2] - xs[1]) == 30000  # snapped to multiples of 30 km
    area = sum(t.width * t.height for t in tiles) * 100
    xmin, ymin, xmax, ymax = iowa.extent
    assert area == pytest.approx((xmax - xmin) * (ymax - ymin))


def test_split_covers_the_tile_exactly():
    t = ExportTile("x1y2", 32615, 1000.0, 5000.0, 7, 5, 10.0)
    kids = t.split()
    assert [k.name for k in kids] == ["x1y2q0", "x1y2q1", "x1y2q2", "x1y2q3"]
    assert sum(k.width * k.height for k in kids) == 35
    assert kids[3].x0 == 1030.0 and kids[3].y1 == 4980.0 and (kids[3].width, kids[3].height) == (4, 3)


def test_names_are_deterministic_and_valid():
    name = export_name("cropmap", "iowa", 2024, "s2", "x0006y0160")
    assert name == "cropmap/iowa/2024/s2/x0006y0160"
    assert task_description(name) == "cropmap_iowa_2024_s2_x0006y0160"
    long = task_description("p/" + "a" * 200)
    assert len(long) == 100 and long == task_description("p/" + "a" * 200) != task_description("p/" + "a" * 199)


def test_season_and_periods(iowa):
    start, end = b.season(iowa.gee, 2024)
    assert (start.isoformat(), end.isoformat()) == ("2024-03-01", "2024-12-01")
    fr = load_site("eure-et-loir")
    assert [d.isoformat() for d in b.season(fr.gee, 2023)] == ["2022-10-01", "2023-10-01"]
    periods = b.composite_periods(iowa.gee, 2024)
    assert periods[0].end == periods[1].start and periods[-1].end == end and len(periods) == 28


def test_s2_export_collections_masking_and_grid(ee_offline, iowa):
    tile = site_tiles(iowa)[1]
    periods = b.composite_periods(iowa.gee, 2024)
    image = b.s2_composites(b.tile_geometry(tile), periods, iowa.gee, list(iowa.bands.s2))
    req = b.task_request(b.image_export(image, tile, "cropmap/iowa/2024/s2/" + tile.name, iowa.gee, no_data=0))
    text, fns = _constants(req), _functions(req)
    assert '"COPERNICUS/S2_SR_HARMONIZED"' in text and '"GOOGLE/CLOUD_SCORE_PLUS/V1/S2_HARMONIZED"' in text
    assert "Image.linkCollection" in fns and '["cs_cdf"]' in text
    assert "Image.gte" in fns and '"constantValue": 0.6' in text  # cs_cdf >= threshold
    assert "Image.remap" in fns and "[3, 8, 9, 10, 11]" in text  # SCL exclusion
    assert '"CLOUDY_PIXEL_PERCENTAGE"' in text and "Filter.lessThan" in fns
    assert fns.count("reduce.median") == len(periods) and fns.count("reduce.count") == len(periods)
    assert '"p027_clear"' in text and '"p000_B02"' in text
    # explicit grid: crs + snapped crsTransform + dimensions, as the fake server reads them
    epsg, transform, width, height = export_grid(req)
    assert epsg == 32615 and (width, height) == (tile.width, tile.height)
    assert list(transform)[:6] == [10.0, 0.0, tile.x0, 0.0, -10.0, tile.y1]
    opts = req["fileExportOptions"]
    assert opts["cloudStorageDestination"] == {"bucket": "cropmap-exports", "filenamePrefix": f"cropmap/iowa/2024/s2/{tile.name}"}
    dims = opts["geoTiffOptions"]["tileDimensions"]
    assert dims["width"] % opts["geoTiffOptions"]["tileSize"]["value"] == 0 and opts["geoTiffOptions"]["cloudOptimized"]
    assert req["description"] == f"cropmap_iowa_2024_s2_{tile.name}"
    assert int(req["maxPixels"]["value"]) >= tile.width * tile.height * len(periods) * 11


def test_scl_exclusion_can_be_turned_off(ee_offline, iowa):
    gee = iowa.gee.model_copy(update={"exclude_scl": [], "cs_cdf_threshold": 0.5})
    img = b.s2_mask(gee, ["B04"])(b.s2_collection(b.tile_geometry(site_tiles(iowa)[0]), *b.season(gee, 2024), gee).first())
    enc = ee_offline.serializer.encode(img, for_cloud_api=True)
    assert "Image.remap" not in _functions(enc) and '"constantValue": 0.5' in _constants(enc)


def test_s1_filters_one_pass_and_linear_averaging(ee_offline, iowa):
    tile = site_tiles(iowa)[0]
    image = b.s1_composites(b.tile_geometry(tile), b.composite_periods(iowa.gee, 2024), iowa.gee, ["VV", "VH"])
    enc = ee_offline.serializer.encode(image, for_cloud_api=True)
    text, fns = _constants(enc), _functions(enc)
    assert '"COPERNICUS/S1_GRD"' in text and '"IW"' in text and '"ASCENDING"' in text
    assert '"instrumentMode"' in text and '"orbitProperties_pass"' in text and '"transmitterReceiverPolarisation"' in text
    assert "Image.pow" in fns and "reduce.mean" in fns and "Image.log10" in fns  # mean of 10^(dB/10), then back to dB
    assert "DESCENDING" not in text


def test_cdl_high_confidence_filter(ee_offline, iowa):
    enc = ee_offline.serializer.encode(b.cdl_labels(2023, iowa.gee, has_confidence=True), for_cloud_api=True)
    text, fns = _constants(enc), _functions(enc)
    assert '"USDA/NASS/CDL/2023"' in text and '"cropland"' in text and '"confidence"' in text
    assert "Image.gt" in fns and '"constantValue": 95' in text
    assert "Reducer.countDistinct" in fns and "Image.reduceNeighborhood" in fns
    assert "Image.reproject" in fns  # the 3x3 window is evaluated on CDL's own grid, not the 10 m export grid
    no_conf = ee_offline.serializer.encode(b.cdl_labels(2008, iowa.gee, has_confidence=False), for_cloud_api=True)
    assert '"confidence"' not in _constants(no_conf) and "Reducer.countDistinct" in _functions(no_conf)


def test_sample_table_export(ee_offline, iowa):
    tile = site_tiles(iowa)[0]
    region = b.tile_geometry(tile)
    points = b.stratified_points(b.cdl_labels(2023, iowa.gee, has_confidence=True), region, iowa, seed=7)
    table = b.sample_table(points, b.s2_acquisitions(region, *b.season(iowa.gee, 2023), iowa.gee, list(iowa.bands.s2)), iowa)
    req = b.task_request(b.table_export(table, "cropmap/iowa/2023/samples/" + tile.name, iowa.gee, b.SAMPLE_COLUMNS + list(iowa.bands.s2)))
    text, fns = _constants(req), _functions(req)
    assert "Image.stratifiedSample" in fns and "Image.sampleRegions" in fns and "Collection.flatten" in fns
    assert '"block_x"' in text and '"constantValue": 10000' in text and '"constantValue": 7' in text
    assert "Date.getRelative" in fns  # day of year of each raw acquisition
    assert req["fileExportOptions"]["fileFormat"] == "CSV" and req["selectors"][:3] == ["sample_id", "label", "block_x"]
