"""Pure builders: (site, year, config) -> Earth Engine expressions and export task configs.

Nothing here talks to a server: the functions only compose ``ee`` objects, so they are tested
by serialising them with the real client initialised offline. One masking function
(:func:`s2_mask`) serves both the raw acquisitions of the training samples and the N-day
composites of the whole-site cubes.

Export encodings (read back by :mod:`.readback`):

* ``s2``: per composite period ``p``, bands ``p{p:03d}_<band>`` (uint16 DN, median of clear
  acquisitions, 0 = none) then ``p{p:03d}_clear`` (number of clear acquisitions);
* ``s1``: per period, ``p{p:03d}_VV``, ``p{p:03d}_VH`` (float32 dB of the mean linear power,
  :data:`S1_NODATA` = none);
* ``labels``: one band of CDL codes (uint16, 0 = no confident label);
* ``samples``: CSV long table, one row per point and clear acquisition.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import ee

from cropmap.pipeline.ingest.gee.tiles import ExportTile, task_description
from cropmap.pipeline.sites import Gee, Site

S2_COLLECTION = "COPERNICUS/S2_SR_HARMONIZED"
CLOUD_SCORE_PLUS = "GOOGLE/CLOUD_SCORE_PLUS/V1/S2_HARMONIZED"
S1_COLLECTION = "COPERNICUS/S1_GRD"
CDL_COLLECTION = "USDA/NASS/CDL"
S1_NODATA = -9999.0
SHARD_SIZE = 256
SAMPLE_COLUMNS = ["sample_id", "label", "block_x", "block_y", "x", "y", "date"]


@dataclass(frozen=True)
class Period:
    start: dt.date
    end: dt.date
    """Exclusive."""


def season(gee: Gee, year: int) -> tuple[dt.date, dt.date]:
    """The season ``[start, end)`` of ``year``: ``season_months`` from ``season_start_month``, ending in ``year``."""
    start = year * 12 + gee.season_start_month - 1
    if start + gee.season_months > (year + 1) * 12:
        start -= 12
    end = start + gee.season_months
    return dt.date(start // 12, start % 12 + 1, 1), dt.date(end // 12, end % 12 + 1, 1)


def composite_periods(gee: Gee, year: int) -> list[Period]:
    """Consecutive ``composite_days`` windows covering the season (the last one may be shorter)."""
    start, end = season(gee, year)
    step = dt.timedelta(days=gee.composite_days)
    out, d = [], start
    while d < end:
        out.append(Period(d, min(d + step, end)))
        d += step
    return out


def period_band_names(n_periods: int, bands: list[str]) -> list[str]:
    """``p{p:03d}_<band>`` for every period, bands varying fastest (the composite images' band order)."""
    return [f"p{i:03d}_{b}" for i in range(n_periods) for b in bands]


def tile_geometry(tile: ExportTile) -> ee.Geometry:
    xmin, ymin, xmax, ymax = tile.grid.bounds
    return ee.Geometry.Rectangle([xmin, ymin, xmax, ymax], ee.Projection(tile.crs), False)


# ---------------------------------------------------------------- Sentinel-2
def s2_collection(region: ee.Geometry, start: dt.date, end: dt.date, gee: Gee) -> ee.ImageCollection:
    """S2 L2A (harmonized: no offset to remove) with Cloud Score+ ``cs_cdf`` linked in."""
    return (ee.ImageCollection(S2_COLLECTION)
            .filterBounds(region)
            .filterDate(start.isoformat(), end.isoformat())
            .filter(ee.Filter.lt("CLOUDY_PIXEL_PERCENTAGE", gee.max_cloudy_percent))
            .linkCollection(ee.ImageCollection(CLOUD_SCORE_PLUS), ["cs_cdf"]))


def s2_mask(gee: Gee, bands: list[str]):
    """The one masking function: keep ``cs_cdf >= threshold`` (and SCL not excluded), select ``bands``."""

    def mask(img: ee.Image) -> ee.Image:
        clear = img.select("cs_cdf").gte(gee.cs_cdf_threshold)
        if gee.exclude_scl:
            scl = img.select("SCL")
            clear = clear.And(scl.remap(list(gee.exclude_scl), [0] * len(gee.exclude_scl), 1).eq(1))
        return img.select(bands).updateMask(clear)

    return mask


def _empty(bands: list[str]) -> ee.Image:
    """A fully masked image with ``bands``: keeps reducers of an empty period well-formed."""
    return ee.Image.constant([0] * len(bands)).rename(bands).updateMask(0)


def s2_composites(region: ee.Geometry, periods: list[Period], gee: Gee, bands: list[str]) -> ee.Image:
    """Per period: median DN of clear acquisitions and the clear count, as one uint16 image."""
    masked = s2_collection(region, periods[0].start, periods[-1].end, gee).map(s2_mask(gee, bands))
    parts = []
    for i, p in enumerate(periods):
        window = masked.filterDate(p.start.isoformat(), p.end.isoformat()).merge(ee.ImageCollection([_empty(bands)]))
        median = window.median().select(bands)
        count = window.select(bands[0]).count().rename("clear")
        names = [f"p{i:03d}_{b}" for b in [*bands, "clear"]]
        parts.append(median.round().addBands(count).unmask(0).toUint16().rename(names))
    return ee.Image.cat(parts)


def s2_acquisitions(region: ee.Geometry, start: dt.date, end: dt.date, gee: Gee, bands: list[str]) -> ee.ImageCollection:
    """Raw clear acquisitions with ``doy`` (day of the year) and ``date`` properties."""

    def add_date(img: ee.Image) -> ee.Image:
        date = img.date()
        return s2_mask(gee, bands)(img).set({"doy": date.getRelative("day", "year").add(1), "date": date.format("YYYY-MM-dd")})

    return s2_collection(region, start, end, gee).map(add_date)


# ---------------------------------------------------------------- Sentinel-1
def s1_collection(region: ee.Geometry, start: dt.date, end: dt.date, gee: Gee, bands: list[str]) -> ee.ImageCollection:
    """S1 GRD (calibrated, terrain-corrected, dB): IW mode, VV+VH, the site's one orbit pass."""
    col = (ee.ImageCollection(S1_COLLECTION)
           .filterBounds(region)
           .filterDate(start.isoformat(), end.isoformat())
           .filter(ee.Filter.eq("instrumentMode", "IW"))
           .filter(ee.Filter.eq("orbitProperties_pass", gee.orbit_pass)))
    for pol in ("VV", "VH"):
        col = col.filter(ee.Filter.listContains("transmitterReceiverPolarisation", pol))
    return col.select(bands)


def to_linear(img: ee.Image) -> ee.Image:
    return ee.Image.constant(10).pow(img.divide(10))


def s1_composites(region: ee.Geometry, periods: list[Period], gee: Gee, bands: list[str]) -> ee.Image:
    """Per period: the mean of linear power, back in dB, float32 (:data:`S1_NODATA` where none)."""
    linear = s1_collection(region, periods[0].start, periods[-1].end, gee, bands).map(to_linear)
    parts = []
    for i, p in enumerate(periods):
        window = linear.filterDate(p.start.isoformat(), p.end.isoformat()).merge(ee.ImageCollection([_empty(bands)]))
        db = window.mean().select(bands).log10().multiply(10)
        parts.append(db.unmask(S1_NODATA).toFloat().rename([f"p{i:03d}_{b}" for b in bands]))
    return ee.Image.cat(parts)


# ---------------------------------------------------------------- CDL
def cdl_year_ids() -> ee.List:
    """Asset ids of the published CDL years (for the availability check)."""
    return ee.ImageCollection(CDL_COLLECTION).aggregate_array("system:index")


def cdl_band_names(year: int) -> ee.List:
    return ee.Image(f"{CDL_COLLECTION}/{year}").bandNames()


def cdl_labels(year: int, gee: Gee, *, has_confidence: bool) -> ee.Image:
    """High-confidence CDL: ``cropland`` where confidence > threshold (when the year has the band)
    and the 3x3 window at CDL's native resolution is uniform; 0 elsewhere (uint16)."""
    cdl = ee.Image(f"{CDL_COLLECTION}/{year}")
    cropland = cdl.select("cropland")
    # the window is computed on CDL's own grid (30 m, 10 m from 2024), not the 10 m export grid
    distinct = cropland.reduceNeighborhood(ee.Reducer.countDistinct(), ee.Kernel.square(1, "pixels"))
    keep = distinct.reproject(cropland.projection()).eq(1)
    if has_confidence:
        keep = keep.And(cdl.select("confidence").gt(gee.cdl_confidence))
    return cropland.updateMask(keep).unmask(0).toUint16().rename("label")


# ---------------------------------------------------------------- training samples
def stratified_points(labels: ee.Image, region: ee.Geometry, site: Site, seed: int) -> ee.FeatureCollection:
    """``samples_per_class`` points per label class, with site-CRS coordinates and spatial block ids."""
    gee = site.gee
    pts = labels.rename("label").selfMask().stratifiedSample(
        numPoints=gee.samples_per_class, classBand="label", region=region, scale=site.resolution,
        projection=ee.Projection(site.crs), seed=seed, tileScale=gee.tile_scale, geometries=True)

    def annotate(f: ee.Feature) -> ee.Feature:
        xy = f.geometry().transform(ee.Projection(site.crs), 1).coordinates()
        x, y = ee.Number(xy.get(0)), ee.Number(xy.get(1))
        return f.set({"sample_id": f.id(), "x": x, "y": y,
                      "block_x": x.divide(gee.block_size_m).floor(), "block_y": y.divide(gee.block_size_m).floor()})

    return pts.map(annotate)


def s1_acquisitions(region: ee.Geometry, start: dt.date, end: dt.date, gee: Gee, bands: list[str]) -> ee.ImageCollection:
    """Raw S1 acquisitions (dB) of the site's orbit pass with ``doy`` and ``date`` properties."""

    def add_date(img: ee.Image) -> ee.Image:
        date = img.date()
        return img.set({"doy": date.getRelative("day", "year").add(1), "date": date.format("YYYY-MM-dd")})

    return s1_collection(region, start, end, gee, bands).map(add_date)


def sample_columns(site: Site) -> list[str]:
    """Columns of the exported sample table: point properties, date, S2 bands (DN), S1 bands (dB)."""
    return [*SAMPLE_COLUMNS, *site.bands.s2, *site.bands.s1]


def sample_table(points: ee.FeatureCollection, acquisitions: ee.ImageCollection, site: Site,
                 s1: ee.ImageCollection | None = None) -> ee.FeatureCollection:
    """The long table: one row per point and clear acquisition (point properties + date + bands);
    with ``s1``, also one row per point and S1 acquisition (S2 columns empty there, and vice versa)."""
    props = ["sample_id", "label", "block_x", "block_y", "x", "y"]

    def per_image(img: ee.Image) -> ee.FeatureCollection:
        rows = img.sampleRegions(collection=points, properties=props, scale=site.resolution,
                                 projection=ee.Projection(site.crs), tileScale=site.gee.tile_scale, geometries=False)
        return rows.map(lambda f: f.set({"date": img.get("date"), "doy": img.get("doy")}))

    rows = acquisitions.map(per_image).flatten()
    return rows if s1 is None else rows.merge(s1.map(per_image).flatten())


# ---------------------------------------------------------------- exports
def image_export(image: ee.Image, tile: ExportTile, name: str, gee: Gee, *, no_data: float) -> ee.batch.Task:
    """A batch GeoTIFF export of ``tile`` with explicit crs/crsTransform/dimensions to ``gs://bucket/name``."""
    return ee.batch.Export.image.toCloudStorage(
        image=image, description=task_description(name), bucket=gee.bucket, fileNamePrefix=name,
        crs=tile.crs, crsTransform=tile.crs_transform(), dimensions=f"{tile.width}x{tile.height}",
        maxPixels=int(gee.max_pixels), shardSize=SHARD_SIZE, fileDimensions=[gee.file_dimensions, gee.file_dimensions],
        fileFormat="GeoTIFF", formatOptions={"cloudOptimized": True, "noData": no_data})


def table_export(table: ee.FeatureCollection, name: str, gee: Gee, columns: list[str]) -> ee.batch.Task:
    """A batch CSV export of ``table`` (only ``columns``) to ``gs://bucket/name.csv``."""
    return ee.batch.Export.table.toCloudStorage(
        collection=table, description=task_description(name), bucket=gee.bucket, fileNamePrefix=name,
        fileFormat="CSV", selectors=columns)


def task_request(task: ee.batch.Task) -> dict:
    """A task's config with its expression serialised (what is sent to the server; for tests and logs)."""
    cfg = dict(task.config)
    cfg["expression"] = ee.serializer.encode(cfg["expression"], for_cloud_api=True)
    return cfg
