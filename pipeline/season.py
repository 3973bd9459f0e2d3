"""Early-season mapping: cut every tile's time series at a day of its season year.

``cropmap run --until MM-DD`` (or ``YYYY-MM-DD``; only month and day count) keeps, for each tile,
the acquisitions up to that day of the tile's year. The training tiles of earlier years are cut at
the same day, so the model learns from what it will see when mapping the current year so far.
"""

from __future__ import annotations

import datetime as dt
import re

import numpy as np
import xarray as xr

from cropmap.pipeline.errors import CropmapError, DataError


def parse_until(text: str | None) -> tuple[int, int] | None:
    """``"MM-DD"`` or ``"YYYY-MM-DD"`` -> (month, day); None stays None."""
    if text is None:
        return None
    m = re.fullmatch(r"(?:\d{4}-)?(\d{2})-(\d{2})", text.strip())
    try:
        if not m:
            raise ValueError
        month, day = int(m.group(1)), int(m.group(2))
        dt.date(2024, month, day)  # a leap year accepts 02-29
    except ValueError:
        raise CropmapError(f"--until {text!r} is not a date", fix="use MM-DD or YYYY-MM-DD, e.g. --until 06-30") from None
    return month, day


def cut_date(year: int, until: tuple[int, int]) -> dt.date:
    month, day = until
    if (month, day) == (2, 29) and not (year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)):
        day = 28
    return dt.date(year, month, day)


def cut_cube(cube: xr.Dataset, year: int, until: tuple[int, int]) -> tuple[xr.Dataset, list[str]]:
    """The cube with only the acquisitions on or before ``until`` of ``year``, and a note."""
    end = np.datetime64(cut_date(year, until)) + np.timedelta64(1, "D")
    sel, kept = {}, {}
    for dim in ("time_s2", "time_s1"):
        if dim in cube.dims:
            mask = cube[dim].values < end
            sel[dim] = np.nonzero(mask)[0]
            kept[dim] = (int(mask.sum()), int(mask.size))
    if "time_s2" in kept and kept["time_s2"][0] == 0 and kept.get("time_s1", (0, 0))[0] == 0:
        raise DataError(f"tile {cube.attrs.get('tile')}: no acquisition on or before {cut_date(year, until)}",
                        fix="choose a later --until date")
    out = cube.isel(sel)
    note = (f"tile {cube.attrs.get('tile')}: early season, series cut at {cut_date(year, until)} "
            f"(Sentinel-2 {kept.get('time_s2', (0, 0))[0]}/{kept.get('time_s2', (0, 0))[1]} dates, "
            f"Sentinel-1 {kept.get('time_s1', (0, 0))[0]}/{kept.get('time_s1', (0, 0))[1]})")
    return out, [note]
