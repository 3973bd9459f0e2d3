"""Whole-site prediction of patch models: overlapping sliding windows, overlap cropped, into the map COG.

Each tile is covered by ``window`` x ``window`` windows at a stride of ``window - overlap`` (the last
window of a row or column is moved back to end at the tile edge, so every pixel is covered and no
window is padded). Each window is composited from the cube on the model's calendar (the dates of the whole tile: every
window sees the same time axis). The overlap is *cropped*: a window's predictions count fully in its
core and (almost) not within ``overlap / 2`` px of an edge that lies inside the tile, where zero
padding distorts convolutions; where cores overlap they are averaged. STA windows are placed on the
tile's grid (``origin``), whatever the sliding-window layout. For STCLN the result is then exactly
the same for any layout whose window starts are multiples of ``sta_window`` and whose overlap is at
least ``2 * (sta_window + 3)`` (the 5 px radius of the two DoubleConv blocks plus one STA window):
no seams. U-TAE's receptive field is larger; its layouts agree closely, not exactly.

Memory is bounded by the tile (a K x H x W float32 accumulator) plus one batch of windows.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from rasterio.windows import Window

from cropmap.models.patch.checkpoint import load_patch_model
from cropmap.models.patch.training import predict_patch_proba
from cropmap.models.training import resolve_device
from cropmap.pipeline.cube import cube_bands, grid_of, open_cube
from cropmap.pipeline.errors import ModelError, SamplesError
from cropmap.pipeline.grid import site_grid, tile_window
from cropmap.pipeline.levels.patch.patches import TileComposite, tile_composite
from cropmap.pipeline.sites import Legend, Site
from cropmap.pipeline.stages.maps import MapClass, MapWriter


def window_starts(length: int, window: int, overlap: int) -> list[int]:
    """Start offsets of windows covering ``length`` pixels (the last one ends at the edge)."""
    if window <= overlap or overlap < 0:
        raise SamplesError(f"window {window} must exceed overlap {overlap} >= 0", fix="use a larger window or smaller overlap")
    if length <= window:
        return [0]
    starts = list(range(0, length - window, window - overlap))
    return [*starts, length - window]


def crop_weights(h: int, w: int, margin: int, edges: tuple[bool, bool, bool, bool]) -> np.ndarray:
    """(h, w) weights of one window: 1 in its core, ~0 (1e-3, still ramping up) within ``margin`` px of an
    edge that lies inside the tile; ``edges`` (top, bottom, left, right) says which edges are tile edges."""

    def axis(n: int, lo_edge: bool, hi_edge: bool) -> np.ndarray:
        i = np.arange(n, dtype=np.float32)
        d = np.minimum(np.where(lo_edge, np.inf, i), np.where(hi_edge, np.inf, n - 1 - i))
        return np.where(d >= margin, 1.0, 1e-3 * (d + 1) / (margin + 1)).astype(np.float32)

    return np.outer(axis(h, edges[0], edges[1]), axis(w, edges[2], edges[3])).astype(np.float32)


def predict_composite(model, comp: TileComposite, *, window: int, overlap: int, batch_size: int = 4,
                      device: str = "cpu") -> np.ndarray:
    """Class probabilities (K, H, W) of a tile composite from overlapping windows (overlap cropped)."""
    _, _, h, w = comp.x.shape
    rows, cols = window_starts(h, window, overlap), window_starts(w, window, overlap)
    wh, ww = min(window, h), min(window, w)
    margin = overlap // 2
    acc, total = None, np.zeros((h, w), np.float32)
    spots = [(r, c) for r in rows for c in cols]
    for s in range(0, len(spots), batch_size):
        chunk = spots[s:s + batch_size]
        x = np.stack([comp.x[:, :, r:r + wh, c:c + ww] for r, c in chunk])
        valid = np.stack([comp.valid[:, r:r + wh, c:c + ww] for r, c in chunk])
        days = np.broadcast_to(comp.days, (len(chunk), len(comp.days))).astype(np.float32)
        proba = predict_patch_proba(model, x, days, valid, batch_size, device, origins=chunk)
        if acc is None:
            acc = np.zeros((proba.shape[1], h, w), np.float32)
        for (r, c), p in zip(chunk, proba):
            weight = crop_weights(wh, ww, margin, (r == 0, r + wh == h, c == 0, c + ww == w))
            acc[:, r:r + wh, c:c + ww] += p * weight
            total[r:r + wh, c:c + ww] += weight
    return acc / total


def predict_patch_site(site: Site, legend: Legend, cube_paths: list[Path], model_dir: Path, map_path: Path, confidence_path: Path, *,
                       window: int = 32, overlap: int = 8, composite_days: int = 15, device: str | None = None,
                       tags: dict[str, str] | None = None, on_tile: Callable[[int], None] | None = None) -> dict:
    """Map the tiles ``cube_paths`` with a patch model into the class and confidence COGs; returns a summary."""
    dev = resolve_device(device)
    try:
        model, meta = load_patch_model(model_dir, dev)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{str(model_dir)!r} is not a trained patch model ({exc})", fix="rerun the patch_train stage") from None
    codes = {c.code for c in legend.classes}
    lut = np.array([int(c["label"]) for c in meta["classes"]], np.uint8)
    for c in meta["classes"]:
        if c["label"] != 0 and c["label"] not in codes:
            raise ModelError(f"model class {c['name']!r} (code {c['label']}) is not in legend {legend.name!r}", fix="train on this site's patches")
    transform, width, height = site_grid(site)
    counts = np.zeros(256, np.int64)
    tiles = []
    with MapWriter(map_path, confidence_path, crs=site.crs, transform=transform, width=width, height=height,
                   classes=[MapClass(c.code, c.name, c.color) for c in legend.classes], tags=tags) as writer:
        for path in cube_paths:
            cube = open_cube(path)
            if cube_bands(cube) != meta["bands"]:
                raise ModelError(f"cube {path.name} has bands {cube_bands(cube)}, the model {meta['bands']}", fix="train on this site's patches")
            comp = tile_composite(cube, composite_days)
            proba = predict_composite(model, comp, window=window, overlap=overlap, device=dev)
            cls = lut[proba.argmax(0)]
            conf = proba.max(0).astype(np.float32)
            observed = comp.valid.any(0)
            cls[~observed] = 0
            conf[~observed] = np.nan
            conf[cls == 0] = np.nan  # background and unobserved: nodata in both maps
            g = grid_of(cube)
            origin = tile_window(site, g.transform)
            win = Window(origin.col_off, origin.row_off, g.width, g.height)
            writer.write(win, cls, conf)
            counts += np.bincount(cls.ravel(), minlength=256)
            tiles.append({"tile": str(cube.attrs["tile"]), "col_off": int(win.col_off), "row_off": int(win.row_off), "width": g.width,
                          "height": g.height, "windows": len(window_starts(g.height, window, overlap)) * len(window_starts(g.width, window, overlap))})
            if on_tile:
                on_tile(1)
    names = {c.code: c.name for c in legend.classes}
    return {"tiles": tiles, "pixels_per_class": {names[k]: int(counts[k]) for k in names if counts[k]},
            "background_or_nodata_pixels": int(counts[0]), "window": window, "overlap": overlap, "blending": "cropped overlap"}
