"""Interactive pixels: ``computePixels`` requests cut under the documented limits, run concurrently.

A window of the site grid is planned as requests of at most :data:`MAX_REQUEST_BYTES`
uncompressed (48 MB) and :data:`MAX_REQUEST_SIDE` pixels a side (32768), each asking for the
image on an explicit grid (``crsCode`` + ``affineTransform`` + ``dimensions``) as NPY (a
structured array, one field per band). Requests run on a small thread pool (``concurrency``,
well under the 40 concurrent requests Earth Engine allows per endpoint); a transient error
(HTTP 429 "Too many requests", 5xx, internal errors) is retried with backoff, a request that
runs out of memory or time is split into four, and the answers are assembled on the window's
grid. Works through any :class:`~.client.Client` (the fake one serves real demo pixels).
"""

from __future__ import annotations

import io
import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from affine import Affine

from cropmap.pipeline.cube import TileGrid
from cropmap.pipeline.errors import DataError
from cropmap.pipeline.ingest.gee.client import Client
from cropmap.pipeline.ingest.gee.tasks import classify_error

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 48 * 1000 * 1000
"""computePixels answers at most 48 MB of uncompressed pixels per request."""
MAX_REQUEST_SIDE = 32768
"""... and at most 32768 pixels a side."""
MAX_CONCURRENCY = 32
"""Earth Engine allows 40 concurrent interactive requests per endpoint: stay well under."""


@dataclass(frozen=True)
class Window:
    """Rows ``row:row+height`` and columns ``col:col+width`` of a grid."""

    row: int
    col: int
    height: int
    width: int

    def split(self) -> list[Window]:
        h0, w0 = self.height // 2, self.width // 2
        parts = [(0, 0, h0, w0), (0, w0, h0, self.width - w0), (h0, 0, self.height - h0, w0),
                 (h0, w0, self.height - h0, self.width - w0)]
        return [Window(self.row + r, self.col + c, h, w) for r, c, h, w in parts if h > 0 and w > 0]


