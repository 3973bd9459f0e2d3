"""`cropmap ingest --plan`: the offline plan of an Earth Engine ingestion, its sites and its limits.

The plan must list exactly what a run submits: a run wired to the fake client (real earthengine-api
serialisation, no server) is compared with the plan task by task, name and grid.
"""

from __future__ import annotations

import datetime as dt
import json
import socket

import numpy as np
import pytest
from conftest import TILE_FULL, gee_demo_doc, write_site
from pyproj import Transformer

from cropmap.pipeline.errors import NotReadyError, SiteError
from cropmap.pipeline.ingest.gee import aux
from cropmap.pipeline.ingest.gee.builders import CDL_COLLECTION, CLOUD_SCORE_PLUS, S1_COLLECTION, S2_COLLECTION
from cropmap.pipeline.ingest.gee.fake import DemoServer, FakeClient, export_grid, write_shards
from cropmap.pipeline.ingest.gee.source import GeeSource
from cropmap.pipeline.ingest.plan import check_year, format_plan, ingest_command, plan_ingest
from cropmap.pipeline.sites import list_site_names, load_site

TODAY = dt.date(2026, 12, 2)
NEW_SITES = ["illinois", "adams-nd", "coahoma-ms", "garfield-wa", "harvey-ks", "haskell-ks", "randolph-ar", "finistere"]


def _covers(plan_zone, lonlat_box=None, points=()):
    """Do the zone's tiles cover the lon/lat box (edges densified, projected to the zone CRS) and points?"""
    lon, lat = np.array([p[0] for p in points], float), np.array([p[1] for p in points], float)
    if lonlat_box is not None:
        w, s, e, n = lonlat_box
        lon = np.r_[lon, np.linspace(w, e, 50), np.full(50, e), np.linspace(e, w, 50), np.full(50, w)]
        lat = np.r_[lat, np.full(50, s), np.linspace(s, n, 50), np.full(50, n), np.linspace(n, s, 50)]
    x, y = Transformer.from_crs(4326, plan_zone.crs, always_xy=True).transform(lon, lat)
    boxes = [(ti.x0, ti.y1 - ti.height * 10, ti.x0 + ti.width * 10, ti.y1) for ti in plan_zone.tiles]
    return all(any(b[0] <= xi <= b[2] and b[1] <= yi <= b[3] for b in boxes) for xi, yi in zip(x, y))


# Iowa's extreme points and the corners of its border (lon, lat; approximate, general geography):
# west (Big Sioux mouth), east (Mississippi near Clinton), south (Keokuk), the northern border at
# 43.50 N from its west to its east end, the south-west corner.
IOWA = [(-96.64, 42.49), (-90.14, 41.80), (-91.42, 40.38), (-96.45, 43.50), (-91.22, 43.50), (-95.77, 40.58)]


def test_iowa_plan_covers_the_state_within_limits():
    p = plan_ingest(load_site("iowa"), check_year(load_site("iowa"), "2024", TODAY))
    (z,) = p.zones
    assert z.crs == "EPSG:32615" and _covers(z, points=IOWA)
    assert len(z.tiles) == 228 and z.tile_size_px == 3000
    ids = {c["id"] for c in p.collections}
    assert {S2_COLLECTION, CLOUD_SCORE_PLUS, S1_COLLECTION, f"{CDL_COLLECTION}/2024"} <= ids
    assert S2_COLLECTION == "COPERNICUS/S2_SR_HARMONIZED"
    assert p.limits["all_within"] and not p.limits["violations"]
    assert all(c["ok"] for t in z.tasks for c in t.checks)
    kinds = {t.kind for t in z.tasks}
    assert kinds == {"s2", "s1", "labels", "samples"} and p.totals["tasks"] == 4 * 228
    assert p.totals["eecu_hours"] > 0 and p.totals["wall_hours"] > 0
    assert p.totals["table_rows"] == sum(t.table_rows for t in z.tiles) > 0
    # every image export has an explicit UTM grid and a 256 shard, names are unique
    img = [t for t in z.tasks if t.config["type"] == "EXPORT_IMAGE"]
    assert all(t.config["crs"] == "EPSG:32615" and t.config["shardSize"] == 256 and len(t.config["crsTransform"]) == 6 for t in img)
    assert len({t.name for t in z.tasks}) == len(z.tasks)
    doc = json.loads(json.dumps(p.to_dict()))
    assert doc["format"] == "cropmap.ingest-plan/1" and doc["zones"][0]["tasks"][0]["config"]["destination"].startswith("gs://")


