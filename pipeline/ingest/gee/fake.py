"""A fake :class:`~.client.Client` for tests, serving real pixels.

:class:`FakeClient` keeps tasks in memory and moves each one a step per poll (READY, RUNNING,
then COMPLETED or FAILED as scripted per export name: ``ok``, ``retry`` (a transient internal
error), ``memory`` ("User memory limit exceeded") or ``fatal``). Every task is serialised with
the real client on submission, and a completed export is *served*: :class:`DemoServer` reads
the grid the request asks for (crs, crsTransform, dimensions from the serialised expression)
and writes GeoTIFF shards / CSV tables of real data there, computed with numpy from the
embedded demo site the way the Earth Engine expression computes them (composites of clear
acquisitions, linear-power S1 means, stratified points), named as Earth Engine names them.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import rasterio
import xarray as xr
from affine import Affine

from cropmap.pipeline.cube import TileGrid, grid_of
from cropmap.pipeline.ingest.gee.builders import S1_NODATA, SAMPLE_COLUMNS, Period, composite_periods, task_request
from cropmap.pipeline.ingest.gee.client import ACTIVE, LocalExports, TaskStatus
from cropmap.pipeline.sites import Site

ERRORS = {
    "retry": "Internal error: an internal error has occurred (request: 1234).",
    "memory": "User memory limit exceeded.",
    "timeout": "Computation timed out.",
    "fatal": "Image.select: Pattern 'B99' did not match any bands.",
    "429": "Too Many Requests: quota exceeded (HTTP 429)",
}


def export_grid(request: dict) -> tuple[int, Affine, int, int]:
    """(epsg, transform, width, height) of an image export request, read from its serialised expression."""
    values = request["expression"]["values"]

    def node(n: dict) -> dict:  # follow shared-value references of the serialised graph
        while "valueReference" in n:
            n = values[n["valueReference"]]
        return n

    def call(n: dict, fn: str) -> dict:
        inv = node(n)["functionInvocationValue"]
        if inv["functionName"] != fn:
            raise ValueError(f"expected {fn}, found {inv['functionName']}: not an image export with an explicit grid")
        return inv["arguments"]

    top = call(values[request["expression"]["result"]], "Image.clipToBoundsAndScale")
    _, _, width, height = node(call(top["geometry"], "GeometryConstructors.Rectangle")["coordinates"])["constantValue"]
    reproject = call(top["input"], "Image.reproject")
    crs = node(call(reproject["crs"], "Projection")["crs"])["constantValue"]
    a, b, c, d, e, f = node(reproject["crsTransform"])["constantValue"]
    return int(crs.split(":")[1]), Affine(a, b, c, d, e, f), int(width), int(height)


class FakeClient:
    """:class:`~.client.Client` in memory; outputs served into ``folder`` by ``serve(name, request, folder)``."""

    def __init__(self, folder: Path, serve: Callable[[str, dict, Path], None] | None = None,
                 script: dict[str, list[str]] | None = None, other_tasks: list[TaskStatus] | None = None,
                 info: Callable[[dict], Any] | None = None, eecu_per_task: float = 2.5,
                 pixels: Callable[[dict, dict], bytes] | None = None, pixel_script: list[str] | None = None):
        self.folder = Path(folder)
        self.exports = LocalExports(self.folder)
        self.serve = serve
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.other_tasks = list(other_tasks or [])
        """Tasks of other work in the project (they count against the pending cap)."""
        self.info = info
        self.eecu_per_task = eecu_per_task
        self.tasks: dict[str, dict] = {}
        self.started: list[str] = []
        """Export names in the order they were started."""
        self.max_active_seen = 0
        self.slept = 0.0
        """Seconds the task manager waited (virtual: nothing sleeps)."""
        self._ids = itertools.count(1)
        self.pixels = pixels or getattr(serve, "pixels", None)
        """``(serialised expression, request) -> NPY bytes`` answering computePixels (a DemoServer does)."""
        self.pixel_script = list(pixel_script or [])
        """Outcomes of the next computePixels calls, in order (``429``, ``memory``, ``fatal``; then ``ok``)."""
        self.pixel_requests: list[dict] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()

    def _outcome(self, name: str) -> str:
        for key, outcomes in self.script.items():
            if key in name and outcomes:
                return outcomes.pop(0)
        return "ok"

    def start_export(self, task: Any) -> str:
        request = task_request(task)  # the real client's serialisation: fails on a malformed expression
        name = request["fileExportOptions"]["cloudStorageDestination"]["filenamePrefix"]
        tid = f"FAKE{next(self._ids):06d}"
        self.tasks[tid] = {"name": name, "request": request, "description": request["description"],
                           "state": "READY", "outcome": self._outcome(name)}
        self.started.append(name)
        active = sum(1 for t in self.tasks.values() if t["state"] in ACTIVE) + sum(t.state in ACTIVE for t in self.other_tasks)
        self.max_active_seen = max(self.max_active_seen, active)
        return tid

    def _advance(self, tid: str) -> None:
        t = self.tasks[tid]
        if t["state"] == "READY":
            t["state"] = "RUNNING"
        elif t["state"] == "RUNNING":
            if t["outcome"] == "ok":
                if self.serve is not None:
                    self.serve(t["name"], t["request"], self.folder)
                t["state"] = "COMPLETED"
            else:
                t["state"], t["error"] = "FAILED", ERRORS[t["outcome"]]

    def _status(self, tid: str) -> TaskStatus:
        t = self.tasks[tid]
        done = t["state"] in ("COMPLETED", "FAILED")
        return TaskStatus(tid, t["description"], t["state"], t.get("error", ""), self.eecu_per_task if done else 0.0)

    def task_statuses(self, ids: list[str]) -> dict[str, TaskStatus]:
        for tid in ids:
            self._advance(tid)
        return {tid: self._status(tid) for tid in ids}

    def list_tasks(self) -> list[TaskStatus]:
        return [self._status(tid) for tid in self.tasks] + self.other_tasks

    def list_outputs(self, prefix: str) -> list[str]:
        return self.exports.list(prefix)

    def fetch_output(self, name: str, dest: Path) -> Path:
        return self.exports.fetch(name, dest)

    def compute_pixels(self, request: dict) -> bytes:
        """computePixels on real demo pixels: the expression is serialised by the real client, the
        answer is NPY bytes of a structured array (one field per band) on the requested grid."""
        import ee

        expr = ee.serializer.encode(request["expression"], for_cloud_api=True)  # fails on a malformed expression
        with self._lock:
            self.pixel_requests.append({k: v for k, v in request.items() if k != "expression"})
            outcome = self.pixel_script.pop(0) if self.pixel_script else "ok"
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            if outcome != "ok":
                raise ee.EEException(ERRORS[outcome])
            if self.pixels is None:
                raise AssertionError("this FakeClient was given nothing to answer computePixels with")
            return self.pixels(expr, request)
        finally:
            with self._lock:
                self._in_flight -= 1

    def get_info(self, obj: Any) -> Any:
        import ee

        if self.info is None:
            raise AssertionError("this FakeClient was given no `info` answers")
        return self.info(ee.serializer.encode(obj, for_cloud_api=True))

    def sleep(self, seconds: float) -> None:
        self.slept += seconds


# ---------------------------------------------------------------- real pixels
def write_shards(data: np.ndarray, transform: Affine, epsg: int, name: str, folder: Path, shard: int) -> list[Path]:
    """Write ``data`` (bands, H, W) as Earth Engine names GeoTIFF exports: ``name.tif`` when one
    file holds it, else ``name-<row>-<col>.tif`` shards of ``shard`` pixels a side."""
    _, h, w = data.shape
    paths = []
    one = h <= shard and w <= shard
    for r in range(0, h, shard):
        for c in range(0, w, shard):
            part = data[:, r:r + shard, c:c + shard]
            path = folder / (f"{name}.tif" if one else f"{name}-{r:010d}-{c:010d}.tif")
            path.parent.mkdir(parents=True, exist_ok=True)
            with rasterio.open(path, "w", driver="GTiff", width=part.shape[2], height=part.shape[1], count=part.shape[0],
                               dtype=part.dtype, crs=f"EPSG:{epsg}", transform=transform @ Affine.translation(c, r)) as ds:
                ds.write(part)
            paths.append(path)
    return paths


def s2_composite(cube: xr.Dataset, periods: list[Period]) -> np.ndarray:
    """What :func:`.builders.s2_composites` computes, in numpy: (periods x (bands + clear), H, W) uint16."""
    dn = cube["s2"].values.astype(np.float64)
    clear = cube["s2_clear"].values
    times = cube["time_s2"].values
    nb = dn.shape[1]
    out = np.zeros((len(periods), nb + 1, *dn.shape[2:]), dtype=np.uint16)
    for i, p in enumerate(periods):
        sel = (times >= np.datetime64(p.start)) & (times < np.datetime64(p.end))
        if not sel.any():
            continue
        vals = np.where(clear[sel][:, None], dn[sel], np.nan)
        with _quiet():
            med = np.nanmedian(vals, axis=0)
        out[i, :nb] = np.where(np.isnan(med), 0, np.floor(med + 0.5)).astype(np.uint16)
        out[i, nb] = clear[sel].sum(axis=0)
    return out.reshape(-1, *dn.shape[2:])


def s1_composite(cube: xr.Dataset, periods: list[Period]) -> np.ndarray:
    """What :func:`.builders.s1_composites` computes: mean linear power in dB, float32, S1_NODATA where none."""
    db = cube["s1"].values.astype(np.float64)
    times = cube["time_s1"].values
    out = np.full((len(periods), db.shape[1], *db.shape[2:]), S1_NODATA, dtype=np.float32)
    for i, p in enumerate(periods):
        sel = (times >= np.datetime64(p.start)) & (times < np.datetime64(p.end))
        if not sel.any():
            continue
        with _quiet():
            mean = np.nanmean(10 ** (db[sel] / 10), axis=0)
        out[i] = np.where(np.isnan(mean), S1_NODATA, 10 * np.log10(mean)).astype(np.float32)
    return out.reshape(-1, *db.shape[2:])


@contextlib.contextmanager
def _quiet():
    """Silence numpy's all-NaN warnings (periods without observations are expected)."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _window(target: TileGrid, source: TileGrid) -> tuple[slice, slice, slice, slice] | None:
    """Overlap of two grids sharing one pixel grid: (target rows, target cols, source rows, source cols)."""
    col = round((source.transform.c - target.transform.c) / target.transform.a)
    row = round((source.transform.f - target.transform.f) / target.transform.e)
    r0, r1 = max(0, row), min(target.height, row + source.height)
    c0, c1 = max(0, col), min(target.width, col + source.width)
    if r0 >= r1 or c0 >= c1:
        return None
    return slice(r0, r1), slice(c0, c1), slice(r0 - row, r1 - row), slice(c0 - col, c1 - col)


