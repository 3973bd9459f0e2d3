"""PSE-TSA and its fusion variants on tiny synthetic parcel sets: shapes, masks, day encoding, fusion
semantics, S1 -> S2 alignment, the date experiments and a training loop that learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cropmap.models.parcel.batch import (
    ParcelSets,
    SensorSets,
    align_s1_to_s2,
    channel_statistics,
    cut_until,
    make_batch,
    nearest_unused,
    prepare_inputs,
    subsample_dates,
)
from cropmap.models.parcel.fusion import build_parcel_model, check_config, model_inputs
from cropmap.models.parcel.psetae import PSETAE, SensorInput
from cropmap.models.parcel.training import ParcelFitConfig, fit_parcels, predict_parcel_proba

VARIANTS = [("none", ["s2"]), ("none", ["s1"]), ("early", ["s2", "s1"]), ("pse", ["s2", "s1"]), ("tsa", ["s2", "s1"]),
            ("decision", ["s2", "s1"])]


def synthetic(p: int = 24, s: int = 8, seed: int = 0, signal: bool = False) -> tuple[ParcelSets, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(p) % 2

    def sensor(c, names, t_lo, t_hi):
        lengths = rng.integers(t_lo, t_hi, p)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        days = np.concatenate([np.sort(rng.choice(np.arange(-120, 330), n, replace=False)) for n in lengths]).astype(np.float32)
        values = rng.normal(size=(offsets[-1], c, s)).astype(np.float32)
        if signal:
            values += np.repeat(y * 2.0, lengths)[:, None, None].astype(np.float32)
        return SensorSets(names, values, days, offsets)

    sets = ParcelSets({"s2": sensor(10, [f"B{i}" for i in range(10)], 4, 12), "s1": sensor(2, ["VV", "VH"], 6, 15)},
                      rng.integers(1, s + 1, p), rng.uniform(100, 5e4, (p, 4)), ["a", "b", "c", "d"])
    return sets, y


def config(fusion, sensors, n_classes=3):
    return {"fusion": fusion, "sensors": sensors, "channels": {"s2": 10, "s1": 2}, "n_classes": n_classes, "n_geom": 4}


def batch_for(cfg, data, idx=None, rng=None):
    inputs = model_inputs(cfg)
    data = prepare_inputs(data, inputs, "linear")
    norm = {k: channel_statistics(data.sensors[k], data.n_pixels) for k in inputs}
    geom_norm = {"mean": np.zeros(4), "std": np.ones(4)}
    idx = np.arange(len(data)) if idx is None else idx
    return make_batch(data, idx, inputs, norm, geom_norm, 4, rng)


@pytest.mark.parametrize("fusion,sensors", VARIANTS)
def test_every_variant_gives_logits_per_parcel(fusion, sensors):
    data, _ = synthetic(6)
    torch.manual_seed(0)
    model = build_parcel_model(config(fusion, sensors)).eval()
    out = model(batch_for(config(fusion, sensors), data))
    assert out.shape == (6, 3) and torch.isfinite(out).all()


def test_single_sensor_size_matches_the_study():
    n = sum(p.numel() for p in PSETAE(10, 12).parameters())
    assert 140_000 < n < 175_000  # ~164k in the study (BatchNorm and LayerNorm layouts differ slightly)


def test_decision_fusion_averages_the_probabilities_of_two_decoders():
    data, _ = synthetic(5)
    torch.manual_seed(0)
    model = build_parcel_model(config("decision", ["s2", "s1"])).eval()
    b = batch_for(config("decision", ["s2", "s1"]), data)
    out = model(b)
    expected = 0.5 * (torch.softmax(model.s2(b["s2"]), -1) + torch.softmax(model.s1(b["s1"]), -1))
    torch.testing.assert_close(out.exp(), expected, atol=1e-5, rtol=1e-5)
    assert model.s2.decoder is not model.s1.decoder


def test_padding_pixels_and_dates_do_not_change_predictions():
    torch.manual_seed(0)
    net = PSETAE(3, 4).eval()
    x = torch.randn(1, 5, 3, 6)
    days = torch.tensor([[-40.0, 10, 80, 150, 400]])
    inp = SensorInput(x, torch.ones(1, 6, dtype=torch.bool), torch.ones(1, 5, dtype=torch.bool), days, torch.zeros(1, 4))
    padded = SensorInput(torch.cat([torch.cat([x, torch.randn(1, 5, 3, 3)], 3), torch.randn(1, 2, 3, 9)], 1),
                         torch.tensor([[True] * 6 + [False] * 3]), torch.tensor([[True] * 5 + [False] * 2]),
                         torch.cat([days, torch.tensor([[999.0, 5000.0]])], 1), torch.zeros(1, 4))
    torch.testing.assert_close(net(inp), net(padded), atol=1e-5, rtol=1e-5)


def test_positions_are_real_day_offsets_of_any_range():
    torch.manual_seed(0)
    net = PSETAE(3, 4).eval()
    x = torch.randn(2, 4, 3, 5)
    masks = torch.ones(2, 5, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool)
    a = net(SensorInput(x, *masks, torch.tensor([[-200.0, 0, 200, 900]] * 2), torch.zeros(2, 4)))
    b = net(SensorInput(x, *masks, torch.tensor([[-100.0, 40, 120, 300]] * 2), torch.zeros(2, 4)))
    assert torch.isfinite(a).all() and not torch.allclose(a, b)  # the original's day table overflowed past its size


def test_nearest_unused_alignment_picks_distinct_radar_dates():
    d1 = np.array([0, 6, 12, 18, 24, 30], np.float32)
    d2 = np.array([5, 7, 13, 29], np.float32)
    k = nearest_unused(d1, d2)
    assert list(k) == [1, 2, 3, 5]  # 7: 6 is taken by 5, 12 is the nearest unused; never empty (the original's bug)
    assert len(set(k)) == len(k)
    many = nearest_unused(np.array([0.0, 10.0]), np.array([1.0, 2.0, 9.0]))
    assert len(many) == 3  # more optical than radar dates: reuse once all are taken


def test_linear_alignment_interpolates_each_pixel():
    data, _ = synthetic(3)
    s1 = data.sensors["s1"]
    v = (s1.days[:, None, None] * np.arange(1, 3)[None, :, None] + np.arange(8)[None, None, :]).astype(np.float32)
    data = data.with_sensor("s1", SensorSets(s1.channels, v, s1.days, s1.offsets))
    out = align_s1_to_s2(data, "linear")
    s2 = data.sensors["s2"]
    for i in range(3):
        d1, d2 = s1.parcel(i)[1], s2.parcel(i)[1]
        inside = (d2 >= d1.min()) & (d2 <= d1.max())
        exp = d2[:, None, None] * np.arange(1, 3)[None, :, None] + np.arange(8)[None, None, :]
        np.testing.assert_allclose(out.parcel(i)[0][inside], exp[inside], rtol=1e-5)
    assert out.values.shape[0] == s2.values.shape[0]


def test_sparse_s2_is_seeded_random_not_the_first_dates():
    data, _ = synthetic(40)
    s2 = data.sensors["s2"]
    a = subsample_dates(data, 0.3, seed=1).sensors["s2"]
    again = subsample_dates(data, 0.3, seed=1).sensors["s2"]
    other = subsample_dates(data, 0.3, seed=2).sensors["s2"]
    np.testing.assert_array_equal(a.days, again.days)
    assert not np.array_equal(a.days, other.days)
    np.testing.assert_array_equal(a.lengths, np.maximum(1, np.round(s2.lengths * 0.3)).astype(int))
    first_k = [np.array_equal(a.parcel(i)[1], s2.parcel(i)[1][: a.lengths[i]]) for i in range(40)]
    assert sum(first_k) < 20
    assert data.sensors["s1"] is subsample_dates(data, 0.3, seed=1).sensors["s1"]


def test_early_season_cut_per_parcel():
    data, _ = synthetic(5)
    cut = cut_until(data, np.array([0, 50, 100, 150, 200]))
    for name in ("s2", "s1"):
        for i, day in enumerate([0, 50, 100, 150, 200]):
            d = cut.sensors[name].parcel(i)[1]
            assert (d <= day).all()
            assert len(d) == (data.sensors[name].parcel(i)[1] <= day).sum()


def test_config_checks():
    check_config("psetae", "tsa", "s1+s2")
    for args in (("psetae", "none", "s1+s2"), ("psetae", "tsa", "s2"), ("psetae", "late", "s1+s2"), ("ltae", "none", "s2")):
        with pytest.raises(ValueError):
            check_config(*args)


@pytest.mark.parametrize("fusion,sensors", [("none", ["s2"]), ("tsa", ["s2", "s1"]), ("decision", ["s2", "s1"])])
def test_training_learns_a_separable_problem(fusion, sensors):
    data, y = synthetic(32, signal=True)
    cfg = config(fusion, sensors, n_classes=2)
    inputs = model_inputs(cfg)
    data = prepare_inputs(data, inputs, "nn")
    norm = {k: channel_statistics(data.sensors[k], data.n_pixels, np.arange(24)) for k in inputs}
    geom_norm = {"mean": np.zeros(4), "std": np.ones(4)}
    torch.manual_seed(0)
    model = build_parcel_model(cfg)
    res = fit_parcels(model, data, y, np.arange(24), inputs, norm, geom_norm, ParcelFitConfig(epochs=15, batch_size=8, sample_pixels=4),
                      2, val_idx=np.arange(24, 32))
    proba = predict_parcel_proba(model, data, inputs, norm, geom_norm)
    assert (proba.argmax(1)[24:] == y[24:]).mean() >= 0.85
    assert res.best_epoch >= 1 and "val_miou" in res.history[0]
    np.testing.assert_allclose(proba, predict_parcel_proba(model, data, inputs, norm, geom_norm))  # deterministic