def test_illinois_is_planned_per_utm_zone():
    site = load_site("illinois")
    p = plan_ingest(site, 2024)
    assert [z.crs for z in p.zones] == ["EPSG:32615", "EPSG:32616"]
    assert [z.site for z in p.zones] == ["illinois-utm15n", "illinois-utm16n"]
    west, east = p.zones
    assert _covers(west, (-91.51, 36.97, -90.0, 42.50)) and _covers(east, (-90.0, 36.97, -87.50, 42.50))
    names = [t.name for z in p.zones for t in z.tasks]
    assert len(set(names)) == len(names) and all("/illinois-utm1" in n for n in names)
    assert p.limits["all_within"] and p.totals["tiles"] == len(west.tiles) + len(east.tiles)
    assert any("cropmap mosaic" in n for n in p.notes)
    # each zone is a site of its own for `cropmap run`, on its own grid
    z15 = load_site("illinois-utm15n")
    assert z15.crs == "EPSG:32615" and z15.extent == site.zones[0].extent and not z15.zones


@pytest.mark.parametrize("name", ["coahoma-ms", "harvey-ks", "adams-nd", "garfield-wa", "haskell-ks", "randolph-ar"])
def test_sits_moco_counties_plan(name):
    site = load_site(name)
    p = plan_ingest(site, 2021)
    assert site.legend == "cdl-sitsmoco" and site.boundary.collection == "TIGER/2018/Counties"
    assert {S2_COLLECTION, CLOUD_SCORE_PLUS, f"{CDL_COLLECTION}/2021"} <= {c["id"] for c in p.collections}
    assert p.limits["all_within"] and 1 <= p.totals["tiles"] <= 30
    assert _covers(p.zones[0], site.boundary.bounds_lonlat)
    assert "SITS-MoCo" in site.provenance


def test_finistere_plan_has_no_cdl_and_keeps_parcels_local():
    site = load_site("finistere")
    p = plan_ingest(site, 2023)
    assert site.label_source == "parcels" and p.zones[0].crs == "EPSG:32630"
    assert {t.kind for t in p.zones[0].tasks} == {"s2", "s1"}
    assert not any(c["id"] and c["id"].startswith(CDL_COLLECTION) for c in p.collections)
    assert p.limits["all_within"] and _covers(p.zones[0], site.boundary.bounds_lonlat)


def test_every_site_loads_and_gee_sites_plan():
    for name in list_site_names():
        site = load_site(name)
        if site.source == "gee":  # parcel files are read at run time only: the plan needs none
            p = plan_ingest(site, site.resolve_year(None))
            assert p.zones and p.limits["all_within"] and p.totals["eecu_hours"] > 0
    assert set(NEW_SITES) <= set(list_site_names())


def test_years_bad_unpublished_and_out_of_list():
    iowa = load_site("iowa")
    with pytest.raises(SiteError, match="is not a four-digit year"):
        check_year(iowa, "20x4", TODAY)
    with pytest.raises(NotReadyError, match="not published yet.*January-February 2027"):
        check_year(iowa, "2026", TODAY)
    with pytest.raises(NotReadyError, match="RPG of 2026"):
        check_year(load_site("finistere"), "2026", TODAY)
    with pytest.raises(SiteError, match="has no data for year 2021"):
        check_year(iowa, "2021", TODAY)
    assert check_year(iowa, None, TODAY) == 2024


def test_season_not_over_is_not_ready(sites_dir, tmp_path):
    doc = gee_demo_doc(tmp_path / "exports", name="late")
    doc["years"] = [2026]
    doc["label_source"], doc["legend"], doc["parcels"] = "parcels", "demo", {"path": "x.gpkg"}
    write_site(sites_dir, doc)
    with pytest.raises(NotReadyError, match="season of site 'late' ends on 2027-01-01"):
        check_year(load_site("late"), "2026", TODAY)


