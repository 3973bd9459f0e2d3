"""Mapping levels: what ``cropmap run`` does after the shared ingest and labels stages.

A :class:`Level` is one small record: its name, the stages it adds (a function of the run's
:class:`RunInputs`), the stages the report reads, the run's ``outputs`` and its sample store.
Three levels implement it, each in its own sub-package that imports only the shared modules
(``cropmap.pipeline.*`` outside ``levels``, :mod:`.common`) and never another level:

* :mod:`.pixel`  - per-pixel series (SITS-MoCo's STNet and the pixel zoo), parcel-disjoint splits;
* :mod:`.parcel` - pixel sets of parcels (PSE-TSA, optical + radar fusion);
* :mod:`.patch`  - image patches (STCLN / U-TAE segmentation, masked pre-training).

:func:`cropmap.pipeline.workflow.get_level` knows them by name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cropmap.pipeline.runner import Stage
from cropmap.pipeline.sites import Legend, Site


@dataclass(frozen=True)
class RunInputs:
    """What a level builds its stages from: one run of one site and year."""

    site: Site
    year: int
    legend: Legend
    tiles: list[tuple[str, int]]  # every tile read (mapped and trained), in site order
    mapped: list[tuple[str, int]]  # tiles mapped for ``year``
    trained: list[tuple[str, int]]  # labelled tiles trained on
    device: str  # concrete: "cpu" or "cuda" (resolved once, at the entry point)
    epochs: int | None = None  # override of the level's training epochs
    common: dict = field(default_factory=dict)  # {"site", "year"}: part of several stage fingerprints
    transfer_from: Path | None = None  # last year's models/ (pixel level)
    compare_scratch: bool = True
    cluster: Any = None  # ClusterSpec of the tiled stages (pixel level)
    gee_source: Any = None  # GeeSource of a ``source: gee`` site (sample tables)


@dataclass(frozen=True)
class Level:
    """One mapping level of ``cropmap run``."""

    name: str  # "pixel", "parcel", "patch"
    description: str
    stages: Callable[[RunInputs], list[Stage]]  # the stages after ingest and labels
    report_after: Callable[[RunInputs], list[str]]  # the stages the report reads (predict and evaluate first)
    outputs: Callable[[dict], dict[str, str]]  # run.json ``outputs`` from the finished stages' outputs
    sample_store: str  # run-relative path of the level's training sample store
    is_store: Callable[[Path], bool]  # is this directory a sample store of the level?
    held_out: str  # what a split holds out, for the run summary ("parcels", "blocks of patches")

    def report_stages(self, run: RunInputs) -> tuple[str, str]:
        """(predict stage, evaluate stage) whose outputs the report shows."""
        after = self.report_after(run)
        return next(a for a in after if a.endswith("predict")), next(a for a in after if a.endswith("evaluate"))


def lazy(target: str) -> Callable:
    """``"module:function"`` as a function imported on first call: a :class:`Level` names its stage
    code without importing it (torch, the models), so listing levels stays cheap."""
    module, name = target.split(":")

    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = name
    return call
