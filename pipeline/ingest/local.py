"""Source ``local``: read tiles already exported from Earth Engine (the archive layout of the demo).

Layout: one folder per tile under the site's ``local.root``::

    <tile>/S2_L2A_10m_<tile>_<epsg>_<start>_<end>.nc       B02 B03 B04 B08 (uint16 DN, fill 0)
    <tile>/S2_L2A_20m_<tile>_<epsg>_<start>_<end>.nc       B05 B06 B07 B8A B11 B12, SCL
    <tile>/S1_GRD-<PASS>_20m_<tile>_<epsg>_<start>_<end>.nc VV VH (int32 dB x 1e4, fill 0)
    <tile>/OUTPUT_POLY-110_10m_<tile>_<epsg>_<start>_<end>.nc  label rasters (CT, LC, IRR)

Fallbacks (recorded in the cube's ``missing_bands`` and in the stage report, never silent):
an absent S2 10 m file leaves B02 B03 B04 B08 as no data for that tile; an absent S1 file
leaves VV/VH as no data. An absent S2 20 m file is an error (it carries the cloud mask).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xarray as xr
from affine import Affine

from cropmap.pipeline.cube import TileGrid
from cropmap.pipeline.errors import DataError
from cropmap.pipeline.sites import Site

log = logging.getLogger(__name__)

S2_10M = ("B02", "B03", "B04", "B08")
S2_20M = ("B05", "B06", "B07", "B8A", "B11", "B12")


@dataclass
class TileFiles:
    tile: str
    folder: Path
    s2_10m: Path | None
    s2_20m: Path | None
    s1: Path | None
    labels: Path | None
    notes: list[str] = field(default_factory=list)

    def existing(self) -> list[Path]:
        return [p for p in (self.s2_10m, self.s2_20m, self.s1, self.labels) if p is not None]


def _one(folder: Path, pattern: str) -> Path | None:
    hits = sorted(folder.glob(pattern))
    if len(hits) > 1:
        raise DataError(f"several files match {pattern!r} in {folder}: {[h.name for h in hits]}", fix="keep one export per tile")
    return hits[0] if hits else None


def find_tile_files(site: Site, tile: str) -> TileFiles:
    """Locate a tile's exported files; raise :class:`DataError` when the tile folder is missing."""
    folder = site.data_root() / tile
    if not folder.is_dir():
        raise DataError(
            f"tile folder {str(folder)!r} of site {site.name!r} does not exist",
            fix="restore the export, or set CROPMAP_DATA_ROOT to the folder that holds the tiles",
        )
    return TileFiles(
        tile=tile,
        folder=folder,
        s2_10m=_one(folder, f"S2_L2A_10m_{tile}_*.nc"),
        s2_20m=_one(folder, f"S2_L2A_20m_{tile}_*.nc"),
        s1=_one(folder, f"S1_GRD-*_20m_{tile}_*.nc"),
        labels=_one(folder, f"OUTPUT_POLY-*_10m_{tile}_*.nc"),
    )


def open_archive(path: Path) -> xr.Dataset:
    """Open one exported netCDF without decoding (raw DN and fill values), loaded into memory."""
    try:
        with xr.open_dataset(path, mask_and_scale=False, engine="netcdf4") as ds:
            return ds.load()
    except Exception as exc:  # netCDF4/HDF5 raise OSError, RuntimeError, ValueError for damaged files
        raise DataError(
            f"cannot read {str(path)!r}: truncated or not a netCDF file ({type(exc).__name__})",
            fix="re-export the tile or restore the file from the archive",
        ) from None


def _grid(ds: xr.Dataset, path: Path, site: Site) -> TileGrid:
    epsg = int(str(ds.attrs.get("epsg", "0")))
    if epsg != site.epsg:
        raise DataError(f"{path.name} is in EPSG:{epsg}, site {site.name!r} is in {site.crs}", fix="reproject the export or fix the site's crs")
    x, y = ds["x"].values, ds["y"].values
    if len(x) < 2 or len(y) < 2:
        raise DataError(f"{path.name} has a degenerate grid ({len(y)} x {len(x)})", fix="re-export the tile")
    dx, dy = float(x[1] - x[0]), float(y[1] - y[0])
    transform = Affine(dx, 0.0, float(x[0]) - dx / 2, 0.0, dy, float(y[0]) - dy / 2)
    return TileGrid(epsg, transform, len(y), len(x))


def _upsample(a: np.ndarray, factor: int) -> np.ndarray:
    return np.repeat(np.repeat(a, factor, axis=-2), factor, axis=-1) if factor > 1 else a


def _check_nested(fine: TileGrid, coarse: TileGrid, name: str) -> int:
    factor = round(coarse.transform.a / fine.transform.a)
    if (
        factor < 1
        or not np.isclose(coarse.transform.a, factor * fine.transform.a)
        or coarse.height * factor != fine.height
        or coarse.width * factor != fine.width
        or not np.allclose(coarse.bounds, fine.bounds, atol=1e-3 * fine.transform.a)
    ):
        raise DataError(f"{name} is not aligned with the 10 m grid (bounds {coarse.bounds} vs {fine.bounds})", fix="re-export on the site grid")
    return factor


