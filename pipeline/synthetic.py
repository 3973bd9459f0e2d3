"""A generated "state-like" site: many tiles on a snapped UTM grid, cubes in the pipeline's format.

Real state-wide data is ~1 TB; the scaling code (tiled prediction on dask, the map writer,
memory bounded by the tile) is exercised and measured on a site generated here instead. Each
tile is written exactly as the ingest stage writes one (:func:`cropmap.pipeline.cube.write_cube`:
``s2`` uint16 DN, ``s2_clear``, ``s1`` dB, the same attributes), with a class raster and a
parcel raster like the labels stage's. Fields are axis-aligned rectangles of 4 crop classes,
each class with its own seasonal NDVI-like curve, plus noise, clouds and missing radar dates, so
a model trained on it maps it well and maps of two code paths can be compared pixel by pixel.

Everything is seeded: the same arguments always write the same files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
import xarray as xr
from affine import Affine

__all__ = ["SyntheticSite", "make_synthetic_site", "CLASSES"]

CLASSES = [(1, "maize", "#f2c94c"), (2, "soybean", "#27ae60"), (3, "grassland", "#9b51e0"), (4, "wheat", "#eb5757")]
"""(code, name, colour) of the generated legend."""
S2_BANDS = ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]
S1_BANDS = ["VV", "VH"]


@dataclass(frozen=True)
class SyntheticSite:
    """Where a generated site lies and what was written."""

    root: Path
    name: str
    epsg: int
    year: int
    resolution: float
    extent: tuple[float, float, float, float]
    tiles: list[str] = field(default_factory=list)
    tile_px: int = 256

    def cube(self, tile: str) -> Path:
        return self.root / "cube" / f"{tile}.zarr"

    def class_raster(self, tile: str) -> Path:
        return self.root / "labels" / f"{tile}_class.tif"

    def parcel_raster(self, tile: str) -> Path:
        return self.root / "labels" / f"{tile}_parcel.tif"

    @property
    def pixels(self) -> int:
        return len(self.tiles) * self.tile_px**2

    def site(self):
        """The site as a validated :class:`cropmap.pipeline.sites.Site` (for prediction and maps)."""
        from cropmap.pipeline.sites import Site

        return Site(name=self.name, crs=f"EPSG:{self.epsg}", resolution=self.resolution, extent=self.extent, source="local",
                    label_source="parcel-raster", legend="synthetic", years=[self.year],
                    local={"root": str(self.root), "tiles": [{"id": t, "year": self.year} for t in self.tiles]})

    def legend(self):
        from cropmap.pipeline.sites import Legend

        return Legend(name="synthetic", title="generated classes",
                      classes=[{"code": c, "name": n, "color": col, "source_codes": [c]} for c, n, col in CLASSES])


def _curves(days: np.ndarray) -> np.ndarray:
    """(4 classes, T) greenness in 0..1 over the season: peak day and width differ per class."""
    peaks, widths, base = [200, 215, 150, 140], [35, 30, 90, 30], [0.15, 0.15, 0.45, 0.1]
    return np.stack([b + (0.8 - b) * np.exp(-0.5 * ((days - p) / w) ** 2) for p, w, b in zip(peaks, widths, base)])


def _fields(rng: np.random.Generator, h: int, w: int, first_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Class and parcel rasters of one tile: a grid of rectangular fields of random sizes."""
    classes = np.zeros((h, w), np.uint8)
    parcels = np.zeros((h, w), np.int64)
    pid = first_id
    r = 0
    while r < h:
        fh = int(rng.integers(12, 40))
        c = 0
        while c < w:
            fw = int(rng.integers(12, 40))
            pid += 1
            classes[r:r + fh, c:c + fw] = rng.integers(1, len(CLASSES) + 1)
            parcels[r:r + fh, c:c + fw] = pid
            c += fw
        r += fh
    border = np.zeros((h, w), bool)  # 1-pixel unlabelled borders (roads, hedges), as in real label rasters
    border[:, 1:] |= parcels[:, 1:] != parcels[:, :-1]
    border[1:, :] |= parcels[1:, :] != parcels[:-1, :]
    classes[border] = 0
    parcels[border] = 0
    return classes, parcels


