"""The report's calibration section: ECE before/after on validation and test, and the reliability diagram."""

import numpy as np

from cropmap.models.calibration import fit_temperature, seed_calibration, summarize_calibration
from cropmap.pipeline.stages.report import _calibration_section


def overconfident(n, seed):
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, (n, 3))
    p_true = np.exp(z / 2.0)
    p_true /= p_true.sum(1, keepdims=True)
    y = np.array([rng.choice(3, p=p) for p in p_true])
    p = np.exp(z)
    return (p / p.sum(1, keepdims=True)).astype(np.float32), y


def test_calibration_block_and_section():
    seeds = {}
    for s in (0, 1):
        pv, yv = overconfident(800, s)
        pt, yt = overconfident(800, 10 + s)
        t = fit_temperature(pv, yv)["temperature"]
        seeds[f"seed-{s}"] = seed_calibration(t, pv, yv, pt, yt)
    cal = summarize_calibration(seeds)
    assert cal["ece"]["test"]["lower_after"] and cal["ece"]["validation"]["lower_after"]
    assert cal["ece"]["test"]["n_seeds"] == 2 and len(cal["reliability"]["test"]["after"]["bins"]) == 15
    html = _calibration_section(cal)
    assert "Calibration of the confidence map" in html and html.count("<img") == 2 and "did <b>not</b>" not in html
    cal["ece"]["test"]["lower_after"] = False
    assert "did <b>not</b> lower the ECE on the test pixels" in _calibration_section(cal)
