"""Table sampling sized for a state: points per class and rows per tile, computed before any export.

``samples: table`` exports, per tile, ``classPoints`` stratified points per legend class and one
row per point and S2 acquisition day (the clearest of that day's overlapping granules, see
:func:`.builders.daily_clearest`) or S1 acquisition. The rows of a tile are therefore at most

    points per class x classes x (S2 days + S1 acquisitions a point can get in the season)

and :func:`table_rows_per_tile` lowers the points per class (from ``gee.samples_per_class``) until
that bound fits ``gee.table_rows_per_tile``. The acquisition counts are upper bounds from the
constellations' repeat cycles (pure arithmetic: no Earth Engine call), so the real tables are
smaller (S2 rows exist only on clear days, S1 rows where a scene covers the point):

* Sentinel-2: 10-day repeat per satellite; 2 satellites until 2024, 3 from 2025 (S2C joined, S2A
  kept flying in an extended campaign); a point in the overlap of two adjacent relative orbits is
  imaged from both (x2).
* Sentinel-1, one orbit pass: 12-day repeat per satellite; S1A+S1B until 2021 (6 days), S1A alone
  2022-2024 (S1B failed in December 2021), S1A+S1C from 2025; adjacent relative orbits of a pass
  overlap (x2).

Same-day S1 scenes (consecutive slices of one datatake overlap by a few km) are averaged at
read-back, not on the server, so points in those strips can exceed the S1 bound by their
duplicates: a small fraction of a tile.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field

from cropmap.pipeline.sites import Site, load_legend

S2_REPEAT_DAYS = 10
S1_REPEAT_DAYS = 12
ORBIT_OVERLAP = 2
"""A point can lie in the overlap of two adjacent relative orbits (S2 and one S1 pass)."""


def s2_satellites(year: int) -> int:
    return 2 if year <= 2024 else 3


def s1_satellites(year: int) -> int:
    return 2 if year <= 2021 or year >= 2025 else 1


def acquisition_bound(days: int, repeat_days: int, satellites: int) -> int:
    """Most acquisition days of one point in ``days`` (capped at one a day)."""
    return min(days, math.ceil(days * satellites / repeat_days) * ORBIT_OVERLAP)


@dataclass(frozen=True)
class TableRows:
    """The table-sampling size of a site and year (see the module docstring)."""

    site: str
    year: int
    season: tuple[dt.date, dt.date]
    classes: int
    """Legend classes (the strata)."""
    points_per_class: int
    s2_days: int
    """Most S2 acquisition days per point in the season (0 without S2 bands)."""
    s1_days: int
    """Most S1 acquisitions per point in the season (0 without S1 bands)."""
    budget: int
    """``gee.table_rows_per_tile``."""
    requested_points: int
    """``gee.samples_per_class`` (lowered to ``points_per_class`` when over budget)."""
    per_tile: dict[str, int] = field(default_factory=dict)
    """Tile name -> most rows of its table."""

    @property
    def rows_per_point(self) -> int:
        return self.s2_days + self.s1_days

    @property
    def points_per_tile(self) -> int:
        return self.points_per_class * self.classes

    @property
    def total(self) -> int:
        return sum(self.per_tile.values())

    def describe(self) -> list[str]:
        """Human lines for a plan: the per-tile and total row counts and how they are made."""
        lowered = (f" (gee.samples_per_class {self.requested_points} lowered to fit gee.table_rows_per_tile {self.budget:,})"
                   if self.points_per_class < self.requested_points else f" (within gee.table_rows_per_tile {self.budget:,})")
        per = sorted(set(self.per_tile.values()))
        per_txt = f"{per[0]:,}" if len(per) == 1 else f"{per[0]:,}-{per[-1]:,}"
        if max(self.per_tile.values(), default=0) > self.budget:
            lowered = (f" (OVER gee.table_rows_per_tile {self.budget:,} even at 1 point per class: raise it, or shorten"
                       " the season)")
        return [f"table samples {self.site} {self.year}: {self.points_per_class} points per class x {self.classes} classes"
                f" = {self.points_per_tile:,} points per tile{lowered}",
                f"  rows per point <= {self.rows_per_point} ({self.s2_days} S2 days + {self.s1_days} S1 acquisitions,"
                f" {self.season[0]} to {self.season[1]})",
                f"  rows per tile <= {per_txt}; total <= {self.total:,} over {len(self.per_tile)} tiles"]


def table_rows_per_tile(site: Site, year: int) -> TableRows:
    """Points per class and the most rows of each tile's sample table (and in total) for ``site`` and
    ``year``; pure (reads the site's legend file, no Earth Engine call)."""
    from cropmap.pipeline.ingest.gee.builders import sampling_strata, season
    from cropmap.pipeline.ingest.gee.tiles import site_tiles

    if site.gee is None:
        raise ValueError(f"site {site.name!r} is not a gee site")
    gee = site.gee
    start, end = season(gee, year)
    days = (end - start).days
    s2 = acquisition_bound(days, S2_REPEAT_DAYS, s2_satellites(year)) if site.bands.s2 else 0
    s1 = acquisition_bound(days, S1_REPEAT_DAYS, s1_satellites(year)) if site.bands.s1 else 0
    classes = len(set(sampling_strata(load_legend(site.legend))[1]))
    per_point = max(1, s2 + s1)
    points = max(1, min(gee.samples_per_class, gee.table_rows_per_tile // (classes * per_point)))
    rows = points * classes * (s2 + s1)
    return TableRows(site.name, int(year), (start, end), classes, points, s2, s1, gee.table_rows_per_tile,
                     gee.samples_per_class, {t.name: rows for t in site_tiles(site)})
