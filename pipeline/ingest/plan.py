"""``cropmap ingest --plan``: what an Earth Engine ingestion would export, checked and costed, offline.

:func:`plan_ingest` touches no network and no credentials. Its export tasks come from the job
lists the ingest, labels and tensors stages submit (:meth:`GeeSource.cube_jobs`, ``labels_jobs``,
``samples_jobs`` in :mod:`.gee.source`), so the plan names exactly the exports a run starts; the
configuration of each task is the one :func:`.gee.builders.image_export` / ``table_export`` build
(a test compares them, task by task, with what the fake client receives).

The plan holds, per UTM zone of the site (one for most sites):

* the collections with their filters and masks;
* the tile grid (count, size, CRS) and each tile's share inside the site geometry (the site's
  ``boundary.file`` polygon when it has one, else its ``extent`` rectangle: stated in the plan);
* every export task (name, region, crs/crsTransform, shard size, destination), whether it already
  exists in the run directory (state files ``RUN/gee/*-tasks.json`` of earlier runs: a resumed run
  plans only what is left), and its checks against Earth Engine's documented limits;
* expected pixels and bytes per collection, table-sampling rows, and an EECU-hours and wall-time
  estimate with every assumption written next to it.

:func:`format_plan` renders it for people; ``to_dict`` is the JSON document (fields in the README).
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cropmap.pipeline.errors import CropmapError, NotReadyError, SiteError
from cropmap.pipeline.ingest.gee.bucket import bucket_problem
from cropmap.pipeline.ingest.gee.sampling import table_rows_per_tile
from cropmap.pipeline.sites import Site, load_legend

PLAN_FORMAT = "cropmap.ingest-plan/1"

# ---------------------------------------------------------------- Earth Engine's documented limits
# (docs/EARTH_ENGINE.md, "Getting pixels out"; Earth Engine's Export and computePixels references)
SHARD_SIZE = 256
"""``shardSize`` of image exports (cropmap sets it explicitly); ``fileDimensions`` must be a multiple."""
DEFAULT_MAX_PIXELS = 1e8
"""Earth Engine's default ``maxPixels`` of an export (cropmap sets ``gee.max_pixels`` explicitly)."""
MAX_FILE_BYTES = 17e9
"""At most about 17 GB per exported file."""
MAX_PENDING_TASKS = 3000
"""Queued + running batch tasks per project."""
MAX_TASK_DAYS = 10
"""A batch task lives at most 10 days."""
MAX_DESCRIPTION = 100
"""Task descriptions: at most 100 characters."""
MAX_REQUEST_BYTES = 10 * 1000 * 1000
"""Request payload limit (a request carrying its region inline must stay under it)."""
PIXELS_MAX_BYTES = 48 * 1000 * 1000
PIXELS_MAX_SIDE = 32768

DTYPE_BYTES = {"uint16": 2, "float32": 4}

# ---------------------------------------------------------------- estimate assumptions (not measured)
S2_REVISIT_DAYS = 5.0
"""Sentinel-2A + 2B: one acquisition every 5 days at the equator."""
S2_GRANULE_OVERLAP = 1.3
"""Average number of granules (MGRS tiles x relative orbits) holding a pixel on an acquisition date: assumed."""
S2_PREFILTER_KEEP = 0.8
"""Share of S2 scenes passing ``CLOUDY_PIXEL_PERCENTAGE < max_cloudy_percent``: assumed."""
S1_REVISIT_DAYS = 12.0
"""One Sentinel-1 satellite, one orbit pass: every 12 days (Sentinel-1B failed in Dec 2021)."""
S1_ORBIT_OVERLAP = 1.5
"""Average relative orbits of the pass covering a pixel: assumed."""
EECU_S_PER_MPX_READ = 0.5
"""EECU-seconds per million input pixel-band reads of a masked composite: an order-of-magnitude
ASSUMPTION (Earth Engine publishes no per-operation cost). Replaced by the rate measured from the
run's own finished tasks (``batchEecuUsageSeconds`` recorded in ``RUN/gee/*-tasks.json``) when there are any."""
EECU_S_PER_SAMPLE_ROW = 0.01
"""EECU-seconds per exported sample-table row (sampleRegions over raw acquisitions): ASSUMPTION."""
CONCURRENT_TASKS = 4
"""Batch tasks Earth Engine runs at once for one project ("few"; more stay queued): ASSUMPTION."""
EECU_PER_TASK_SECOND = 20.0
"""EECUs one batch task uses in parallel (its wall time = its EECU-seconds / this): ASSUMPTION."""
TASK_OVERHEAD_MINUTES = 5.0
"""Queueing and start-up of one batch task before it computes: ASSUMPTION."""


# ---------------------------------------------------------------- years
def expected_label_date(site: Site, year: int) -> tuple[dt.date | None, str]:
    """When the year's labels are expected to be published, and by whom (None: local labels)."""
    if site.label_source == "cdl":
        return dt.date(year + 1, 3, 1), f"USDA publishes CDL {year} in Earth Engine around January-February {year + 1}"
    if site.label_source == "parcels" and site.legend == "rpg":
        return dt.date(year + 1, 7, 1), f"IGN publishes the RPG of {year} during {year + 1}"
    return None, ""


