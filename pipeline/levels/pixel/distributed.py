"""Tiled stages on dask.distributed: one task per tile, resumable tile by tile.

``cropmap run --workers N`` runs the per-tile work of the tensors and predict stages as tasks on
a :class:`dask.distributed.LocalCluster` of N single-threaded worker processes;
``--scheduler ADDRESS`` sends them to an existing cluster instead; no option (or ``--workers
0``) keeps everything in the one process (:func:`cropmap.pipeline.levels.pixel.predict.predict_site`).

How the pitfalls of the ecosystem are handled:

* **Handles do not pickle**: a task gets paths (cube store, label rasters, model directory) and
  opens them itself; the model is loaded once per worker process and reused.
* **GDAL settings**: the ``GDAL_*``/``CPL_*``/``VSI_*`` variables of the parent (e.g.
  ``GDAL_CACHEMAX`` set by the CLI) are installed in every worker by a worker plugin and every
  task runs inside ``rasterio.Env`` with them; the plugin also sets the worker's torch threads.
* **Shared outputs**: no task writes a shared file. Each task writes its own *part* (a GeoTIFF of
  the tile's classes and confidence, or the tile's sample store) atomically, then a *tile record*
  ``<stage dir>/<tile>.json`` naming the part's checksum and the key of its inputs. Only the
  parent writes the site map (:class:`~cropmap.pipeline.stages.maps.MapWriter`), copying each part in
  as it arrives, row block by row block, so its memory is bounded by the block.
* **Failures**: a task that raises is retried (``retries``); a task whose worker dies is
  rescheduled by dask on another worker. A task first looks for its tile record and returns it
  without recomputing, so a result lost with a worker, a retried stage or a rerun after a crash
  never redoes a finished tile. The tile records live under ``RUN/tiles/<stage>/`` next to
  ``run.json``; the stage report in the manifest counts computed and reused tiles.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from distributed.diagnostics.plugin import WorkerPlugin

from cropmap.pipeline.errors import CropmapError, StageError
from cropmap.pipeline.fsio import atomic_path, sha256_path, write_json

log = logging.getLogger(__name__)

__all__ = ["ClusterError", "ClusterSpec", "cluster_spec", "cluster_client", "probe", "TileLedger", "TileJob", "run_tiled",
           "predict_site_distributed", "samples_distributed", "gdal_env"]

PRELOAD = ("numpy", "zarr", "xarray", "rasterio", "torch", "cropmap.pipeline.cube", "cropmap.pipeline.levels.pixel.tensors",
           "cropmap.pipeline.samples", "cropmap.pipeline.levels.pixel.predict")
_ENV_PREFIXES = ("GDAL_", "CPL_", "VSI_", "PROJ_", "OGR_")
_ADDRESS = re.compile(r"^(?:(tcp|tls|inproc|ws|wss|ucx)://)?([A-Za-z0-9_.\-\[\]:]+?)(?::(\d{1,5}))?/?$")


class ClusterError(CropmapError):
    """A ``--workers``/``--scheduler`` value that cannot be used, or a cluster that cannot be reached."""


@dataclass(frozen=True)
class ClusterSpec:
    """Where tiled work runs: in this process, on a LocalCluster, or on an existing scheduler."""

    workers: int = 0
    """LocalCluster workers; 0 with no scheduler: one process, no dask."""
    scheduler: str | None = None
    """Address of an existing dask scheduler (``tcp://host:8786``)."""
    threads_per_worker: int = 1
    processes: bool = True
    """LocalCluster of processes (False: threads of this process; for tests)."""
    torch_threads: int | None = 1
    """torch threads of each worker process (None: leave as is)."""
    retries: int = 2
    """Extra attempts of a tile task that raised."""
    connect_timeout: float = 10.0

    @property
    def distributed(self) -> bool:
        return self.workers > 0 or self.scheduler is not None

    def describe(self) -> str:
        if self.scheduler:
            return f"dask scheduler {self.scheduler}"
        if self.workers:
            return f"LocalCluster of {self.workers} worker {'processes' if self.processes else 'threads'}"
        return "one process"


def cluster_spec(workers: int | None = None, scheduler: str | None = None, **options: Any) -> ClusterSpec:
    """Validate ``--workers`` and ``--scheduler`` (raises :class:`ClusterError`, one line: what, value, fix)."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise ClusterError(f"--workers must be a whole number >= 0, got {workers!r}",
                           fix="use --workers 0 (one process) or --workers N (a local dask cluster of N worker processes)")
    if scheduler is not None:
        if workers:
            raise ClusterError(f"--workers {workers} and --scheduler {scheduler!r} both given",
                               fix="pass --scheduler alone (the cluster's own workers run the tiles) or --workers alone")
        m = _ADDRESS.match(scheduler.strip())
        if scheduler.startswith("inproc://") and len(scheduler) > len("inproc://"):  # a scheduler of this process
            return ClusterSpec(workers=0, scheduler=scheduler, **options)
        if not scheduler.strip() or m is None or m.group(3) is None:
            raise ClusterError(f"--scheduler {scheduler!r} is not a dask scheduler address",
                               fix="use PROTOCOL://HOST:PORT, e.g. tcp://10.0.0.5:8786 (the address `dask scheduler` prints)")
        if m.group(3) is not None and not 0 < int(m.group(3)) < 65536:
            raise ClusterError(f"--scheduler {scheduler!r} has port {m.group(3)}, outside 1..65535", fix="use the scheduler's port (8786 by default)")
        scheduler = scheduler.strip() if m.group(1) else f"tcp://{scheduler.strip()}"
    return ClusterSpec(workers=workers or 0, scheduler=scheduler, **options)


def gdal_env() -> dict[str, str]:
    """The GDAL configuration of this process that workers must share (no credentials)."""
    return {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)}


class WorkerSetup(WorkerPlugin):
    """Worker plugin: GDAL variables and torch threads of every worker (run at worker start)."""

    name = "cropmap-worker-setup"

    def __init__(self, env: dict[str, str], torch_threads: int | None) -> None:
        self.env, self.torch_threads = env, torch_threads

    def setup(self, worker: Any = None) -> None:
        os.environ.update(self.env)
        # import the heavy modules once, here, before any task: a task thread importing zarr while the
        # worker's event loop unpickles a message that imports it too can see a half-initialised module
        import importlib

        for name in PRELOAD:
            importlib.import_module(name)
        if self.torch_threads:
            import torch

            torch.set_num_threads(self.torch_threads)


def probe(spec: ClusterSpec) -> None:
    """Fail early, before any stage runs, when ``--scheduler`` cannot be reached."""
    if spec.scheduler:
        with cluster_client(spec):
            pass


@contextlib.contextmanager
def cluster_client(spec: ClusterSpec) -> Iterator[Any]:
    """A dask Client for ``spec`` (None when it runs in one process); closed on exit."""
    if not spec.distributed:
        yield None
        return
    from dask.distributed import Client, LocalCluster

    cluster = None
    quiet = logging.getLogger("distributed")
    if quiet.getEffectiveLevel() < logging.WARNING and not logging.getLogger("cropmap").isEnabledFor(logging.DEBUG):
        quiet.setLevel(logging.WARNING)  # the scheduler of a LocalCluster logs every connection at INFO
    if spec.scheduler:
        try:
            client = Client(spec.scheduler, timeout=spec.connect_timeout)
        except (OSError, TimeoutError) as exc:
            raise ClusterError(f"cannot reach the dask scheduler at {spec.scheduler!r} within {spec.connect_timeout:.0f} s "
                               f"({type(exc).__name__})",
                               fix="start it (`dask scheduler`, then `dask worker ADDRESS`), check host and port, "
                                   "or drop --scheduler to use a local cluster (--workers N)") from None
    else:
        cluster = LocalCluster(n_workers=spec.workers, threads_per_worker=spec.threads_per_worker, processes=spec.processes,
                               dashboard_address=None, silence_logs=logging.ERROR)
        client = Client(cluster)
    try:
        # torch threads are process-wide: leave them alone when the "workers" are threads of this process
        client.register_plugin(WorkerSetup(gdal_env(), spec.torch_threads if (spec.processes or spec.scheduler) else None),
                               name=WorkerSetup.name)
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


# -- per-tile records -----------------------------------------------------------------------


class TileLedger:
    """Completion records of one tiled stage: ``DIR/<tile>.json`` + the tile's part ``DIR/<tile><suffix>``.

    A record says the part was finished for inputs with a given *key*; it counts only while the
    part is present with the recorded checksum."""

    def __init__(self, directory: Path, suffix: str) -> None:
        self.dir = Path(directory)
        self.suffix = suffix

    def part(self, tile: str) -> Path:
        return self.dir / f"{tile}{self.suffix}"

    def record_path(self, tile: str) -> Path:
        return self.dir / f"{tile}.json"

    def finished(self, tile: str, key: str) -> dict | None:
        path = self.record_path(tile)
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        part = self.part(tile)
        if rec.get("key") != key or rec.get("status") != "done" or not part.exists() or sha256_path(part) != rec.get("sha256"):
            return None
        return rec

    def write(self, tile: str, key: str, summary: dict, seconds: float) -> dict:
        rec = {"tile": tile, "key": key, "status": "done", "part": self.part(tile).name, "sha256": sha256_path(self.part(tile)),
               "seconds": round(seconds, 3), "pid": os.getpid(), "summary": summary}
        write_json(self.record_path(tile), rec)
        return rec

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass(frozen=True)
class TileJob:
    """One tile task: ``func(tile, part_path, *args) -> summary`` (runs on a worker)."""

    tile: str
    key: str
    args: tuple = ()


@dataclass
class TiledResult:
    records: dict[str, dict] = field(default_factory=dict)
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)


def _run_tile(func: Callable, ledger_dir: str, suffix: str, tile: str, key: str, env: dict[str, str], args: tuple) -> dict:
    """The task: the tile's record when it is already done, else compute the part and record it."""
    import rasterio

    ledger = TileLedger(Path(ledger_dir), suffix)
    done = ledger.finished(tile, key)
    if done is not None:
        return {**done, "reused": True}
    t0 = time.perf_counter()
    with rasterio.Env(**{k: int(v) if v.isdigit() else v for k, v in env.items()}):  # rasterio wants GDAL_CACHEMAX as an int
        summary = func(tile, ledger.part(tile), *args)
    return {**ledger.write(tile, key, summary, time.perf_counter() - t0), "reused": False}


def run_tiled(client: Any, func: Callable, jobs: list[TileJob], ledger: TileLedger, *, retries: int = 2,
              on_result: Callable[[dict], None] | None = None, stage: str = "tiles") -> TiledResult:
    """Run ``func`` for every job not yet recorded as done; ``on_result(record)`` in this process as
    each tile finishes (finished ones first). ``client`` None runs the jobs here, one by one.

    Raises :class:`StageError` naming the failed tiles after every other tile has finished (and
    been recorded), so a rerun only computes the failed ones."""
    ledger.dir.mkdir(parents=True, exist_ok=True)
    result = TiledResult()

    def take(rec: dict) -> None:
        result.records[rec["tile"]] = rec
        (result.reused if rec.pop("reused", False) else result.computed).append(rec["tile"])
        if on_result:
            on_result(rec)

    todo = []
    for job in jobs:
        rec = ledger.finished(job.tile, job.key)
        if rec is not None:
            take({**rec, "reused": True})
        else:
            todo.append(job)
    env = gdal_env()
    failed: dict[str, BaseException] = {}
    if client is None:
        for job in todo:
            for attempt in range(retries + 1):
                try:
                    take(_run_tile(func, str(ledger.dir), ledger.suffix, job.tile, job.key, env, job.args))
                    break
                except Exception as exc:  # noqa: BLE001 - retried, then reported with the others
                    if isinstance(exc, CropmapError) or attempt == retries:
                        failed[job.tile] = exc
                        log.warning("tile %s failed: %s: %s", job.tile, type(exc).__name__, exc)
                        break
    elif todo:
        from dask.distributed import as_completed

        run_id = uuid.uuid4().hex[:8]
        futures = {client.submit(_run_tile, func, str(ledger.dir), ledger.suffix, job.tile, job.key, env, job.args,
                                 key=f"cropmap-{stage}-{job.tile}-{run_id}", retries=retries, pure=False): job.tile for job in todo}
        for fut in as_completed(list(futures)):
            tile = futures[fut]
            try:
                take(fut.result())
            except Exception as exc:  # noqa: BLE001 - reported together below, after the other tiles
                failed[tile] = exc
                log.warning("tile %s failed: %s: %s", tile, type(exc).__name__, exc)
    if failed:
        first, exc = next(iter(failed.items()))
        raise StageError(f"{len(failed)} of {len(jobs)} tiles failed (first: tile {first}: {type(exc).__name__}: {exc})",
                         fix=f"fix the cause and rerun: the {len(result.records)} finished tiles are kept in {ledger.dir} and not redone")
    return result


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _stamp(path: Path) -> list:
    """A cheap identity of an input file or store (name, size, modification time), not a checksum of a 1 TB cube."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [str(path), sum(f.stat().st_size for f in files), max((f.stat().st_mtime_ns for f in files), default=0)]


# -- predict ----------------------------------------------------------------------------------

PREDICT_TILE_VERSION = "1"
_PREDICTORS: dict[tuple, Any] = {}


def _grouping(groups: list[list[int]] | None, group_temperatures: list[float] | None) -> dict:
    """The blend's grouping keywords of :func:`~cropmap.pipeline.levels.pixel.predict.make_predictor` (none without groups)."""
    return {"groups": groups, "group_temperatures": group_temperatures} if groups else {}


def _predictor(legend, model_dir: Path | list[Path], device: str | None, groups: list[list[int]] | None = None,
               group_temperatures: list[float] | None = None):
    """The model (or averaging ensemble of models, or the blend's groups of members) of this worker process,
    loaded once per model directory set and grouping."""
    from cropmap.pipeline.levels.pixel.predict import make_predictor

    dirs = [Path(d) for d in (model_dir if isinstance(model_dir, (list, tuple)) else [model_dir])]
    k = (tuple(str(d) for d in dirs), tuple(_stamp(d / "model.safetensors")[2] for d in dirs), device,
         json.dumps(_grouping(groups, group_temperatures)))
    if k not in _PREDICTORS:
        _PREDICTORS.clear()
        _PREDICTORS[k] = make_predictor(legend, dirs, device, **_grouping(groups, group_temperatures))
    return _PREDICTORS[k]


def predict_tile(tile: str, part: Path, site, legend, cube_path: Path, model_dir: Path, device: str | None,
                 rows_per_block: int, groups: list[list[int]] | None = None, group_temperatures: list[float] | None = None) -> dict:
    """Worker side: classes and confidence of one tile into its part GeoTIFF (band 1 class code,
    band 2 confidence, float32, one strip per row block), atomically; returns its window and class counts."""
    import rasterio
    from rasterio.windows import Window

    from cropmap.pipeline.cube import grid_of, open_cube

    predictor = _predictor(legend, model_dir, device, groups, group_temperatures)
    cube = open_cube(cube_path)
    full = predictor.check_tile(site, cube, cube_path)
    grid = grid_of(cube)
    counts = np.zeros(256, np.int64)
    profile = dict(driver="GTiff", width=grid.width, height=grid.height, count=2, dtype="float32", crs=f"EPSG:{grid.epsg}",
                   transform=grid.transform, tiled=False, blockysize=rows_per_block, compress="deflate", bigtiff="IF_SAFER")
    with atomic_path(part) as tmp, rasterio.open(tmp, "w", **profile) as ds:
        for r0, r1, cls, conf in predictor.blocks(cube, rows_per_block):
            counts += np.bincount(cls.ravel(), minlength=256)
            win = Window(0, r0, grid.width, r1 - r0)
            ds.write(cls.astype(np.float32), 1, window=win)
            ds.write(conf, 2, window=win)
    return {"tile": str(cube.attrs["tile"]), "window": [int(full.col_off), int(full.row_off), int(full.width), int(full.height)],
            "counts": {int(c): int(n) for c, n in enumerate(counts) if n}}


def predict_site_distributed(site, legend, cube_paths: list[Path], model_dir: Path | list[Path], map_path: Path, confidence_path: Path, *,
                             client: Any, tiles_dir: Path, device: str | None = None, tags: dict[str, str] | None = None,
                             rows_per_block: int | None = None, retries: int = 2, keep_parts: bool = False,
                             on_block: Callable[[int], None] | None = None, groups: list[list[int]] | None = None,
                             group_temperatures: list[float] | None = None) -> dict:
    """The class and confidence COGs of :func:`~cropmap.pipeline.levels.pixel.predict.predict_site`, with one task
    per tile on ``client`` (None: here); identical maps. Parts and tile records go to ``tiles_dir``
    (removed once the map is complete unless ``keep_parts``). ``groups`` / ``group_temperatures``: the
    blend's members per split seed and each group's own temperature, as in ``predict_site``."""
    import rasterio
    from rasterio.windows import Window

    from cropmap.pipeline.levels.pixel.predict import ROWS_PER_BLOCK, calibration_tags, map_classes, site_grid, summary_of
    from cropmap.pipeline.stages.maps import MapWriter

    rows = rows_per_block or ROWS_PER_BLOCK
    dirs = [Path(d) for d in (model_dir if isinstance(model_dir, (list, tuple)) else [model_dir])]
    model_dir = dirs if len(dirs) > 1 else dirs[0]
    metas = [json.loads((d / "config.json").read_text()) for d in dirs]
    if groups:  # the blend: the calibration the workers' predictor applies (its groups' own temperatures)
        from cropmap.pipeline.levels.pixel.predict import blend_calibration

        metas = [{**metas[0], "calibration": blend_calibration(group_temperatures)}]
    elif len(dirs) > 1:
        from cropmap.pipeline.levels.pixel.predict import ensemble_calibration

        metas = [{**metas[0], "calibration": ensemble_calibration(metas)}]
    tags = {**(tags or {}), **calibration_tags(metas[0])}
    model_key = "".join(sha256_path(d / "model.safetensors") + sha256_path(d / "config.json") for d in dirs)
    jobs = [TileJob(Path(p).name.removesuffix(".zarr"), _key(PREDICT_TILE_VERSION, model_key, _stamp(p), site.model_dump(mode="json"),
                                                             rows, device, _grouping(groups, group_temperatures)),
                    (site, legend, Path(p), model_dir, device, rows, groups, group_temperatures)) for p in cube_paths]
    ledger = TileLedger(Path(tiles_dir), ".tif")
    transform, width, height = site_grid(site)
    counts = np.zeros(256, np.int64)
    windows: dict[str, Window] = {}
    with MapWriter(map_path, confidence_path, crs=site.crs, transform=transform, width=width, height=height,
                   classes=map_classes(legend), tags=tags) as writer:

        def merge(rec: dict) -> None:  # in this process only: the one writer of the site map
            col, row, w, h = rec["summary"]["window"]
            windows[rec["tile"]] = Window(col, row, w, h)
            for code, n in rec["summary"]["counts"].items():
                counts[int(code)] += n
            with rasterio.open(ledger.part(rec["tile"])) as ds:
                for r0 in range(0, h, 8 * rows):
                    r1 = min(h, r0 + 8 * rows)
                    win = Window(0, r0, w, r1 - r0)
                    cls = ds.read(1, window=win).astype(np.uint8)
                    writer.write(Window(col, row + r0, w, r1 - r0), cls, ds.read(2, window=win))
                    if on_block:
                        on_block(cls.size)

        res = run_tiled(client, predict_tile, jobs, ledger, retries=retries, on_result=merge, stage="predict")
    if not keep_parts:
        ledger.remove()
    order = [j.tile for j in jobs]
    summary = summary_of(legend, counts, width, height, [(res.records[t]["summary"]["tile"], windows[t]) for t in order])
    summary["tiles_computed"], summary["tiles_reused"] = len(res.computed), len(res.reused)
    return summary


# -- tensors ----------------------------------------------------------------------------------

SAMPLES_TILE_VERSION = "1"


def samples_tile(tile: str, part: Path, cube_path: Path, class_path: Path, parcel_path: Path, names: dict[int, str],
                 s1_window: int) -> dict:
    """Worker side: the labelled pixel samples of one tile into its own sample store (atomic)."""
    import rasterio

    from cropmap.pipeline.cube import open_cube
    from cropmap.pipeline.levels.pixel.tensors import labelled_samples
    from cropmap.pipeline.samples import save_store

    with rasterio.open(class_path) as ds:
        classes = ds.read(1)
    with rasterio.open(parcel_path) as ds:
        parcels = ds.read(1)
    samples = labelled_samples(open_cube(cube_path), classes, parcels, names, s1_window=s1_window)
    save_store(samples, part)
    return {"n_samples": len(samples)}


def samples_distributed(jobs: list[tuple[str, Path, Path, Path]], names: dict[int, str], s1_window: int, *, client: Any,
                        tiles_dir: Path, retries: int = 2):
    """The labelled samples of every (tile, cube, class raster, parcel raster), one task per tile,
    concatenated in the order given (as the single-process tensors stage does); returns (samples, result)."""
    from cropmap.pipeline.levels.pixel.tensors import concat_samples
    from cropmap.pipeline.samples import load_store

    ledger = TileLedger(Path(tiles_dir), ".samples")
    tjobs = [TileJob(t, _key(SAMPLES_TILE_VERSION, _stamp(c), _stamp(k), _stamp(p), names, s1_window), (c, k, p, names, s1_window))
             for t, c, k, p in jobs]
    res = run_tiled(client, samples_tile, tjobs, ledger, retries=retries, stage="tensors")
    samples = concat_samples([load_store(ledger.part(t), mmap=False) for t, *_ in jobs])
    return samples, res
