"""The parcel level: each parcel a set of pixel series (optical and radar), one PSE-TSA model per split.

:mod:`.parcels` builds and stores the parcel pixel sets (from the label raster or a polygon file),
:mod:`.train` fits, scores and predicts (any fusion of S2 and S1), :mod:`.stages` puts them into
``cropmap run`` and writes the parcel map (GeoPackage) and its rasterised COGs.
"""

from __future__ import annotations

from cropmap.pipeline.levels import Level, lazy

LEVEL = Level(
    name="parcel",
    description="pixel sets of parcels; PSE-TSA with optical + radar fusion",
    stages=lazy("cropmap.pipeline.levels.parcel.stages:parcel_stages"),
    report_after=lambda run: ["parcel_predict", "parcel_evaluate"],
    outputs=lazy("cropmap.pipeline.levels.parcel.stages:parcel_outputs"),
    sample_store="samples/parcels",
    is_store=lazy("cropmap.pipeline.levels.parcel.parcels:is_parcel_store"),
    held_out="parcels",
)