def check_year(site: Site, year: str | int | None, today: dt.date | None = None) -> int:
    """The season year to plan: a year whose inputs and labels exist (one clear error otherwise)."""
    today = today or dt.date.today()
    if year is None:
        y = site.resolve_year(None)
    else:
        text = str(year).strip()
        if not (text.isdigit() and len(text) == 4):
            raise SiteError(f"--year {year!r} is not a four-digit year", fix=f"use one of {site.years}")
        y = int(text)
    published, who = expected_label_date(site, y)
    if published is not None and today < published:
        raise NotReadyError(f"the {y} labels of site {site.name!r} are not published yet ({who})",
                            fix=f"plan an earlier year (one of {[v for v in site.years if v < y] or site.years}) or wait")
    if site.source == "gee":
        from cropmap.pipeline.availability import season_end

        end = season_end(site, y)
        if today < end:
            raise NotReadyError(f"the {y} season of site {site.name!r} ends on {end}: its images do not exist yet",
                                fix="plan an earlier year or wait for the season's end")
        from cropmap.pipeline.ingest.gee.builders import season

        start = season(site.gee, y)[0]
        if start < dt.date(2017, 3, 28):
            raise SiteError(f"year {y}: its season starts on {start}, before COPERNICUS/S2_SR_HARMONIZED (from 2017-03-28)",
                            fix="plan 2018 or later")
    return site.resolve_year(y)


# ---------------------------------------------------------------- plan documents
@dataclass
class TileInfo:
    name: str
    width: int
    height: int
    x0: float
    y1: float
    inside_share: float
    """Share of the tile's area inside the site geometry (see ``geometry``)."""
    table_rows: int | None = None
    """Expected sample-table rows of the tile (``gee.samples: table``), None otherwise."""


@dataclass
class TaskInfo:
    name: str
    kind: str
    tile: str
    state: str
    """``planned`` (would be submitted), ``done`` (finished in an earlier run), ``running`` (submitted by
    an earlier run: polled, not resubmitted)."""
    config: dict[str, Any]
    pixels: int
    bytes: int
    checks: list[dict[str, Any]]


@dataclass
class ZonePlan:
    site: str
    crs: str
    extent: list[float]
    geometry: str
    tile_size_m: float
    tile_size_px: int
    tiles: list[TileInfo]
    tasks: list[TaskInfo]
    per_collection: dict[str, dict[str, Any]]
    eecu_hours: float
    wall_hours: float
    table_rows: int | None
    run_dir: str
    state_files: list[str]
    notes: list[str] = field(default_factory=list)


@dataclass
class IngestPlan:
    site: str
    year: int
    source: str
    label_source: str
    legend: str
    collections: list[dict[str, Any]]
    zones: list[ZonePlan]
    limits: dict[str, Any]
    assumptions: list[dict[str, Any]]
    totals: dict[str, Any]
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, **asdict(self)}


# ---------------------------------------------------------------- collections
def collections(site: Site, year: int) -> list[dict[str, Any]]:
    """Collections the exports read, with their filters and masks (as :mod:`.gee.builders` builds them)."""
    from cropmap.pipeline.ingest.gee import aux
    from cropmap.pipeline.ingest.gee.builders import CDL_COLLECTION, CLOUD_SCORE_PLUS, S1_COLLECTION, S2_COLLECTION, composite_periods, season

    g = site.gee
    start, end = season(g, year)
    span = f"{start} .. {end} (exclusive)"
    periods = composite_periods(g, year)
    out = [{"id": S2_COLLECTION, "use": "Sentinel-2 L2A (harmonized: DN/1e4, no offset to remove)", "bands": list(site.bands.s2),
            "filters": ["filterBounds(tile)", f"filterDate {span}", f"CLOUDY_PIXEL_PERCENTAGE < {g.max_cloudy_percent:g}"],
            "mask": f"Cloud Score+ cs_cdf >= {g.cs_cdf_threshold}" + (f" and SCL not in {list(g.exclude_scl)}" if g.exclude_scl else ""),
            "temporal": f"{len(periods)} composites of {g.composite_days} days (median of clear observations + clear count), uint16"},
           {"id": CLOUD_SCORE_PLUS, "use": "cloud mask of Sentinel-2", "bands": ["cs_cdf"],
            "filters": ["linkCollection(S2, ['cs_cdf']) (same system:index)"], "mask": "", "temporal": "per S2 scene"}]
    if site.bands.s1:
        out.append({"id": S1_COLLECTION, "use": "Sentinel-1 GRD (calibrated, terrain-corrected, dB)", "bands": list(site.bands.s1),
                    "filters": ["filterBounds(tile)", f"filterDate {span}", "instrumentMode == IW", f"orbitProperties_pass == {g.orbit_pass}",
                                "transmitterReceiverPolarisation contains VV and VH"], "mask": "",
                    "temporal": f"{len(periods)} means of linear power per {g.composite_days} days, back to dB, float32"})
    if site.label_source == "cdl":
        out.append({"id": f"{CDL_COLLECTION}/{year}", "use": "labels (USDA NASS Cropland Data Layer)", "bands": ["cropland", "confidence"],
                    "filters": [f"the {year} image; its band names checked at run time (confidence is absent in some years)"],
                    "mask": f"confidence > {g.cdl_confidence} and the 3x3 window on CDL's own grid uniform", "temporal": "yearly"})
    else:
        out.append({"id": None, "use": f"labels: local parcel file {site.parcels.path if site.parcels else '?'} (kept local, rasterised on each tile)",
                    "bands": [], "filters": [], "mask": "", "temporal": "yearly"})
    if "era5" in g.aux:
        out.append({"id": aux.ERA5_LAND_MONTHLY, "use": "auxiliary input of the pre-trained encoder (gee.aux)", "bands": list(aux.ERA5_BANDS),
                    "filters": [f"filterDate per season month ({len(aux.season_months(g, year))} months)"], "mask": "",
                    "temporal": "monthly, resampled onto the 10 m cube grid, float32"})
    if "srtm" in g.aux:
        out.append({"id": aux.SRTM, "use": "auxiliary input of the pre-trained encoder (gee.aux)", "bands": ["elevation", "slope (ee.Terrain.slope)"],
                    "filters": [], "mask": "", "temporal": "static, resampled onto the 10 m cube grid, float32"})
    return out


