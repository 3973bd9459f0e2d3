"""Export tiles: the site extent cut into tiles snapped to a fixed UTM grid, and their names.

Every tile lies on the site's pixel grid (origin ``gee.grid_origin``, pixel ``resolution``), so
tiles of different runs and years coincide pixel for pixel and neighbours never resample
differently; focal operations (the CDL 3x3 window) are computed by Earth Engine on the source
grid before export, so tile edges need no overlap. A tile whose export runs out of memory or
time is split into four children named ``<tile>q0`` .. ``<tile>q3`` (row-major quadrants).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

from affine import Affine

from cropmap.pipeline.cube import TileGrid
from cropmap.pipeline.sites import Site

DESCRIPTION_OK = re.compile(r"[^A-Za-z0-9_,:;.-]")


@dataclass(frozen=True)
class ExportTile:
    """One export tile: its name and where it lies (top-left corner, size in pixels)."""

    name: str
    epsg: int
    x0: float
    """Left edge (site CRS)."""
    y1: float
    """Top edge (site CRS)."""
    width: int
    height: int
    resolution: float

    @property
    def transform(self) -> Affine:
        return Affine(self.resolution, 0.0, self.x0, 0.0, -self.resolution, self.y1)

    @property
    def grid(self) -> TileGrid:
        return TileGrid(self.epsg, self.transform, self.height, self.width)

    @property
    def crs(self) -> str:
        return f"EPSG:{self.epsg}"

    def crs_transform(self) -> list[float]:
        """Earth Engine's ``crsTransform`` order: xScale, xShear, xTranslate, yShear, yScale, yTranslate."""
        t = self.transform
        return [t.a, t.b, t.c, t.d, t.e, t.f]

    def split(self) -> list[ExportTile]:
        """Four quadrant tiles covering this one exactly (row-major)."""
        if self.width < 2 or self.height < 2:
            raise ValueError(f"tile {self.name} ({self.width} x {self.height} px) is too small to split")
        w0, h0 = self.width // 2, self.height // 2
        out = []
        for i, (col, row, w, h) in enumerate([(0, 0, w0, h0), (w0, 0, self.width - w0, h0),
                                               (0, h0, w0, self.height - h0), (w0, h0, self.width - w0, self.height - h0)]):
            out.append(ExportTile(f"{self.name}q{i}", self.epsg, self.x0 + col * self.resolution,
                                  self.y1 - row * self.resolution, w, h, self.resolution))
        return out


def site_tiles(site: Site) -> list[ExportTile]:
    """The tiles covering the site extent, snapped to the ``tile_size_m`` grid and clipped to the extent."""
    assert site.gee is not None
    size, res = site.gee.tile_size_m, site.resolution
    ox, oy = site.gee.grid_origin
    xmin, ymin, xmax, ymax = site.extent
    # the extent snapped outwards to the pixel grid
    xmin = ox + math.floor((xmin - ox) / res) * res
    ymin = oy + math.floor((ymin - oy) / res) * res
    xmax = ox + math.ceil((xmax - ox) / res) * res
    ymax = oy + math.ceil((ymax - oy) / res) * res
    tiles = []
    for row in range(math.floor((ymax - oy) / size - 1e-9), math.floor((ymin - oy) / size) - 1, -1):
        for col in range(math.floor((xmin - ox) / size), math.ceil((xmax - ox) / size)):
            x0, x1 = max(xmin, ox + col * size), min(xmax, ox + (col + 1) * size)
            y0, y1 = max(ymin, oy + row * size), min(ymax, oy + (row + 1) * size)
            if x1 <= x0 or y1 <= y0:
                continue
            tiles.append(ExportTile(tile_name(col, row), site.epsg, x0, y1,
                                    round((x1 - x0) / res), round((y1 - y0) / res), res))
    return tiles


def tile_name(col: int, row: int) -> str:
    """``x<col>y<row>`` on the snapped grid (negative indices keep their sign)."""
    return f"x{col:04d}y{row:04d}"


def export_name(prefix: str, site: str, year: int, kind: str, tile: str) -> str:
    """The deterministic object name of an export: ``{prefix}/{site}/{year}/{kind}/{tile}``."""
    return "/".join(p for p in (prefix.strip("/"), site, str(year), kind, tile) if p)


def task_description(name: str) -> str:
    """An Earth Engine task description for ``name`` (<= 100 allowed characters, unique per name)."""
    desc = DESCRIPTION_OK.sub("_", name.replace("/", "_"))
    if len(desc) <= 100:
        return desc
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    return f"{desc[:89]}_{digest}"
