"""The workflow of ``cropmap run``: the shared stages, then the stages of the site's level.

    ingest -> labels -> <level stages: tensors, [pretrain], train, predict, evaluate> -> report

``ingest`` and ``labels`` (:mod:`cropmap.pipeline.stages.ingest`, :mod:`~cropmap.pipeline.stages.labels`)
and ``report`` (:mod:`~cropmap.pipeline.stages.report`) are the same at every level; a level
(:mod:`cropmap.pipeline.levels`) supplies what lies between. Everything is written under the run
directory ``OUT/SITE/YEAR/versions/vN/`` (see each level's ``stages`` module for its files).
"""

from __future__ import annotations

from pathlib import Path

from cropmap.pipeline import season
from cropmap.pipeline.errors import CropmapError, StageError
from cropmap.pipeline.levels import Level, RunInputs
from cropmap.pipeline.levels.parcel import LEVEL as PARCEL
from cropmap.pipeline.levels.patch import LEVEL as PATCH
from cropmap.pipeline.levels.pixel import LEVEL as PIXEL
from cropmap.pipeline.runner import Stage
from cropmap.pipeline.sites import Legend, Site, load_legend
from cropmap.pipeline.stages.ingest import ingest_stage, open_source, run_tiles, training_tiles
from cropmap.pipeline.stages.labels import labels_stage
from cropmap.pipeline.stages.report import report_stage

LEVELS: dict[str, Level] = {lv.name: lv for lv in (PIXEL, PARCEL, PATCH)}


def get_level(name: str) -> Level:
    """The level called ``name`` (one clear error for any other name)."""
    if name not in LEVELS:
        raise CropmapError(f"unknown level {name!r}", fix=f"use one of {', '.join(LEVELS)}")
    return LEVELS[name]


def resolve_device(device: str | None) -> str:
    """``auto``/None -> ``cuda`` when torch sees a CUDA device, else ``cpu``; ``cpu``/``cuda`` as given
    (``cuda`` without a device is one clear error). Called once, where a command starts."""
    if device not in (None, "auto", "cpu", "cuda"):
        raise CropmapError(f"unknown device {device!r}", fix="use --device auto, cpu or cuda")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise CropmapError("--device cuda was asked for but torch sees no CUDA device",
                           fix="use --device cpu (or auto), or install a CUDA build of torch")
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def build_stages(site: Site, year: int, *, device: str | None = None, epochs: int | None = None,
                 gee_client=None, level: str | None = None, until: str | None = None, transfer_from: Path | None = None,
                 compare_scratch: bool = True, previous_map: Path | None = None, cluster=None) -> tuple[list[Stage], Legend]:
    """The stages of ``cropmap run``. ``device`` (auto/None, cpu, cuda) is resolved here once and every
    stage gets the concrete value; ``gee_client`` (a factory site -> client) replaces the real Earth
    Engine client of a ``source: gee`` site (tests use the fake one); ``level`` (default: the site's
    ``level``) picks the level; ``until`` (MM-DD or YYYY-MM-DD) cuts every series at that day of its
    year (early season, :mod:`.season`); ``transfer_from`` (last year's ``models/``) initialises pixel
    training and adds the ``transfer`` comparison; ``previous_map`` (last year's crop map) adds
    year-over-year changes to the report; ``cluster`` (a ClusterSpec) runs the pixel level's per-tile
    work as dask tasks (same outputs; not part of any stage fingerprint)."""
    lv = get_level(level or site.level)
    legend = load_legend(site.legend)
    mapped = run_tiles(site, year)
    trained = training_tiles(site, year)
    if not mapped:
        raise StageError(f"site {site.name!r} lists no tile for year {year}", fix=f"add tiles with year {year} to its site file")
    order = [t for t, _ in mapped] if site.source == "gee" else [x.id for x in site.local.tiles]
    tiles = sorted(set(mapped) | set(trained), key=lambda t: order.index(t[0]))
    cut = season.parse_until(until)
    src = open_source(site, year, legend, tiles, gee_client=gee_client, cut=cut)
    common = {"site": site.name, "year": year}
    run = RunInputs(site=site, year=year, legend=legend, tiles=tiles, mapped=mapped, trained=trained, device=resolve_device(device),
                    epochs=epochs, common=common, transfer_from=transfer_from, compare_scratch=compare_scratch, cluster=cluster,
                    gee_source=src.gee)
    predict, evaluate = lv.report_stages(run)
    stages = [
        ingest_stage(site, tiles, src, common=common, cut=cut),
        labels_stage(site, tiles, legend, src, common=common, tile_index={tid: i for i, tid in enumerate(order)}),
        *lv.stages(run),
        report_stage(site, year, legend, level=lv.name, after=lv.report_after(run), predict=predict, evaluate=evaluate,
                     mapped=mapped, common=common, previous_map=previous_map),
    ]
    return stages, legend
