"""Labels: the label-source raster mapped through the site legend, and parcels recovered from it.

For each tile, label-source codes (e.g. WorldCereal CT, CDL, RPG CODE_GROUP rasterised) become
crop-map class codes 1..K through the legend (0 = no label: unlabelled, or a code the legend
does not map, counted in the report). Parcels are recovered as connected regions (4-connected)
of equal source code, so training and test sets can be split by parcel and never share a field.
Adjacent fields with the same crop merge into one parcel, which can only make splits stricter.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage

from cropmap.pipeline.sites import Legend

PARCEL_STRIDE = 1_000_000
"""Parcel ids are ``tile_index * PARCEL_STRIDE + component``: unique across a site."""


@dataclass
class TileLabels:
    classes: np.ndarray  # (H, W) uint8 crop-map class code, 0 = no label
    parcels: np.ndarray  # (H, W) int64 parcel id, 0 = none
    parcel_table: pd.DataFrame
    unmapped: Counter  # source code -> pixel count of codes the legend does not map


def map_codes(codes: np.ndarray, legend: Legend) -> tuple[np.ndarray, Counter]:
    """Source codes -> class codes (uint8); also the pixel counts of unmapped non-zero codes."""
    lookup = legend.source_lookup()
    out = np.zeros(codes.shape, dtype=np.uint8)
    unmapped: Counter = Counter()
    for code, count in zip(*np.unique(codes, return_counts=True)):
        code = int(code)
        if code == 0:
            continue
        if code in lookup:
            out[codes == code] = lookup[code]
        else:
            unmapped[code] += int(count)
    return out, unmapped


def recover_parcels(codes: np.ndarray, tile_index: int) -> np.ndarray:
    """Connected regions of equal non-zero code, as site-unique parcel ids (0 = none)."""
    parcels = np.zeros(codes.shape, dtype=np.int64)
    next_id = 1
    for code in np.unique(codes):
        if code == 0:
            continue
        comp, n = ndimage.label(codes == code)  # 4-connectivity: diagonal touches are separate fields
        sel = comp > 0
        parcels[sel] = comp[sel] + (next_id - 1)
        next_id += n
    if next_id >= PARCEL_STRIDE:
        raise ValueError(f"more than {PARCEL_STRIDE} parcels in one tile")
    parcels[parcels > 0] += tile_index * PARCEL_STRIDE
    return parcels


def tile_labels(codes: np.ndarray, legend: Legend, *, tile: str, tile_index: int, year: int,
                transform=None, parcel_ids: np.ndarray | None = None) -> TileLabels:
    """Classes, parcels and the parcel table of one tile. ``parcel_ids`` (positive ids burnt from
    a parcel file, e.g. RPG ``ID_PARCEL``; 0 = none) are used as they are; without them parcels
    are recovered as connected regions of equal code."""
    classes, unmapped = map_codes(codes, legend)
    if parcel_ids is not None:
        parcels = np.where(classes > 0, np.asarray(parcel_ids, dtype=np.int64), 0)
    else:
        parcels = recover_parcels(np.where(classes > 0, codes, 0), tile_index)
    names = {c.code: c.name for c in legend.classes}
    rows = []
    ids, inverse, counts = np.unique(parcels.ravel(), return_inverse=True, return_counts=True)
    rr, cc = np.indices(parcels.shape)
    sum_r = np.bincount(inverse, weights=rr.ravel())
    sum_c = np.bincount(inverse, weights=cc.ravel())
    for k, pid in enumerate(ids):
        if pid == 0:
            continue
        r0, c0 = np.unravel_index(np.argmax(parcels.ravel() == pid), parcels.shape)
        code = int(classes[r0, c0])
        row, col = sum_r[k] / counts[k], sum_c[k] / counts[k]
        x, y = (transform @ (col + 0.5, row + 0.5)) if transform is not None else (np.nan, np.nan)
        rows.append({
            "parcel_id": int(pid), "tile": tile, "year": year, "class_code": code,
            "class_name": names[code], "source_code": int(codes[r0, c0]), "n_pixels": int(counts[k]),
            "x": float(x), "y": float(y),
        })
    table = pd.DataFrame(rows, columns=["parcel_id", "tile", "year", "class_code", "class_name", "source_code", "n_pixels", "x", "y"])
    return TileLabels(classes, parcels, table, unmapped)


def labels_stage(site, tiles: list[tuple[str, int]], legend: Legend, src, *, common: dict, tile_index: dict[str, int]):
    """Stage ``labels``: per tile a class raster and a parcel raster under ``labels/``, plus ``parcels.parquet``."""
    import rasterio

    from cropmap.pipeline.fsio import atomic_path
    from cropmap.pipeline.runner import Stage

    def labels(ctx) -> dict[str, str]:
        out = ctx.path("labels")
        tables, unmapped = [], {}
        with atomic_path(out, is_dir=True) as tmp:
            for tid, tyear in tiles:
                codes, grid, parcel_ids = src.read_codes(ctx, tid)
                tl = tile_labels(codes, legend, tile=tid, tile_index=tile_index[tid], year=tyear, transform=grid.transform,
                                 parcel_ids=parcel_ids)
                profile = dict(driver="GTiff", width=grid.width, height=grid.height, count=1, crs=f"EPSG:{grid.epsg}",
                               transform=grid.transform, compress="deflate")
                with rasterio.open(tmp / f"{tid}_class.tif", "w", dtype="uint8", nodata=0, **profile) as ds:
                    ds.write(tl.classes, 1)
                with rasterio.open(tmp / f"{tid}_parcel.tif", "w", dtype="int64", nodata=0, **profile) as ds:
                    ds.write(tl.parcels, 1)
                tables.append(tl.parcel_table)
                if tl.unmapped:
                    unmapped[tid] = {str(k): v for k, v in tl.unmapped.items()}
            parcels = pd.concat(tables, ignore_index=True)
            parcels.to_parquet(tmp / "parcels.parquet", index=False)
        per_class = parcels.groupby("class_name").agg(parcels=("parcel_id", "size"), pixels=("n_pixels", "sum"))
        ctx.report.update(parcels=int(parcels["parcel_id"].nunique()), per_class=per_class.to_dict(orient="index"),
                          unmapped_source_codes=unmapped)
        ctx.report.update(ctx.report.pop("gee", {}))
        if unmapped:
            ctx.report["notes"] = ctx.report.get("notes", []) + [f"tile {t}: source codes not in legend {legend.name!r} (pixels): {u}" for t, u in unmapped.items()]
        return {"labels": "labels"}

    return Stage("labels", labels, inputs=src.label_files, config={**common, "tiles": tiles, "legend": legend.model_dump(), **src.config(site)})
