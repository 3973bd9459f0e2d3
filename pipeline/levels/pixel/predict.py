"""Predict: map every pixel of the site's tiles into the crop-map COG, window by window.

The map covers the site's extent on its grid (so maps of different years align pixel for pixel);
each tile cube is processed in blocks of rows, so memory is bounded by the block, never by the
site. Pixels with no observation stay nodata (0). Outputs: the class map (uint8 COG, colour
table, class names), a confidence COG (percent), and a PNG preview with a legend.

Series building is vectorised end to end (:meth:`TilePredictor.blocks`): a reader thread
decompresses chunk-aligned strips of rows (each zarr chunk once, memory bounded by
``STRIP_BYTES``), turns each row block into a dense pixels x dates x bands array
(:func:`dense_block`) and into the model's padded, length-bucketed views
(:func:`cropmap.models.inference.dense_views`), while the model runs on the previous block. The
reference path (:meth:`TilePredictor.rows_reference`: :func:`cube_series` + ``predict_proba``, a
Python loop per pixel) gives the same maps to float tolerance and is kept for the benchmark.

Several models at once (:class:`EnsemblePredictor`, ``training.model: auto``): the map is drawn
with the chosen candidate's models of *all* split seeds. Each model's class probabilities (after
its own temperature, fitted on its own validation pixels) are averaged; the class is the arg-max
of the mean and the confidence its top probability. A block's dense series is built once and
normalised per member (each seed's model has its own band statistics). Members may know
different classes (a class can be absent from one seed's training side): their columns are
aligned by legend code, a class a member does not know counts as probability 0 for it.
:func:`make_predictor` returns a plain :class:`TilePredictor` for one model directory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from rasterio.windows import Window

from cropmap.models.calibration import scale as scale_temperature
from cropmap.models.inference import Prefetcher, Views, compiled, dense_views, host_tensors, predict_views
from cropmap.models.series import Series
from cropmap.models.training import predict_proba, resolve_device
from cropmap.pipeline.cube import S2_SCALE, grid_of, open_cube
from cropmap.pipeline.errors import DataError, ModelError
from cropmap.pipeline.grid import site_grid, tile_window  # noqa: F401  (re-exported for the distributed path)
from cropmap.pipeline.levels.pixel.tensors import composite_s1, cube_bands, cube_series, day_offsets
from cropmap.pipeline.levels.pixel.train import load_model_dir
from cropmap.pipeline.sites import Legend, Site
from cropmap.pipeline.stages.maps import MapClass, MapWriter

ROWS_PER_BLOCK = 32
"""Rows of a tile predicted at once: memory is bounded by this block, not by the tile."""
STRIP_BYTES = 256 * 2**20
"""Most bytes of raw cube rows the reader holds at once (a strip of whole zarr chunk rows when it fits)."""


def dense_block(dn: np.ndarray, clear: np.ndarray, s1: np.ndarray, d2: np.ndarray, d1: np.ndarray,
                s1_window: int = 0, mean: np.ndarray | None = None,
                std: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A block of raw cube rows as dense series: ``(P, U, C)`` float32 (NaN = not observed), the ``U`` days
    and the ``(P, U)`` observed mask (some band observed).

    ``dn`` (T2, C2, h, w) uint16 S2 DN, ``clear`` (T2, h, w), ``s1`` (T1, C1, h, w) dB, ``d2``/``d1``
    day offsets. The same inputs as :func:`cube_series` gives (pixels row-major): reflectance =
    DN x scale, NaN where DN = 0 or not clear; radar composited over ``s1_window`` days; one day
    axis for both sensors, the first observed value kept when several acquisitions share a day.
    With ``mean`` and ``std`` the values come out normalised ((v - mean) / std, fused with the
    DN scaling: one pass).
    """
    t2, c2, h, w = dn.shape
    t1, c1 = s1.shape[:2]
    p = h * w
    m = np.zeros(c2 + c1, np.float32) if mean is None else np.asarray(mean, np.float32)
    sd = np.ones(c2 + c1, np.float32) if std is None else np.asarray(std, np.float32)
    dn = dn.reshape(t2, c2, p)
    s2 = np.multiply(dn, np.float32(S2_SCALE), dtype=np.float32)  # cast and scale in one pass (= astype, then *)
    if mean is not None:  # ((dn * scale) - mean) / std in float32, as the reference path computes it
        s2 -= m[:c2, None]
        s2 /= sd[:c2, None]
    invalid2 = dn == 0
    invalid2 |= ~clear.reshape(t2, 1, p)
    np.copyto(s2, np.float32(np.nan), where=invalid2)
    s1 = s1.reshape(t1, c1, p)
    s1, d1 = composite_s1(s1, d1, s1_window)
    if mean is not None:
        s1 = (s1 - m[c2:, None]) / sd[c2:, None]
    union = np.unique(np.concatenate([d2, d1]))
    u = len(union)
    # one spare all-NaN row after the P x U rows: the padding target of dense_views' gather
    rows = np.full((p * u + 1, c2 + c1), np.nan, dtype=np.float32)
    arr = rows[:-1].reshape(p, u, c2 + c1)
    obs = np.zeros((u, p), bool)
    for src, d, lo, seen in ((s2, d2, 0, ~invalid2.all(axis=1)), (s1, d1, c2, ~np.isnan(s1).all(axis=1))):
        hi = lo + src.shape[1]
        done = np.zeros(u, bool)
        for k, i in enumerate(np.searchsorted(union, d)):  # one date at a time: a plain transposed copy (no fancy index)
            if done[i]:  # same-day acquisitions: keep the first observed value, fill what is still missing
                block = arr[:, i, lo:hi]
                np.copyto(block, src[k].T, where=np.isnan(block))
            else:
                arr[:, i, lo:hi] = src[k].T
                done[i] = True
            obs[i] |= seen[k]
    return arr, union.astype(np.float32), np.ascontiguousarray(obs.T)


