"""The site grid: the extent and resolution every map of a site is written on, and where a tile lies in it.

Shared by every level's predict stage, so maps of different years and levels align pixel for pixel."""

from __future__ import annotations

import numpy as np
from affine import Affine
from rasterio.windows import Window

from cropmap.pipeline.errors import DataError
from cropmap.pipeline.sites import Site


def site_grid(site: Site) -> tuple[Affine, int, int]:
    xmin, ymin, xmax, ymax = site.extent
    res = site.resolution
    width, height = int(round((xmax - xmin) / res)), int(round((ymax - ymin) / res))
    return Affine(res, 0.0, xmin, 0.0, -res, ymax), width, height


def tile_window(site: Site, transform: Affine) -> Window:
    """Where a tile (given by its transform) lies in the site grid; must be grid-aligned."""
    st, _, _ = site_grid(site)
    col = (transform.c - st.c) / st.a
    row = (transform.f - st.f) / st.e
    if not (np.isclose(col, round(col), atol=1e-6) and np.isclose(row, round(row), atol=1e-6) and np.isclose(transform.a, st.a)):
        raise DataError(f"tile grid (origin {transform.c}, {transform.f}, pixel {transform.a}) is not aligned with site {site.name!r}",
                        fix="export tiles on the site grid (snapped origin, same resolution)")
    return Window(int(round(col)), int(round(row)), 0, 0)
