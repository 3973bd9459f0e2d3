"""The pixel level: per-pixel time series of labelled pixels, one model per parcel-disjoint split.

:mod:`.tensors` cuts series from the cube into :mod:`cropmap.pipeline.samples` stores (which also read Parquet long
tables), :mod:`.train` / :mod:`.evaluate` / :mod:`.predict` fit, score and map, :mod:`.pretrain`
(MoCo), :mod:`.transfer` (last year's models) and :mod:`.distributed` (dask tiles) extend it;
:mod:`.stages` puts them into ``cropmap run``.
"""

from __future__ import annotations

from cropmap.pipeline.levels import Level, lazy

LEVEL = Level(
    name="pixel",
    description="per-pixel series; STNet and the pixel model zoo, optional MoCo pre-training",
    stages=lazy("cropmap.pipeline.levels.pixel.stages:pixel_stages"),
    report_after=lambda run: ["labels", "predict", "evaluate",
                              *(["transfer"] if run.transfer_from is not None and run.compare_scratch else [])],
    outputs=lazy("cropmap.pipeline.levels.pixel.stages:pixel_outputs"),
    sample_store="samples/pixels",
    is_store=lazy("cropmap.pipeline.samples:is_pixel_store"),
    held_out="parcels",
)