def test_limits_are_checked_not_assumed(sites_dir, tmp_path):
    write_site(sites_dir, gee_demo_doc(tmp_path / "exports", name="tight", max_pixels=1e6, tile_size_m=20000,
                                       grid_origin=[0, 0]) | {"extent": [560000, 5600000, 600000, 5640000]})
    p = plan_ingest(load_site("tight"), 2019)
    assert not p.limits["all_within"] and any("maxPixels 4000000 > 1000000" in v for v in p.limits["violations"])
    assert "VIOLATED" in format_plan(p)


def test_boundary_file_gives_the_share_inside(sites_dir, tmp_path):
    poly = tmp_path / "area.geojson"
    t = Transformer.from_crs(32631, 4326, always_xy=True)
    ring = [t.transform(x, y) for x, y in [(560000, 5600000), (600000, 5600000), (560000, 5640000), (560000, 5600000)]]
    poly.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}}]}))
    doc = gee_demo_doc(tmp_path / "exports", name="tri", tile_size_m=20000, grid_origin=[0, 0])
    write_site(sites_dir, doc | {"extent": [560000, 5600000, 600000, 5640000], "boundary": {"file": str(poly)}})
    shares = {ti.name: ti.inside_share for ti in plan_ingest(load_site("tri"), 2019).zones[0].tiles}
    # a right triangle over 2 x 2 tiles: the lower-left tile fully in, the upper-right one out, the diagonal ones half
    assert sorted(round(v, 2) for v in shares.values()) == [0.0, 0.5, 0.5, 1.0]


def _cdl_info(expr):
    return ["2018", "2019"] if "AggregateFeatureCollection" in str(expr) else ["cropland", "confidence"]


def _serve_with_aux(server):
    """The demo server, plus constant-valued ERA5/SRTM exports on the requested grid."""

    def serve(name, request, folder):
        kind = name.split("/")[-2]
        if kind not in aux.AUX_KINDS:
            return server(name, request, folder)
        epsg, transform, width, height = export_grid(request)
        nb = len(aux.band_names(kind, server.site.gee, server.year))
        data = np.broadcast_to(np.arange(1, nb + 1, dtype=np.float32)[:, None, None], (nb, height, width)).copy()
        write_shards(data, transform, epsg, name, folder, 256)

    return serve


def test_planned_run_submits_exactly_the_planned_tasks(sites_dir, tmp_path, ee_offline):
    from cropmap.pipeline.ingest.local import read_label_raster, read_tile

    write_site(sites_dir, gee_demo_doc(tmp_path / "exports", samples="table", aux=["era5", "srtm"]))
    site = load_site("demo-gee")
    out = tmp_path / "runs"
    before = plan_ingest(site, 2019, out)
    planned = [t for z in before.zones for t in z.tasks]
    assert all(t.state == "planned" for t in planned) and {t.kind for t in planned} == {"s2", "s1", "era5", "srtm", "labels", "samples"}

    demo = load_site("demo")
    cube, _ = read_tile(demo, TILE_FULL, 2019)
    client = FakeClient(tmp_path / "exports", _serve_with_aux(DemoServer(site, 2019, [cube], [read_label_raster(demo, TILE_FULL)])),
                        info=_cdl_info)
    src = GeeSource(site, 2019, lambda s: client)
    run_dir = out / site.name / "2019" / "versions" / "v1"
    leaves = src.export_cubes(run_dir)
    src.export_cdl(run_dir)
    src.export_samples(run_dir)
    assert sorted(client.started) == sorted(t.name for t in planned)  # exactly the plan: no more, no fewer, no repeats
    requests = {t["name"]: t["request"] for t in client.tasks.values()}
    for t in planned:
        req, cfg = requests[t.name], t.config
        dest = req["fileExportOptions"]["cloudStorageDestination"]
        assert (req["description"], dest["bucket"], dest["filenamePrefix"]) == (cfg["description"], cfg["bucket"], cfg["fileNamePrefix"])
        if cfg["type"] == "EXPORT_IMAGE":
            epsg, transform, width, height = export_grid(req)
            assert f"EPSG:{epsg}" == cfg["crs"] and list(transform)[:6] == cfg["crsTransform"]
            assert f"{width}x{height}" == cfg["dimensions"] and int(req["maxPixels"]["value"]) == cfg["maxPixels"]
            geo = req["fileExportOptions"]["geoTiffOptions"]
            assert geo["tileSize"]["value"] == cfg["shardSize"] and geo["tileDimensions"]["width"] == cfg["fileDimensions"][0]
            assert len(json.dumps(req["expression"])) < 10_000_000  # the request payload limit, measured
        else:
            assert req["fileExportOptions"]["fileFormat"] == "CSV"

    # the aux inputs come back on the cube's grid
    tile = src.tiles[0]
    c = src.read_cube(tile, leaves[tile.name], tmp_path / "cache")
    assert c["era5"].shape == (12, 2, tile.height, tile.width) and c["srtm"].shape == (2, tile.height, tile.width)
    assert float(c["srtm"][1, 0, 0]) == 2.0 and float(c["era5"][0, 1, 0, 0]) == 2.0 and float(c["era5"][11, 1, 5, 5]) == 24.0
    assert list(c["band_era5"].values) == ["temperature_2m", "total_precipitation"] and list(c["band_srtm"].values) == ["elevation", "slope"]
    assert str(c["time_era5"].values[0])[:10] == "2019-01-01"
    from cropmap.pipeline.cube import open_cube, write_cube

    back = open_cube(write_cube(c, tmp_path / "aux.zarr")).load()
    assert back["era5"].shape == c["era5"].shape and float(back["srtm"][0, 3, 3]) == 1.0

    # the same plan on the run directory: every task exists, nothing is left to submit
    after = plan_ingest(site, 2019, out)
    assert after.totals["planned"] == 0 and after.totals["done"] == len(planned)
    state = run_dir / "gee" / "ingest-tasks.json"
    doc = json.loads(state.read_text())
    name = next(n for n in doc["jobs"] if "/s1/" in n)
    doc["jobs"][name]["status"] = "failed"
    state.write_text(json.dumps(doc))
    resumed = plan_ingest(site, 2019, out)
    assert [t.name for z in resumed.zones for t in z.tasks if t.state == "planned"] == [name]


