"""The ingest stage (every tile's cube from the site's source) and the source readers it and the
labels stage share.

A *source* gives two readers: ``read_cube(ctx, tile, year) -> (cube, notes)`` and
``read_codes(ctx, tile) -> (label codes, grid, parcel ids or None)``. ``source: local`` reads the
site's files (:mod:`cropmap.pipeline.ingest.local`); ``source: gee`` runs Earth Engine exports
on first use (task manager, resumable) and reads each tile back (:mod:`cropmap.pipeline.ingest.gee`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cropmap.pipeline import season
from cropmap.pipeline.cube import write_cube
from cropmap.pipeline.ingest.local import find_tile_files, read_label_raster, read_tile
from cropmap.pipeline.runner import Stage, StageContext
from cropmap.pipeline.sites import Legend, Site


def run_tiles(site: Site, year: int) -> list[tuple[str, int]]:
    """Tiles mapped for ``year``."""
    if site.source == "gee":
        from cropmap.pipeline.ingest.gee.tiles import site_tiles

        return [(t.name, year) for t in site_tiles(site)]
    return [(t.id, t.year) for t in site.local.tiles if t.year == year]


def training_tiles(site: Site, year: int) -> list[tuple[str, int]]:
    """Labelled tiles used for training: the run year's, or every year up to it with ``pool_years`` (local sites)."""
    if site.training.pool_years and site.source == "local":
        return [(t.id, t.year) for t in site.local.tiles if t.year <= year]
    return run_tiles(site, year)


@dataclass
class Source:
    """The readers of a site's source and the files its stages fingerprint."""

    read_cube: Any
    read_codes: Any
    source_files: list[Path] = field(default_factory=list)
    label_files: list[Path] = field(default_factory=list)
    gee: Any = None  # the GeeSource of a ``source: gee`` site

    def config(self, site: Site) -> dict:
        """The source part of the ingest and labels stage configs."""
        if site.source == "gee":
            return {"gee": site.gee.model_dump(exclude={"samples"}), "parcels": site.parcels.model_dump() if site.parcels else None}
        return {"label_variable": site.local.label_variable}


def open_source(site: Site, year: int, legend: Legend, tiles: list[tuple[str, int]], *, gee_client=None, cut=None) -> Source:
    """The readers of ``site``; ``gee_client`` (a factory site -> client) replaces the real Earth
    Engine client (tests use the fake one); ``cut`` (month, day) ends every series at that day of its
    year (early season, :mod:`cropmap.pipeline.season`)."""
    if site.source == "gee":
        from cropmap.pipeline.ingest.gee.source import GeeSource, make_client

        gee_src = GeeSource(site, year, gee_client or make_client)
        read_cube, read_codes = _gee_readers(site, gee_src, legend)
        src = Source(read_cube, read_codes, [], [site.parcels.resolved()] if site.label_source == "parcels" else [], gee_src)
    else:
        files = {tid: find_tile_files(site, tid) for tid, _ in tiles}

        def read_cube(ctx, tid, tyear):
            return read_tile(site, tid, tyear)

        def read_codes(ctx, tid):
            return (*read_label_raster(site, tid), None)

        src = Source(read_cube, read_codes, [p for f in files.values() for p in f.existing() if p != f.labels],
                     [f.labels for f in files.values() if f.labels is not None])
    if cut is not None:
        read_full = src.read_cube

        def read_cut(ctx, tid, tyear):
            cube, notes = read_full(ctx, tid, tyear)
            cube, note = season.cut_cube(cube, tyear, cut)
            return cube, notes + note

        src.read_cube = read_cut
    return src


def ingest_stage(site: Site, tiles: list[tuple[str, int]], src: Source, *, common: dict, cut=None) -> Stage:
    """Stage ``ingest``: one cube per tile under ``cube/`` (stale tiles of another configuration removed)."""

    def ingest(ctx: StageContext) -> dict[str, str]:
        out = ctx.path("cube")
        out.mkdir(parents=True, exist_ok=True)
        keep = {f"{tid}.zarr" for tid, _ in tiles}
        for stale in out.iterdir():  # tiles of an earlier configuration
            if stale.name in keep:
                continue
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink()
        notes, sizes = [], {}
        tick = ctx.progress("ingest tiles", len(tiles)) if ctx.progress else None
        for tid, tyear in tiles:
            cube, tile_notes = src.read_cube(ctx, tid, tyear)
            write_cube(cube, out / f"{tid}.zarr")
            notes += tile_notes
            sizes[tid] = {"s2_dates": int(cube.sizes["time_s2"]), "s1_dates": int(cube.sizes["time_s1"]),
                          "clear_fraction": round(float(cube["s2_clear"].mean()), 3), "missing_bands": list(cube.attrs["missing_bands"])}
            if tick:
                tick(1)
        ctx.report.update(tiles=sizes, notes=notes, **ctx.report.pop("gee", {}))
        return {"cube": "cube"}

    return Stage("ingest", ingest, inputs=src.source_files,
                 config={**common, "tiles": tiles, "bands": site.bands.model_dump(), **({"until": list(cut)} if cut else {}),
                         "cloud_mask": site.cloud_mask.model_dump(), **src.config(site)})


def _gee_readers(site: Site, src, legend: Legend):
    """read_cube / read_codes of a ``source: gee`` site: the first call of a stage runs its exports
    (task manager, resumable), then each tile is read back from the exported files."""
    from cropmap.pipeline.ingest.gee.source import PARCEL_ID, burn_parcels, read_parcels

    tiles = {t.name: t for t in src.tiles}
    exported: dict[str, dict] = {}

    def read_cube(ctx: StageContext, tid: str, tyear: int):
        if site.gee.cubes == "pixels":
            cube = src.pixels_cube(tiles[tid])
            st = src.pixel_stats
            ctx.report["gee"] = {"pixel_requests": st.requests, "pixel_retries": st.retries, "pixel_splits": st.splits}
            return cube, []
        if "cubes" not in exported:
            exported["cubes"] = src.export_cubes(ctx.run_dir)
            ctx.report["gee"] = {"exports": sum(len(v) for t in exported["cubes"].values() for v in t.values()),
                                 "eecu_hours": round(src.eecu_seconds / 3600, 4)}
        cube = src.read_cube(tiles[tid], exported["cubes"][tid], ctx.run_dir / "gee" / "files")
        return cube, []

    def read_codes(ctx: StageContext, tid: str):
        tile = tiles[tid]
        if site.label_source == "parcels":
            if "parcels" not in exported:
                exported["parcels"] = read_parcels(site)
                if site.parcels.id_column:
                    ctx.report["gee"] = {"notes": [f"parcel ids from column {site.parcels.id_column} of {site.parcels.resolved().name}"]}
            codes, ids = burn_parcels(exported["parcels"], tile.grid, site.parcels.code_column,
                                      PARCEL_ID if site.parcels.id_column else None)
            return codes, tile.grid, ids
        if "cdl" not in exported:
            exported["cdl"], note = src.export_cdl(ctx.run_dir)
            ctx.report["gee"] = {"notes": [note]}
        return src.read_cdl(tile, exported["cdl"][tid], ctx.run_dir / "gee" / "files"), tile.grid, None

    return read_cube, read_codes
