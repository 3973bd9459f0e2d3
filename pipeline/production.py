"""What ``cropmap run`` does around the stages for production reruns: the year (``auto``), the
options that depend on earlier years (transfer from last year's models, last year's map for the
report), the lock and the run version. The stages themselves are in :mod:`.workflow`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cropmap.pipeline import versions
from cropmap.pipeline.availability import resolve_auto_year
from cropmap.pipeline.errors import CropmapError
from cropmap.pipeline.fsio import ensure_writable_dir
from cropmap.pipeline.levels.pixel.transfer import previous_models
from cropmap.pipeline.lock import run_lock
from cropmap.pipeline.runner import load_manifest
from cropmap.pipeline.sites import Site
from cropmap.pipeline.versions import Plan, publish, runs_table, year_dir

__all__ = ["resolve_year", "run_options", "run_dir", "locked", "publish", "list_runs", "previous_map", "RunOptions", "Plan"]


def resolve_year(site: Site, year: str | int | None, *, today: dt.date | None = None,
                 cdl_years: Callable[[], set[int]] | None = None) -> tuple[int, list[str]]:
    """``--year``: None (the site's default), ``auto`` (latest available, :mod:`.availability`) or a year."""
    if year is None or isinstance(year, int):
        return site.resolve_year(year), []
    if year.strip().lower() == "auto":
        return resolve_auto_year(site, today=today, cdl_years=cdl_years)
    if not year.strip().isdigit():
        raise CropmapError(f"--year {year!r} is neither a year nor 'auto'", fix=f"use --year auto or one of {site.years}")
    return site.resolve_year(int(year)), []


def previous_map(out: Path, site: str, year: int) -> Path | None:
    """The crop map of the current version of ``out/site/year-1`` (resolved path), if any."""
    ydir = Path(out) / site / str(year - 1)
    doc = load_manifest(ydir)
    if not doc or doc.get("status") != "succeeded" or "map" not in doc.get("outputs", {}):
        return None
    p = (ydir / doc["outputs"]["map"]).resolve()
    return p if p.is_file() else None


@dataclass
class RunOptions:
    stage_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of :func:`~.workflow.build_stages`."""
    header: dict[str, Any] = field(default_factory=dict)
    """Extra manifest fields."""
    notes: list[str] = field(default_factory=list)


def run_options(site: Site, year: int, out: Path, *, until: str | None = None, transfer: str | None = None,
                level: str | None = None) -> RunOptions:
    from cropmap.pipeline.season import parse_until

    mode = transfer or site.training.transfer
    if mode not in ("none", "previous-year"):
        raise CropmapError(f"unknown --transfer {mode!r}", fix="use --transfer none or --transfer previous-year")
    opts = RunOptions()
    cut = parse_until(until)
    if cut is not None:
        opts.stage_args["until"] = f"{cut[0]:02d}-{cut[1]:02d}"
        opts.header["early_season_until"] = opts.stage_args["until"]
    if mode == "previous-year" and (level or site.level) != "pixel":
        opts.notes.append(f"transfer: cross-year transfer is implemented for pixel models; the {level or site.level} path trains from scratch")
    elif mode == "previous-year":
        prev = previous_models(out, site.name, year)
        if prev is None:
            opts.notes.append(f"transfer: no complete {year - 1} run under {out}; training from scratch")
        else:
            opts.stage_args.update(transfer_from=prev, compare_scratch=site.training.transfer_compare_scratch)
            opts.header["transfer_from"] = year - 1
            opts.notes.append(f"transfer: initialising from the {year - 1} models ({prev})")
    pm = previous_map(out, site.name, year)
    if pm is not None:
        opts.stage_args["previous_map"] = pm
    return opts


def run_dir(out: Path, site: str, year: int) -> Path:
    return year_dir(out, site, year)


@contextlib.contextmanager
def locked(ydir: Path) -> Iterator[Callable[..., tuple[Plan, dict[str, Any]]]]:
    """Hold the year directory's lock; yields ``prepare(stages, header, force) -> (plan, header)``."""
    ensure_writable_dir(ydir)
    with run_lock(ydir):
        yield lambda stages, header, force=False: versions.prepare(ydir, stages, header, force)


def list_runs(out: Path, site: str | None = None) -> list[dict[str, Any]]:
    if site is not None:
        year_dir(out, site, 2000)  # validates the name
    return runs_table(out, site)
