"""Parcel pixel sets: built from the site cubes and parcels (label-raster parcels or polygon files), stored on disk.

For every parcel, per sensor, the values of up to ``max_pixels`` of its pixels (a seeded random
draw, the same pixels for both sensors) on each of that sensor's dates: optical dates where at
least ``min_clear_fraction`` of those pixels are clear (the cloudy pixels of a kept date are filled
with the mean of its clear pixels), radar dates where any pixel is observed. Plus geometric
features: area (m2), perimeter (m), cover ratio (pixel area inside / parcel area) and
perimeter / area.

Parcels come from the labels stage's per-tile parcel rasters (connected regions of one crop), or
from a polygon file (Shapefile, GeoPackage, GeoParquet: RPG ``CODE_GROUP``, EuroCrops) read with
:func:`read_parcel_polygons` and rasterised per tile with :func:`rasterize_tile_parcels`. Nothing
is dropped silently: every parcel left out is counted under its reason (``skipped``), and the
stage's report says so.

On disk a *parcel store* (format ``cropmap.parcel-samples/1``) is a directory written atomically::

    meta.json                 format, sensors and their channels, class names, geometric feature names, skip counts
    parcels.parquet           one row per parcel: parcel_id, label, class_name, tile, season_year, n_pixels, ...
    n_pixels.npy geom.npy     stored pixels per parcel (P,), geometric features (P, G)
    <sensor>_values.npy       (rows, C, S) float32, NaN = missing; rows = dates of every parcel
    <sensor>_days.npy <sensor>_offsets.npy    day offsets since 1 January of the season year; (P + 1)
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from cropmap.models.parcel.batch import ParcelSets, SensorSets
from cropmap.pipeline.cube import S2_SCALE, composite_s1, day_offsets
from cropmap.pipeline.errors import DataError, SamplesError
from cropmap.pipeline.fsio import atomic_path, store_format

PARCEL_FORMAT = "cropmap.parcel-samples/1"
GEOM_FEATURES = ["area_m2", "perimeter_m", "cover_ratio", "perimeter_area_ratio"]
SKIP_REASONS = {
    "invalid_geometry": "invalid geometry that could not be repaired",
    "empty_geometry": "empty geometry",
    "outside_tiles": "no overlap with any tile of the site",
    "unmapped_code": "crop code not in the legend",
    "no_clear_s2": "no optical date with enough clear pixels",
    "no_s1": "no radar observation",
}


@dataclass
class ParcelSamples:
    """Parcel pixel sets (:class:`~cropmap.models.parcel.batch.ParcelSets`) with their parcel table."""

    sets: ParcelSets
    table: pd.DataFrame
    class_names: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    """Counts of the build: parcels kept, skipped per reason, repaired, clipped at tile edges, ..."""

    def __len__(self) -> int:
        return len(self.table)

    def subset(self, idx: np.ndarray) -> ParcelSamples:
        idx = np.asarray(idx, np.int64)
        return ParcelSamples(self.sets.subset(idx), self.table.iloc[idx].reset_index(drop=True), dict(self.class_names), dict(self.report))


def is_parcel_store(path: Path) -> bool:
    return store_format(path) == PARCEL_FORMAT


# ---------------------------------------------------------------- store
def save_parcel_store(samples: ParcelSamples, path: Path) -> Path:
    with atomic_path(Path(path), is_dir=True) as tmp:
        s = samples.sets
        for name in ("s2", "s1"):
            if name not in s.sensors:
                continue
            sens = s.sensors[name]
            np.save(tmp / f"{name}_values.npy", np.ascontiguousarray(sens.values, np.float32))
            np.save(tmp / f"{name}_days.npy", np.ascontiguousarray(sens.days, np.float32))
            np.save(tmp / f"{name}_offsets.npy", np.ascontiguousarray(sens.offsets, np.int64))
        np.save(tmp / "n_pixels.npy", np.asarray(s.n_pixels, np.int64))
        np.save(tmp / "geom.npy", np.asarray(s.geom, np.float64))
        samples.table.to_parquet(tmp / "parcels.parquet", index=False)
        meta = {"format": PARCEL_FORMAT, "n_parcels": len(samples), "max_pixels": s.max_pixels,
                "sensors": {k: v.channels for k, v in s.sensors.items() if k in ("s2", "s1")},
                "geom_features": list(s.geom_names), "class_names": [[k, v] for k, v in samples.class_names.items()],
                "build": samples.report}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return Path(path)


def load_parcel_store(path: Path) -> ParcelSamples:
    path = Path(path)
    if not (path / "meta.json").is_file():
        raise SamplesError(f"{str(path)!r} is not a parcel store (no meta.json)", fix="pass runs/SITE/YEAR/samples/parcels made by `cropmap run --level parcel`")
    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("format") != PARCEL_FORMAT:
            raise SamplesError(f"{str(path)!r} has format {meta.get('format')!r}, expected {PARCEL_FORMAT!r}",
                               fix="pass a parcel store (runs/SITE/YEAR/samples/parcels)")
        sensors = {}
        for name, channels in meta["sensors"].items():
            sensors[name] = SensorSets(list(channels), np.load(path / f"{name}_values.npy", mmap_mode="r"),
                                       np.load(path / f"{name}_days.npy"), np.load(path / f"{name}_offsets.npy"))
        n_pixels, geom = np.load(path / "n_pixels.npy"), np.load(path / "geom.npy")
        table = pd.read_parquet(path / "parcels.parquet")
    except SamplesError:
        raise
    except Exception as exc:
        raise SamplesError(f"parcel store {str(path)!r} is damaged ({type(exc).__name__}: {exc})", fix="delete it and rerun the parcel tensors stage") from None
    for name, s in sensors.items():
        if len(s.offsets) != len(table) + 1 or s.offsets[-1] != len(s.values) or len(s.days) != len(s.values):
            raise SamplesError(f"parcel store {str(path)!r} is inconsistent ({name} arrays disagree with the parcel table)",
                               fix="delete it and rerun the parcel tensors stage")
    if len(n_pixels) != len(table) or len(geom) != len(table):
        raise SamplesError(f"parcel store {str(path)!r} is inconsistent (pixel counts or geometry)", fix="delete it and rerun the parcel tensors stage")
    return ParcelSamples(ParcelSets(sensors, n_pixels, geom, list(meta.get("geom_features", []))), table,
                         {k: v for k, v in meta.get("class_names", [])}, meta.get("build", {}))


def concat_parcels(parts: list[ParcelSamples]) -> ParcelSamples:
    parts = [p for p in parts if len(p)]
    if not parts:
        raise DataError("no parcel with observations in any tile", fix="check the parcels overlap the site's tiles and the cubes hold clear dates")
    max_px = max(p.sets.max_pixels for p in parts)
    sensors = {}
    for name in parts[0].sets.sensors:
        vals, days, lengths = [], [], []
        for p in parts:
            s = p.sets.sensors[name]
            if s.channels != parts[0].sets.sensors[name].channels:
                raise DataError(f"tiles disagree on {name} channels: {s.channels} vs {parts[0].sets.sensors[name].channels}", fix="rerun ingest")
            v = np.asarray(s.values)
            if v.shape[2] < max_px:
                v = np.concatenate([v, np.full((*v.shape[:2], max_px - v.shape[2]), np.nan, np.float32)], axis=2)
            vals.append(v)
            days.append(np.asarray(s.days))
            lengths.append(s.lengths)
        lengths = np.concatenate(lengths)
        sensors[name] = SensorSets(list(parts[0].sets.sensors[name].channels), np.concatenate(vals), np.concatenate(days),
                                   np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    sets = ParcelSets(sensors, np.concatenate([p.sets.n_pixels for p in parts]), np.concatenate([p.sets.geom for p in parts]),
                      list(parts[0].sets.geom_names))
    names: dict = {}
    for p in parts:
        names.update(p.class_names)
    return ParcelSamples(sets, pd.concat([p.table for p in parts], ignore_index=True), names)


# ---------------------------------------------------------------- building from a tile cube
def raster_geometry(mask: np.ndarray, res: float) -> tuple[float, float]:
    """Area (m2) and perimeter (m) of a set of pixels (exposed pixel edges)."""
    m = np.pad(mask.astype(bool), 1)
    edges = (m[1:, :] != m[:-1, :]).sum() + (m[:, 1:] != m[:, :-1]).sum()
    return float(mask.sum()) * res * res, float(edges) * res


def tile_parcel_sets(cube: xr.Dataset, parcel_raster: np.ndarray, parcels: pd.DataFrame, *, max_pixels: int = 128,
                     min_clear_fraction: float = 0.5, s1_window: int = 0, seed: int = 0,
                     geometry: dict[int, tuple[float, float]] | None = None) -> tuple[ParcelSamples, Counter]:
    """Pixel sets of the parcels of one tile.

    ``parcel_raster`` (H, W) holds parcel ids on the tile grid (0 = none); ``parcels`` has one row
    per parcel id to build (``parcel_id``, ``label``, ``class_name`` and any other columns, kept).
    ``geometry`` (parcel id -> (area m2, perimeter m)) gives polygon geometry; without it the
    geometry of the raster pixels is used. Returns the samples and the skip counts.
    """
    res = abs(float(cube.attrs["transform"][1]))
    year = int(cube.attrs["year"])
    d2 = day_offsets(cube["time_s2"].values, year).astype(np.float32)
    d1_all = day_offsets(cube["time_s1"].values, year)
    bands_s2, bands_s1 = list(cube.attrs["bands_s2"]), list(cube.attrs["bands_s1"])
    flat = parcel_raster.ravel()
    order = np.argsort(flat, kind="stable")
    ids_sorted = flat[order]
    skipped: Counter = Counter()
    rows, v2s, dd2, l2, v1s, dd1, l1, npx, geoms = [], [], [], [], [], [], [], [], []
    width = parcel_raster.shape[1]
    cx, cy = np.asarray(cube["x"].values, np.float64), np.asarray(cube["y"].values, np.float64)  # pixel centres
    for _, rec in parcels.iterrows():
        pid = int(rec["parcel_id"])
        a, b = np.searchsorted(ids_sorted, pid, "left"), np.searchsorted(ids_sorted, pid, "right")
        pix = order[a:b]
        if len(pix) == 0:
            skipped["outside_tiles"] += 1
            continue
        rng = np.random.default_rng([int(seed), pid & 0xFFFFFFFF, pid >> 32])
        take = np.sort(rng.choice(len(pix), size=min(max_pixels, len(pix)), replace=False))
        rr, cc = np.divmod(pix[take], width)
        r0, r1, c0, c1 = rr.min(), rr.max() + 1, cc.min(), cc.max() + 1
        win = cube.isel(y=slice(int(r0), int(r1)), x=slice(int(c0), int(c1)))
        rl, cl = rr - r0, cc - c0
        dn = win["s2"].values[:, :, rl, cl]  # (T2, C2, n)
        clear = win["s2_clear"].values[:, rl, cl] & (dn != 0).any(axis=1)
        s2 = dn.astype(np.float32) * np.float32(S2_SCALE)
        s2[dn == 0] = np.nan
        s2[~np.broadcast_to(clear[:, None, :], s2.shape)] = np.nan
        keep2 = clear.mean(axis=1) >= min_clear_fraction
        s1 = win["s1"].values[:, :, rl, cl].astype(np.float32)
        s1, d1 = composite_s1(s1, d1_all, s1_window)
        keep1 = ~np.isnan(s1).all(axis=(1, 2))
        if not keep2.any():
            skipped["no_clear_s2"] += 1
            continue
        if not keep1.any():
            skipped["no_s1"] += 1
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN channels (bands a tile lacks) stay NaN
            s2, s1 = s2[keep2], s1[keep1]
            s2 = np.where(np.isnan(s2), np.nanmean(s2, axis=2, keepdims=True), s2)
            s1 = np.where(np.isnan(s1), np.nanmean(s1, axis=2, keepdims=True), s1)
        pad = max_pixels - s2.shape[2]
        if pad:
            s2 = np.concatenate([s2, np.full((*s2.shape[:2], pad), np.nan, np.float32)], axis=2)
            s1 = np.concatenate([s1, np.full((*s1.shape[:2], pad), np.nan, np.float32)], axis=2)
        v2s.append(s2.astype(np.float32))
        dd2.append(d2[keep2])
        l2.append(int(keep2.sum()))
        v1s.append(s1.astype(np.float32))
        dd1.append(d1[keep1].astype(np.float32))
        l1.append(int(keep1.sum()))
        npx.append(len(take))
        if geometry is not None and pid in geometry:
            area, perim = geometry[pid]
        else:
            pr, pc = np.divmod(pix, width)
            sub = np.zeros((pr.max() - pr.min() + 1, pc.max() - pc.min() + 1), bool)
            sub[pr - pr.min(), pc - pc.min()] = True
            area, perim = raster_geometry(sub, res)
        cover = len(pix) * res * res / area if area > 0 else 0.0
        geoms.append([area, perim, cover, perim / area if area > 0 else 0.0])
        centre_r, centre_c = np.divmod(pix, width)
        rows.append({**rec.to_dict(), "tile": str(cube.attrs["tile"]), "season_year": year, "epsg": int(cube.attrs["epsg"]),
                     "x": float(cx[centre_c].mean()), "y": float(cy[centre_r].mean()),  # centroid: the parcel's split block
                     "n_pixels": int(len(pix)), "n_pixels_stored": int(len(take)), "area_m2": area, "perimeter_m": perim,
                     "cover_ratio": cover, "s2_dates": int(keep2.sum()), "s1_dates": int(keep1.sum())})

    def sensor(channels, vals, days, lengths, c):
        if not vals:
            return SensorSets(channels, np.zeros((0, c, max_pixels), np.float32), np.zeros(0, np.float32), np.zeros(1, np.int64))
        return SensorSets(channels, np.concatenate(vals), np.concatenate(days), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))

    sets = ParcelSets({"s2": sensor(bands_s2, v2s, dd2, l2, len(bands_s2)), "s1": sensor(bands_s1, v1s, dd1, l1, len(bands_s1))},
                      np.asarray(npx, np.int64), np.asarray(geoms, np.float64).reshape(-1, len(GEOM_FEATURES)), list(GEOM_FEATURES))
    return ParcelSamples(sets, pd.DataFrame(rows)), skipped


# ---------------------------------------------------------------- polygon files
def read_parcel_polygons(path: Path, *, code_column: str, crs: str, id_column: str | None = None, layer: str | None = None):
    """Read a parcel file into a GeoDataFrame in the site CRS with ``parcel_id``, ``source_code``, ``geometry``.

    Raises :class:`DataError` for a missing/unreadable file, a missing column or a file without a CRS.
    Returns ``(frame, report)``: a file in another CRS is reprojected (``reprojected_from``), invalid
    geometries are repaired (``repaired_geometries``) or skipped (``skipped``), empty ones skipped.
    """
    import geopandas as gpd
    from shapely.validation import make_valid

    path = Path(path)
    if not path.exists():
        raise DataError(f"parcel file {str(path)!r} does not exist", fix="check parcels.path in the site file")
    try:
        gdf = gpd.read_parquet(path) if path.suffix.lower() in (".parquet", ".geoparquet") else gpd.read_file(path, layer=layer)
    except Exception as exc:
        raise DataError(f"cannot read parcel file {str(path)!r} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                        fix="pass a Shapefile, GeoPackage or GeoParquet file") from None
    cols = [c for c in gdf.columns if c != gdf.geometry.name]
    for col, what in ((code_column, "code_column"), (id_column, "id_column")):
        if col is not None and col not in gdf.columns:
            raise DataError(f"parcel file {str(path)!r} has no column {col!r} (columns: {', '.join(map(str, cols))})",
                            fix=f"set parcels.{what} in the site file to the column holding the {'crop codes' if what == 'code_column' else 'parcel ids'}")
    if gdf.crs is None:
        raise DataError(f"parcel file {str(path)!r} has no CRS", fix="set its CRS (e.g. with ogr2ogr -a_srs EPSG:2154) and retry")
    report: dict = {"read": int(len(gdf)), "skipped": {}}
    if gdf.crs.to_epsg() != int(crs.split(":")[1]):
        report["reprojected_from"] = gdf.crs.to_string()
        gdf = gdf.to_crs(crs)
    skipped: Counter = Counter()
    empty = gdf.geometry.isna() | gdf.geometry.is_empty
    skipped["empty_geometry"] += int(empty.sum())
    gdf = gdf[~empty].copy()
    invalid = ~gdf.geometry.is_valid
    repaired = 0
    if invalid.any():
        fixed = gdf.geometry[invalid].apply(make_valid)
        # make_valid may return collections with lines/points: keep the polygonal part
        fixed = fixed.apply(lambda g: g if g.geom_type in ("Polygon", "MultiPolygon") else
                            (g.__class__(list(p for p in getattr(g, "geoms", []) if p.geom_type in ("Polygon", "MultiPolygon")))
                             if hasattr(g, "geoms") else None))
        ok = fixed.apply(lambda g: g is not None and not g.is_empty and g.is_valid and g.area > 0)
        gdf.loc[fixed.index[ok], gdf.geometry.name] = fixed[ok]
        repaired = int(ok.sum())
        skipped["invalid_geometry"] += int((~ok).sum())
        gdf = gdf.drop(index=fixed.index[~ok])
    report["repaired_geometries"] = repaired
    out = gpd.GeoDataFrame({
        "parcel_id": (gdf[id_column].to_numpy() if id_column else np.arange(1, len(gdf) + 1)),
        "source_code": gdf[code_column].to_numpy(),
    }, geometry=gdf.geometry.to_numpy(), crs=crs)
    if id_column and out["parcel_id"].duplicated().any():
        dup = out.loc[out["parcel_id"].duplicated(), "parcel_id"].iloc[0]
        raise DataError(f"parcel file {str(path)!r} repeats parcel id {dup!r} in column {id_column!r}", fix="ids must be unique")
    report["skipped"] = {k: v for k, v in skipped.items() if v}
    return out, report


def rasterize_tile_parcels(gdf, transform, height: int, width: int) -> tuple[np.ndarray, dict[int, int], list[int]]:
    """Parcel ids (index ``k + 1`` of ``gdf`` rows, 0 = none) on a tile grid.

    Pixels whose centre lies in a polygon belong to it; a parcel smaller than a pixel (no centre
    inside) that overlaps the tile gets the pixel holding its representative point. Returns the
    raster, pixels per row index and the row indices placed through that sub-pixel rule.
    """
    from rasterio import features
    from shapely.geometry import box

    xmin, ymax = transform.c, transform.f
    tile_box = box(xmin, ymax + transform.e * height, xmin + transform.a * width, ymax)
    hits = gdf.sindex.query(tile_box, predicate="intersects")
    raster = np.zeros((height, width), np.int64)
    if len(hits) == 0:
        return raster, {}, []
    shapes = ((gdf.geometry.iloc[k], int(k) + 1) for k in hits)
    raster = features.rasterize(shapes, out_shape=(height, width), transform=transform, fill=0, dtype="int64")
    counts = dict(zip(*np.unique(raster[raster > 0], return_counts=True)))
    tiny = []
    inv = ~transform
    for k in hits:
        if (k + 1) in counts:
            continue
        pt = gdf.geometry.iloc[k].representative_point()
        col, row = (int(np.floor(v)) for v in inv @ (pt.x, pt.y))
        if 0 <= row < height and 0 <= col < width:
            raster[row, col] = k + 1
            tiny.append(int(k))
    counts = {int(k) - 1: int(v) for k, v in zip(*np.unique(raster[raster > 0], return_counts=True))}
    return raster, counts, tiny


def polygon_parcel_samples(gdf, cubes: dict, lookup: dict[int, int], class_names: dict[int, str], **build) -> tuple[ParcelSamples, dict, dict]:
    """Pixel sets of polygon parcels (:func:`read_parcel_polygons`) over the tile cubes ``cubes`` (tile -> cube).

    A parcel crossing tile edges is kept whole in no tile: its pixels are taken from the tile holding
    most of them (counted as ``clipped_at_tile_edge``; its cover ratio says how much is left). A parcel
    smaller than a pixel gets the pixel holding its representative point (``smaller_than_pixel``).
    ``lookup`` maps source crop codes to class codes (others are skipped as ``unmapped_code``).
    Returns the samples, the parcel raster of each tile (ids = ``parcel_id``) and the report.
    """
    from cropmap.pipeline.cube import grid_of

    codes = [lookup.get(int(c)) if pd.notna(c) and float(c).is_integer() else None for c in gdf["source_code"]]
    mapped = np.array([c is not None for c in codes])
    skipped: Counter = Counter({"unmapped_code": int((~mapped).sum())})
    per_tile, rasters = {}, {}
    for tid, cube in cubes.items():
        g = grid_of(cube)
        raster, counts, tiny = rasterize_tile_parcels(gdf, g.transform, g.height, g.width)
        per_tile[tid] = (raster, counts, set(tiny))
    best: dict[int, tuple[int, str]] = {}
    in_tiles: Counter = Counter()
    for tid, (_, counts, _) in per_tile.items():
        for k, n in counts.items():
            in_tiles[k] += 1
            if k not in best or n > best[k][0]:
                best[k] = (n, tid)
    outside = [k for k in range(len(gdf)) if mapped[k] and k not in best]
    skipped["outside_tiles"] += len(outside)
    if not best:
        raise DataError("no parcel of the parcel file overlaps the site's tiles",
                        fix="check the file covers the site (and its CRS): the site extent and the parcels do not intersect")
    geometry = {k + 1: (float(gdf.geometry.iloc[k].area), float(gdf.geometry.iloc[k].length)) for k in best}
    parts, report_extra = [], {"clipped_at_tile_edge": 0, "smaller_than_pixel": 0}
    for tid, (raster, _, tiny) in per_tile.items():
        mine = [k for k, (_, t) in best.items() if t == tid and mapped[k]]
        report_extra["clipped_at_tile_edge"] += sum(in_tiles[k] > 1 for k in mine)
        report_extra["smaller_than_pixel"] += sum(k in tiny for k in mine)
        keep_ids = np.array([k + 1 for k in mine], np.int64)
        r = np.where(np.isin(raster, keep_ids), raster, 0)
        rasters[tid] = r
        table = pd.DataFrame({"parcel_id": keep_ids, "source_parcel_id": [gdf["parcel_id"].iloc[k] for k in mine],
                              "source_code": [gdf["source_code"].iloc[k] for k in mine],
                              "label": [codes[k] for k in mine], "class_name": [class_names[codes[k]] for k in mine]})
        part, sk = tile_parcel_sets(cubes[tid], r, table, geometry=geometry, **build)
        skipped.update(sk)
        parts.append(part)
    samples = concat_parcels(parts)
    samples.class_names = dict(class_names)
    report = {"parcels_read": int(len(gdf)), "parcels_kept": len(samples), **report_extra,
              "skipped": {k: int(v) for k, v in skipped.items() if v}}
    return samples, rasters, report
