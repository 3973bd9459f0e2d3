"""The ingest and labels stages of a ``source: gee`` site.

ingest: one S2 and one S1 composite export per tile (:mod:`.builders`), run by the
:class:`~.tasks.TaskManager` (state in ``RUN/gee/ingest-tasks.json``), read back into
``cube/<tile>.zarr``. labels: CDL exports per tile (after checking the year is published and
which bands it has), or the site's local parcel file rasterised on each tile grid.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from cropmap.pipeline.cube import TileGrid
from cropmap.pipeline.errors import DataError, SiteError
from cropmap.pipeline.ingest.gee.client import Client, output_files
from cropmap.pipeline.ingest.gee.pixels import FetchStats
from cropmap.pipeline.ingest.gee.tasks import Job, TaskManager
from cropmap.pipeline.ingest.gee.tiles import ExportTile, export_name, site_tiles
from cropmap.pipeline.sites import Site

log = logging.getLogger(__name__)


def make_client(site: Site) -> Client:
    """The real client for ``site``: credentials checked now (one clear error if missing), Earth Engine initialised on first use."""
    from cropmap.pipeline.ingest.gee.auth import initialize, load_credentials, require_auth
    from cropmap.pipeline.ingest.gee.client import BucketExports, EarthEngineClient, LocalExports

    gee = site.gee
    if not gee.bucket:
        raise SiteError(f"site {site.name!r} has no gee.bucket: Earth Engine exports need a Cloud Storage bucket",
                        fix="set gee.bucket in the site file (gee.export_folder alone only reads exports already made)")
    status = require_auth(gee.project)
    exports = (LocalExports(gee.folder()) if gee.export_folder
               else BucketExports(gee.bucket, status.project, credentials=lambda: load_credentials(status)))
    return EarthEngineClient(status.project, exports, initialize=lambda: initialize(status))


class GeeSource:
    """Exports and read-back for one site and year through a :class:`~.client.Client`."""

    def __init__(self, site: Site, year: int, client_factory: Callable[[Site], Client] = make_client):
        self.site, self.year = site, year
        self.tiles: list[ExportTile] = site_tiles(site)
        self._client_factory = client_factory
        self._client: Client | None = None
        self.pixel_stats = FetchStats()
        """computePixels requests, retries and splits of this source (reported by the ingest stage)."""

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = self._client_factory(self.site)
        return self._client

    def name(self, kind: str, tile: str) -> str:
        return export_name(self.site.gee.prefix, self.site.name, self.year, kind, tile)

    def manager(self, state: Path, make_task) -> TaskManager:
        g = self.site.gee
        return TaskManager(self.client, state, make_task, max_pending=g.max_pending, max_attempts=g.max_attempts,
                           max_split_depth=g.max_split_depth)

    def _files(self, leaves: list[str], cache: Path) -> list[Path]:
        paths = []
        for leaf in leaves:
            names = output_files(self.client.list_outputs(leaf), leaf)
            if not names:
                raise DataError(f"export {leaf} finished but its files are not in the export location",
                                fix="check gee.bucket / gee.export_folder, or delete the run's gee/ folder and rerun")
            paths += [self.client.fetch_output(n, cache) for n in names]
        return paths

    # ------------------------------------------------------------ cubes
    def export_cubes(self, run_dir: Path) -> dict[str, dict[str, list[str]]]:
        """Run the S2 (and S1) composite exports of every tile; tile -> kind -> leaf export names."""
        from cropmap.pipeline.ingest.gee import builders as b

        periods = b.composite_periods(self.site.gee, self.year)
        bands = {"s2": list(self.site.bands.s2), "s1": list(self.site.bands.s1)}

        def make_task(job: Job):
            region = b.tile_geometry(job.tile)
            if job.kind == "s2":
                return b.image_export(b.s2_composites(region, periods, self.site.gee, bands["s2"]), job.tile, job.name, self.site.gee, no_data=0)
            return b.image_export(b.s1_composites(region, periods, self.site.gee, bands["s1"]), job.tile, job.name, self.site.gee,
                                  no_data=b.S1_NODATA)

        kinds = ["s2"] + (["s1"] if bands["s1"] else [])
        jobs = [Job(self.name(k, t.name), k, t) for t in self.tiles for k in kinds]
        mgr = self.manager(Path(run_dir) / "gee" / "ingest-tasks.json", make_task)
        leaves = mgr.run(jobs)
        self.eecu_seconds = mgr.eecu_seconds()
        return {t.name: {k: leaves[self.name(k, t.name)] for k in kinds} for t in self.tiles}

    def read_cube(self, tile: ExportTile, leaves: dict[str, list[str]], cache: Path) -> xr.Dataset:
        from cropmap.pipeline.ingest.gee.builders import composite_periods
        from cropmap.pipeline.ingest.gee.readback import composite_cube, read_shards

        s2_files = self._files(leaves["s2"], cache)
        s1_files = self._files(leaves["s1"], cache) if "s1" in leaves else []
        s2 = read_shards(s2_files, tile.grid)
        s1 = read_shards(s1_files, tile.grid) if s1_files else None
        return composite_cube(s2, s1, composite_periods(self.site.gee, self.year), tile, self.site, self.year,
                              sources=[*leaves["s2"], *leaves.get("s1", [])])

    def pixels_cube(self, tile: ExportTile) -> xr.Dataset:
        """The cube of one tile fetched interactively (computePixels, no bucket round trip): the same
        composites, grid and cube format as :meth:`read_cube` of the batch exports."""
        from cropmap.pipeline.ingest.gee import builders as b
        from cropmap.pipeline.ingest.gee.pixels import fetch_pixels
        from cropmap.pipeline.ingest.gee.readback import composite_cube

        g = self.site.gee
        periods = b.composite_periods(g, self.year)
        region = b.tile_geometry(tile)
        kw = dict(concurrency=g.max_concurrent_requests, max_split_depth=g.max_split_depth, stats=self.pixel_stats)
        bands2, bands1 = list(self.site.bands.s2), list(self.site.bands.s1)
        s2 = fetch_pixels(self.client, b.s2_composites(region, periods, g, bands2), tile.grid,
                          b.period_band_names(len(periods), [*bands2, "clear"]), np.uint16, **kw)
        s1 = (fetch_pixels(self.client, b.s1_composites(region, periods, g, bands1), tile.grid,
                           b.period_band_names(len(periods), bands1), np.float32, **kw) if bands1 else None)
        return composite_cube(s2, s1, periods, tile, self.site, self.year,
                              sources=[f"computePixels:{k}/{tile.name}" for k in (["s2", "s1"] if bands1 else ["s2"])])

    # ------------------------------------------------------------ labels
    def check_cdl(self) -> tuple[bool, str]:
        """Is the year's CDL published, and does it have a confidence band? Returns (has_confidence, note)."""
        from cropmap.pipeline.ingest.gee import builders as b

        ids = [str(i) for i in self.client.get_info(b.cdl_year_ids())]
        if str(self.year) not in ids:
            latest = max(ids) if ids else "none"
            raise DataError(f"USDA CDL {self.year} is not in Earth Engine yet (latest: {latest}; a year is published around Jan-Feb of the next)",
                            fix=f"run an earlier --year (e.g. {latest}) or rerun once CDL {self.year} is published")
        bands = list(self.client.get_info(b.cdl_band_names(self.year)))
        if "cropland" not in bands:
            raise DataError(f"USDA CDL {self.year} has no 'cropland' band (has {bands})", fix="choose another year")
        has_conf = "confidence" in bands
        rule = (f"confidence > {self.site.gee.cdl_confidence} and a uniform 3x3 window" if has_conf
                else "a uniform 3x3 window (this year has no confidence band)")
        return has_conf, f"CDL {self.year} bands {bands}; labels kept where {rule}"

    def export_cdl(self, run_dir: Path) -> tuple[dict[str, list[str]], str]:
        from cropmap.pipeline.ingest.gee import builders as b

        has_conf, note = self.check_cdl()
        image = b.cdl_labels(self.year, self.site.gee, has_confidence=has_conf)
        jobs = [Job(self.name("labels", t.name), "labels", t) for t in self.tiles]
        mgr = self.manager(Path(run_dir) / "gee" / "labels-tasks.json",
                           lambda job: b.image_export(image, job.tile, job.name, self.site.gee, no_data=0))
        leaves = mgr.run(jobs)
        return {t.name: leaves[self.name("labels", t.name)] for t in self.tiles}, note

    # ------------------------------------------------------------ training sample tables
    def export_samples(self, run_dir: Path) -> dict[str, list[str]]:
        """Per tile, a CSV table export of stratified points (``samples_per_class`` per CDL class,
        with spatial block ids) and their raw clear S2 and S1 acquisitions; tile -> leaf names."""
        from cropmap.pipeline.ingest.gee import builders as b

        has_conf, _ = self.check_cdl()
        labels = b.cdl_labels(self.year, self.site.gee, has_confidence=has_conf)
        start, end = b.season(self.site.gee, self.year)
        columns = b.sample_columns(self.site)
        bands2, bands1 = list(self.site.bands.s2), list(self.site.bands.s1)

        def make_task(job: Job):
            region = b.tile_geometry(job.tile)
            points = b.stratified_points(labels, region, self.site, seed=self.year)
            s1 = b.s1_acquisitions(region, start, end, self.site.gee, bands1) if bands1 else None
            table = b.sample_table(points, b.s2_acquisitions(region, start, end, self.site.gee, bands2), self.site, s1)
            return b.table_export(table, job.name, self.site.gee, columns)

        jobs = [Job(self.name("samples", t.name), "samples", t) for t in self.tiles]
        mgr = self.manager(Path(run_dir) / "gee" / "samples-tasks.json", make_task)
        leaves = mgr.run(jobs)
        self.samples_eecu_seconds = mgr.eecu_seconds()
        return {t.name: leaves[self.name("samples", t.name)] for t in self.tiles}

    def read_samples(self, leaves: dict[str, list[str]], cache: Path, legend, *, s1_window: int = 0):
        """The exported sample tables of every tile as one :class:`~cropmap.pipeline.samples.PixelSamples`."""
        from cropmap.pipeline.ingest.gee.readback import samples_from_table
        from cropmap.pipeline.samples import concat_samples

        parts = []
        for tile, names in leaves.items():
            frames = []
            for path in self._files(names, cache):
                try:
                    frames.append(pd.read_csv(path))
                except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
                    raise DataError(f"exported sample table {path.name} is not readable CSV ({type(exc).__name__})",
                                    fix="delete it and rerun: it is exported again") from None
            table = pd.concat(frames, ignore_index=True)
            if len(table):
                parts.append(samples_from_table(table, self.site, legend, self.year, s1_window=s1_window, tile=tile))
        if not parts:
            raise DataError(f"the exported sample tables of {self.site.name} {self.year} have no rows",
                            fix="check the site's labels for the year, or use gee.samples: cube")
        return concat_samples(parts)

    def read_cdl(self, tile: ExportTile, leaves: list[str], cache: Path) -> np.ndarray:
        from cropmap.pipeline.ingest.gee.readback import read_shards

        return read_shards(self._files(leaves, cache), tile.grid)[0].astype(np.int32)


