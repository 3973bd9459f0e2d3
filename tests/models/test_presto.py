"""Presto: the published weights load into our own network and are the right ones (real series),
inputs from long tables (NDVI-only too), both heads, and the boosting baseline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from cropmap.models.boosting import fit_boosting, make_boosting, proba_for_classes
from cropmap.models.forest import binned_features
from cropmap.models.pixel.presto import PrestoClassifier, data_options, embed_series, fit_embed_head
from cropmap.models.pixel.presto_inputs import PrestoInputs, month_offsets, presto_channel, samples_location, window_for_days
from cropmap.models.pixel.presto_net import (
    CHANNELS,
    GROUPS,
    WEIGHTS_PATH,
    PrestoNet,
    month_table,
    pretrained_net,
    sinusoid_table,
)
from cropmap.models.series import Series, band_statistics, pad_batch
from cropmap.models.training import FitConfig, fit, predict_proba
from cropmap.pipeline.samples import long_table_to_samples, read_long_table
from cropmap.pipeline.train import as_series, class_table, encode_labels

RPG = Path(__file__).resolve().parents[1] / "data" / "rpg2023_dekad_long_60.parquet"


@pytest.fixture(scope="module")
def rpg():
    return read_long_table(RPG)


def _all_obs_batch(series: Series, mean, std):
    picks = [series.offsets[i] + np.arange(series.lengths[i]) for i in range(len(series))]
    return pad_batch(series, picks, mean, std)


def test_published_weights_load_strictly_into_our_network():
    state = load_file(str(WEIGHTS_PATH))
    net = PrestoNet()
    assert set(state) == set(net.state_dict())  # every tensor used, none missing
    net.load_state_dict(state, strict=True)
    assert sum(v.numel() for v in state.values()) == 823_002
    # the fixed tables we compute are the published ones
    assert torch.allclose(sinusoid_table(24, 64), state["encoder.pos_embed"][0], atol=1e-6)
    assert torch.allclose(month_table(32), state["encoder.month_embed.weight"], atol=1e-6)
    assert torch.allclose(month_table(48), state["decoder.month_embed.weight"], atol=1e-6)


def _hide_tokens(missing: torch.Tensor, seed: int, fraction: float = 0.3) -> torch.Tensor:
    """Hide a random ``fraction`` of the observed (month, group) tokens (all channels of a group)."""
    g = torch.Generator().manual_seed(seed)
    hide = torch.zeros_like(missing)
    b, t, _ = missing.shape
    for name, idx in GROUPS:
        if name == "SRTM":
            continue
        h = torch.rand(b, t, generator=g) < fraction
        hide[:, :, list(idx)] = h[..., None]
    return hide & ~missing


def _reconstruction_error(net, inputs, latlon, seeds=(0, 1, 2)) -> float:
    x17, missing, dw, months = inputs
    has = torch.ones(len(x17), dtype=torch.bool)
    errs = []
    for s in seeds:
        hide = _hide_tokens(missing, s)
        with torch.inference_mode():
            out, _ = net(x17, missing | hide, dw, months, latlon, has)
        errs.append(float(((out - x17) ** 2)[hide].mean()))
    return float(np.mean(errs))


def test_masked_reconstruction_with_published_weights_far_below_random(rpg, capsys):
    """Real RPG 2023 series (S2 + S1 monthly composites): hide 30 % of the observed tokens and
    reconstruct them. The published weights must do far better than the same network with random
    weights, better than each sample's own channel means, and better than with the channel-group
    embeddings permuted (checks the group order) or the months shifted (checks the month code)."""
    torch.manual_seed(0)
    series = as_series(rpg)
    mean, std = band_statistics(series)
    first, n = window_for_days(series.days)
    inputs = PrestoInputs(rpg.bands, mean, std, first, n)(**_all_obs_batch(series, mean, std))
    loc = samples_location(rpg.table)
    latlon = torch.tensor([loc] * len(series), dtype=torch.float32)
    pre = pretrained_net()
    e_pre = _reconstruction_error(pre, inputs, latlon)
    e_rnd = _reconstruction_error(PrestoNet().eval(), inputs, latlon)

    x17, missing, dw, months = inputs
    base = []
    for s in (0, 1, 2):
        hide = _hide_tokens(missing, s)
        vis = ~(missing | hide)
        m = (x17 * vis).sum(1, keepdim=True) / vis.sum(1, keepdim=True).clamp_min(1)
        base.append(float(((m.expand_as(x17) - x17) ** 2)[hide].mean()))
    e_mean = float(np.mean(base))

    permuted = pretrained_net()
    order = [0, 3, 4, 1, 2, 5, 6, 7, 8, 9]  # RGB/red-edge swapped with the NIR groups
    for emb in (permuted.encoder.channel_embed, permuted.decoder.channel_embeddings):
        emb.weight.data = emb.weight.data[order]
    e_perm = _reconstruction_error(permuted, inputs, latlon)
    e_shift = _reconstruction_error(pre, (x17, missing, dw, (months + 6) % 12), latlon)
    with capsys.disabled():
        print(f"\nPresto masked reconstruction MSE on {len(series)} real RPG series ({n} months, 30 % of tokens hidden): "
              f"published weights {e_pre:.5f}, random weights {e_rnd:.5f}, per-sample channel mean {e_mean:.5f}, "
              f"groups permuted {e_perm:.5f}, months shifted {e_shift:.5f}")
    assert e_pre < e_rnd / 20
    assert e_pre < 0.8 * e_mean
    assert e_pre < e_perm and e_pre < e_shift


def test_band_names_and_months():
    assert [presto_channel(b) for b in ["B02", "B8A", "b11", "VV", "ndvi", "DEM", "SCL", "B01"]] == \
        ["B2", "B8A", "B11", "VV", "NDVI", "elevation", None, None]
    days = np.array([-1, 0, 30, 31, 58, 59, 364, 365, 400])
    assert month_offsets(days).tolist() == [-1, 0, 0, 1, 1, 2, 11, 12, 13]
    assert window_for_days(np.arange(-120, 400, 10)) == (-4, 17)  # September .. January
    assert window_for_days(np.arange(-400, 800, 10))[1] == 24


def test_location_from_utm_and_degrees():
    utm = pd.DataFrame({"x": [500000.0], "y": [5650000.0], "epsg": [32631]})
    lat, lon = samples_location(utm)
    assert abs(lat - 51.0) < 0.1 and abs(lon - 3.0) < 0.01
    deg = pd.DataFrame({"x": [0.1, 0.3], "y": [47.0, 47.2], "epsg": [4326, 4326]})
    assert np.allclose(samples_location(deg), [47.1, 0.2], atol=0.01)
    assert samples_location(pd.DataFrame({"a": [1]})) == []


def _ndvi_only(rpg_df: pd.DataFrame) -> pd.DataFrame:
    out = rpg_df[["sample_id", "date", "label", "x", "y", "epsg"]].copy()
    out["NDVI"] = (rpg_df["B08"] - rpg_df["B04"]) / (rpg_df["B08"] + rpg_df["B04"])
    return out


def test_ndvi_only_table_masks_every_other_channel(rpg):
    samples = long_table_to_samples(_ndvi_only(pd.read_parquet(RPG)))
    series = as_series(samples)
    mean, std = band_statistics(series)
    inp = PrestoInputs(samples.bands, mean, std, *window_for_days(series.days))
    x17, missing, dw, _ = inp(**_all_obs_batch(series, mean, std))
    present = (~missing).any(0).any(0)
    assert present.tolist() == [c == "NDVI" for c in CHANNELS]
    assert (dw == 9).all()
    # the composite NDVI equals the NDVI computed from the S2 composites (same months observed)
    mean2, std2 = band_statistics(as_series(rpg))
    full = PrestoInputs(rpg.bands, mean2, std2, *window_for_days(series.days))(**_all_obs_batch(as_series(rpg), mean2, std2))
    both = ~missing[..., 16] & ~full[1][..., 16]
    corr = np.corrcoef(x17[..., 16][both].numpy(), full[0][..., 16][both].numpy())[0, 1]
    assert corr > 0.97
    model = PrestoClassifier(1, 3, band_names=samples.bands, mean=mean.tolist(), std=std.tolist(),
                             **data_options(series.days, samples.table))
    emb = model.encode(**_all_obs_batch(series, mean, std))
    assert emb.shape == (len(series), 128) and torch.isfinite(emb).all()


def test_presto_fine_tunes_through_the_training_loop(rpg):
    torch.manual_seed(0)
    classes = class_table(rpg, np.arange(len(rpg)))
    y = encode_labels(rpg, classes)
    series = as_series(rpg)
    mean, std = band_statistics(series)
    model = PrestoClassifier(len(rpg.bands), len(classes), band_names=rpg.bands, mean=mean.tolist(), std=std.tolist(),
                             **data_options(series.days, rpg.table))
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    result = fit(model, series, y, mean, std, FitConfig(epochs=2, batch_size=16, lr=3e-4, max_len=48, seed=0), n_classes=len(classes))
    assert len(result.history) == 2 and np.isfinite(result.history[-1]["train_loss"])
    changed = [k for k, v in model.encoder.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("blocks.") for k in changed)  # the encoder is fine-tuned, not frozen
    assert torch.equal(model.encoder.pos_embed, before["pos_embed"])  # fixed codes stay fixed
    proba = predict_proba(model, series, mean, std, 48)
    assert proba.shape == (len(series), len(classes)) and np.allclose(proba.sum(1), 1, atol=1e-4)


def test_presto_embed_head_round_trips_through_safetensors(rpg, tmp_path):
    from safetensors.torch import save_file

    classes = class_table(rpg, np.arange(len(rpg)))
    y = encode_labels(rpg, classes)
    series = as_series(rpg)
    mean, std = band_statistics(series)
    model = PrestoClassifier(len(rpg.bands), len(classes), band_names=rpg.bands, mean=mean.tolist(), std=std.tolist(),
                             head="boosting", **data_options(series.days, rpg.table))
    emb = embed_series(model, series, mean, std)
    assert embed_series(model, series, mean, std) is emb  # cached
    info = fit_embed_head(model, series, y, mean, std, seed=0, n_jobs=1, boosting_options={"n_estimators": 50})
    assert info["head_bytes"] == model.config.head_bytes > 0
    proba = predict_proba(model, series, mean, std, 512)
    assert (proba.argmax(1) == y).mean() > 0.9  # fits its own training set
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    again = PrestoClassifier.from_config(model.config.to_dict())
    again.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    assert np.allclose(predict_proba(again, series, mean, std, 512), proba, atol=1e-6)


def test_boosting_baseline_on_forest_features(rpg):
    classes = class_table(rpg, np.arange(len(rpg)))
    y = encode_labels(rpg, classes)
    X = binned_features(as_series(rpg))
    assert np.isnan(X).any()  # empty monthly bins stay NaN, routed natively
    clf = make_boosting(0, n_jobs=1, n_estimators=30).fit(X, y)
    p = proba_for_classes(clf, X, len(classes))
    assert p.shape == (len(y), len(classes)) and (p.argmax(1) == y).mean() > 0.9
    tr, va = np.arange(0, 60, 2), np.arange(1, 60, 2)
    es = fit_boosting(X[tr], y[tr], X[va], y[va], seed=0, n_jobs=1, early_stopping_rounds=5)
    assert 1 <= es.best_iteration_ <= 300
