"""What the Earth Engine expressions COMPUTE, not only which names they contain.

Structural checks on the serialised graphs (every mapped function feeding a filterDate keeps
``system:time_start``; merged images agree in type; the filters are there), and the fake's
evaluator (:mod:`cropmap.pipeline.ingest.gee.graph`) computing the composites from the expression
over the demo acquisitions: a graph that selects nothing on the server yields nothing here.
"""

from __future__ import annotations

import ee as ee_module
import numpy as np
import pytest
from conftest import TILE_FULL, gee_demo_doc, write_site

from cropmap.pipeline.ingest.gee import builders as b
from cropmap.pipeline.ingest.gee.fake import DemoServer
from cropmap.pipeline.ingest.gee.graph import Evaluator, Graph, time_filtered_maps
from cropmap.pipeline.ingest.gee.tiles import site_tiles
from cropmap.pipeline.ingest.local import read_label_raster, read_tile
from cropmap.pipeline.sites import load_site


@pytest.fixture(scope="module")
def demo_local():
    site = load_site("demo")
    cube, _ = read_tile(site, TILE_FULL, 2019)
    return cube.load(), read_label_raster(site, TILE_FULL)


@pytest.fixture
def demo_gee(tmp_path, sites_dir, demo_local):
    write_site(sites_dir, gee_demo_doc(tmp_path / "exports"))
    site = load_site("demo-gee")
    cube, labels = demo_local
    return site, DemoServer(site, 2019, [cube], [labels])


def encode(x) -> dict:
    return ee_module.serializer.encode(x, for_cloud_api=True)


def graphs(site, year):
    tile = site_tiles(site)[0]
    region = b.tile_geometry(tile)
    periods = b.composite_periods(site.gee, year)
    start, end = b.season(site.gee, year)
    labels = b.cdl_labels(year, site.gee, has_confidence=True)
    points = b.stratified_points(labels, region, site, seed=year)
    table = b.sample_table(points, b.s2_acquisitions(region, start, end, site.gee, list(site.bands.s2)), site,
                           b.s1_acquisitions(region, start, end, site.gee, list(site.bands.s1)))
    return {"s2": b.s2_composites(region, periods, site.gee, list(site.bands.s2)),
            "s1": b.s1_composites(region, periods, site.gee, list(site.bands.s1)),
            "samples": table}


@pytest.mark.parametrize("kind", ["s2", "s1", "samples"])
def test_every_map_feeding_a_filter_date_keeps_system_time_start(ee_offline, kind):
    g = Graph(encode(graphs(load_site("iowa"), 2024)[kind]))
    maps = time_filtered_maps(g)
    assert maps, "no mapped collection is filtered by date: the check would prove nothing"
    assert all(keeps for _, keeps in maps), [inv["functionName"] for inv, keeps in maps if not keeps]


def test_the_time_check_catches_an_arithmetic_map(ee_offline):
    col = ee_module.ImageCollection(b.S1_COLLECTION)
    bad = col.map(lambda img: ee_module.Image.constant(10).pow(img.divide(10))).filterDate("2024-03-01", "2024-04-01")
    good = col.map(b.to_linear).filterDate("2024-03-01", "2024-04-01")
    assert [k for _, k in time_filtered_maps(Graph(encode(bad)))] == [False]
    assert [k for _, k in time_filtered_maps(Graph(encode(good)))] == [True]


@pytest.mark.parametrize("kind, cast", [("s2", "Image.toUint16"), ("s1", "Image.toFloat")])
def test_padding_is_cast_to_the_type_of_the_collection_it_joins(ee_offline, kind, cast):
    g = Graph(encode(graphs(load_site("iowa"), 2024)[kind]))
    merges = g.calls("ImageCollection.merge")
    assert len(merges) == len(b.composite_periods(load_site("iowa").gee, 2024))
    for m in merges:
        pad = g.node(m["arguments"]["collection2"])["functionInvocationValue"]
        (img,) = pad["arguments"]["images"]["arrayValue"]["values"]
        assert g.outer(img) == cast
    # the mapped images are of that type too: S1 linear power is cast to float32 in to_linear
    if kind == "s1":
        body = [inv for inv in g.calls("Element.copyProperties") + g.calls("Image.copyProperties")]
        assert body and all(g.outer(inv["arguments"]["destination"]) == "Image.toFloat" for inv in body)