# ---------------------------------------------------------------- local parcels
def read_parcels(site: Site):
    """The site's parcel file (Shapefile, GeoPackage, GeoParquet) in the site CRS, with its code column checked."""
    import geopandas as gpd

    p = site.parcels
    path = p.resolved()
    if not path.exists():
        raise DataError(f"parcel file {str(path)!r} of site {site.name!r} does not exist", fix="download it or fix parcels.path")
    try:
        df = gpd.read_parquet(path) if path.suffix in (".parquet", ".geoparquet") else gpd.read_file(path, layer=p.layer)
    except Exception as exc:  # pyogrio/pyarrow raise many kinds for a damaged or foreign file
        raise DataError(f"cannot read parcel file {str(path)!r} ({type(exc).__name__})",
                        fix="pass a Shapefile, GeoPackage or GeoParquet") from None
    cols = [p.code_column] + ([p.id_column] if p.id_column else [])
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise DataError(f"parcel file {path.name} has no column(s) {missing} (has {[c for c in df.columns if c != 'geometry']})",
                        fix="set parcels.code_column / parcels.id_column in the site file")
    if df.crs is None:
        raise DataError(f"parcel file {path.name} has no CRS", fix="add its .prj / CRS metadata")
    codes = pd.to_numeric(df[p.code_column], errors="coerce")
    bad = df.loc[codes.isna() & df[p.code_column].notna(), p.code_column]
    if len(bad):
        raise DataError(f"parcel file {path.name}: column {p.code_column} holds non-numeric code {bad.iloc[0]!r}",
                        fix="use a numeric code column (RPG CODE_GROUP, EuroCrops EC_hcat_c)")
    df[p.code_column] = codes.fillna(0).astype(np.int64)
    if p.id_column:
        df[PARCEL_ID] = parcel_ids(df[p.id_column], path.name, p.id_column)
    return df.to_crs(site.crs)


