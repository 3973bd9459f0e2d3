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

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr
from affine import Affine

from .errors import DataError
from .fsio import atomic_path

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
