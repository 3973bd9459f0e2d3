"""Auxiliary inputs of a ``source: gee`` site: monthly ERA5-Land weather and SRTM terrain.

The pre-trained Presto encoder was trained with, besides Sentinel-1/2, a dynamic-world class, a
monthly ERA5 group (2 m temperature, total precipitation) and an SRTM group (elevation, slope).
With ``gee.aux: [era5, srtm]`` those groups are exported per tile **on the same grid as the
cube** (the tile's crs, crsTransform and dimensions: Earth Engine resamples the ~11 km ERA5-Land
and 30 m SRTM pixels onto the 10 m grid, nearest neighbour) and added to the tile cube:

* ``era5`` (time_era5, band_era5, y, x) float32: per month of the season, ``temperature_2m`` (K)
  and ``total_precipitation`` (m in the month: the band ``total_precipitation_sum``), the monthly
  aggregates of ``ECMWF/ERA5_LAND/MONTHLY_AGGR``, named as the Presto encoder's channels;
* ``srtm`` (band_srtm, y, x) float32: ``elevation`` (m) and ``slope`` (degrees, ``ee.Terrain.slope``)
  of ``USGS/SRTMGL1_003``.

Both are off by default: nothing here can benchmark whether they help (no Earth Engine access
from the development machines), so they cost export time and EECU only when a site asks.
"""

from __future__ import annotations

import datetime as dt

import numpy as np

ERA5_LAND_MONTHLY = "ECMWF/ERA5_LAND/MONTHLY_AGGR"
ERA5_BANDS = ["temperature_2m", "total_precipitation_sum"]
ERA5_CUBE_BANDS = ["temperature_2m", "total_precipitation"]
"""Names of the ERA5 bands in the cube: the channel names the Presto encoder maps (K, and m per month)."""
SRTM = "USGS/SRTMGL1_003"
SRTM_BANDS = ["elevation", "slope"]
AUX_NODATA = -9999.0
AUX_KINDS = ("era5", "srtm")


def season_months(gee, year: int) -> list[dt.date]:
    """First day of every month of the season (``season_months`` from ``season_start_month``, ending in ``year``)."""
    start = year * 12 + gee.season_start_month - 1
    if start + gee.season_months > (year + 1) * 12:
        start -= 12
    return [dt.date((start + i) // 12, (start + i) % 12 + 1, 1) for i in range(gee.season_months)]


def _next_month(d: dt.date) -> dt.date:
    return dt.date(d.year + d.month // 12, d.month % 12 + 1, 1)


def band_names(kind: str, gee, year: int) -> list[str]:
    """Band names of the exported image of ``kind``, in export order."""
    if kind == "era5":
        return [f"m{i:02d}_{b}" for i in range(len(season_months(gee, year))) for b in ERA5_BANDS]
    if kind == "srtm":
        return list(SRTM_BANDS)
    raise ValueError(f"unknown auxiliary input {kind!r}")


def era5_monthly(gee, year: int):
    """Per season month, ERA5-Land 2 m temperature and total precipitation as one float image."""
    import ee

    col = ee.ImageCollection(ERA5_LAND_MONTHLY).select(ERA5_BANDS)
    empty = ee.Image.constant([0.0] * len(ERA5_BANDS)).toFloat().rename(ERA5_BANDS).updateMask(0)
    parts = []
    for i, m in enumerate(season_months(gee, year)):
        month = col.filterDate(m.isoformat(), _next_month(m).isoformat()).merge(ee.ImageCollection([empty]))
        parts.append(month.mean().select(ERA5_BANDS).unmask(AUX_NODATA).toFloat()
                     .rename([f"m{i:02d}_{b}" for b in ERA5_BANDS]))
    return ee.Image.cat(parts)


def srtm_terrain():
    """SRTM elevation (m) and slope (degrees) as one float image."""
    import ee

    elevation = ee.Image(SRTM).select("elevation")
    return (elevation.toFloat().addBands(ee.Terrain.slope(elevation).toFloat())
            .rename(SRTM_BANDS).unmask(AUX_NODATA).toFloat())


def aux_export(kind: str, region, tile, name: str, gee, year: int):
    """The batch export of auxiliary input ``kind`` for ``tile``: the cube's grid, as every cube export."""
    from cropmap.pipeline.ingest.gee.builders import image_export

    image = era5_monthly(gee, year) if kind == "era5" else srtm_terrain() if kind == "srtm" else None
    if image is None:
        raise ValueError(f"unknown auxiliary input {kind!r}")
    return image_export(image, tile, name, gee, no_data=AUX_NODATA)


def aux_variables(kind: str, data: np.ndarray, gee, year: int) -> tuple[dict, dict]:
    """(data variables, coordinates) to add to a tile cube from the read-back export of ``kind``."""
    from cropmap.pipeline.errors import DataError

    names = band_names(kind, gee, year)
    if data.shape[0] != len(names):
        raise DataError(f"{kind} export has {data.shape[0]} bands, expected {len(names)}",
                        fix="the export is from another configuration: delete it and rerun the ingest stage")
    values = data.astype(np.float32)
    values[values == AUX_NODATA] = np.nan
    if kind == "srtm":
        return {"srtm": (("band_srtm", "y", "x"), values)}, {"band_srtm": list(SRTM_BANDS)}
    months = season_months(gee, year)
    values = values.reshape(len(months), len(ERA5_BANDS), *values.shape[1:])
    return ({"era5": (("time_era5", "band_era5", "y", "x"), values)},
            {"time_era5": np.array([np.datetime64(m, "ns") for m in months]), "band_era5": list(ERA5_CUBE_BANDS)})