PARCEL_ID = "_cropmap_parcel_id"
"""Column of :func:`read_parcels` holding the positive integer parcel id taken from ``parcels.id_column``."""


def parcel_ids(values: pd.Series, file: str, column: str) -> np.ndarray:
    """Positive int64 parcel ids from an id column: the numbers themselves when every value is a
    positive integer (RPG ``ID_PARCEL`` is a digit string), else 1..N in order of first appearance."""
    if values.isna().any():
        raise DataError(f"parcel file {file}: column {column} has {int(values.isna().sum())} empty id(s)",
                        fix="fill the ids, or unset parcels.id_column to recover parcels from the raster")
    nums = pd.to_numeric(values, errors="coerce")
    if nums.notna().all() and (nums > 0).all() and (nums % 1 == 0).all() and nums.max() < 2**62:
        return nums.astype(np.int64).to_numpy()
    return pd.factorize(values.astype(str))[0].astype(np.int64) + 1


def burn_parcels(parcels, grid: TileGrid, code_column: str, id_column: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Parcel codes (int32) and, with ``id_column``, parcel ids (int64) burnt onto ``grid`` from one
    rasterisation (pixel centres inside a parcel; 0 = none; where parcels overlap the last one wins)."""
    from rasterio.features import rasterize

    xmin, ymin, xmax, ymax = grid.bounds
    sel = parcels.cx[xmin:xmax, ymin:ymax]
    keep = [k for k, geom in enumerate(sel.geometry) if geom is not None and not geom.is_empty]
    empty = np.zeros((grid.height, grid.width), dtype=np.int32)
    if not keep:
        return empty, (empty.astype(np.int64) if id_column else None)
    # burn row numbers (1-based), then look codes and ids up: both come from the same polygon
    rows = rasterize([(sel.geometry.iloc[k], i + 1) for i, k in enumerate(keep)], out_shape=(grid.height, grid.width),
                     transform=grid.transform, fill=0, dtype="int32")
    codes = np.concatenate([[0], sel[code_column].to_numpy()[keep]]).astype(np.int32)[rows]
    ids = np.concatenate([[0], sel[id_column].to_numpy()[keep]]).astype(np.int64)[rows] if id_column else None
    return codes, ids


def rasterize_parcels(parcels, grid: TileGrid, code_column: str) -> np.ndarray:
    """Parcel codes burnt onto ``grid`` (pixel centres inside a parcel; 0 = none), int32."""
    return burn_parcels(parcels, grid, code_column)[0]
