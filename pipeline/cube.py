"""The site cube: one chunked zarr store per tile, holding raw acquisitions on the 10 m grid.

A tile cube is an :class:`xarray.Dataset` with

* ``s2`` (time_s2, band_s2, y, x) uint16 digital numbers (reflectance = DN * 1e-4, 0 = no data),
  all Sentinel-2 bands on the one 10 m grid (20 m bands repeated 2x2, grids checked aligned);
* ``s2_clear`` (time_s2, y, x) bool: observed and not cloud, shadow, snow or no data (SCL);
* ``s1`` (time_s1, band_s1, y, x) float32 backscatter in dB (NaN = no data), on its own dates;
* coordinates ``x``/``y`` (pixel centres, site CRS), ``time_s2``/``time_s1`` (acquisition times,
  raw acquisitions, not composites);
* attributes: ``tile``, ``year`` (label season), ``epsg``, ``transform`` (GDAL order),
  ``bands_s2``/``bands_s1`` (band names along the band axes),
  ``missing_bands`` (bands of the site absent from this tile's export) and ``sources``.

Bands missing from an export are kept in the cube as all-no-data layers (and named in
``missing_bands``), so every tile of a site has the same band axis.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr
from affine import Affine

from cropmap.pipeline.errors import DataError
from cropmap.pipeline.fsio import atomic_path

S2_SCALE = 1e-4


@dataclass(frozen=True)
class TileGrid:
    """Where a tile lies: its CRS, affine transform and shape (rows, cols)."""

    epsg: int
    transform: Affine
    height: int
    width: int

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        t = self.transform
        return (t.c, t.f + t.e * self.height, t.c + t.a * self.width, t.f)


def grid_of(cube: xr.Dataset) -> TileGrid:
    return TileGrid(int(cube.attrs["epsg"]), Affine.from_gdal(*cube.attrs["transform"]), cube.sizes["y"], cube.sizes["x"])


def write_cube(cube: xr.Dataset, path: Path, chunk: int = 256) -> Path:
    """Write a tile cube as a zarr store, atomically (temporary directory, then rename)."""
    enc = {}
    for name, var in cube.data_vars.items():
        chunks = tuple(min(chunk, n) if d in ("x", "y") else n for d, n in zip(var.dims, var.shape))
        enc[name] = {"chunks": chunks}
    with atomic_path(Path(path), is_dir=True) as tmp:
        cube.to_zarr(tmp, mode="w", encoding=enc, consolidated=False, zarr_format=3)
    return Path(path)


def open_cube(path: Path) -> xr.Dataset:
    """Open a tile cube lazily; raise :class:`DataError` when missing or unreadable."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"cube {str(path)!r} does not exist", fix="rerun the ingest stage")
    try:
        return xr.open_zarr(path, consolidated=False)
    except Exception as exc:  # zarr raises many kinds for a damaged store
        raise DataError(f"cube {str(path)!r} cannot be read ({type(exc).__name__})", fix="delete it and rerun the ingest stage") from None


def s2_reflectance(cube: xr.Dataset) -> np.ndarray:
    """(time, band, y, x) float32 reflectance with NaN where not clear or no data."""
    dn = cube["s2"].values
    refl = dn.astype(np.float32) * np.float32(S2_SCALE)
    refl[dn == 0] = np.nan
    refl[~np.broadcast_to(cube["s2_clear"].values[:, None], refl.shape)] = np.nan
    return refl


def day_offsets(times: np.ndarray, year: int) -> np.ndarray:
    """Whole days since 1 January of ``year`` (negative before it)."""
    t = np.asarray(times).astype("datetime64[D]")
    return (t - np.datetime64(f"{year}-01-01", "D")).astype(np.int64)


def cube_bands(cube: xr.Dataset) -> list[str]:
    return [*cube.attrs["bands_s2"], *cube.attrs["bands_s1"]]


def composite_s1(s1: np.ndarray, days: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Average radar backscatter over ``window``-day bins, in linear power (never in dB).

    ``s1`` (T, C, P) in dB with NaN; returns (T', C, P) in dB and each bin's mean acquisition day
    (rounded). Averaging the acquisitions of one 12-day repeat cycle suppresses speckle.
    """
    if window <= 1 or len(days) == 0:
        return s1, days
    bins = (days - days.min()) // window
    uniq = np.unique(bins)
    out = np.full((len(uniq), *s1.shape[1:]), np.nan, dtype=np.float32)
    out_days = np.zeros(len(uniq), dtype=days.dtype)
    power = np.power(10.0, s1.astype(np.float64) / 10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN bins stay NaN
        for k, b in enumerate(uniq):
            sel = bins == b
            out[k] = (10.0 * np.log10(np.nanmean(power[sel], axis=0))).astype(np.float32)
            out_days[k] = int(round(float(days[sel].mean())))
    return out, out_days