def test_split_tiles_are_planned_as_their_leaves(sites_dir, tmp_path, ee_offline):
    write_site(sites_dir, gee_demo_doc(tmp_path / "exports"))
    site = load_site("demo-gee")
    client = FakeClient(tmp_path / "exports", None, info=_cdl_info, script={"/s2/": ["memory"]})
    run_dir = tmp_path / "runs" / site.name / "2019" / "versions" / "v1"
    GeeSource(site, 2019, lambda s: client).export_cubes(run_dir)
    p = plan_ingest(site, 2019, tmp_path / "runs")
    s2 = [t for t in p.zones[0].tasks if t.kind == "s2"]
    assert [t.name.rsplit("/", 1)[1] for t in s2] == ["x0000y0000q0", "x0000y0000q1", "x0000y0000q2", "x0000y0000q3"]
    assert all(t.state == "done" for t in s2) and s2[0].config["dimensions"] == "32x32"


def test_plan_uses_no_network_and_no_credentials(monkeypatch, tmp_path):
    for var in ("GOOGLE_APPLICATION_CREDENTIALS", "EE_PROJECT", "GOOGLE_CLOUD_PROJECT", "EARTHENGINE_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.config/earthengine credentials

    def refuse(*a, **k):
        raise AssertionError("the plan opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    lines = []
    doc = ingest_command("iowa", "2024", tmp_path / "runs", plan=True, as_json=True, echo=lines.append)
    assert json.loads(lines[0])["totals"]["tasks"] == doc["totals"]["tasks"] == 912
    ingest_command("illinois", "2024", tmp_path / "runs", plan=True, echo=lines.append)
    assert "Zone EPSG:32615 (site illinois-utm15n)" in lines[1] and "Zone EPSG:32616" in lines[1]


def test_local_site_has_nothing_to_plan():
    with pytest.raises(SiteError, match="nothing to export from Earth Engine"):
        plan_ingest(load_site("demo"), 2019)


def test_zone_sites_and_aux_validation(sites_dir, tmp_path):
    from cropmap.pipeline.sites import Site

    with pytest.raises(SiteError, match="has no zone 'utm17n'"):
        load_site("illinois-utm17n")
    doc = gee_demo_doc(tmp_path / "e")
    with pytest.raises(ValueError, match="two or more different UTM CRSs"):
        Site.model_validate(doc | {"zones": [{"crs": "EPSG:32631", "extent": [0, 0, 10, 10]}]})
    with pytest.raises(ValueError, match="aux inputs are batch exports"):
        Site.model_validate(gee_demo_doc(tmp_path / "e", aux=["era5"], cubes="pixels"))
    with pytest.raises(ValueError, match="lists an input twice"):
        Site.model_validate(gee_demo_doc(tmp_path / "e", aux=["era5", "era5"]))
    site = Site.model_validate(gee_demo_doc(tmp_path / "e", aux=["era5", "srtm"]))
    assert GeeSource(site, 2019, lambda s: None).cube_kinds() == ["s2", "s1", "era5", "srtm"]
    assert Site.model_validate(gee_demo_doc(tmp_path / "e")).gee.aux == []  # off by default


def test_ingest_without_plan_runs_only_ingest_and_labels(sites_dir, tmp_path, ee_offline):
    from cropmap.pipeline.ingest.local import read_label_raster, read_tile
    from cropmap.pipeline.runner import load_manifest

    write_site(sites_dir, gee_demo_doc(tmp_path / "exports"))
    demo = load_site("demo")
    cube, _ = read_tile(demo, TILE_FULL, 2019)
    clients = []

    def factory(site):
        clients.append(FakeClient(tmp_path / "exports", DemoServer(site, 2019, [cube], [read_label_raster(demo, TILE_FULL)]), info=_cdl_info))
        return clients[-1]

    lines = []
    res = ingest_command("demo-gee", "2019", tmp_path / "runs", gee_client=factory, echo=lines.append)
    run_dir = tmp_path / "runs" / "demo-gee" / "2019" / "versions" / "v1"
    assert res["demo-gee"]["status"] == "succeeded" and res["demo-gee"]["run_dir"] == str(run_dir)
    manifest = load_manifest(run_dir)
    assert list(manifest["stages"]) == ["ingest", "labels"]
    assert (run_dir / "cube" / "x0000y0000.zarr").is_dir() and (run_dir / "labels" / "x0000y0000_class.tif").is_file()
    assert sorted(clients[0].started) == sorted(t.name for t in plan_ingest(load_site("demo-gee"), 2019).zones[0].tasks)
    # the plan of that run directory: everything exists
    assert plan_ingest(load_site("demo-gee"), 2019, tmp_path / "runs").totals["planned"] == 0


def test_site_file_from_a_polygon(tmp_path):
    import yaml

    from cropmap.pipeline.ingest.plan import site_file_from_polygon, zones_of_polygon
    from cropmap.pipeline.sites import Site

    p = tmp_path / "area.geojson"
    ring = [(-91.5, 37.0), (-87.5, 37.0), (-87.5, 42.5), (-91.5, 42.5), (-91.5, 37.0)]
    p.write_text(json.dumps({"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}}))
    zones = zones_of_polygon(p)
    assert [z["crs"] for z in zones] == ["EPSG:32615", "EPSG:32616"]
    site = Site.model_validate(yaml.safe_load(site_file_from_polygon(p, "mine")))
    assert [z.name for z in site.zone_sites()] == ["mine-utm15n", "mine-utm16n"] and site.boundary.resolved_file() == p.resolve()
    plan = plan_ingest(site, 2024)
    shares = [t.inside_share for z in plan.zones for t in z.tiles]
    assert min(shares) < 1 and max(shares) == 1.0  # the zone parts' overlap strips and rounded edges lie partly outside
    small = tmp_path / "county.geojson"
    small.write_text(json.dumps({"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [
        [(3.0, 50.0), (3.2, 50.0), (3.2, 50.1), (3.0, 50.0)]]}}))
    one = Site.model_validate(yaml.safe_load(site_file_from_polygon(small, "c", label_source="parcels")))
    assert one.crs == "EPSG:32631" and not one.zones and one.label_source == "parcels"
    with pytest.raises(SiteError, match="does not exist"):
        zones_of_polygon(tmp_path / "nope.geojson")


def test_pixels_cubes_are_not_planned_as_exports(sites_dir, tmp_path):
    write_site(sites_dir, gee_demo_doc(tmp_path / "exports", name="px", cubes="pixels"))
    p = plan_ingest(load_site("px"), 2019)
    assert {t.kind for t in p.zones[0].tasks} == {"labels"}
    assert any("computePixels requests" in n for n in p.zones[0].notes)