# ---------------------------------------------------------------- per-task figures
def _kind_bands(site: Site, year: int, kind: str) -> tuple[int, str]:
    """(bands, dtype) of an image export of ``kind``, as :mod:`.gee.builders` / :mod:`.gee.aux` build it."""
    from cropmap.pipeline.ingest.gee import aux
    from cropmap.pipeline.ingest.gee.builders import composite_periods

    n = len(composite_periods(site.gee, year))
    if kind == "s2":
        return n * (len(site.bands.s2) + 1), "uint16"
    if kind == "s1":
        return n * len(site.bands.s1), "float32"
    if kind == "labels":
        return 1, "uint16"
    if kind in aux.AUX_KINDS:
        return len(aux.band_names(kind, site.gee, year)), "float32"
    raise ValueError(kind)


def _no_data(kind: str) -> float:
    from cropmap.pipeline.ingest.gee.aux import AUX_NODATA
    from cropmap.pipeline.ingest.gee.builders import S1_NODATA

    return {"s2": 0, "labels": 0, "s1": S1_NODATA}.get(kind, AUX_NODATA)


def task_config(site: Site, job) -> dict[str, Any]:
    """The configuration :func:`.gee.builders.image_export` / ``table_export`` give the job's task."""
    from cropmap.pipeline.ingest.gee.builders import sample_columns
    from cropmap.pipeline.ingest.gee.tiles import task_description

    g, t = site.gee, job.tile
    xmin, ymin, xmax, ymax = t.grid.bounds
    root = f"gs://{g.bucket}" if g.bucket else str(g.folder())
    common = {"description": task_description(job.name), "bucket": g.bucket, "fileNamePrefix": job.name,
              "region": {"type": "Rectangle", "crs": t.crs, "coordinates": [xmin, ymin, xmax, ymax], "geodesic": False}}
    if job.kind == "samples":
        return {"type": "EXPORT_TABLE", **common, "fileFormat": "CSV", "selectors": sample_columns(site),
                "destination": f"{root}/{job.name}.csv"}
    return {"type": "EXPORT_IMAGE", **common, "crs": t.crs, "crsTransform": t.crs_transform(), "dimensions": f"{t.width}x{t.height}",
            "maxPixels": int(g.max_pixels), "shardSize": SHARD_SIZE, "fileDimensions": [g.file_dimensions, g.file_dimensions],
            "fileFormat": "GeoTIFF", "formatOptions": {"cloudOptimized": True, "noData": _no_data(job.kind)},
            "destination": f"{root}/{job.name}*.tif"}


def _check(name: str, value, limit, ok: bool, note: str = "") -> dict[str, Any]:
    return {"check": name, "value": value, "limit": limit, "ok": bool(ok), **({"note": note} if note else {})}


def image_checks(site: Site, job, bands: int, dtype: str, task_days: float) -> list[dict[str, Any]]:
    """One export checked against Earth Engine's documented limits."""
    g, t = site.gee, job.tile
    fd = g.file_dimensions
    file_bytes = min(fd, t.width) * min(fd, t.height) * bands * DTYPE_BYTES[dtype]
    return [
        _check("maxPixels", t.width * t.height, int(g.max_pixels), t.width * t.height <= g.max_pixels,
               f"set explicitly (Earth Engine's default is {DEFAULT_MAX_PIXELS:.0e})"),
        _check("shardSize", SHARD_SIZE, "256 (multiple of the tiling)", SHARD_SIZE == 256),
        _check("fileDimensions multiple of shardSize", fd, f"k x {SHARD_SIZE}", fd % SHARD_SIZE == 0),
        _check("bytes per file", file_bytes, int(MAX_FILE_BYTES), file_bytes <= MAX_FILE_BYTES),
        _check("description length", len(task_description_of(job)), MAX_DESCRIPTION, len(task_description_of(job)) <= MAX_DESCRIPTION),
        _check("request payload", "rectangle region, 4 coordinates", f"{MAX_REQUEST_BYTES} bytes", True,
               "no geometry is inlined (parcels stay local); the expression's serialised size is tested offline"),
        _check("task lifetime (days, estimated)", round(task_days, 3), MAX_TASK_DAYS, task_days <= MAX_TASK_DAYS),
    ]


def task_description_of(job) -> str:
    from cropmap.pipeline.ingest.gee.tiles import task_description

    return task_description(job.name)


def _reads_per_pixel(site: Site, year: int, kind: str) -> float:
    """Input pixel-band reads per output pixel of an export of ``kind`` (for the EECU estimate)."""
    from cropmap.pipeline.ingest.gee.builders import season

    start, end = season(site.gee, year)
    days = (end - start).days
    if kind == "s2":  # the bands, cs_cdf and SCL of every scene
        return days / S2_REVISIT_DAYS * S2_GRANULE_OVERLAP * S2_PREFILTER_KEEP * (len(site.bands.s2) + 2)
    if kind == "s1":
        return days / S1_REVISIT_DAYS * S1_ORBIT_OVERLAP * len(site.bands.s1)
    if kind == "labels":
        return 2 * 9  # cropland + confidence, 3x3 window
    if kind == "era5":
        return 2 * site.gee.season_months
    return 9  # srtm: elevation and its 3x3 slope window


