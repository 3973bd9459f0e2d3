"""Predict: map every pixel of the site's tiles into the crop-map COG, window by window.

The map covers the site's extent on its grid (so maps of different years align pixel for pixel);
each tile cube is processed in blocks of rows, so memory is bounded by the block, never by the
site. Pixels with no observation stay nodata (0). Outputs: the class map (uint8 COG, colour
table, class names), a confidence COG (percent), and a PNG preview with a legend.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from rasterio.windows import Window

from cropmap.models.series import Series
from cropmap.models.calibration import scale as scale_temperature
from cropmap.models.training import predict_proba
from cropmap.pipeline.cube import grid_of, open_cube
from cropmap.pipeline.errors import DataError, ModelError
from cropmap.pipeline.grid import site_grid, tile_window  # noqa: F401  (re-exported for the distributed path)
from cropmap.pipeline.levels.pixel.tensors import cube_bands, cube_series
from cropmap.pipeline.levels.pixel.train import load_model_dir
from cropmap.pipeline.sites import Legend, Site
from cropmap.pipeline.stages.maps import MapClass, MapWriter

ROWS_PER_BLOCK = 32
"""Rows of a tile predicted at once: memory is bounded by this block, not by the tile."""


class TilePredictor:
    """A loaded model and what it needs to map pixels: normalisation, class lookup, series options.

    Shared by the single-process :func:`predict_site` and the per-tile tasks of
    :mod:`cropmap.pipeline.levels.pixel.distributed`, so both compute every row block the same way."""

    def __init__(self, legend: Legend, model_dir: Path, device: str | None = None, batch_size: int = 2048):
        model, meta = load_model_dir(model_dir, device)
        self.model, self.meta, self.device, self.batch_size = model, meta, device, batch_size
        self.mean = np.asarray(meta["normalisation"]["mean"], np.float32)
        self.std = np.asarray(meta["normalisation"]["std"], np.float32)
        legend_codes = {c.code for c in legend.classes}
        label_to_code = {}
        for c in meta["classes"]:
            if c["label"] not in legend_codes:
                raise ModelError(f"model class {c['name']!r} (label {c['label']!r}) is not a class of legend {legend.name!r}",
                                 fix="train the model on this site's samples")
            label_to_code[c["index"]] = int(c["label"])
        self.lut = np.array([label_to_code[i] for i in range(len(meta["classes"]))], dtype=np.uint8)
        self.s1_window = int(meta.get("inputs", {}).get("s1_window_days", 0))  # build series as in training
        # the confidence is the top-class probability after temperature scaling (fitted on validation pixels)
        self.temperature = float((meta.get("calibration") or {}).get("temperature", 1.0))

    def check_tile(self, site: Site, cube, path: Path) -> Window:
        """The tile's full window in the site grid (raises when it is off-grid, outside or has other bands)."""
        transform, width, height = site_grid(site)
        grid = grid_of(cube)
        if grid.epsg != site.epsg:
            raise DataError(f"cube {path} is in EPSG:{grid.epsg}, site {site.name!r} in {site.crs}", fix="rerun ingest")
        origin = tile_window(site, grid.transform)
        if origin.col_off < 0 or origin.row_off < 0 or origin.col_off + grid.width > width or origin.row_off + grid.height > height:
            raise DataError(f"tile {cube.attrs['tile']} lies outside the extent of site {site.name!r}", fix="enlarge the site's extent")
        bands = cube_bands(cube)
        if bands != self.meta["bands"]:
            raise ModelError(f"tile {cube.attrs['tile']} has bands {bands}, the model {self.meta['bands']}", fix="retrain the model on this site")
        return Window(origin.col_off, origin.row_off, grid.width, grid.height)

    def rows(self, cube, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        """Class codes (uint8) and confidence (float32, NaN = no observation) of rows r0:r1 of a tile."""
        width = int(cube.sizes["x"])
        values, days, lengths = cube_series(cube, rows=slice(r0, r1), s1_window=self.s1_window)
        npx = (r1 - r0) * width
        cls = np.zeros(npx, dtype=np.uint8)
        conf = np.full(npx, np.nan, dtype=np.float32)
        has = lengths > 0
        if has.any():
            rows = np.repeat(has, lengths)
            offsets = np.concatenate([[0], np.cumsum(lengths[has])])
            series = Series(values[rows], days[rows], offsets)
            proba = predict_proba(self.model, series, self.mean, self.std, int(self.meta["max_len"]), self.batch_size, self.device)
            if self.temperature != 1.0:
                proba = scale_temperature(proba, self.temperature)
            cls[has] = self.lut[proba.argmax(1)]
            conf[has] = proba.max(1)
        return cls.reshape(r1 - r0, width), conf.reshape(r1 - r0, width)


def map_classes(legend: Legend) -> list[MapClass]:
    return [MapClass(c.code, c.name, c.color) for c in legend.classes]


def summary_of(legend: Legend, counts: np.ndarray, width: int, height: int, windows: list[tuple[str, Window]]) -> dict:
    """The predict stage's report: per-class pixel counts and the tile windows."""
    return {
        "pixels_per_class": {c.name: int(counts[c.code]) for c in legend.classes},
        "pixels_nodata_in_tiles": int(counts[0]),
        "width": width, "height": height,
        "tiles": [{"tile": name, "col_off": int(w.col_off), "row_off": int(w.row_off), "width": int(w.width), "height": int(w.height)}
                  for name, w in windows],
    }


def calibration_tags(meta: dict) -> dict[str, str]:
    """Dataset tags saying how the confidence map was calibrated (temperature fitted on validation pixels)."""
    cal = meta.get("calibration")
    if not cal:
        return {"cropmap_confidence_calibration": "none (raw top-class softmax probability)"}
    return {"cropmap_confidence_calibration": f"temperature scaling, T={cal['temperature']:.4f}, fitted on {cal.get('n', '?')} validation pixels"}


def predict_site(site: Site, legend: Legend, cube_paths: list[Path], model_dir: Path, map_path: Path,
                 confidence_path: Path, *, rows_per_block: int = ROWS_PER_BLOCK, device: str | None = None,
                 tags: dict[str, str] | None = None, on_block: Callable[[int], None] | None = None) -> dict:
    """Write the class and confidence COGs in this process; returns per-class pixel counts and the tile windows."""
    predictor = TilePredictor(legend, model_dir, device)
    tags = {**(tags or {}), **calibration_tags(predictor.meta)}
    transform, width, height = site_grid(site)
    counts = np.zeros(256, dtype=np.int64)
    windows: list[tuple[str, Window]] = []
    with MapWriter(map_path, confidence_path, crs=site.crs, transform=transform, width=width, height=height,
                   classes=map_classes(legend), tags=tags) as writer:
        for path in cube_paths:
            cube = open_cube(path)
            full = predictor.check_tile(site, cube, path)
            windows.append((str(cube.attrs["tile"]), full))
            for r0 in range(0, full.height, rows_per_block):
                r1 = min(full.height, r0 + rows_per_block)
                cls, conf = predictor.rows(cube, r0, r1)
                counts += np.bincount(cls.ravel(), minlength=256)
                writer.write(Window(full.col_off, full.row_off + r0, full.width, r1 - r0), cls, conf)
                if on_block:
                    on_block(cls.size)
    return summary_of(legend, counts, width, height, windows)