def strip_reader(cube) -> Callable[[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``read(a, b)`` -> raw ``s2``, ``s2_clear``, ``s1`` of rows a:b of a tile.

    A cube opened from a zarr store (``cube.encoding["source"]``) is read with zarr itself: the
    chunks are decompressed straight into numpy, without building a dask graph per read (2.4x less
    CPU than ``.values`` through dask on a 128 px tile). Any other cube (in memory, another
    backend) is read through xarray."""
    names = ("s2", "s2_clear", "s1")
    src = cube.encoding.get("source")
    if src and str(src).endswith(".zarr") and Path(src).is_dir():
        try:
            import zarr

            group = zarr.open_group(str(src), mode="r")
            arrays = [group[v] for v in names]
            axes = [cube[v].dims.index("y") for v in names]
            if all(tuple(a.shape) == tuple(cube[v].shape) for a, v in zip(arrays, names)):
                def read_zarr(a: int, b: int):
                    return tuple(arr[(slice(None),) * ax + (slice(a, b),)] for arr, ax in zip(arrays, axes))

                return read_zarr
        except Exception:  # noqa: BLE001 - fall back to xarray, which raises a clear error if the store is bad
            pass

    def read_xarray(a: int, b: int):
        win = cube.isel(y=slice(a, b))
        return tuple(win[v].values for v in names)

    return read_xarray


def _strip_rows(cube, rows_per_block: int, budget: int = STRIP_BYTES) -> int:
    """Rows the reader decompresses at once: whole zarr chunk rows (each chunk read once) within ``budget``."""
    height, width = int(cube.sizes["y"]), int(cube.sizes["x"])
    per_row = width * sum(int(np.prod([cube.sizes[d] for d in cube[v].dims if d not in ("x", "y")])) * cube[v].dtype.itemsize
                          for v in ("s2", "s2_clear", "s1"))
    chunks = cube["s2"].encoding.get("chunks")
    ch = int(chunks[cube["s2"].dims.index("y")]) if chunks else height
    fit = max(1, budget // max(1, per_row))
    if ch <= fit:
        return min(height, max(ch, fit // ch * ch))
    return max(rows_per_block, fit // rows_per_block * rows_per_block)


class TilePredictor:
    """A loaded model and what it needs to map pixels: normalisation, class lookup, series options.

    Shared by the single-process :func:`predict_site` and the per-tile tasks of
    :mod:`cropmap.pipeline.levels.pixel.distributed`, so both compute every row block the same way."""

    def __init__(self, legend: Legend, model_dir: Path, device: str | None = None, batch_size: int = 2048,
                 view_batch: int | None = None, compile: bool = False, amp: bool = True):
        model, meta = load_model_dir(model_dir, device)
        self.model, self.meta, self.device, self.batch_size = model, meta, device, batch_size
        self.dev = resolve_device(device)
        # views per forward pass: on CPU 256 keeps a transformer's activations (~6 MB per tensor) out of fresh
        # memory pages (512 page-faults ~50k times per 2048 px block: 10 % of STNet's time on this CPU)
        self.view_batch = int(view_batch or (512 if self.dev.startswith("cuda") else 256))
        self.amp = amp
        self.max_len = int(meta["max_len"])
        self.fast_model = compiled(self.model.to(self.dev).eval(), self.dev, compile)
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

    def prepare(self, dn, clear, s1, d2, d1) -> tuple[Views, list[dict] | None]:
        """A block of raw rows -> sorted padded views (and their pinned host batches on CUDA)."""
        dense, days, observed = dense_block(dn, clear, s1, d2, d1, self.s1_window, self.mean, self.std)
        v = dense_views(dense, days, self.max_len, None, None, observed)
        host = None
        if self.dev.startswith("cuda"):  # pin off the critical path (this runs on the reader thread)
            from cropmap.models.inference import _batches

            host = [host_tensors(v, s, e, t, pin=True) for s, e, t in _batches(v, self.view_batch)]
        return v, host

    def classify(self, v: Views, host, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Class codes and confidence (NaN = no observation) of a block's views."""
        npx = shape[0] * shape[1]
        cls = np.zeros(npx, dtype=np.uint8)
        conf = np.full(npx, np.nan, dtype=np.float32)
        if len(v):
            proba = predict_views(self.fast_model, v, self.view_batch, self.dev, self.amp, host)
            has = np.bincount(v.owner, minlength=npx) > 0
            if self.temperature != 1.0:  # calibrated confidence (the class is unchanged: scaling keeps the order)
                proba[has] = scale_temperature(proba[has], self.temperature)
            cls[has] = self.lut[proba[has].argmax(1)]
            conf[has] = proba[has].max(1)
        return cls.reshape(shape), conf.reshape(shape)

    def _days(self, cube) -> tuple[np.ndarray, np.ndarray]:
        year = int(cube.attrs["year"])
        return day_offsets(cube["time_s2"].values, year), day_offsets(cube["time_s1"].values, year)

    def rows(self, cube, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        """Class codes (uint8) and confidence (float32, NaN = no observation) of rows r0:r1 of a tile (vectorised path)."""
        win = cube.isel(y=slice(r0, r1))
        d2, d1 = self._days(cube)
        v, host = self.prepare(win["s2"].values, win["s2_clear"].values, win["s1"].values, d2, d1)
        return self.classify(v, host, (r1 - r0, int(cube.sizes["x"])))

    def blocks(self, cube, rows_per_block: int = ROWS_PER_BLOCK, prefetch: bool = True,
               strip_bytes: int = STRIP_BYTES) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        """``(r0, r1, classes, confidence)`` of every row block of a tile, in order.

        A reader thread (``prefetch``) decompresses chunk-aligned strips and prepares each block's
        views while the model classifies the previous one; at most two blocks wait in memory."""
        height, width = int(cube.sizes["y"]), int(cube.sizes["x"])
        strip = _strip_rows(cube, rows_per_block, strip_bytes)
        d2, d1 = self._days(cube)

        read = strip_reader(cube)

        def produce_strips():
            for a in range(0, height, strip):
                b = min(height, a + strip)
                dn, clear, s1 = read(a, b)
                for r0 in range(a, b, rows_per_block):
                    r1 = min(b, r0 + rows_per_block)
                    sl = slice(r0 - a, r1 - a)
                    yield r0, r1, self.prepare(dn[:, :, sl], clear[:, sl], s1[:, :, sl], d2, d1)

        if not prefetch:
            for r0, r1, (v, host) in produce_strips():
                cls, conf = self.classify(v, host, (r1 - r0, width))
                yield r0, r1, cls, conf
            return
        with Prefetcher(produce_strips(), lambda item: item, depth=2) as pf:
            for r0, r1, (v, host) in pf:
                cls, conf = self.classify(v, host, (r1 - r0, width))
                yield r0, r1, cls, conf

    def rows_reference(self, cube, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        """The reference path of :meth:`rows`: :func:`cube_series` and ``predict_proba`` (a Python loop per pixel)."""
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


class EnsemblePredictor(TilePredictor):
    """Several :class:`TilePredictor` members behind the same interface (``blocks``, ``rows``, ``check_tile``)."""

    def __init__(self, legend: Legend, model_dirs: Sequence[Path], device: str | None = None, *,
                 groups: Sequence[Sequence[int]] | None = None, group_temperatures: Sequence[float] | None = None, **kwargs) -> None:
        """``groups`` (lists of member indices) with ``group_temperatures``: each group's raw probabilities are
        averaged and scaled by the group's temperature (a blend calibrated as a whole), then the groups are
        averaged; without them every member is its own group, scaled by its own temperature."""
        if not model_dirs:
            raise ModelError("an ensemble needs at least one model directory", fix="train the models first")
        self.members = [TilePredictor(legend, Path(d), device, **kwargs) for d in model_dirs]
        first = self.members[0]
        for m, d in zip(self.members[1:], model_dirs[1:]):
            if m.meta["bands"] != first.meta["bands"] or m.s1_window != first.s1_window:
                raise ModelError(f"model {d} reads other inputs (bands, S1 window) than {model_dirs[0]}",
                                 fix="average only models trained on the same samples")
        self.device, self.dev, self.view_batch, self.amp = first.device, first.dev, first.view_batch, first.amp
        self.s1_window, self.max_len, self.batch_size = first.s1_window, first.max_len, first.batch_size
        codes = sorted({int(c) for m in self.members for c in m.lut})
        self.lut = np.array(codes, dtype=np.uint8)
        self.columns = [np.searchsorted(self.lut, m.lut) for m in self.members]
        if groups is None:
            self.groups = [[i] for i in range(len(self.members))]
            self.group_temperatures = [m.temperature for m in self.members]
        else:
            self.groups, self.group_temperatures = [list(g) for g in groups], [float(x) for x in group_temperatures]
            if len(self.groups) != len(self.group_temperatures) or sorted(i for g in self.groups for i in g) != list(range(len(self.members))):
                raise ModelError("ensemble groups must cover every member once, with one temperature each", fix="rerun the train stage")
        self.meta = {**first.meta, "ensemble": [str(d) for d in model_dirs],
                     "calibration": ensemble_calibration([m.meta for m in self.members]) if groups is None else
                     blend_calibration(self.group_temperatures)}
        self.temperature = 1.0  # each member applies its own

    def prepare(self, dn, clear, s1, d2, d1) -> tuple[list[Views], None]:
        dense, days, observed = dense_block(dn, clear, s1, d2, d1, self.s1_window)
        views = []
        for i, m in enumerate(self.members):
            # dense_views normalises in place only on its own gathered copy: ``dense`` stays raw for the next member
            views.append(dense_views(dense, days, m.max_len, m.mean, m.std, observed))
        return views, None

    def proba(self, views: list[Views], npx: int) -> tuple[np.ndarray, np.ndarray]:
        """Mean calibrated probabilities (npx, classes) over the members, and the pixels that have any."""
        acc = np.zeros((npx, len(self.lut)), np.float64)
        has = np.bincount(views[0].owner, minlength=npx) > 0 if len(views[0]) else np.zeros(npx, bool)
        for group, temp in zip(self.groups, self.group_temperatures):
            g = np.zeros_like(acc)
            for i in group:
                m, v, cols = self.members[i], views[i], self.columns[i]
                if len(v):
                    g[:, cols] += predict_views(m.fast_model, v, m.view_batch, m.dev, m.amp)
            g /= len(group)
            if temp != 1.0 and has.any():
                g[has] = scale_temperature(g[has], temp)
            acc += g
        acc /= len(self.groups)
        return acc.astype(np.float32), has

    def classify(self, views: list[Views], host, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        npx = shape[0] * shape[1]
        cls = np.zeros(npx, dtype=np.uint8)
        conf = np.full(npx, np.nan, dtype=np.float32)
        proba, has = self.proba(views, npx)
        if has.any():
            cls[has] = self.lut[proba[has].argmax(1)]
            conf[has] = proba[has].max(1)
        return cls.reshape(shape), conf.reshape(shape)


def ensemble_calibration(metas: list[dict]) -> dict | None:
    cals = [m.get("calibration") for m in metas]
    if not any(cals):
        return None
    temps = [float(c["temperature"]) if c else 1.0 for c in cals]
    return {"temperature": float(np.exp(np.mean(np.log(temps)))), "members": temps,
            "n": sum(int(c.get("n", 0)) for c in cals if c), "method": "each member's own temperature, then the mean of the members"}


def blend_calibration(group_temperatures: Sequence[float]) -> dict:
    """The ``calibration`` of an ensemble of blends (groups of members, each scaled by its own temperature)."""
    temps = [float(t) for t in group_temperatures]
    return {"temperature": float(np.exp(np.mean(np.log(temps)))), "members": temps,
            "n": 0, "method": "each blend's raw mean scaled by its own temperature, then the mean of the blends"}


def make_predictor(legend: Legend, model_dirs: Path | Sequence[Path], device: str | None = None, **kwargs) -> TilePredictor:
    """A predictor of one model directory, or the averaging ensemble of several."""
    if isinstance(model_dirs, (str, Path)):
        return TilePredictor(legend, Path(model_dirs), device, **kwargs)
    dirs = [Path(d) for d in model_dirs]
    if len(dirs) == 1 and not kwargs.get("groups"):
        kwargs.pop("groups", None), kwargs.pop("group_temperatures", None)
        return TilePredictor(legend, dirs[0], device, **kwargs)
    return EnsemblePredictor(legend, dirs, device, **kwargs)


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
    if cal.get("members") and str(cal.get("method", "")).startswith("each blend"):
        return {"cropmap_confidence_calibration": "per split seed, the mean of the candidates' probabilities scaled by the blend's own "
                "temperature (T={}, fitted on that seed's validation pixels), then the mean of the seeds".format(
                    ", ".join(f"{t:.4f}" for t in cal["members"]))}
    if cal.get("members"):
        return {"cropmap_confidence_calibration": "mean of {} models' probabilities, each temperature-scaled (T={}) on its own "
                "validation pixels".format(len(cal["members"]), ", ".join(f"{t:.4f}" for t in cal["members"]))}
    return {"cropmap_confidence_calibration": f"temperature scaling, T={cal['temperature']:.4f}, fitted on {cal.get('n', '?')} validation pixels"}


def predict_site(site: Site, legend: Legend, cube_paths: list[Path], model_dir: Path | list[Path], map_path: Path,
                 confidence_path: Path, *, rows_per_block: int = ROWS_PER_BLOCK, device: str | None = None,
                 tags: dict[str, str] | None = None, on_block: Callable[[int], None] | None = None,
                 groups: list[list[int]] | None = None, group_temperatures: list[float] | None = None) -> dict:
    """Write the class and confidence COGs in this process; returns per-class pixel counts and the tile windows.

    ``model_dir``: one model directory, or several whose probabilities are averaged (:class:`EnsemblePredictor`)."""
    predictor = make_predictor(legend, model_dir, device, **({"groups": groups, "group_temperatures": group_temperatures} if groups else {}))
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
            for r0, r1, cls, conf in predictor.blocks(cube, rows_per_block):
                counts += np.bincount(cls.ravel(), minlength=256)
                writer.write(Window(full.col_off, full.row_off + r0, full.width, r1 - r0), cls, conf)
                if on_block:
                    on_block(cls.size)
    return summary_of(legend, counts, width, height, windows)