# ---------------------------------------------------------------- existing tasks
def state_files(out: Path | None, site: str, year: int) -> list[Path]:
    """Task-manager state files of earlier runs of ``site``/``year`` under ``out`` (every version)."""
    if out is None:
        return []
    ydir = Path(out) / site / str(year)
    files = sorted(ydir.glob("versions/*/gee/*-tasks.json")) + sorted(ydir.glob("gee/*-tasks.json"))
    return [f for f in files if f.is_file()]


def _load_states(files: list[Path]) -> tuple[dict[str, dict], list[str]]:
    from cropmap.pipeline.ingest.gee.tasks import STATE_FORMAT

    jobs: dict[str, dict] = {}
    notes = []
    rank = {"done": 3, "split": 2, "submitted": 1}
    for f in files:
        try:
            doc = json.loads(f.read_text())
            if doc.get("format") != STATE_FORMAT:
                raise ValueError
            items = doc["jobs"].items()
        except (ValueError, KeyError, TypeError, AttributeError):
            notes.append(f"{f}: unreadable task state, ignored (the run would stop on it: delete it)")
            continue
        for name, j in items:
            old = jobs.get(name)
            if old is None or rank.get(j.get("status"), 0) > rank.get(old.get("status"), 0):
                jobs[name] = j
    return jobs, notes


def _leaf_states(name: str, jobs: dict[str, dict]) -> list[tuple[str, str, dict | None]]:
    """(leaf name, state, stored job) of a job: a split job's leaves are its children's."""
    j = jobs.get(name)
    if j is None:
        return [(name, "planned", None)]
    if j.get("status") == "split" and j.get("children"):
        return [leaf for child in j["children"] for leaf in _leaf_states(child, jobs)]
    state = {"done": "done", "submitted": "running"}.get(j.get("status"), "planned")
    return [(name, state, j)]


def _read_polygons(path: Path, what: str, *, missing: str = "", missing_fix: str = "pass a GeoJSON, GeoPackage or Shapefile"):
    """A polygon file (a site's boundary, or the polygon a site is made from) as a GeoDataFrame with a CRS;
    one clear :class:`SiteError` when it is missing, unreadable or has no CRS."""
    import geopandas as gpd

    if not path.is_file():
        raise SiteError(f"{what} file {str(path)!r}{missing} does not exist", fix=missing_fix)
    try:
        df = gpd.read_file(path)
    except Exception as exc:  # pyogrio raises many kinds for a damaged or foreign file
        raise SiteError(f"cannot read {what} file {str(path)!r} ({type(exc).__name__})", fix="pass a GeoJSON, GeoPackage or Shapefile") from None
    if df.crs is None:
        raise SiteError(f"{what} file {path.name} has no CRS", fix="add its CRS (GeoJSON is WGS 84)")
    return df


# ---------------------------------------------------------------- the plan
def _geometry(site: Site):
    """(shapely geometry in the site CRS, description) the inside shares are computed against."""
    from shapely.geometry import box

    b = site.boundary
    if b is not None and b.file:
        path = b.resolved_file()
        geom = _read_polygons(path, "boundary", missing=f" of site {site.name!r}", missing_fix="fix boundary.file or remove it")
        geom = geom.to_crs(site.crs).union_all()
        return geom, f"polygon file {path} ({geom.area / 1e6:,.0f} km2 in {site.crs})"
    where = f"; the exact geometry is {b.collection} {b.filter} in Earth Engine (not read offline)" if b and b.collection else ""
    return box(*site.extent), f"the site extent rectangle {list(site.extent)} (no boundary.file{where}): every tile lies inside it"


def _no_client(site: Site):
    raise CropmapError("the ingest plan needs no Earth Engine client (a bug if you read this)")


