"""Crop-map rasters: writing the class map and its confidence map as COGs, and checking COGs.

A finished site produces two co-registered single-band ``uint8`` rasters:

* the **class map** — each pixel holds the raster code (1..255) of a :class:`MapClass`;
  0 is nodata. The file carries its own legend: a colour table (0 transparent, every class
  opaque in its colour), band tags ``CLASS_<code>=<name>`` and a JSON band tag
  ``cropmap_classes`` (``[{"code", "name", "color"}, ...]``). The same JSON list is written
  next to the map as ``<map file name>.classes.json``;
* the **confidence map** — the classifier's confidence for the chosen class in whole percent
  (``round(100 * confidence)``, 0..100), nodata 255, dataset tag
  ``cropmap_confidence_units=percent``. Pixels whose class is nodata are nodata here too.

Maps of whole regions are far too big for memory (40000 x 40000 pixels is ordinary), so
:class:`MapWriter` streams windows, in any order, into hidden tiled, sparse GeoTIFFs in the
destination directories; parts never written stay nodata and cost no disk. ``close()`` builds
internal overviews with *nearest* resampling (averaging class codes would invent classes,
averaging confidence would mix in the 255 nodata) and converts both files with GDAL's COG
driver into Cloud-Optimized GeoTIFFs, checks the result, and only then renames them onto the
final paths, so an interrupted run never replaces a previous map with a partial one.

GDAL note: metadata keys must not contain ``:`` — GDAL splits ``key:value`` like ``key=value``
(``cropmap:classes`` would be stored as key ``cropmap``) — hence the ``cropmap_`` prefixes. The
COG driver keeps default-domain dataset and band tags, nodata and the colour table, but drops
custom metadata domains, so everything lives in the default domain.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import affine
import numpy as np
import rasterio
import rasterio.crs
import rasterio.errors
import rasterio.shutil
import rasterio.windows
from rasterio.enums import Resampling

from cropmap.pipeline.errors import OutputError
from cropmap.pipeline.fsio import atomic_path, ensure_writable_dir

from .legend import CLASS_NODATA, CLASSES_TAG, MapClass, check_classes, classes_json, sidecar_path

__all__ = ["MapWriter", "validate_cog", "bigtiff_option", "CONFIDENCE_UNITS_TAG", "CONFIDENCE_NODATA"]

CONFIDENCE_UNITS_TAG = "cropmap_confidence_units"
"""Dataset tag of the confidence map; its value is ``percent``."""
PRODUCT_TAG = "cropmap_product"
OVERVIEW_RESAMPLING_TAG = "cropmap_overview_resampling"
CONFIDENCE_NODATA = 255

_TAG_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
_MIN_OVERVIEW_SIDE = 256
_SMALL_BLOCK = 256
_CONF_TOLERANCE = 1e-4


def _block_size(block: int, width: int, height: int) -> int:
    """The tile size actually used: ``block``, or 256 (at most ``block``) for small rasters."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 16 or block % 16:
        raise ValueError(f"block must be a positive multiple of 16 (GDAL tiling), got {block!r}")
    if max(width, height) < block:
        return min(block, _SMALL_BLOCK)
    return block


def _overview_factors(width: int, height: int) -> list[int]:
    """2, 4, 8, ... until the smaller side of the last overview is below 256 px.

    None when both sides are at most 256 px.
    """
    if max(width, height) <= _MIN_OVERVIEW_SIDE:
        return []
    factors, f = [], 2
    while True:
        factors.append(f)
        if min(math.ceil(width / f), math.ceil(height / f)) < _MIN_OVERVIEW_SIDE:
            return factors
        f *= 2


_CLASSIC_TIFF_LIMIT = 4 * 1024**3


def bigtiff_option(width: int, height: int, bytes_per_pixel: int = 1) -> str:
    """``YES`` when the raster with its overviews could pass the 4 GiB offsets of classic TIFF, else ``NO``.

    Decided from the uncompressed size plus a third for overviews (compression usually shrinks a
    class map 10-50x, but a noisy map may not shrink, and a classic TIFF past 4 GiB is unwritable,
    so the decision is made on the worst case with a 10 % margin). Iowa at 10 m: 55300 x 35400 px
    = 1.96 GB + overviews = 2.6 GB, classic; a 60000 x 60000 px map (3.6 GB + 1.2 GB) is BigTIFF.
    """
    worst = width * height * bytes_per_pixel * 4 / 3
    return "YES" if worst > 0.9 * _CLASSIC_TIFF_LIMIT else "NO"


