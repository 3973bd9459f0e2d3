"""Reading exports back: GeoTIFF shards into the site cube format, CSV tables into sample stores.

Shards are placed on the tile grid by their own georeferencing (not by file name), so the
outputs of a tile that was split into quadrants assemble the same way as one export; a grid
that does not match (CRS, pixel size, alignment) or a tile left partly uncovered is an error,
never a silent hole. The cube built here has the variables, dtypes and attributes of the
``local`` source (:mod:`cropmap.pipeline.cube`), with composites instead of raw acquisitions
along ``time_s2``/``time_s1`` (attribute ``temporal: composite``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import rasterio
import xarray as xr

from cropmap.pipeline.cube import S2_SCALE, TileGrid
from cropmap.pipeline.errors import DataError
from cropmap.pipeline.ingest.gee.builders import S1_NODATA, Period
from cropmap.pipeline.ingest.gee.tiles import ExportTile
from cropmap.pipeline.samples import PixelSamples, long_table_to_samples
from cropmap.pipeline.sites import Legend, Site
from cropmap.pipeline.splits import block_split  # noqa: F401  (the shared split logic; re-exported for older imports)


def read_shards(paths: list[Path], grid: TileGrid) -> np.ndarray:
    """Mosaic GeoTIFF shards onto ``grid``: (bands, height, width), checked complete and aligned."""
    if not paths:
        raise DataError("no exported file to read for this tile", fix="rerun the ingest stage to export it")
    out, covered = None, np.zeros((grid.height, grid.width), dtype=bool)
    for path in paths:
        with rasterio.open(path) as ds:
            if ds.crs is None or ds.crs.to_epsg() != grid.epsg:
                raise DataError(f"{Path(path).name} is in {ds.crs}, the tile is in EPSG:{grid.epsg}", fix="re-export with the site's crs")
            t = ds.transform
            col, row = (t.c - grid.transform.c) / grid.transform.a, (t.f - grid.transform.f) / grid.transform.e
            if not (np.isclose(t.a, grid.transform.a) and np.isclose(t.e, grid.transform.e)
                    and np.isclose(col, round(col)) and np.isclose(row, round(row))):
                raise DataError(f"{Path(path).name} is not on the tile's pixel grid (transform {tuple(t)[:6]})",
                                fix="re-export with the tile's crsTransform")
            col, row = round(col), round(row)
            if col < 0 or row < 0 or col + ds.width > grid.width or row + ds.height > grid.height:
                raise DataError(f"{Path(path).name} reaches outside its tile", fix="re-export the tile")
            data = ds.read()
        if out is None:
            out = np.zeros((data.shape[0], grid.height, grid.width), dtype=data.dtype)
        elif data.shape[0] != out.shape[0]:
            raise DataError(f"{Path(path).name} has {data.shape[0]} bands, other shards of the tile {out.shape[0]}", fix="re-export the tile")
        out[:, row:row + ds.height, col:col + ds.width] = data
        covered[row:row + ds.height, col:col + ds.width] = True
    if not covered.all():
        raise DataError(f"the exported shards cover {covered.mean():.1%} of the tile", fix="rerun the ingest stage; missing shards are exported again")
    return out


def _per_period(data: np.ndarray, n_periods: int, per: int, what: str) -> np.ndarray:
    if data.shape[0] != n_periods * per:
        raise DataError(f"{what} export has {data.shape[0]} bands, expected {n_periods} periods x {per}",
                        fix="the export is from another configuration: delete it and rerun the ingest stage")
    return data.reshape(n_periods, per, *data.shape[1:])


def composite_cube(s2: np.ndarray, s1: np.ndarray | None, periods: list[Period], tile: ExportTile, site: Site,
                   year: int, sources: list[str]) -> xr.Dataset:
    """The cube of one tile from its S2 export (bands x periods + clear counts) and S1 export."""
    bands_s2, bands_s1 = list(site.bands.s2), list(site.bands.s1)
    s2p = _per_period(s2, len(periods), len(bands_s2) + 1, "Sentinel-2")
    dn = s2p[:, :-1].astype(np.uint16)
    clear = (s2p[:, -1] > 0) & (dn != 0).any(axis=1)
    if s1 is not None and bands_s1:
        s1p = _per_period(s1, len(periods), len(bands_s1), "Sentinel-1").astype(np.float32)
        s1p[s1p == S1_NODATA] = np.nan
    else:
        s1p = np.full((len(periods), len(bands_s1), tile.height, tile.width), np.nan, dtype=np.float32)
    times = np.array([np.datetime64(p.start, "ns") for p in periods])
    t = tile.transform
    return xr.Dataset(
        {
            "s2": (("time_s2", "band_s2", "y", "x"), dn),
            "s2_clear": (("time_s2", "y", "x"), clear),
            "s1": (("time_s1", "band_s1", "y", "x"), s1p),
        },
        coords={
            "time_s2": times, "time_s1": times.copy(),
            "x": t.c + t.a * (np.arange(tile.width) + 0.5),
            "y": t.f + t.e * (np.arange(tile.height) + 0.5),
        },
        attrs={
            "tile": tile.name, "year": int(year), "epsg": tile.epsg, "transform": list(t.to_gdal()),
            "bands_s2": bands_s2, "bands_s1": bands_s1, "missing_bands": [], "sources": sources,
            "s2_scale": S2_SCALE, "temporal": "composite", "composite_days": site.gee.composite_days,
        },
    )


# ---------------------------------------------------------------- sample tables
def block_parcel_id(block_x: np.ndarray, block_y: np.ndarray) -> np.ndarray:
    """A positive int64 id per spatial block (the split unit of table samples, see :func:`samples_from_table`)."""
    bx, by = np.asarray(block_x, np.int64), np.asarray(block_y, np.int64)
    return (bx + 2**20) * 2**21 + (by + 2**20) + 1


def samples_from_table(table: pd.DataFrame, site: Site, legend: Legend, year: int, *, seed: int = 0, s1_window: int = 0,
                       tile: str = "") -> PixelSamples:
    """The exported long table (one row per point and S2 clear acquisition, DN bands, or S1
    acquisition, dB bands) as pixel samples in the format of the cube path: reflectance and dB
    bands in the cube's band order, S2 and S1 observations of one day on one row, S1 averaged
    over ``s1_window`` days in linear power (as the pixel level's cube_series),
    legend class codes (unmapped codes dropped). ``parcel_id`` is the sample's spatial block
    (``gee.block_size_m``), so parcel-disjoint splits of the train stage are block-disjoint;
    ``split`` is the seeded block split of :func:`block_split`."""
    bands_s2, bands_s1 = list(site.bands.s2), list(site.bands.s1)
    need = ["sample_id", "label", "date", "x", "y", "block_x", "block_y", *bands_s2, *bands_s1]
    missing = [c for c in need if c not in table.columns]
    if missing:
        raise DataError(f"exported sample table lacks column(s) {missing}", fix="delete the export and rerun: it is from another configuration")
    if table.empty:
        raise DataError("the exported sample tables have no rows (no labelled pixel in the site?)",
                        fix="check the labels of the site and year, or use gee.samples: cube")
    lookup = legend.source_lookup()
    codes = table["label"].astype(int).map(lookup)
    df = table[codes.notna()].copy()
    df["label"] = codes[codes.notna()].astype(int)
    for b in bands_s2:
        df[b] = df[b].astype(np.float32) * np.float32(S2_SCALE)
    for b in bands_s1:
        df[b] = df[b].astype(np.float32)
    df["date"] = pd.to_datetime(df["date"])
    if bands_s1 and s1_window > 1:
        df = _composite_s1_rows(df, bands_s2, bands_s1, s1_window)
    df = dedupe_same_day(df, bands_s2, bands_s1)
    # one row per sample and day: its S2 row and its S1 row (at most one each now) share it
    df = df.groupby(["sample_id", "date"], as_index=False, sort=False).first()
    tr = site.training
    df["split"] = block_split(df["block_x"].to_numpy(), df["block_y"].to_numpy(), seed, tr.test_fraction, tr.val_fraction)
    df["parcel_id"] = block_parcel_id(df["block_x"].to_numpy(), df["block_y"].to_numpy())
    df["epsg"] = site.epsg
    df["season_year"] = int(year)
    df["tile"] = tile
    df = df[["sample_id", "date", *bands_s2, *bands_s1, "label", "split", "parcel_id", "x", "y", "epsg", "season_year", "tile"]]
    samples = long_table_to_samples(df, source="Earth Engine sample export")
    samples.class_names = {c.code: c.name for c in legend.classes}
    return samples


def dedupe_same_day(df: pd.DataFrame, bands_s2: list[str], bands_s1: list[str]) -> pd.DataFrame:
    """At most one S2 and one S1 row per sample and day, whatever the row order of the export.

    S2: overlapping granules of one day (MGRS tiles of one datatake) are the same acquisition
    processed twice; the row kept is the clearest (highest ``cs_cdf``, ties broken by the band
    values), so the values are one real observation, consistent across bands. S1: same-day scenes
    (overlapping slices of one datatake) are averaged in linear power, as the composites are; radar
    has no clear score to choose by. The exports already hold one S2 image per day
    (:func:`.builders.daily_clearest`): this also covers tables exported before, and quadrants."""
    from cropmap.pipeline.ingest.gee.builders import S2_SCORE

    has2 = df[bands_s2].notna().any(axis=1) if bands_s2 else pd.Series(False, index=df.index)
    s2, rest = df[has2], df[~has2]
    if len(s2) and s2.duplicated(["sample_id", "date"]).any():
        score = [S2_SCORE] if S2_SCORE in s2.columns else []
        s2 = (s2.sort_values(["sample_id", "date", *score, *bands_s2], ascending=[True, True] + [False] * len(score) + [True] * len(bands_s2),
                             kind="mergesort")
              .drop_duplicates(["sample_id", "date"], keep="first"))
    if bands_s1 and len(rest) and rest.duplicated(["sample_id", "date"]).any():
        lin = rest.copy()
        for b in bands_s1:
            lin[b] = np.power(10.0, lin[b].astype(np.float64) / 10.0)
        firsts = lin.groupby(["sample_id", "date"], sort=True).first()
        means = lin.groupby(["sample_id", "date"], sort=True)[bands_s1].mean()
        with np.errstate(divide="ignore", invalid="ignore"):
            for b in bands_s1:
                firsts[b] = (10.0 * np.log10(means[b])).astype(np.float32)
        rest = firsts.reset_index()[list(df.columns)]
    return pd.concat([s2, rest], ignore_index=True)


def _composite_s1_rows(df: pd.DataFrame, bands_s2: list[str], bands_s1: list[str], window: int) -> pd.DataFrame:
    """S1 rows averaged per sample over ``window``-day bins (linear power), dated by the bins' mean day."""
    is_s1 = df[bands_s1].notna().any(axis=1) & df[bands_s2].isna().all(axis=1)
    s1 = df[is_s1].copy()
    if s1.empty:
        return df
    day = (s1["date"] - s1["date"].min()).dt.days
    s1["_bin"] = day // window
    s1["_day"] = day
    for b in bands_s1:
        s1[b] = np.power(10.0, s1[b].astype(np.float64) / 10.0)
    keys = ["sample_id", "_bin"]
    firsts = s1.groupby(keys, sort=False).first()
    means = s1.groupby(keys, sort=False)[[*bands_s1, "_day"]].mean()
    with np.errstate(divide="ignore", invalid="ignore"):
        for b in bands_s1:
            firsts[b] = (10.0 * np.log10(means[b])).astype(np.float32)
    firsts["date"] = s1["date"].min() + pd.to_timedelta(np.round(means["_day"]).astype(int), unit="D")
    return pd.concat([df[~is_s1], firsts.reset_index().drop(columns=["_bin", "_day"])], ignore_index=True)