def plan_zone(site: Site, year: int, out: Path | None, legend_classes: int) -> ZonePlan:
    from shapely.geometry import box

    from cropmap.pipeline.ingest.gee.source import GeeSource

    g = site.gee
    src = GeeSource(site, year, client_factory=_no_client)
    geom, geom_text = _geometry(site)
    files = state_files(out, site.name, year)
    stored, notes = _load_states(files)

    table = g.samples == "table" and site.label_source == "cdl"
    trows = table_rows_per_tile(site, year) if table else None  # classPoints per class within gee.table_rows_per_tile

    def rows_of(tile: str) -> int | None:
        """Most sample-table rows of a tile (a split tile's quarters: the bound of a whole tile)."""
        if trows is None:
            return None
        return trows.per_tile.get(tile, max(trows.per_tile.values(), default=0))

    tiles = []
    for t in src.tiles:
        xmin, ymin, xmax, ymax = t.grid.bounds
        cell = box(xmin, ymin, xmax, ymax)
        share = geom.intersection(cell).area / cell.area if cell.area else 0.0
        tiles.append(TileInfo(t.name, t.width, t.height, t.x0, t.y1, round(share, 4), rows_of(t.name)))
    if any(ti.inside_share == 0 for ti in tiles):
        notes.append(f"{sum(ti.inside_share == 0 for ti in tiles)} tile(s) lie outside the site geometry and are still exported "
                     "(tiles cover the extent rectangle)")

    measured = _measured_rate(stored, site, year)
    rate = measured or EECU_S_PER_MPX_READ
    tasks, per = [], {}
    cube_jobs = [] if g.cubes == "pixels" else src.cube_jobs()  # pixels: computePixels requests, no cube exports
    for job in [*cube_jobs, *src.labels_jobs(), *src.samples_jobs()]:
        for leaf, state, sj in _leaf_states(job.name, stored):
            tile = job.tile
            if leaf != job.name and sj is not None and sj.get("tile"):
                from cropmap.pipeline.ingest.gee.tiles import ExportTile

                tile = ExportTile(**sj["tile"])
            leaf_job = type(job)(leaf, job.kind, tile)
            px = 0 if job.kind == "samples" else tile.width * tile.height  # tables: rows, not pixels
            if job.kind == "samples":
                rows = rows_of(tile.name) or 0
                nbytes = rows * len(task_config(site, leaf_job)["selectors"]) * 8
                eecu = rows * EECU_S_PER_SAMPLE_ROW
                checks = [_check("description length", len(task_description_of(leaf_job)), MAX_DESCRIPTION,
                                 len(task_description_of(leaf_job)) <= MAX_DESCRIPTION),
                          _check("request payload", "rectangle region, stratifiedSample points computed server-side",
                                 f"{MAX_REQUEST_BYTES} bytes", True),
                          _check("task lifetime (days, estimated)", round(eecu / EECU_PER_TASK_SECOND / 86400, 3), MAX_TASK_DAYS,
                                 eecu / EECU_PER_TASK_SECOND / 86400 <= MAX_TASK_DAYS)]
            else:
                bands, dtype = _kind_bands(site, year, job.kind)
                nbytes = px * bands * DTYPE_BYTES[dtype]
                eecu = px * _reads_per_pixel(site, year, job.kind) / 1e6 * rate
                checks = image_checks(site, leaf_job, bands, dtype, eecu / EECU_PER_TASK_SECOND / 86400)
            tasks.append(TaskInfo(leaf, job.kind, tile.name, state, task_config(site, leaf_job), px, int(nbytes), checks))
            c = per.setdefault(job.kind, {"tasks": 0, "planned": 0, "pixels": 0, "bytes": 0, "eecu_hours": 0.0, "planned_eecu_hours": 0.0})
            c["tasks"] += 1
            c["pixels"] += px
            c["bytes"] += int(nbytes)
            c["eecu_hours"] += eecu / 3600
            if state == "planned":
                c["planned"] += 1
                c["planned_eecu_hours"] += eecu / 3600
            if job.kind != "samples":
                c["bands"], c["dtype"] = _kind_bands(site, year, job.kind)
            else:
                c["rows"] = c.get("rows", 0) + (rows_of(tile.name) or 0)
    for c in per.values():
        c["eecu_hours"] = round(c["eecu_hours"], 2)
        c["planned_eecu_hours"] = round(c["planned_eecu_hours"], 2)
    if g.cubes == "pixels":
        from cropmap.pipeline.ingest.gee.pixels import plan_windows

        bands, dtype = _kind_bands(site, year, "s2")
        reqs = sum(len(plan_windows(t.height, t.width, bands * DTYPE_BYTES[dtype], max_bytes=PIXELS_MAX_BYTES,
                                    max_side=PIXELS_MAX_SIDE)) for t in src.tiles)
        notes.append(f"gee.cubes: pixels: the cubes travel as {reqs} computePixels requests for S2 (each <= 48 MB and "
                     "<= 32768 px a side) and as many for S1, not as batch exports; only the exports listed are batch tasks")
    if trows is not None:
        notes += trows.describe()
    if measured:
        notes.append(f"EECU rate measured from this run's finished tasks: {measured:.3g} EECU-s per million pixel-band reads")
    problem = bucket_problem(site)
    if problem:
        notes.append(problem + ": set gee.bucket before a real run (`cropmap run` stops at once until then)")
    planned = [t for t in tasks if t.state == "planned"]
    eecu_h = sum(c["planned_eecu_hours"] for c in per.values())
    task_h = [t_eecu / EECU_PER_TASK_SECOND / 3600 + TASK_OVERHEAD_MINUTES / 60 for t_eecu in
              (_task_eecu(site, year, t, rate, rows_of(t.tile)) for t in planned)]
    conc = min(CONCURRENT_TASKS, g.max_pending)
    wall_h = max(sum(task_h) / conc, max(task_h, default=0.0))
    return ZonePlan(site.name, site.crs, list(site.extent), geom_text, g.tile_size_m, int(round(g.tile_size_m / site.resolution)),
                    tiles, tasks, per, round(eecu_h, 2), round(wall_h, 2),
                    trows.total if trows is not None else None,
                    str(Path(out) / site.name / str(year)) if out is not None else "", [str(f) for f in files], notes)


def _task_eecu(site: Site, year: int, t: TaskInfo, rate: float, rows_tile: int | None) -> float:
    if t.kind == "samples":
        return (rows_tile or 0) * EECU_S_PER_SAMPLE_ROW
    return t.pixels * _reads_per_pixel(site, year, t.kind) / 1e6 * rate


def _measured_rate(stored: dict[str, dict], site: Site, year: int) -> float | None:
    """EECU-seconds per million input reads measured from finished image tasks of earlier runs."""
    eecu = reads = 0.0
    for j in stored.values():
        if j.get("status") == "done" and j.get("eecu_seconds", 0) > 0 and j.get("tile") and j.get("kind") in ("s2", "s1", "labels"):
            eecu += j["eecu_seconds"]
            reads += j["tile"]["width"] * j["tile"]["height"] * _reads_per_pixel(site, year, j["kind"]) / 1e6
    return eecu / reads if reads > 0 else None