class DemoServer:
    """Serves exports of a ``gee`` site from local cubes and label rasters (e.g. the demo tiles).

    ``cubes``: cubes in the cube format (raw acquisitions) on the site's pixel grid; ``labels``:
    (codes, grid) label-source rasters. Exports outside them are no data, as over an empty area.
    """

    def __init__(self, site: Site, year: int, cubes: list[xr.Dataset], labels: list[tuple[np.ndarray, TileGrid]],
                 shard: int | None = None, seed: int = 0):
        self.site, self.year, self.cubes, self.labels = site, year, cubes, labels
        self.periods = composite_periods(site.gee, year)
        self.shard = shard
        self.seed = seed
        self._computed: dict[tuple[str, int], np.ndarray] = {}
        self._lock = threading.Lock()

    def __call__(self, name: str, request: dict, folder: Path) -> None:
        kind = name.split("/")[-2]
        if kind == "samples":
            self.serve_samples(name, request, folder)
            return
        epsg, transform, width, height = export_grid(request)
        grid = TileGrid(epsg, transform, height, width)
        shard = self.shard or request["fileExportOptions"]["geoTiffOptions"]["tileDimensions"]["width"]
        write_shards(self.render(kind, grid), transform, epsg, name, folder, shard)

    def render(self, kind: str, grid: TileGrid) -> np.ndarray:
        nb2, nb1, n = len(self.site.bands.s2), len(self.site.bands.s1), len(self.periods)
        if kind == "s2":
            out = np.zeros((n * (nb2 + 1), grid.height, grid.width), dtype=np.uint16)
            parts = [(grid_of(c), lambda k=k, c=c: self._cached("s2", k, lambda: s2_composite(c, self.periods)))
                     for k, c in enumerate(self.cubes)]
        elif kind == "s1":
            out = np.full((n * nb1, grid.height, grid.width), S1_NODATA, dtype=np.float32)
            parts = [(grid_of(c), lambda k=k, c=c: self._cached("s1", k, lambda: s1_composite(c, self.periods)))
                     for k, c in enumerate(self.cubes)]
        elif kind == "labels":
            out = np.zeros((1, grid.height, grid.width), dtype=np.uint16)
            parts = [(g, lambda codes=codes: codes[None].astype(np.uint16)) for codes, g in self.labels]
        else:
            raise ValueError(f"the demo server cannot serve exports of kind {kind!r}")
        for src_grid, compute in parts:
            w = _window(grid, src_grid)
            if w is not None:
                out[:, w[0], w[1]] = compute()[:, w[2], w[3]]
        return out

    def _cached(self, kind: str, k: int, compute: Callable[[], np.ndarray]) -> np.ndarray:
        with self._lock:
            if (kind, k) not in self._computed:
                self._computed[(kind, k)] = compute()
            return self._computed[(kind, k)]

    def band_names(self, kind: str) -> list[str]:
        """Band names of the image :mod:`.builders` makes for ``kind`` (as Earth Engine names them)."""
        if kind == "labels":
            return ["label"]
        bands = [*self.site.bands.s2, "clear"] if kind == "s2" else list(self.site.bands.s1)
        return [f"p{i:03d}_{b}" for i in range(len(self.periods)) for b in bands]

    def pixels(self, expr: dict, request: dict) -> bytes:
        """Answer a computePixels request: which image (S2 or S1 composites, CDL labels) is read from
        the collections the serialised expression loads; the grid must be on the site's pixel grid."""
        from cropmap.pipeline.ingest.gee.pixels import encode_npy, request_grid

        text = json.dumps(expr)
        kind = ("s2" if '"COPERNICUS/S2_SR_HARMONIZED"' in text else "s1" if '"COPERNICUS/S1_GRD"' in text
                else "labels" if "USDA/NASS/CDL" in text else None)
        if kind is None:
            raise ValueError("the demo server answers computePixels for S2/S1 composites and CDL labels only")
        grid = request_grid(request)
        res = self.site.resolution
        ox, oy = self.site.gee.grid_origin
        on_grid = all(np.isclose(v, round(v)) for v in ((grid.transform.c - ox) / res, (grid.transform.f - oy) / res))
        if (grid.epsg != self.site.epsg or not on_grid
                or not (np.isclose(grid.transform.a, res) and np.isclose(grid.transform.e, -res))):
            raise ValueError(f"the demo server serves the site's pixel grid only (EPSG:{self.site.epsg}, {res} m)")
        names = self.band_names(kind)
        wanted = request.get("bandIds") or names
        unknown = [b for b in wanted if b not in names]
        if unknown:
            import ee

            raise ee.EEException(f"Image.select: Pattern '{unknown[0]}' did not match any bands.")
        data = self.render(kind, grid)
        return encode_npy(data[[names.index(b) for b in wanted]], list(wanted))

    def serve_samples(self, name: str, request: dict, folder: Path) -> None:
        """Stratified points (``samples_per_class`` per label code, inside the export's tile when it is
        one of the site's) with their clear raw S2 acquisitions (DN) and S1 acquisitions (dB) as CSV."""
        from cropmap.pipeline.ingest.gee.tiles import site_tiles

        rng = np.random.default_rng(self.seed)
        block = self.site.gee.block_size_m
        tiles = {t.name: t for t in site_tiles(self.site)}
        leaf = name.split("/")[-1]
        tile = next((t for n, t in tiles.items() if leaf == n or (leaf.startswith(n) and set(leaf[len(n):]) <= set("q0123"))), None)
        if tile is not None and leaf != tile.name:  # a split tile: its quadrant
            for q in leaf[len(tile.name):].split("q")[1:]:
                tile = tile.split()[int(q)]
        b2, b1 = list(self.site.bands.s2), list(self.site.bands.s1)
        rows = []
        for (codes, lgrid), cube in zip(self.labels, self.cubes):
            dn, clear, s1 = cube["s2"].values, cube["s2_clear"].values, cube["s1"].values
            days2, days1 = pd.to_datetime(cube["time_s2"].values), pd.to_datetime(cube["time_s1"].values)
            inside = np.ones(codes.shape, bool)
            if tile is not None:
                w = _window(lgrid, tile.grid)
                inside[:] = False
                if w is not None:
                    inside[w[0], w[1]] = True
            for code in np.unique(codes[(codes > 0) & inside]):
                rr, cc = np.nonzero((codes == code) & inside)
                pick = rng.choice(len(rr), size=min(self.site.gee.samples_per_class, len(rr)), replace=False)
                for k in pick:
                    r, c = int(rr[k]), int(cc[k])
                    x, y = lgrid.transform @ (c + 0.5, r + 0.5)
                    point = {"sample_id": f"{cube.attrs['tile']}_{r}_{c}", "label": int(code), "block_x": int(x // block),
                             "block_y": int(y // block), "x": x, "y": y}
                    for t in np.nonzero(clear[:, r, c])[0]:
                        rows.append({**point, "date": days2[t].strftime("%Y-%m-%d"), **{bd: int(dn[t, j, r, c]) for j, bd in enumerate(b2)}})
                    for t in np.nonzero(~np.isnan(s1[:, :, r, c]).all(axis=1))[0] if b1 else []:
                        rows.append({**point, "date": days1[t].strftime("%Y-%m-%d"), **{bd: float(s1[t, j, r, c]) for j, bd in enumerate(b1)}})
        columns = request.get("selectors") or [*SAMPLE_COLUMNS, *b2, *b1]
        path = folder / f"{name}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows, columns=columns).to_csv(path, index=False)