class _WorkFiles:
    """The hidden working rasters of one writer; cleaned up explicitly or at garbage collection."""

    def __init__(self) -> None:
        self.datasets: list[Any] = []
        self.dirs: list[Path] = []

    def close_datasets(self) -> None:
        while self.datasets:
            ds = self.datasets.pop()
            try:
                ds.close()
            except Exception:  # noqa: BLE001 - best effort while cleaning up
                pass

    def cleanup(self) -> None:
        self.close_datasets()
        while self.dirs:
            shutil.rmtree(self.dirs.pop(), ignore_errors=True)


class MapWriter:
    """Writes a class map + confidence map window by window, then finishes both as COGs."""

    def __init__(
        self,
        map_path: Path,
        confidence_path: Path,
        *,
        crs: str | rasterio.crs.CRS,
        transform: affine.Affine,
        width: int,
        height: int,
        classes: Sequence[MapClass],
        block: int = 512,
        tags: dict[str, str] | None = None,
    ) -> None:
        """Create the hidden working rasters; raises OutputError when a destination is unwritable."""
        self.map_path = Path(map_path)
        self.confidence_path = Path(confidence_path)
        if self.map_path.resolve() == self.confidence_path.resolve():
            raise ValueError(f"map and confidence paths are the same file: {str(self.map_path)!r}")
        for v, what in ((width, "width"), (height, "height")):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{what} must be a positive integer, got {v!r}")
        self.width, self.height = int(width), int(height)
        self.classes = check_classes(classes)
        self.block = _block_size(block, self.width, self.height)
        self.crs = rasterio.crs.CRS.from_user_input(crs)
        if not isinstance(transform, affine.Affine):
            raise ValueError(f"transform must be an affine.Affine, got {type(transform).__name__}")
        self.transform = transform
        self.tags = dict(tags or {})
        for k, v in self.tags.items():
            if not isinstance(k, str) or not _TAG_KEY_RE.match(k):
                raise ValueError(
                    f"tag name {k!r} is not usable in GDAL metadata (letters, digits, _ . - only; "
                    "':' and '=' are separators)"
                )
            if not isinstance(v, str):
                raise ValueError(f"tag {k!r} must be a string, got {type(v).__name__}")
        self.overview_factors = _overview_factors(self.width, self.height)
        self.bigtiff = bigtiff_option(self.width, self.height)

        self._valid = np.zeros(256, dtype=bool)
        self._valid[[c.code for c in self.classes]] = True
        self._valid[CLASS_NODATA] = True
        self._closed = False
        self._aborted = False
        self._work = _WorkFiles()
        self._finalizer = weakref.finalize(self, self._work.cleanup)

        for final in (self.map_path, self.confidence_path):
            if final.is_dir():
                raise OutputError(
                    f"output {str(final)!r} is a directory", fix="give a file name ending in .tif"
                )
            ensure_writable_dir(final.parent)
        try:
            self._map_work = self._create_work(self.map_path, CLASS_NODATA, self._map_tags())
            self._map_ds.write_colormap(1, self._colormap())
            self._map_ds.update_tags(1, **self._map_band_tags())
            self._conf_work = self._create_work(
                self.confidence_path, CONFIDENCE_NODATA, self._confidence_tags()
            )
        except BaseException:
            self._work.cleanup()
            raise

    # -- metadata ---------------------------------------------------------------------------

    def _common_tags(self) -> dict[str, str]:
        return {**self.tags, OVERVIEW_RESAMPLING_TAG: "nearest"}

    def _map_tags(self) -> dict[str, str]:
        return {**self._common_tags(), PRODUCT_TAG: "class_map"}

    def _confidence_tags(self) -> dict[str, str]:
        return {**self._common_tags(), PRODUCT_TAG: "confidence", CONFIDENCE_UNITS_TAG: "percent"}

    def _map_band_tags(self) -> dict[str, str]:
        band = {f"CLASS_{c.code}": c.name for c in self.classes}
        band[CLASSES_TAG] = classes_json(self.classes)
        return band

    def _colormap(self) -> dict[int, tuple[int, int, int, int]]:
        cmap = {CLASS_NODATA: (0, 0, 0, 0)}
        cmap.update({c.code: (*c.rgb, 255) for c in self.classes})
        return cmap

    # -- working files ----------------------------------------------------------------------

    def _create_work(self, final: Path, nodata: int, tags: dict[str, str]) -> Path:
        try:
            tmpdir = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".work", dir=final.parent))
        except OSError as exc:
            raise OutputError(
                f"cannot write in {str(final.parent)!r}: {exc.strerror or exc}",
                fix="fix its permissions or choose another location with --out",
            ) from None
        self._work.dirs.append(tmpdir)
        path = tmpdir / "work.tif"
        try:
            ds = rasterio.open(
                path, "w", driver="GTiff", width=self.width, height=self.height, count=1,
                dtype="uint8", nodata=nodata, crs=self.crs, transform=self.transform,
                tiled=True, blockxsize=self.block, blockysize=self.block, compress="deflate",
                predictor=2, zlevel=1, sparse_ok=True, bigtiff=self.bigtiff,
            )  # fmt: skip
        except rasterio.errors.RasterioError as exc:
            raise OutputError(
                f"cannot create a raster in {str(final.parent)!r}: {exc}",
                fix="check free disk space and permissions of the output directory",
            ) from None
        self._work.datasets.append(ds)
        ds.update_tags(**tags)
        return path

    @property
    def _map_ds(self) -> Any:
        return self._work.datasets[0]

    @property
    def _conf_ds(self) -> Any:
        return self._work.datasets[1]

    # -- writing ----------------------------------------------------------------------------

    def _check_window(self, window: rasterio.windows.Window) -> tuple[int, int, int, int]:
        if not isinstance(window, rasterio.windows.Window):
            raise ValueError(f"window must be a rasterio.windows.Window, got {type(window).__name__}")
        vals = (window.col_off, window.row_off, window.width, window.height)
        if not all(float(v).is_integer() for v in vals):
            raise ValueError(f"window {window} must have whole-pixel offsets and sizes")
        col, row, w, h = (int(v) for v in vals)
        if w < 1 or h < 1 or col < 0 or row < 0 or col + w > self.width or row + h > self.height:
            raise ValueError(
                f"window (col {col}, row {row}, {w}x{h}) is outside the "
                f"{self.width}x{self.height} raster"
            )
        return col, row, w, h

    def write(
        self, window: rasterio.windows.Window, classes: np.ndarray, confidence: np.ndarray
    ) -> None:
        """classes: uint8 (h,w), 0 = nodata; confidence: float32 in [0,1] (NaN = nodata) (h,w)."""
        if self._closed or self._aborted:
            raise RuntimeError("MapWriter is already closed")
        col, row, w, h = self._check_window(window)
        cls = np.asarray(classes)
        conf = np.asarray(confidence)
        for arr, what in ((cls, "classes"), (conf, "confidence")):
            if arr.shape != (h, w):
                raise ValueError(f"{what} has shape {arr.shape}, the window needs {(h, w)}")
        if not np.issubdtype(cls.dtype, np.integer):
            raise ValueError(f"classes must be an integer array (uint8), got {cls.dtype}")
        if cls.dtype != np.uint8:
            if cls.size and (cls.min() < 0 or cls.max() > 255):
                raise ValueError("classes holds values outside 0..255")
            cls = cls.astype(np.uint8)
        known = self._valid[cls]
        if not known.all():
            bad = np.unique(cls[~known])[:10].tolist()
            raise ValueError(f"classes holds codes {bad} that are not in the class table")
        if not np.issubdtype(conf.dtype, np.floating):
            raise ValueError(f"confidence must be a float array, got {conf.dtype}")
        conf = conf.astype(np.float32, copy=False)
        missing = np.isnan(conf)
        if np.any((conf < -_CONF_TOLERANCE) | (conf > 1 + _CONF_TOLERANCE)):
            raise ValueError("confidence holds values outside [0, 1] (use NaN for nodata)")
        pct = np.rint(np.clip(np.where(missing, 0.0, conf), 0.0, 1.0) * 100.0).astype(np.uint8)
        pct[missing | (cls == CLASS_NODATA)] = CONFIDENCE_NODATA

        win = rasterio.windows.Window(col, row, w, h)
        try:
            self._map_ds.write(cls, 1, window=win)
            self._conf_ds.write(pct, 1, window=win)
        except rasterio.errors.RasterioError as exc:
            raise OutputError(
                f"cannot write map data next to {str(self.map_path)!r}: {exc}",
                fix="check free disk space of the output directory",
            ) from None

    # -- finishing --------------------------------------------------------------------------

    def close(self) -> tuple[Path, Path]:
        """Build overviews and convert both rasters to Cloud-Optimized GeoTIFF at the final
        paths (atomic); returns (map_path, confidence_path)."""
        if self._closed:
            return self.map_path, self.confidence_path
        if self._aborted:
            raise RuntimeError("MapWriter was aborted")
        try:
            self._work.close_datasets()
            for work in (self._map_work, self._conf_work):
                self._build_overviews(work)
            with (
                atomic_path(self.map_path) as map_tmp,
                atomic_path(self.confidence_path) as conf_tmp,
                atomic_path(sidecar_path(self.map_path)) as side_tmp,
            ):
                self._to_cog(self._map_work, map_tmp)
                self._verify(map_tmp, CLASS_NODATA, self._map_tags(), self._map_band_tags(), True)
                self._to_cog(self._conf_work, conf_tmp)
                self._verify(conf_tmp, CONFIDENCE_NODATA, self._confidence_tags(), {}, False)
                side_tmp.write_text(
                    json.dumps([c.to_dict() for c in self.classes], indent=2, ensure_ascii=False)
                    + "\n",
                    encoding="utf-8",
                )
        except BaseException:
            self._aborted = True
            raise
        finally:
            self._work.cleanup()
        self._closed = True
        return self.map_path, self.confidence_path

    def _build_overviews(self, work: Path) -> None:
        if not self.overview_factors:
            return
        try:
            with rasterio.open(work, "r+") as ds:
                ds.build_overviews(self.overview_factors, Resampling.nearest)
        except rasterio.errors.RasterioError as exc:
            raise OutputError(
                f"cannot build overviews next to {str(self.map_path)!r}: {exc}",
                fix="check free disk space of the output directory",
            ) from None

    def _to_cog(self, src: Path, dst: Path) -> None:
        try:
            rasterio.shutil.copy(
                src, dst, driver="COG", COMPRESS="DEFLATE", PREDICTOR="2",
                BLOCKSIZE=str(self.block), OVERVIEWS="FORCE_USE_EXISTING" if self.overview_factors
                else "NONE", RESAMPLING="NEAREST", BIGTIFF=self.bigtiff, NUM_THREADS="ALL_CPUS",
            )  # fmt: skip
        except rasterio.errors.RasterioError as exc:
            raise OutputError(
                f"cannot write Cloud-Optimized GeoTIFF {str(dst)!r}: {exc}",
                fix="check free disk space of the output directory",
            ) from None
        extra = [p.name for p in dst.parent.iterdir() if p != dst]
        if extra:  # an .aux.xml would be lost by the rename: metadata GDAL could not embed
            raise OutputError(
                f"GDAL wrote side files {extra} next to {str(dst)!r}",
                fix=f"report this; GDAL {rasterio.__gdal_version__} did not embed all metadata",
            )

    def _verify(
        self, path: Path, nodata: int, tags: dict[str, str], band_tags: dict[str, str], cmap: bool
    ) -> None:
        problems = validate_cog(path)
        with rasterio.open(path) as ds:
            if ds.count != 1 or ds.dtypes[0] != "uint8":
                problems.append(f"expected 1 uint8 band, got {ds.count} {ds.dtypes}")
            if ds.nodata != nodata:
                problems.append(f"nodata is {ds.nodata}, expected {nodata}")
            # compare counts: GDAL reports factors from rounded sizes (40000 px / 256 -> 255)
            if len(ds.overviews(1)) != len(self.overview_factors):
                problems.append(f"overviews {ds.overviews(1)}, expected {self.overview_factors}")
            got = ds.tags()
            lost = [k for k, v in tags.items() if got.get(k) != v]
            got_band = ds.tags(1)
            lost += [k for k, v in band_tags.items() if got_band.get(k) != v]
            if lost:
                problems.append(f"tags lost in conversion: {lost}")
            if cmap:
                try:
                    table = ds.colormap(1)
                except ValueError:
                    table = {}
                wrong = [k for k, v in self._colormap().items() if tuple(table.get(k, ())) != v]
                if wrong:
                    problems.append(f"colour table entries lost for codes {wrong}")
        if problems:
            raise OutputError(
                f"the Cloud-Optimized GeoTIFF written for {str(path)!r} is not as expected: "
                + "; ".join(problems),
                fix=f"report this; the GDAL build in use is {rasterio.__gdal_version__}",
            )

    def abort(self) -> None:
        """Remove the working files; any previous final files are left untouched."""
        if self._closed:
            return
        self._aborted = True
        self._work.cleanup()

    def __enter__(self) -> MapWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()