def plan_ingest(site: Site, year: int, out: Path | None = None) -> IngestPlan:
    """The ingest plan of ``site`` and ``year`` (a ``source: gee`` site), per UTM zone; offline."""
    if site.source != "gee":
        raise SiteError(f"site {site.name!r} has source {site.source!r}: there is nothing to export from Earth Engine",
                        fix="run `cropmap ingest` without --plan (it reads the local archive)")
    legend = load_legend(site.legend)
    legend_classes = len(legend.source_lookup())
    zones = [plan_zone(z, year, out, legend_classes) for z in site.zone_sites()]
    tasks = [t for z in zones for t in z.tasks]
    planned = [t for t in tasks if t.state == "planned"]
    failed = [f"{t.name}: {c['check']} {c['value']} > {c['limit']}" for t in tasks for c in t.checks if not c["ok"]]
    limits = {
        "all_within": not failed and site.gee.max_pending <= MAX_PENDING_TASKS,
        "violations": failed,
        "documented": {"shardSize": SHARD_SIZE, "fileDimensions": "multiple of shardSize", "maxPixels_default": DEFAULT_MAX_PIXELS,
                       "bytes_per_file": MAX_FILE_BYTES, "pending_tasks_per_project": MAX_PENDING_TASKS,
                       "task_lifetime_days": MAX_TASK_DAYS, "description_chars": MAX_DESCRIPTION,
                       "request_payload_bytes": MAX_REQUEST_BYTES, "computePixels": {"bytes": PIXELS_MAX_BYTES, "side": PIXELS_MAX_SIDE},
                       "source": "docs/EARTH_ENGINE.md (Earth Engine Export and computePixels documentation)"},
        "pending": {"max_pending": site.gee.max_pending, "cap": MAX_PENDING_TASKS,
                    "note": f"{len(planned)} tasks are submitted at most {site.gee.max_pending} at a time (gee.max_pending)"},
    }
    assumptions = [
        {"name": "s2_revisit_days", "value": S2_REVISIT_DAYS, "why": "Sentinel-2A + 2B"},
        {"name": "s2_granule_overlap", "value": S2_GRANULE_OVERLAP, "why": "granules holding a pixel per date (assumed)"},
        {"name": "s2_prefilter_keep", "value": S2_PREFILTER_KEEP, "why": "share of scenes under the cloudy-percentage filter (assumed)"},
        {"name": "s1_revisit_days", "value": S1_REVISIT_DAYS, "why": "one Sentinel-1 satellite, one orbit pass"},
        {"name": "s1_orbit_overlap", "value": S1_ORBIT_OVERLAP, "why": "relative orbits of the pass per pixel (assumed)"},
        {"name": "eecu_s_per_million_reads", "value": EECU_S_PER_MPX_READ,
         "why": "order of magnitude, NOT measured (Earth Engine publishes no per-operation cost); replaced by the rate of this run's finished tasks when recorded"},
        {"name": "eecu_s_per_sample_row", "value": EECU_S_PER_SAMPLE_ROW, "why": "sampleRegions cost per table row (assumed)"},
        {"name": "concurrent_tasks", "value": CONCURRENT_TASKS, "why": "batch tasks Earth Engine runs at once per project (assumed; more stay queued)"},
        {"name": "eecu_per_task_second", "value": EECU_PER_TASK_SECOND, "why": "parallelism of one batch task (assumed)"},
        {"name": "task_overhead_minutes", "value": TASK_OVERHEAD_MINUTES, "why": "queueing and start-up of each task (assumed)"},
    ]
    totals = {
        "tiles": sum(len(z.tiles) for z in zones), "tasks": len(tasks), "planned": len(planned),
        "done": sum(t.state == "done" for t in tasks), "running": sum(t.state == "running" for t in tasks),
        "pixels": sum(t.pixels for t in tasks), "bytes": sum(t.bytes for t in tasks),
        "planned_bytes": sum(t.bytes for t in planned),
        "eecu_hours": round(sum(z.eecu_hours for z in zones), 2),
        "wall_hours": round(sum(z.wall_hours for z in zones), 2),
        "table_rows": sum(z.table_rows for z in zones) if any(z.table_rows is not None for z in zones) else None,
    }
    notes = []
    if len(zones) > 1:
        notes.append(f"the site spans {len(zones)} UTM zones: each is planned, exported and mapped on its own grid "
                     f"(sites {', '.join(z.site for z in zones)}), then `cropmap mosaic` joins the maps")
    if site.provenance:
        notes.append(f"provenance: {site.provenance}")
    notes.append("existing exports in the bucket cannot be seen offline: a run also skips every task whose files are "
                 "already there, and adopts tasks of the project queued under the same description")
    notes.append("EECU and wall-time figures are estimates from the assumptions listed, not measurements")
    return IngestPlan(site.name, year, site.source, site.label_source, site.legend, collections(site, year), zones, limits,
                      assumptions, totals, notes)


