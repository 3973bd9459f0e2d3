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


def _fields(n_fields, pixels, t_true, seed):
    """Validation 'fields': pixels of one field share their logits (near-copies), labels drawn per field."""
    p_all, y_all, g_all = [], [], []
    for f in range(n_fields):
        p, y = overconfident(n=1, c=4, seed=seed * 1000 + f, t_true=t_true)
        n = pixels[f] if hasattr(pixels, "__len__") else pixels
        p_all.append(np.repeat(p, n, 0))
        y_all.append(np.repeat(y, n))
        g_all.append(np.full(n, f))
    return np.concatenate(p_all), np.concatenate(y_all), np.concatenate(g_all)


def test_every_parcel_weighs_the_same_so_one_big_field_cannot_set_the_temperature():
    p, y = overconfident(n=60, seed=3)
    # one huge field: a confident, wrong prediction repeated 5000 times
    big_p = np.tile(np.array([[0.97, 0.01, 0.01, 0.01]], np.float32), (5000, 1))
    proba = np.concatenate([p, big_p])
    labels = np.concatenate([y, np.full(5000, 1)])
    groups = np.concatenate([np.arange(60), np.full(5000, 999)])
    per_pixel = fit_temperature(proba, labels, prior_sds=(float("inf"),))["temperature"]
    per_parcel = fit_temperature(proba, labels, groups, prior_sds=(float("inf"),))
    assert per_parcel["n_groups"] == 61 and per_parcel["weighting"].startswith("every parcel")
    assert per_pixel > 8  # the big field dominates the pixel-weighted NLL and flattens everything
    assert 1.5 < per_parcel["temperature"] < per_pixel / 2


def test_few_parcels_shrink_towards_no_scaling_and_cross_validation_can_refuse():
    p, y, g = _fields(2, 200, 2.5, 0)
    two = fit_temperature(p, y, g)
    assert two["temperature"] == 1.0 and "not run" in two["cross_validation"]  # 2 parcels: no evidence to fit on
    # well calibrated fields: scaling does not help held-out parcels, the MAP stays near T = 1
    rng = np.random.default_rng(5)
    conf = rng.uniform(0.4, 0.95, 40)
    proba = np.stack([conf, (1 - conf) / 2, (1 - conf) / 2], 1).astype(np.float32)
    labels = np.where(rng.random(40) < conf, 0, 1)
    fit = fit_temperature(np.repeat(proba, 30, 0), np.repeat(labels, 30), np.repeat(np.arange(40), 30))
    assert 0.7 < fit["temperature"] < 1.4 and set(fit["cross_validation"]["held_out_nll"]) == {"0", "0.1", "0.25", "0.5", "1", "inf"}
    # many overconfident fields: the data overrule the prior and the temperature is recovered
    p, y, g = _fields(400, 5, 2.5, 1)
    many = fit_temperature(p, y, g)
    assert many["prior_sd"] >= 0.5 and 1.8 < many["temperature"] < 3.3 and many["cross_validation"]["folds"] == 10


def test_bounded_search_and_group_shape_check():
    p, y = overconfident(200, seed=2)
    fit = fit_temperature(p, 1 - (y > 0).astype(int) + 2, prior_sds=(float("inf"),))  # nonsense labels: T at a bound at most
    assert 0.05 - 1e-6 <= fit["temperature"] <= 20 + 1e-3
    with pytest.raises(ValueError, match="groups"):
        fit_temperature(p, y, np.arange(5))
