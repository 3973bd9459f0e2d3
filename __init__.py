"""cropmap: crop-type maps of whole sites from Sentinel-1/2 time series.

Sub-packages: :mod:`cropmap.pipeline` (stages and their orchestration),
:mod:`cropmap.models` (pure PyTorch networks and baselines), :mod:`cropmap.regions`
(site catalogue and class legends as data, plus the embedded demo data).
"""

__version__ = "0.1.0"