def make_tile(tile: str, transform: Affine, tile_px: int, year: int, epsg: int, seed: int, s2_dates: int, s1_dates: int,
              first_parcel: int) -> tuple[xr.Dataset, np.ndarray, np.ndarray]:
    """One generated tile cube (ingest format) with its class and parcel rasters."""
    rng = np.random.default_rng(seed)
    h = w = tile_px
    classes, parcels = _fields(rng, h, w, first_parcel)
    d2 = np.sort(rng.choice(np.arange(60, 320), size=s2_dates, replace=False))
    d1 = np.sort(rng.choice(np.arange(60, 320), size=s1_dates, replace=False))
    cls_idx = np.where(classes > 0, classes, rng.integers(1, len(CLASSES) + 1, size=(h, w))).astype(np.int64) - 1
    g2 = _curves(d2.astype(np.float64))[cls_idx].transpose(2, 0, 1)  # (T2, h, w)
    g1 = _curves(d1.astype(np.float64))[cls_idx].transpose(2, 0, 1)
    band_gain = np.linspace(0.3, 1.2, len(S2_BANDS))[None, :, None, None]
    refl = 0.05 + 0.25 * g2[:, None] * band_gain + rng.normal(0, 0.01, size=(s2_dates, len(S2_BANDS), h, w))
    s2 = np.clip(refl * 1e4, 1, 12000).astype(np.uint16)
    # clouds: a few dates with a cloudy disc each, plus 3 % scattered pixels
    clear = rng.random((s2_dates, h, w)) > 0.03
    yy, xx = np.mgrid[0:h, 0:w]
    for t in rng.choice(s2_dates, size=max(1, s2_dates // 4), replace=False):
        cy, cx, rad = rng.integers(0, h), rng.integers(0, w), rng.integers(h // 8, h // 3)
        clear[t] &= (yy - cy) ** 2 + (xx - cx) ** 2 > rad**2
    s1 = (-18 + 8 * g1[:, None] + np.array([0.0, -6.0])[None, :, None, None]
          + rng.normal(0, 0.8, size=(s1_dates, len(S1_BANDS), h, w))).astype(np.float32)
    s1[rng.random((s1_dates, 1, h, w)).repeat(2, axis=1) < 0.02] = np.nan
    times = lambda d: (np.datetime64(f"{year}-01-01") + d.astype("timedelta64[D]")).astype("datetime64[ns]")  # noqa: E731
    cube = xr.Dataset(
        {"s2": (("time_s2", "band_s2", "y", "x"), s2), "s2_clear": (("time_s2", "y", "x"), clear),
         "s1": (("time_s1", "band_s1", "y", "x"), s1)},
        coords={"time_s2": times(d2), "time_s1": times(d1),
                "x": transform.c + transform.a * (np.arange(w) + 0.5), "y": transform.f + transform.e * (np.arange(h) + 0.5)},
        attrs={"tile": tile, "year": int(year), "epsg": int(epsg), "transform": list(transform.to_gdal()), "bands_s2": S2_BANDS,
               "bands_s1": S1_BANDS, "missing_bands": [], "sources": ["synthetic"], "s2_scale": 1e-4},
    )
    return cube, classes, parcels


def make_synthetic_site(root: Path, *, tiles_x: int = 2, tiles_y: int = 2, tile_px: int = 256, s2_dates: int = 12,
                        s1_dates: int = 8, year: int = 2024, epsg: int = 32615, resolution: float = 10.0,
                        origin: tuple[float, float] = (400000.0, 4700000.0), seed: int = 0, name: str = "synthetic",
                        overwrite: bool = False) -> SyntheticSite:
    """Write a ``tiles_x`` x ``tiles_y`` grid of tiles of ``tile_px`` pixels under ``root``.

    ``origin`` is the upper-left corner of the grid (site CRS, snapped to the tile size like the
    Earth Engine export grid). Tiles already written (same name) are kept unless ``overwrite``.
    """
    from cropmap.pipeline.cube import write_cube
    from cropmap.pipeline.fsio import atomic_path

    root = Path(root)
    side = tile_px * resolution
    x0, y0 = origin
    extent = (x0, y0 - tiles_y * side, x0 + tiles_x * side, y0)
    tiles = []
    for j in range(tiles_y):
        for i in range(tiles_x):
            tile = f"T{int(x0 + i * side)}_{int(y0 - j * side)}"
            tiles.append(tile)
            out = root / "cube" / f"{tile}.zarr"
            if out.exists() and not overwrite:
                continue
            transform = Affine(resolution, 0.0, x0 + i * side, 0.0, -resolution, y0 - j * side)
            cube, classes, parcels = make_tile(tile, transform, tile_px, year, epsg, seed * 100003 + j * 1009 + i,
                                               s2_dates, s1_dates, first_parcel=(j * tiles_x + i) * 1_000_000)
            profile = dict(driver="GTiff", width=tile_px, height=tile_px, count=1, crs=f"EPSG:{epsg}", transform=transform,
                           compress="deflate")
            for arr, dtype, path in ((classes, "uint8", root / "labels" / f"{tile}_class.tif"),
                                     (parcels, "int64", root / "labels" / f"{tile}_parcel.tif")):
                with atomic_path(path) as tmp, rasterio.open(tmp, "w", dtype=dtype, nodata=0, **profile) as ds:
                    ds.write(arr, 1)
            write_cube(cube, out)
    return SyntheticSite(root, name, epsg, year, resolution, extent, tiles, tile_px)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Write a generated state-like site (tile cubes + label rasters).")
    ap.add_argument("out", type=Path)
    ap.add_argument("--tiles-x", type=int, default=4)
    ap.add_argument("--tiles-y", type=int, default=4)
    ap.add_argument("--tile-px", type=int, default=256)
    ap.add_argument("--s2-dates", type=int, default=12)
    ap.add_argument("--s1-dates", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    s = make_synthetic_site(a.out, tiles_x=a.tiles_x, tiles_y=a.tiles_y, tile_px=a.tile_px, s2_dates=a.s2_dates,
                            s1_dates=a.s1_dates, seed=a.seed)
    print(f"{len(s.tiles)} tiles of {s.tile_px} px ({s.pixels:,} pixels) in EPSG:{s.epsg} under {s.root}")


if __name__ == "__main__":
    main()