def test_filters_are_present(ee_offline):
    iowa = load_site("iowa")
    gs = {k: Graph(encode(v)) for k, v in graphs(iowa, 2024).items()}

    def equals(g):
        return {(g.constant(f["arguments"]["leftField"]), g.constant(f["arguments"]["rightValue"])) for f in g.calls("Filter.equals")}

    for kind in ("s1", "samples"):
        assert {("instrumentMode", "IW"), ("orbitProperties_pass", "ASCENDING"), ("resolution_meters", 10)} <= equals(gs[kind])
        pols = {g for g in (gs[kind].constant(f["arguments"]["rightValue"]) for f in gs[kind].calls("Filter.listContains"))}
        assert pols == {"VV", "VH"}
    lt = gs["s2"].calls("Filter.lessThan")
    assert [(gs["s2"].constant(f["arguments"]["leftField"]), gs["s2"].constant(f["arguments"]["rightValue"])) for f in lt] == [
        ("CLOUDY_PIXEL_PERCENTAGE", 80)]
    (ss,) = gs["samples"].calls("Image.stratifiedSample")
    a = ss["arguments"]
    g = gs["samples"]
    assert g.constant(a["numPoints"]) == 0 and g.constant(a["classValues"]) == list(range(1, 11))
    assert len(set(g.constant(a["classPoints"]))) == 1 and g.constant(a["classBand"]) == "stratum"
    assert g.calls("ImageCollection.qualityMosaic")  # one S2 image per day: the clearest granule per pixel


def test_s1_composite_evaluated_from_the_expression_is_not_empty(ee_offline, demo_gee):
    """THE regression test of the empty-S1 bug: evaluated from the expression, every period with an
    S1 acquisition has values, equal to the numpy reference. It fails on the old ``to_linear``
    (``Image.constant(10).pow(img.divide(10))``, no properties: the per-period filterDate selected
    nothing and every band came out S1_NODATA)."""
    site, server = demo_gee
    tile = site_tiles(site)[0]
    periods = b.composite_periods(site.gee, 2019)
    image = b.s1_composites(b.tile_geometry(tile), periods, site.gee, list(site.bands.s1))
    out = server.compute("s1", encode(image), tile.grid)
    ref = server.render("s1", tile.grid)
    with_data = (ref != b.S1_NODATA).reshape(len(periods), -1).any(axis=1)
    assert with_data.sum() >= 5
    got = (out != b.S1_NODATA).reshape(len(periods), -1).any(axis=1)
    np.testing.assert_array_equal(got, with_data)
    np.testing.assert_allclose(out, ref, rtol=1e-5)


def test_a_graph_that_selects_nothing_yields_nothing(ee_offline, demo_gee, monkeypatch):
    """The fake is not fooled: the old to_linear (properties dropped) and a wrong orbit pass give
    all-nodata S1; a season with no acquisition gives no clear S2 pixel."""
    site, server = demo_gee
    tile = site_tiles(site)[0]
    region = b.tile_geometry(tile)
    periods = b.composite_periods(site.gee, 2019)
    bands1 = list(site.bands.s1)
    monkeypatch.setattr(b, "to_linear", lambda img: ee_module.Image.constant(10).pow(img.divide(10)))
    old = server.compute("s1", encode(b.s1_composites(region, periods, site.gee, bands1)), tile.grid)
    assert (old == b.S1_NODATA).all()
    monkeypatch.undo()
    desc = site.gee.model_copy(update={"orbit_pass": "DESCENDING"})
    assert (server.compute("s1", encode(b.s1_composites(region, periods, desc, bands1)), tile.grid) == b.S1_NODATA).all()
    later = b.composite_periods(site.gee, 2031)  # no demo acquisition in 2031
    s2 = server.compute("s2", encode(b.s2_composites(region, later, site.gee, list(site.bands.s2))), tile.grid)
    assert not s2.any()


def test_s2_composite_evaluated_from_the_expression_equals_the_reference(ee_offline, demo_gee):
    site, server = demo_gee
    tile = site_tiles(site)[0]
    periods = b.composite_periods(site.gee, 2019)
    image = b.s2_composites(b.tile_geometry(tile), periods, site.gee, list(site.bands.s2))
    out = server.compute("s2", encode(image), tile.grid)
    np.testing.assert_array_equal(out, server.render("s2", tile.grid))
    clear = out.reshape(len(periods), -1, *out.shape[1:])[:, -1]
    assert clear.sum() > 0
    # a stricter mask selects fewer clear pixels; none kept when nothing passes cs_cdf
    strict = site.gee.model_copy(update={"cs_cdf_threshold": 0.9})
    assert server.compute("s2", encode(b.s2_composites(b.tile_geometry(tile), periods, strict, list(site.bands.s2))), tile.grid).any()


def test_merging_mismatched_types_is_an_error_in_the_evaluator(ee_offline, demo_gee):
    site, server = demo_gee
    tile = site_tiles(site)[0]
    col = ee_module.ImageCollection(b.S2_COLLECTION).select(["B02"])
    pad = ee_module.ImageCollection([ee_module.Image.constant([0]).rename(["B02"]).updateMask(0)])  # int32, not uint16
    with pytest.raises(TypeError, match="band 'B02' is uint16 in one and int32"):
        Evaluator(encode(col.merge(pad).median()), tile.grid, server.catalog(tile.grid)).image()
