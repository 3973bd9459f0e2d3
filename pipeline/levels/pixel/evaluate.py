"""Evaluate: metrics of a model on labelled samples, deterministic.

:func:`evaluate_model` serves ``cropmap evaluate`` and the evaluate stage. Samples whose label
the model never saw count as errors under their own class (they are never hidden); the macro
averages run over the classes present in the reference (see :mod:`cropmap.models.metrics`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cropmap.models.training import predict_proba
from cropmap.pipeline.errors import ModelError, SamplesError
from cropmap.pipeline.levels.common import encode_labels, metrics_for
from cropmap.pipeline.levels.pixel.train import as_series, load_model_dir
from cropmap.pipeline.samples import PixelSamples, from_ragged


def align_bands(samples: PixelSamples, bands: list[str]) -> PixelSamples:
    """The samples with their band columns in the model's order (error if any is missing)."""
    if list(samples.bands) == list(bands):
        return samples
    missing = [b for b in bands if b not in samples.bands]
    if missing:
        raise ModelError(f"the samples lack band(s) {', '.join(missing)} that the model was trained on",
                         fix=f"provide columns {', '.join(bands)}")
    cols = [samples.bands.index(b) for b in bands]
    values = np.asarray(samples.values)[:, cols]
    observed = ~np.isnan(values).all(axis=1)
    sample_of = np.repeat(np.arange(len(samples)), samples.lengths)
    lengths = np.bincount(sample_of[observed], minlength=len(samples))
    out = from_ragged(bands, values[observed], np.asarray(samples.days)[observed], lengths, samples.table, samples.class_names)
    keep = np.nonzero(lengths > 0)[0]
    return out if len(keep) == len(out) else out.subset(keep)


def predict_samples(model_dir: Path, samples: PixelSamples, device: str | None = None, batch_size: int = 1024):
    """(probabilities, model meta, band-aligned samples)."""
    model, meta = load_model_dir(model_dir, device)
    samples = align_bands(samples, meta["bands"])
    norm = meta["normalisation"]
    proba = predict_proba(model, as_series(samples), np.asarray(norm["mean"], np.float32), np.asarray(norm["std"], np.float32),
                          int(meta["max_len"]), batch_size, device)
    return proba, meta, samples


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
