"""Evaluate: metrics of a model on labelled samples, deterministic.

:func:`evaluate_model` serves ``cropmap evaluate`` and the evaluate stage. Samples whose label
the model never saw count as errors under their own class (they are never hidden); the macro
averages run over the classes present in the reference (see :mod:`cropmap.models.metrics`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cropmap.pipeline.errors import SamplesError
from cropmap.pipeline.levels.common import encode_labels, metrics_for
from cropmap.pipeline.levels.series_models import align_bands, predict_samples  # noqa: F401  (re-exported)
from cropmap.pipeline.samples import PixelSamples


def evaluate_model(model_dir: Path, samples: PixelSamples, device: str | None = None) -> dict:
    if len(samples) == 0:
        raise SamplesError("no samples to evaluate", fix="pass a table with labelled samples")
    proba, meta, aligned = predict_samples(model_dir, samples, device)
    m = metrics_for(aligned, proba, meta["classes"])
    m["model"] = meta["model"]
    m["protocol"] = "every sample passed is evaluated; deterministic (evenly spaced observations when a series is longer than the model's max_len)"
    return m


def calibration_of_seed(model_dir: Path, meta: dict, val_samples: PixelSamples | None, test_proba: np.ndarray,
                        test_samples: PixelSamples, device: str | None = None) -> dict | None:
    """ECE before and after the model's stored temperature (fitted on its validation pixels at
    training) on the validation and the test pixels of one seed; ``None`` for an uncalibrated model."""
    from cropmap.models.calibration import seed_calibration

    cal = meta.get("calibration")
    if not cal:
        return None
    pv = yv = None
    if val_samples is not None and len(val_samples):
        pv, _, aligned_val = predict_samples(model_dir, val_samples, device)
        yv = encode_labels(aligned_val, meta["classes"])
    return seed_calibration(cal["temperature"], pv, yv, test_proba, encode_labels(test_samples, meta["classes"]))