def plan_windows(height: int, width: int, bytes_per_pixel: int, *, max_bytes: int = MAX_REQUEST_BYTES,
                 max_side: int = MAX_REQUEST_SIDE) -> list[Window]:
    """Row-major windows covering ``height`` x ``width`` exactly, each under both request limits."""
    if bytes_per_pixel > max_bytes:
        raise DataError(f"one pixel of this image is {bytes_per_pixel} bytes, over the {max_bytes}-byte request limit",
                        fix="request fewer bands at a time")
    side = max(1, math.isqrt(max_bytes // bytes_per_pixel))
    bw = min(width, max_side, side)
    bh = min(height, max_side, max_bytes // (bytes_per_pixel * bw))
    return [Window(r, c, min(bh, height - r), min(bw, width - c))
            for r in range(0, height, bh) for c in range(0, width, bw)]


def grid_request(image, grid: TileGrid, window: Window, bands: list[str]) -> dict:
    """The ``ee.data.computePixels`` parameters for ``window`` of ``grid`` (NPY, explicit grid)."""
    t = grid.transform @ Affine.translation(window.col, window.row)
    return {
        "expression": image,
        "fileFormat": "NPY",
        "bandIds": list(bands),
        "grid": {
            "crsCode": f"EPSG:{grid.epsg}",
            "affineTransform": {"scaleX": t.a, "shearX": t.b, "translateX": t.c, "shearY": t.d, "scaleY": t.e, "translateY": t.f},
            "dimensions": {"width": window.width, "height": window.height},
        },
    }


def request_grid(request: dict) -> TileGrid:
    """The grid of a computePixels request (the inverse of :func:`grid_request`)."""
    g = request["grid"]
    a = g["affineTransform"]
    epsg = int(str(g["crsCode"]).split(":")[1])
    return TileGrid(epsg, Affine(a["scaleX"], a.get("shearX", 0.0), a["translateX"], a.get("shearY", 0.0), a["scaleY"], a["translateY"]),
                    int(g["dimensions"]["height"]), int(g["dimensions"]["width"]))


def encode_npy(data: np.ndarray, bands: list[str]) -> bytes:
    """(bands, H, W) as computePixels' NPY answer: a structured (H, W) array, one field per band."""
    out = np.empty(data.shape[1:], dtype=[(b, data.dtype) for b in bands])
    for k, b in enumerate(bands):
        out[b] = data[k]
    buf = io.BytesIO()
    np.save(buf, out, allow_pickle=False)
    return buf.getvalue()


def decode_npy(payload: bytes, bands: list[str], shape: tuple[int, int]) -> np.ndarray:
    """A computePixels NPY answer as (bands, H, W), checked against the request."""
    try:
        arr = np.load(io.BytesIO(payload), allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"computePixels returned {len(payload)} bytes that are not NPY ({exc})",
                        fix="ask for fileFormat NPY; rerun (a truncated answer is transient)") from None
    missing = [b for b in bands if arr.dtype.names is None or b not in arr.dtype.names]
    if missing or arr.shape != tuple(shape):
        raise DataError(f"computePixels answer has bands {arr.dtype.names} and shape {arr.shape}, expected {bands} and {tuple(shape)}",
                        fix="the image does not have the requested bands: check the site's band lists")
    return np.stack([arr[b] for b in bands])


@dataclass
class FetchStats:
    requests: int = 0
    retries: int = 0
    splits: int = 0
    windows: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **kw: int) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)


def fetch_pixels(client: Client, image, grid: TileGrid, bands: list[str], dtype, *, concurrency: int = 8,
                 max_attempts: int = 5, max_split_depth: int = 2, backoff: float = 1.0,
                 max_bytes: int = MAX_REQUEST_BYTES, max_side: int = MAX_REQUEST_SIDE,
                 stats: FetchStats | None = None) -> np.ndarray:
    """``image`` (its ``bands``, all of ``dtype``) on ``grid`` as (bands, H, W), by computePixels requests."""
    import ee

    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise ValueError(f"concurrency must be 1..{MAX_CONCURRENCY}, got {concurrency}")
    dtype = np.dtype(dtype)
    stats = stats if stats is not None else FetchStats()
    windows = plan_windows(grid.height, grid.width, dtype.itemsize * len(bands), max_bytes=max_bytes, max_side=max_side)
    stats.add(windows=len(windows))
    out = np.zeros((len(bands), grid.height, grid.width), dtype=dtype)

    def run(window: Window, depth: int = 0) -> None:
        request = grid_request(image, grid, window, bands)
        for attempt in range(1, max_attempts + 1):
            stats.add(requests=1)
            try:
                payload = client.compute_pixels(request)
            except ee.EEException as exc:
                message = str(exc)
                kind = "retry" if "429" in message else classify_error(message)
                if kind == "retry" and attempt < max_attempts:
                    stats.add(retries=1)
                    log.warning("computePixels %s: %s; retry %d of %d", window, message, attempt, max_attempts - 1)
                    client.sleep(backoff * 2 ** (attempt - 1))
                    continue
                if kind == "split" and depth < max_split_depth and min(window.height, window.width) >= 2:
                    stats.add(splits=1)
                    log.warning("computePixels %s: %s; split into 4", window, message)
                    for child in window.split():
                        run(child, depth + 1)
                    return
                raise DataError(f"computePixels failed for rows {window.row}+{window.height}, cols {window.col}+{window.width}: {message}",
                                fix=("lower gee.max_concurrent_requests and rerun" if kind == "retry"
                                     else "use gee.cubes: export (batch tasks) for this size" if kind == "split"
                                     else "check the site's band lists and collections")) from None
            data = decode_npy(payload, bands, (window.height, window.width))
            out[:, window.row:window.row + window.height, window.col:window.col + window.width] = data
            return

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="computePixels") as pool:
        for future in [pool.submit(run, w) for w in windows]:
            future.result()
    return out