# ---------------------------------------------------------------- text
def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def format_plan(plan: IngestPlan, max_tasks: int = 12) -> str:
    """The plan for people (``--json`` prints :meth:`IngestPlan.to_dict`)."""
    L = [f"Ingest plan: site {plan.site}, season {plan.year} (labels: {plan.label_source}, legend {plan.legend}); "
         "no network or credentials used", "", "Collections:"]
    for c in plan.collections:
        L.append(f"  {c['id'] or '(local)'}: {c['use']}")
        if c["bands"]:
            L.append(f"      bands {', '.join(c['bands'])}")
        for f in c["filters"]:
            L.append(f"      filter {f}")
        if c["mask"]:
            L.append(f"      mask   {c['mask']}")
        L.append(f"      time   {c['temporal']}")
    for z in plan.zones:
        L += ["", f"Zone {z.crs} (site {z.site}): {len(z.tiles)} tiles of {z.tile_size_m / 1000:g} km ({z.tile_size_px} px), "
                  f"extent {z.extent}", f"  inside shares against {z.geometry}"]
        shares = [t.inside_share for t in z.tiles]
        L.append(f"  share of each tile inside the site: min {min(shares):.2f}, mean {sum(shares) / len(shares):.2f}, "
                 f"{sum(s < 1 for s in shares)} tile(s) partly outside")
        L.append(f"  {'kind':<8} {'tasks':>6} {'to do':>6} {'pixels':>16} {'bytes':>12} {'EECU-h':>9}")
        for kind, c in z.per_collection.items():
            L.append(f"  {kind:<8} {c['tasks']:>6} {c['planned']:>6} {c['pixels']:>16,} {_size(c['bytes']):>12} {c['eecu_hours']:>9.1f}"
                     + (f"   {c['rows']:,} rows" if "rows" in c else f"   {c['bands']} bands {c['dtype']}"))
        todo = [t for t in z.tasks if t.state == "planned"]
        L.append(f"  tasks: {len(z.tasks)} ({len(todo)} to submit, {sum(t.state == 'done' for t in z.tasks)} done, "
                 f"{sum(t.state == 'running' for t in z.tasks)} running in earlier runs)" + (f"; state files: {len(z.state_files)}" if z.state_files else ""))
        for t in todo[:max_tasks]:
            cfg = t.config
            grid = f"{cfg['crs']} {cfg['crsTransform']} {cfg['dimensions']} shard {cfg['shardSize']} files {cfg['fileDimensions'][0]}px" \
                if cfg["type"] == "EXPORT_IMAGE" else f"CSV {len(cfg['selectors'])} columns"
            L.append(f"    {t.name}  {grid}  -> {cfg['destination']}")
        if len(todo) > max_tasks:
            L.append(f"    ... {len(todo) - max_tasks} more (--json lists every task)")
        if z.table_rows is not None:
            L.append(f"  table rows: {z.tiles[0].table_rows:,} per tile, {z.table_rows:,} in all")
        L.append(f"  estimate: {z.eecu_hours:,.1f} EECU-hours, {z.wall_hours:,.1f} h wall time for what is left")
        for n in z.notes:
            L.append(f"  note: {n}")
    t = plan.totals
    lim = plan.limits
    L += ["", f"Limits: {'every export within' if lim['all_within'] else 'VIOLATED'} Earth Engine's documented limits "
              f"(maxPixels, shardSize {SHARD_SIZE}, fileDimensions, <= 17 GB per file, descriptions <= 100 chars, "
              f"<= {MAX_PENDING_TASKS} pending tasks, tasks <= {MAX_TASK_DAYS} days, requests <= 10 MB)"]
    for v in lim["violations"][:10]:
        L.append(f"  violation: {v}")
    L.append(f"  {lim['pending']['note']}")
    L += ["", f"Total: {t['tiles']} tiles, {t['tasks']} export tasks ({t['planned']} to submit), {_size(t['bytes'])} "
              f"uncompressed ({_size(t['planned_bytes'])} left), {t['eecu_hours']:,.1f} EECU-hours, about {t['wall_hours']:,.1f} h wall time"
              + (f", {t['table_rows']:,} table rows" if t["table_rows"] is not None else ""),
          "Assumptions of the estimate:"]
    for a in plan.assumptions:
        L.append(f"  {a['name']} = {a['value']:g}: {a['why']}")
    for n in plan.notes:
        L.append(f"note: {n}")
    return "\n".join(L)


# ---------------------------------------------------------------- the command
def ingest_command(site_name: str, year: str | None, out: Path, *, plan: bool = False, as_json: bool = False,
                   today: dt.date | None = None, gee_client=None, echo=print) -> dict[str, Any] | None:
    """``cropmap ingest``: with ``plan``, print the plan (text or JSON) and return its document;
    without, run the ingest and labels stages of every zone of the site (resumable, as ``cropmap run``)."""
    from cropmap.pipeline.sites import load_site

    site = load_site(site_name)
    y = check_year(site, year, today)
    if plan:
        p = plan_ingest(site, y, out)
        doc = p.to_dict()
        echo(json.dumps(doc, indent=1, default=str) if as_json else format_plan(p))
        return doc
    results = {}
    for zone in site.zone_sites():
        results[zone.name] = run_ingest_stages(zone, y, out, gee_client=gee_client)
    if as_json:
        echo(json.dumps(results, indent=1, default=str))
    else:
        for name, r in results.items():
            echo(f"{name} {y}: ingest and labels {r['status']} in {r['run_dir']}")
    return results


def run_ingest_stages(site: Site, year: int, out: Path, *, gee_client=None) -> dict[str, Any]:
    """Run only the ingest and labels stages of ``site``/``year`` into its run directory (versioned, locked)."""
    import sys

    from cropmap.pipeline import production
    from cropmap.pipeline.runner import Runner
    from cropmap.pipeline.workflow import build_stages

    stages, _ = build_stages(site, year, gee_client=gee_client)
    stages = [s for s in stages if s.name in ("ingest", "labels")]
    ydir = production.run_dir(out, site.name, year)
    with production.locked(ydir) as versioned:
        vplan, header = versioned(stages, {"site": site.name, "year": year, "command": " ".join(["cropmap", *sys.argv[1:]]),
                                           "stages_only": ["ingest", "labels"]})
        runner = Runner(vplan.dir, header, reuse_from=vplan.reuse_from)
        manifest = runner.run(stages, lambda done: {"cube": done["ingest"]["cube"], "labels": done["labels"]["labels"]})
    return {"status": manifest.get("status"), "run_dir": str(vplan.dir)}