def read_tile(site: Site, tile: str, year: int) -> tuple[xr.Dataset, list[str]]:
    """Read one exported tile into the cube format (see :mod:`cropmap.pipeline.cube`).

    Returns the cube and the notes (fallbacks taken) for the stage report.
    """
    files = find_tile_files(site, tile)
    notes: list[str] = []
    if files.s2_20m is None:
        raise DataError(
            f"tile {tile}: the Sentinel-2 20 m export (S2_L2A_20m_{tile}_*.nc, with the SCL cloud mask) is missing in {files.folder}",
            fix="re-export the tile; it cannot be used without a cloud mask",
        )
    want_s2 = list(site.bands.s2)
    want_s1 = list(site.bands.s1)

    s20 = open_archive(files.s2_20m)
    g20 = _grid(s20, files.s2_20m, site)
    if files.s2_10m is not None:
        s10 = open_archive(files.s2_10m)
        g10 = _grid(s10, files.s2_10m, site)
        if not np.array_equal(s10["timestamp"].values, s20["timestamp"].values):
            raise DataError(f"tile {tile}: S2 10 m and 20 m files have different dates", fix="re-export both files together")
    else:
        s10 = None
        # derive the 10 m grid from the 20 m one (same bounds, half the pixel size)
        t = g20.transform
        g10 = TileGrid(g20.epsg, Affine(t.a / 2, 0, t.c, 0, t.e / 2, t.f), g20.height * 2, g20.width * 2)
        lost = [b for b in want_s2 if b in S2_10M]
        if lost:
            notes.append(f"tile {tile}: no S2 10 m export; bands {' '.join(lost)} are no data for this tile")
    f20 = _check_nested(g10, g20, files.s2_20m.name)

    if "SCL" not in s20:
        raise DataError(f"{files.s2_20m.name} has no SCL band", fix="re-export with the scene classification (SCL)")
    scl = _upsample(s20["SCL"].values, f20)
    clear = ~np.isin(scl, np.asarray(site.cloud_mask.scl_invalid, dtype=scl.dtype))

    s2 = np.zeros((s20.sizes["timestamp"], len(want_s2), g10.height, g10.width), dtype=np.uint16)
    missing: list[str] = []
    for i, band in enumerate(want_s2):
        src, factor = (s10, 1) if band in S2_10M else (s20, f20)
        if src is None or band not in src:
            if src is not None:
                notes.append(f"tile {tile}: band {band} absent from its export; no data for this tile")
            missing.append(band)
            continue
        s2[:, i] = _upsample(src[band].values.astype(np.uint16), factor)
    clear &= (s2 != 0).any(axis=1) if len(want_s2) > len(missing) else False

    if files.s1 is not None and want_s1:
        s1ds = open_archive(files.s1)
        g1 = _grid(s1ds, files.s1, site)
        f1 = _check_nested(g10, g1, files.s1.name)
        s1 = np.full((s1ds.sizes["timestamp"], len(want_s1), g10.height, g10.width), np.nan, dtype=np.float32)
        for i, band in enumerate(want_s1):
            if band not in s1ds:
                missing.append(band)
                notes.append(f"tile {tile}: band {band} absent from its S1 export; no data for this tile")
                continue
            raw = s1ds[band].values
            scale = float(s1ds[band].attrs.get("scale_factor", 1e-4))
            fill = s1ds[band].attrs.get("_FillValue", 0)
            vals = raw.astype(np.float32) * np.float32(scale)
            vals[raw == fill] = np.nan
            s1[:, i] = _upsample(vals, f1)
        t1 = s1ds["timestamp"].values
    else:
        if want_s1:
            notes.append(f"tile {tile}: no S1 export; bands {' '.join(want_s1)} are no data for this tile")
            missing.extend(want_s1)
        s1 = np.full((0, len(want_s1), g10.height, g10.width), np.nan, dtype=np.float32)
        t1 = np.array([], dtype="datetime64[ns]")

    t = g10.transform
    cube = xr.Dataset(
        {
            "s2": (("time_s2", "band_s2", "y", "x"), s2),
            "s2_clear": (("time_s2", "y", "x"), clear),
            "s1": (("time_s1", "band_s1", "y", "x"), s1),
        },
        coords={
            "time_s2": s20["timestamp"].values.astype("datetime64[ns]"),
            "time_s1": np.asarray(t1).astype("datetime64[ns]"),
            "x": t.c + t.a * (np.arange(g10.width) + 0.5),
            "y": t.f + t.e * (np.arange(g10.height) + 0.5),
        },
        attrs={
            "tile": tile,
            "year": int(year),
            "epsg": g10.epsg,
            "transform": list(t.to_gdal()),
            "bands_s2": want_s2,
            "bands_s1": want_s1,
            "missing_bands": missing,
            "sources": [p.name for p in files.existing() if p is not files.labels],
            "s2_scale": 1e-4,
        },
    )
    for n in notes:
        log.info(n)
    return cube, notes


def read_label_raster(site: Site, tile: str) -> tuple[np.ndarray, TileGrid]:
    """The tile's label-source codes (int32, 0 = no label) and grid."""
    files = find_tile_files(site, tile)
    if files.labels is None:
        raise DataError(f"tile {tile}: label raster (OUTPUT_POLY-*_10m_{tile}_*.nc) is missing in {files.folder}", fix="restore it from the archive")
    ds = open_archive(files.labels)
    var = site.local.label_variable if site.local else "CT"
    if var not in ds:
        raise DataError(f"{files.labels.name} has no variable {var!r} (has {list(ds.data_vars)})", fix="fix local.label_variable in the site file")
    codes = ds[var].values
    fill = ds[var].attrs.get("_FillValue", 0)
    if np.issubdtype(codes.dtype, np.floating):
        codes = np.where(np.isnan(codes), 0, codes)
    codes = codes.astype(np.int64)
    codes[codes == fill] = 0
    return codes.astype(np.int32), _grid(ds, files.labels, site)
