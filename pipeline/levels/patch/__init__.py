"""The patch level: image patches of composites, segmentation by STCLN or U-TAE, split by spatial blocks.

:mod:`.patches` cuts and stores patches, :mod:`.train` fits, pre-trains (masked spatiotemporal
reconstruction) and scores, :mod:`.predict` maps the site by overlapping sliding windows,
:mod:`.commands` serves ``cropmap train/pretrain/evaluate`` on patch stores, :mod:`.stages` puts
them into ``cropmap run``.
"""

from __future__ import annotations

from cropmap.pipeline.levels import Level, lazy

LEVEL = Level(
    name="patch",
    description="image patches; STCLN / U-TAE segmentation, masked pre-training",
    stages=lazy("cropmap.pipeline.levels.patch.stages:patch_stages"),
    report_after=lambda run: ["labels", "patch_predict", "patch_evaluate"],
    outputs=lazy("cropmap.pipeline.levels.patch.stages:patch_outputs"),
    sample_store="samples/patches",
    is_store=lazy("cropmap.pipeline.levels.patch.patches:is_patch_store"),
    held_out="blocks of patches",
)