# -- reading ------------------------------------------------------------------------------


# -- validation ---------------------------------------------------------------------------

_TIFF_TYPE_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8,
                   13: 4, 16: 8, 17: 8, 18: 8}  # fmt: skip
_TIFF_INT_FMT = {3: "H", 4: "I", 13: "I", 16: "Q", 18: "Q"}
_TAG_TILE_WIDTH, _TAG_TILE_OFFSETS, _TAG_STRIP_OFFSETS = 322, 324, 273


def _tiff_ifds(path: Path, max_ifds: int = 64) -> tuple[list[dict[str, Any]], bytes]:
    """Offsets, tile flag and data offsets of each IFD of a (Big)TIFF, plus its first KiB."""
    with open(path, "rb") as fh:
        head = fh.read(1024)
        if head[:2] not in (b"II", b"MM"):
            raise ValueError("not a TIFF file")
        bo = "<" if head[:2] == b"II" else ">"
        (version,) = struct.unpack(bo + "H", head[2:4])
        if version == 42:
            big, nxt = False, struct.unpack(bo + "I", head[4:8])[0]
        elif version == 43:
            big, nxt = True, struct.unpack(bo + "Q", head[8:16])[0]
        else:
            raise ValueError(f"unknown TIFF version {version}")
        cnt_fmt, ent_size, off_fmt, inline = ("Q", 20, "Q", 8) if big else ("H", 12, "I", 4)
        ifds: list[dict[str, Any]] = []
        seen: set[int] = set()
        while nxt and nxt not in seen and len(ifds) < max_ifds:
            seen.add(nxt)
            fh.seek(nxt)
            (n,) = struct.unpack(bo + cnt_fmt, fh.read(struct.calcsize(cnt_fmt)))
            raw = fh.read(n * ent_size + struct.calcsize(off_fmt))
            ifd: dict[str, Any] = {"offset": nxt, "tiled": False, "data": []}
            for i in range(n):
                e = raw[i * ent_size : (i + 1) * ent_size]
                tag, typ = struct.unpack(bo + "HH", e[:4])
                (count,) = struct.unpack(bo + off_fmt, e[4 : 4 + inline])
                val = e[4 + inline :]
                if tag == _TAG_TILE_WIDTH:
                    ifd["tiled"] = True
                if tag in (_TAG_TILE_OFFSETS, _TAG_STRIP_OFFSETS) and typ in _TIFF_INT_FMT:
                    size = _TIFF_TYPE_SIZE[typ] * count
                    if size <= inline:
                        buf = val[:size]
                    else:
                        fh.seek(struct.unpack(bo + off_fmt, val)[0])
                        buf = fh.read(size)
                    ifd["data"] = [o for o in struct.unpack(bo + _TIFF_INT_FMT[typ] * count, buf) if o]
            ifds.append(ifd)
            (nxt,) = struct.unpack(bo + off_fmt, raw[n * ent_size :])
    return ifds, head