# ---------------------------------------------------------------- a site from a polygon file
ZONE_OVERLAP_DEG = 0.03
"""A zone's part reaches this far (about 2-3 km) past the zone edge, so neighbouring zone maps overlap."""


def _read_polygon_lonlat(path: Path):
    path = Path(path)
    geom = _read_polygons(path, "polygon").to_crs(4326).union_all()
    if geom.is_empty or geom.area == 0:
        raise SiteError(f"polygon file {path.name} holds no polygon area", fix="pass the site's boundary polygon(s)")
    return geom


def _project(geom, epsg: int):
    """``geom`` (lon/lat) in ``epsg``."""
    import shapely
    from pyproj import Transformer

    proj = Transformer.from_crs(4326, epsg, always_xy=True).transform
    return shapely.transform(geom, lambda x, y: proj(x, y), interleaved=False)


def _snap_out(bounds, res: float) -> list[int]:
    xmin, ymin, xmax, ymax = bounds
    return [int(math.floor(xmin / res) * res), int(math.floor(ymin / res) * res),
            int(math.ceil(xmax / res) * res), int(math.ceil(ymax / res) * res)]


def zones_of_polygon(path: Path, resolution: float = 10) -> list[dict[str, Any]]:
    """The UTM zone(s) a polygon file covers: per zone, its CRS, the extent (site CRS, snapped
    outwards to ``resolution``) of the polygon's part in it, and that part's area (km2)."""
    from shapely.geometry import box

    geom = _read_polygon_lonlat(path)
    west, south, east, north = geom.bounds
    north_hemi = geom.centroid.y >= 0
    out = []
    for zone in range(int((west + 180) // 6) + 1, int((east + 180) // 6) + 2):
        if zone > 60:
            break
        lo, hi = -180 + (zone - 1) * 6, -180 + zone * 6
        part = geom.intersection(box(lo - ZONE_OVERLAP_DEG, -90, hi + ZONE_OVERLAP_DEG, 90))
        core = geom.intersection(box(lo, -90, hi, 90))
        if core.is_empty or core.area == 0:
            continue
        epsg = (32600 if north_hemi else 32700) + zone
        out.append({"crs": f"EPSG:{epsg}", "extent": _snap_out(_project(part.segmentize(0.01), epsg).bounds, resolution),
                    "area_km2": round(_project(core, epsg).area / 1e6, 1)})
    return out


def site_file_from_polygon(path: Path, name: str, *, label_source: str = "cdl", resolution: float = 10) -> str:
    """A site file (YAML text) for the area of a polygon file: UTM zone(s), extent(s), the polygon as
    ``boundary.file`` (so ``cropmap ingest --plan`` computes each tile's share inside it)."""
    from cropmap.pipeline.sites import SITE_NAME

    if not SITE_NAME.match(name or ""):
        raise SiteError(f"invalid site name {name!r}", fix="use lower-case letters, digits, '-' or '_'")
    if label_source not in ("cdl", "parcels"):
        raise SiteError(f"unknown label source {label_source!r}", fix="use cdl (USDA CDL, US) or parcels (a local parcel file)")
    zones = zones_of_polygon(path, resolution)
    main = max(zones, key=lambda z: z["area_km2"])
    geom = _read_polygon_lonlat(path)
    lines = [f"# Site {name}, made from the polygon file {Path(path).resolve()} (cropmap ingest --from-polygon).",
             "# Check every field, set gee.bucket, then: cropmap ingest --plan --site " + name,
             f"name: {name}", f"title: {name}", f"crs: {main['crs']}", f"resolution: {resolution:g}"]
    if len(zones) > 1:
        whole = _project(geom.segmentize(0.01), int(main["crs"].split(":")[1]))
        lines.append(f"extent: {_snap_out(whole.bounds, resolution)}   # whole site in {main['crs']}")
        lines.append(f"zones:   # the site spans {len(zones)} UTM zones: each is exported and mapped on its own grid")
        lines += [f"  - {{crs: {z['crs']}, extent: {z['extent']}}}   # {z['area_km2']:,.0f} km2" for z in zones]
    else:
        lines.append(f"extent: {main['extent']}   # {main['area_km2']:,.0f} km2 inside")
    w, s, e, n = (round(v, 4) for v in geom.bounds)
    lines += ["boundary:", f"  file: {Path(path).resolve()}", f"  bounds_lonlat: [{w}, {s}, {e}, {n}]",
              f"  source: the polygon file {Path(path).name}", "source: gee", f"label_source: {label_source}",
              f"legend: {'cdl' if label_source == 'cdl' else 'rpg'}", f"years: [{dt.date.today().year - 1}]", "gee:",
              "  bucket: your-bucket        # PLACEHOLDER: set your Cloud Storage bucket", "  tile_size_m: 30000", "  season_start_month: 3",
              "  season_months: 9"]
    if label_source == "parcels":
        lines += ["parcels:", "  path: SET-ME.gpkg          # the local parcel file (RPG, EuroCrops)", "  code_column: CODE_GROUP"]
    return "\n".join(lines) + "\n"
