"""PNG previews of class maps, with a legend of the classes present."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import rasterio
import rasterio.errors
import rasterio.windows
from rasterio.enums import Resampling

from cropmap.pipeline.errors import DataError
from cropmap.pipeline.fsio import atomic_path

from .legend import CLASS_NODATA, read_class_table


def write_preview(
    map_path: Path, png_path: Path, *, max_size: int = 1024, title: str | None = None,
    windows: Sequence[tuple[str, tuple[int, int, int, int]]] | None = None,
) -> Path:
    """Render the class map to a PNG with a legend of the classes present, atomically.

    Without ``windows`` the whole map is drawn (longest side at most ``max_size`` px). With
    ``windows`` (name, (col_off, row_off, width, height)) each window is drawn as its own
    titled panel: a site whose tiles are far apart would otherwise be a few dots in an empty
    frame. Returns ``png_path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 16:
        raise ValueError(f"max_size must be an integer >= 16, got {max_size!r}")
    map_path, png_path = Path(map_path), Path(png_path)
    table = {c.code: c for c in read_class_table(map_path)}
    panels: list[tuple[str | None, np.ndarray]] = []
    try:
        with rasterio.open(map_path) as ds:
            try:
                cmap = ds.colormap(1)
            except ValueError:
                cmap = {}
            if windows:
                per = max(16, max_size // max(1, math.ceil(math.sqrt(len(windows)))))
                for name, (col, row, w, h) in windows:
                    scale = min(1.0, per / max(w, h))
                    shape = (max(1, round(h * scale)), max(1, round(w * scale)))
                    data = ds.read(1, window=rasterio.windows.Window(col, row, w, h), out_shape=shape, resampling=Resampling.nearest)
                    panels.append((name, data))
            else:
                scale = min(1.0, max_size / max(ds.width, ds.height))
                shape = (max(1, round(ds.height * scale)), max(1, round(ds.width * scale)))
                panels.append((None, ds.read(1, out_shape=shape, resampling=Resampling.nearest)))
    except rasterio.errors.RasterioIOError as exc:
        raise DataError(f"cannot read class map {str(map_path)!r}: {exc}") from None

    lut = np.zeros((256, 4), dtype=np.uint8)  # unknown codes: grey; nodata: transparent
    lut[1:] = (128, 128, 128, 255)
    for code, rgba in cmap.items():
        lut[code] = rgba
    for c in table.values():
        lut[c.code] = (*c.rgb, 255)
    lut[CLASS_NODATA] = (0, 0, 0, 0)

    present = sorted({int(v) for _, data in panels for v in np.unique(data) if v != CLASS_NODATA})
    handles = [
        Patch(
            facecolor=tuple(lut[v, :3] / 255.0),
            edgecolor="0.3",
            label=table[v].name if v in table else f"code {v}",
        )
        for v in present
    ]
    dpi = 100
    ncols = max(1, math.ceil(math.sqrt(len(panels))))
    nrows = math.ceil(len(panels) / ncols)
    cell = max(max(d.shape) for _, d in panels)
    zoom = max(1, math.ceil(400 / cell)) if len(panels) == 1 else max(1, math.ceil(300 / cell))
    fig = Figure(figsize=(ncols * cell * zoom / dpi, nrows * cell * zoom / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = []
    for k, (name, data) in enumerate(panels):
        r, c = divmod(k, ncols)
        # one preview pixel per output pixel (tiny maps enlarged by a whole factor)
        ax = fig.add_axes((c / ncols, 1 - (r + 1) / nrows, 0.96 / ncols, 0.9 / nrows if name else 1.0 / nrows))
        ax.imshow(lut[data], interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if name:
            ax.set_title(name, fontsize="small")
        else:
            ax.set_axis_off()
        axes.append(ax)
    if title:
        fig.suptitle(title, y=1.0 + 0.25 / max(1, nrows * cell * zoom / dpi))
    if handles:
        axes[ncols - 1 if len(axes) >= ncols else -1].legend(
            handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False,
            fontsize="small", ncol=max(1, math.ceil(len(handles) / 25)),
        )  # fmt: skip
    else:
        axes[0].text(0.5, 0.5, "no data", ha="center", va="center", transform=axes[0].transAxes)
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    return png_path