def validate_cog(path: Path) -> list[str]:
    """Problems that keep ``path`` from being a tiled Cloud-Optimized GeoTIFF; empty when valid."""
    path = Path(path)
    if not path.is_file():
        return [f"{str(path)!r} does not exist"]
    problems: list[str] = []
    try:
        with rasterio.open(path) as ds:
            if ds.driver != "GTiff":
                return [f"{str(path)!r} is a {ds.driver} file, not a GeoTIFF"]
            layout = ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT")
            if layout != "COG":
                problems.append(
                    "GDAL does not report LAYOUT=COG (not written by the COG driver, or modified "
                    "afterwards)"
                )
            if max(ds.width, ds.height) > 512 and not all(ds.overviews(b) for b in ds.indexes):
                problems.append(f"no overviews although the raster is {ds.width}x{ds.height} px")
            if any(f.lower().endswith(".ovr") for f in ds.files):
                problems.append("overviews are in an external .ovr file, not inside the GeoTIFF")
    except rasterio.errors.RasterioIOError as exc:
        return [f"{str(path)!r} cannot be opened as a raster: {exc}"]
    try:
        ifds, head = _tiff_ifds(path)
    except (OSError, ValueError, struct.error) as exc:
        return problems + [f"TIFF structure of {str(path)!r} cannot be read: {exc}"]
    if not ifds:
        return problems + ["the TIFF has no image directory"]
    untiled = [i for i, ifd in enumerate(ifds) if not ifd["tiled"]]
    if untiled:
        problems.append(
            "not tiled (strip layout)" if 0 in untiled else f"image directories {untiled} are not tiled"
        )
    data_start = min((min(ifd["data"]) for ifd in ifds if ifd["data"]), default=None)
    if data_start is not None and any(ifd["offset"] > data_start for ifd in ifds):
        problems.append("image directories are not all at the start of the file, before the data")
    if b"KNOWN_INCOMPATIBLE_EDITION=YES" in head:
        problems.append("the file was modified after it was written as a COG; its layout is broken")
    return problems
