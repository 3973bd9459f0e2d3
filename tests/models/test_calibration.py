"""Temperature scaling and expected calibration error."""

import numpy as np
import pytest

from cropmap.models.calibration import N_BINS, fit_temperature, pooled_bins, reliability, scale


def overconfident(n=4000, c=4, seed=0, t_true=2.5):
    """Labels drawn from softmax(z / t_true), reported as softmax(z): too confident by t_true."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2.0, (n, c))
    z[np.arange(n), rng.integers(0, c, n)] += 3.0
    true_p = np.exp(z / t_true)
    true_p /= true_p.sum(1, keepdims=True)
    y = np.array([rng.choice(c, p=p) for p in true_p])
    reported = np.exp(z)
    reported /= reported.sum(1, keepdims=True)
    return reported.astype(np.float32), y


def test_temperature_recovers_overconfidence_and_lowers_ece_on_held_out_data():
    p_val, y_val = overconfident(seed=0)
    p_test, y_test = overconfident(seed=1)
    fit = fit_temperature(p_val, y_val)
    assert 2.0 < fit["temperature"] < 3.1 and fit["nll_after"] < fit["nll_before"]
    before, after = reliability(p_test, y_test), reliability(scale(p_test, fit["temperature"]), y_test)
    assert after["ece"] < 0.5 * before["ece"]
    assert (scale(p_test, fit["temperature"]).argmax(1) == p_test.argmax(1)).all()  # the map does not change


def test_ece_bins_and_perfect_calibration():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.5, 1.0, 20000)
    proba = np.stack([conf, 1 - conf], 1)
    y = np.where(rng.random(len(conf)) < conf, 0, 1)
    rel = reliability(proba, y)
    assert rel["n_bins"] == N_BINS == 15 and len(rel["bins"]) == 15
    assert sum(b["count"] for b in rel["bins"]) == len(y)
    assert rel["ece"] < 0.02
    wrong = reliability(proba, 1 - y)  # the same confidence, mostly wrong: badly calibrated
    assert wrong["ece"] > 0.4
    pooled = pooled_bins([rel, rel])
    assert pooled["n"] == 2 * len(y) and abs(pooled["ece"] - rel["ece"]) < 1e-9


def test_fit_ignores_unknown_labels_and_refuses_empty_data():
    p, y = overconfident(500)
    y = y.copy()
    y[:10] = -1
    assert fit_temperature(p, y)["n"] == 490
    with pytest.raises(ValueError, match="no validation sample"):
        fit_temperature(p[:3], np.array([-1, -1, -1]))
    with pytest.raises(ValueError, match="positive"):
        scale(p, 0.0)
