"""``--year auto``: the latest site year whose inputs and labels are available now.

* ``source: local`` sites: a year is available when every tile listed for it has its files
  (its label raster included) in the archive.
* ``source: gee`` sites: a year is available when its season is over (Sentinel data for the whole
  season exists) and, for ``label_source: cdl``, when USDA has published that year's CDL in Earth
  Engine (months after the season, around January-February of the next year); parcel labels
  need the site's parcel file.

The clock and the list of published CDL years are parameters, so the decision is tested offline.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

from cropmap.pipeline.errors import CropmapError, NotReadyError
from cropmap.pipeline.sites import Site


@dataclass(frozen=True)
class YearStatus:
    year: int
    available: bool
    reason: str
    """Why it is (not) available, for the user."""


def _local_status(site: Site, year: int) -> YearStatus:
    from cropmap.pipeline.ingest.local import find_tile_files

    tiles = [t for t in site.local.tiles if t.year == year]
    if not tiles:
        return YearStatus(year, False, f"no tile of the site file is listed for {year}")
    for t in tiles:
        try:
            files = find_tile_files(site, t.id)
        except CropmapError as exc:
            return YearStatus(year, False, f"tile {t.id}: {exc.what}")
        if files.labels is None:
            return YearStatus(year, False, f"tile {t.id} has no label raster yet")
    return YearStatus(year, True, f"{len(tiles)} tile(s) with labels in {site.data_root()}")


def published_cdl_years(site: Site) -> set[int]:
    """The CDL years Earth Engine lists (needs credentials and network)."""
    from cropmap.pipeline.ingest.gee import builders as b
    from cropmap.pipeline.ingest.gee.source import make_client

    return {int(str(i)[:4]) for i in make_client(site).get_info(b.cdl_year_ids()) if str(i)[:4].isdigit()}


def season_end(site: Site, year: int) -> dt.date:
    g = site.gee
    month0 = g.season_start_month - 1 + g.season_months  # months after January of the season's first year
    start_year = year - (g.season_start_month - 1 + g.season_months - 1) // 12
    y, m = start_year + month0 // 12, month0 % 12 + 1
    return dt.date(y, m, 1)


def _gee_status(site: Site, year: int, today: dt.date, cdl_years: Callable[[], set[int]]) -> YearStatus:
    end = season_end(site, year)
    if today < end:
        return YearStatus(year, False, f"the {year} season ends on {end}; Sentinel data for it is not complete yet")
    if site.label_source == "cdl":
        published = cdl_years()
        if year not in published:
            latest = max(published) if published else "none"
            return YearStatus(year, False, f"USDA CDL {year} is not published in Earth Engine yet (latest: {latest}; "
                                            "a year is usually published in January-February of the next)")
        return YearStatus(year, True, f"season over on {end}, CDL {year} published")
    if site.label_source == "parcels" and not site.parcels.resolved().exists():
        return YearStatus(year, False, f"parcel file {site.parcels.resolved()} does not exist yet")
    return YearStatus(year, True, f"season over on {end}")


def year_statuses(site: Site, *, today: dt.date | None = None, cdl_years: Callable[[], set[int]] | None = None) -> list[YearStatus]:
    """Availability of every year of the site, newest first (stops at the first available one)."""
    today = today or dt.date.today()
    cache: dict[str, set[int]] = {}

    def cdl() -> set[int]:
        if "years" not in cache:
            cache["years"] = (cdl_years or (lambda: published_cdl_years(site)))()
        return cache["years"]

    out = []
    for year in sorted(site.years, reverse=True):
        st = _local_status(site, year) if site.source == "local" else _gee_status(site, year, today, cdl)
        out.append(st)
        if st.available:
            break
    return out


def resolve_auto_year(site: Site, **kw) -> tuple[int, list[str]]:
    """The latest available year and notes about newer years that must wait; :class:`NotReadyError` if none."""
    statuses = year_statuses(site, **kw)
    waiting = [f"{s.year} waits: {s.reason}" for s in statuses if not s.available]
    chosen = next((s for s in statuses if s.available), None)
    if chosen is None:
        raise NotReadyError(f"no year of site {site.name!r} is available yet ({'; '.join(waiting)})",
                            fix="nothing to do now: the scheduled run will try again (exit code 75 means 'wait')")
    return chosen.year, [f"--year auto: {chosen.year} ({chosen.reason})", *waiting]
