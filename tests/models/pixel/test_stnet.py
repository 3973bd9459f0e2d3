"""Tests of STNet: shapes, padding/permutation invariance, cloud weights, learning."""

import copy
import json
import time

import pytest
import torch

from cropmap.models.pixel.stnet import STNet, STNetConfig, cloud_weights

BANDS = ["B02", "B03", "B04", "B08", "B11", "B12", "VV", "VH"]
OPTICAL = slice(0, 6)
RADAR = slice(6, 8)
# Plausible reflectance / dB statistics for the z-score.
MEAN = [0.05, 0.08, 0.07, 0.30, 0.20, 0.12, -12.0, -18.0]
STD = [0.03, 0.03, 0.04, 0.10, 0.06, 0.05, 3.0, 3.0]


def make_model(**kw):
    torch.manual_seed(0)
    return STNet(len(BANDS), 3, band_names=BANDS, mean=MEAN, std=STD, **kw)


def normalise(raw):
    return (raw - torch.tensor(MEAN)) / torch.tensor(STD)


def random_batch(B=4, T=12, seed=0):
    """A batch in the cropmap convention with mixed S1/S2 dates and end padding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, len(BANDS), generator=g)
    is_s2 = torch.rand(B, T, generator=g) < 0.6
    present = torch.zeros(B, T, len(BANDS), dtype=torch.bool)
    present[..., OPTICAL] = is_s2.unsqueeze(-1)
    present[..., RADAR] = (~is_s2).unsqueeze(-1)
    lengths = torch.randint(3, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    present &= mask.unsqueeze(-1)
    x = torch.where(present, x, torch.zeros_like(x))
    days = torch.rand(B, T, generator=g) * 480 - 150
    return x, present, days, mask


def test_output_shape_and_encode():
    model = make_model().eval()
    x, present, days, mask = random_batch()
    logits = model(x, present, days, mask)
    assert logits.shape == (4, 3)
    assert torch.isfinite(logits).all()
    assert model.encode(x, present, days, mask).shape == (4, 128)


def test_parameter_count_plausible():
    names = ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]
    model = STNet(10, 21, band_names=names, mean=[0.1] * 10, std=[0.05] * 10)
    n = sum(p.numel() for p in model.parameters())
    print(f"STNet parameters (10 bands, 21 classes): {n}")
    assert 80_000 <= n <= 200_000


def test_padding_invariance_with_garbage():
    model = make_model().eval()
    x, present, days, mask = random_batch()
    ref = model(x, present, days, mask)
    B, T, C = x.shape
    extra = 5
    g = torch.Generator().manual_seed(1)
    x2 = torch.cat([x, torch.randn(B, extra, C, generator=g) * 100], dim=1)
    x2[:, -1, 0] = float("nan")
    present2 = torch.cat([present, torch.rand(B, extra, C, generator=g) < 0.5], dim=1)
    days2 = torch.cat([days, torch.randn(B, extra, generator=g) * 1e4], dim=1)
    mask2 = torch.cat([mask, torch.zeros(B, extra, dtype=torch.bool)], dim=1)
    # Garbage also in the padding that already existed.
    pad = ~mask2
    x2[pad] = 55.0
    present2[pad] = True
    days2[pad] = -999.0
    out = model(x2, present2, days2, mask2)
    assert torch.allclose(out, ref, atol=1e-5)


def test_padding_does_not_pollute_batchnorm_statistics():
    model_a = make_model().train()
    model_b = copy.deepcopy(model_a)
    x, present, days, mask = random_batch()
    B, T, C = x.shape
    x2 = torch.cat([x, torch.full((B, 4, C), 50.0)], dim=1)
    present2 = torch.cat([present, torch.ones(B, 4, C, dtype=torch.bool)], dim=1)
    days2 = torch.cat([days, torch.zeros(B, 4)], dim=1)
    mask2 = torch.cat([mask, torch.zeros(B, 4, dtype=torch.bool)], dim=1)
    model_a(x, present, days, mask)
    model_b(x2, present2, days2, mask2)
    for bn_a, bn_b in zip(model_a.input_mlp, model_b.input_mlp):
        if isinstance(bn_a, torch.nn.BatchNorm1d):
            assert torch.allclose(bn_a.running_mean, bn_b.running_mean, atol=1e-6)
            assert torch.allclose(bn_a.running_var, bn_b.running_var, atol=1e-6)


def test_permutation_of_observations_is_invariant():
    model = make_model().eval()
    x, present, days, mask = random_batch(seed=3)
    ref = model(x, present, days, mask)
    xp, pp, dp = x.clone(), present.clone(), days.clone()
    g = torch.Generator().manual_seed(7)
    for b in range(x.shape[0]):
        n = int(mask[b].sum())
        perm = torch.randperm(n, generator=g)
        xp[b, :n], pp[b, :n], dp[b, :n] = x[b, perm], present[b, perm], days[b, perm]
    out = model(xp, pp, dp, mask)
    assert torch.allclose(out, ref, atol=1e-5)


def test_radar_only_sample():
    model = make_model()
    x, present, days, mask = random_batch(B=3)
    present[:] = False
    present[..., RADAR] = mask.unsqueeze(-1)
    x = torch.where(present, x, torch.zeros_like(x))
    w = model.pooling_weights(x, present, mask)
    # No optical observation -> neutral NDVI everywhere -> uniform over real dates.
    expected = mask.float() / mask.float().sum(1, keepdim=True)
    assert torch.allclose(w, expected, atol=1e-6)
    for train in (True, False):
        model.train(train)
        out = model(x, present, days, mask)
        assert torch.isfinite(out).all()


def _clear_and_cloudy():
    # dates: clear vegetated, cloudy (bright visible), dark, radar-only, padding
    refl = torch.tensor(
        [
            [
                [0.03, 0.06, 0.04, 0.40, 0.20, 0.10, 0.0, 0.0],
                [0.45, 0.48, 0.50, 0.55, 0.40, 0.30, 0.0, 0.0],
                [0.02, 0.03, 0.02, 0.08, 0.05, 0.03, 0.0, 0.0],
                [0.00, 0.00, 0.00, 0.00, 0.00, 0.00, 0.1, 0.02],
                [9.00, 9.00, 9.00, 9.00, 9.00, 9.00, 9.0, 9.0],
            ]
        ]
    )
    present = torch.zeros(1, 5, 8, dtype=torch.bool)
    present[0, :3, OPTICAL] = True
    present[0, 3, RADAR] = True
    present[0, 4] = True
    mask = torch.tensor([[True, True, True, True, False]])
    return refl, present, mask


def test_cloud_weights_prefer_clear_vegetated_dates():
    refl, present, mask = _clear_and_cloudy()
    w = cloud_weights(refl, present, mask, BANDS)[0]
    clear, cloudy, dark, radar, pad = w.tolist()
    assert clear > radar > cloudy
    assert dark == pytest.approx(cloudy)  # both flagged: NDVI = -1
    assert pad == 0.0
    assert w.sum().item() == pytest.approx(1.0)
    ndvi_clear = (0.40 - 0.04) / 0.44
    assert clear / cloudy == pytest.approx(torch.tensor(ndvi_clear + 1).exp().item(), rel=1e-4)


def test_cloud_flag_skipped_when_band_missing():
    refl, present, mask = _clear_and_cloudy()
    present[0, 1, 0] = False  # blue missing on the cloudy date: cannot flag it
    w = cloud_weights(refl, present, mask, BANDS)[0]
    ndvi = (0.55 - 0.50) / 1.05
    # Unflagged -> weight follows its (low but positive) NDVI, not -1.
    assert w[1] / w[3] == pytest.approx(torch.tensor(ndvi).exp().item(), rel=1e-4)


def test_cloud_weights_nir_fallback_and_uniform_without_red_nir():
    refl, present, mask = _clear_and_cloudy()
    names_8a = ["B02", "B03", "B04", "B8A", "B11", "B12", "VV", "VH"]
    assert torch.allclose(
        cloud_weights(refl, present, mask, names_8a), cloud_weights(refl, present, mask, BANDS)
    )
    radar_names = ["X1", "X2", "X3", "X4", "X5", "X6", "VV", "VH"]
    w = cloud_weights(refl, present, mask, radar_names)[0]
    assert torch.allclose(w, torch.tensor([0.25, 0.25, 0.25, 0.25, 0.0]))


def test_model_weights_denormalise():
    model = make_model()
    refl, present, mask = _clear_and_cloudy()
    x = torch.where(present, normalise(refl), torch.zeros_like(refl))
    w_model = model.pooling_weights(x, present, mask)
    w_direct = cloud_weights(refl, present, mask, BANDS)
    assert torch.allclose(w_model, w_direct, atol=1e-5)
    mean_model = make_model(pooling="mean")
    w_mean = mean_model.pooling_weights(x, present, mask)
    assert torch.allclose(w_mean, torch.tensor([[0.25, 0.25, 0.25, 0.25, 0.0]]))


def test_eval_deterministic_and_train_backpropagates():
    model = make_model()
    x, present, days, mask = random_batch(B=8)
    model.eval()
    a = model.encode(x, present, days, mask)
    b = model.encode(x, present, days, mask)
    assert torch.equal(a, b)
    model.train()
    out = model(x, present, days, mask)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def _seasonal_dataset(n=64, T=20, seed=0):
    """Two classes whose NDVI peaks at day 120 vs day 230; one S1 date in four."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    days = torch.rand(n, T, generator=g) * 360 - 30
    peak = torch.where(y == 0, 120.0, 230.0).unsqueeze(1)
    green_up = torch.exp(-(((days - peak) / 35.0) ** 2))
    noise = lambda: torch.randn(n, T, generator=g) * 0.01  # noqa: E731
    raw = torch.stack(
        [
            0.04 + noise(),
            0.07 + noise(),
            0.09 - 0.06 * green_up + noise(),
            0.20 + 0.35 * green_up + noise(),
            0.22 + noise(),
            0.13 + noise(),
            -12.0 + 2.0 * torch.randn(n, T, generator=g),
            -18.0 + 2.0 * torch.randn(n, T, generator=g),
        ],
        dim=-1,
    )
    is_s2 = torch.rand(n, T, generator=g) < 0.75
    present = torch.zeros(n, T, len(BANDS), dtype=torch.bool)
    present[..., OPTICAL] = is_s2.unsqueeze(-1)
    present[..., RADAR] = (~is_s2).unsqueeze(-1)
    lengths = torch.randint(12, T + 1, (n,), generator=g)
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    present &= mask.unsqueeze(-1)
    x = torch.where(present, normalise(raw), torch.zeros_like(raw))
    return x, present, days, mask, y


def test_overfits_tiny_seasonal_dataset():
    torch.manual_seed(0)
    x, present, days, mask, y = _seasonal_dataset()
    model = STNet(len(BANDS), 2, band_names=BANDS, mean=MEAN, std=STD)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    start = time.perf_counter()
    for step in range(300):
        model.train()
        loss = torch.nn.functional.cross_entropy(model(x, present, days, mask), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 24:
            model.eval()
            with torch.no_grad():
                acc = (model(x, present, days, mask).argmax(1) == y).float().mean().item()
            if acc > 0.95:
                break
    print(f"overfit: step {step + 1}, acc {acc:.3f}, {time.perf_counter() - start:.1f}s")
    assert acc > 0.95


def test_eval_no_grad_batch_of_one():
    model = make_model().eval()
    x, present, days, mask = random_batch(B=1, T=9)
    with torch.no_grad():
        out = model(x, present, days, mask)
    assert out.shape == (1, 3)
    assert torch.isfinite(out).all()


def test_config_roundtrip_json():
    model = make_model(pooling="mean", dropout=0.1)
    text = json.dumps(model.config.to_dict())
    cfg = STNetConfig.from_dict(json.loads(text))
    assert cfg == model.config
    clone = STNet.from_config(cfg)
    clone.load_state_dict(model.state_dict())
    model.eval()
    clone.eval()
    x, present, days, mask = random_batch()
    assert torch.allclose(model(x, present, days, mask), clone(x, present, days, mask))
    with pytest.raises(ValueError):
        STNetConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_constructor_validation():
    with pytest.raises(ValueError):
        STNet(8, 3, band_names=BANDS[:7], mean=MEAN, std=STD)
    with pytest.raises(ValueError):
        STNet(8, 3, band_names=BANDS, mean=MEAN, std=STD, pooling="max")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_matches_cpu():
    model = make_model().eval()
    x, present, days, mask = random_batch()
    ref = model(x, present, days, mask)
    model = model.cuda()
    with torch.no_grad():
        out = model(x.cuda(), present.cuda(), days.cuda(), mask.cuda()).cpu()
    assert torch.allclose(out, ref, atol=1e-4)


@pytest.mark.parametrize("norm_first,activation", [(False, "relu"), (True, "gelu")])
def test_encoder_layer_eval_equals_the_module(norm_first, activation):
    from cropmap.models.pixel.stnet import encoder_layer_eval

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 48, batch_first=True, norm_first=norm_first, activation=activation).eval()
    x = torch.randn(6, 9, 32)
    pad = torch.arange(9)[None, :] >= torch.tensor([9, 3, 5, 9, 1, 7])[:, None]
    with torch.inference_mode():
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            want = layer(x, src_key_padding_mask=pad)
            want_full = layer(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
        got, got_full = encoder_layer_eval(layer, x, pad), encoder_layer_eval(layer, x, None)
    real = ~pad
    assert torch.allclose(got[real], want[real], atol=1e-5)
    assert torch.allclose(got_full, want_full, atol=1e-5)


def test_eval_fast_path_equals_the_module_path():
    """Inside predict_views (eval_fast): the batch-first layer, no boolean indexing without padding; = the module path."""
    from cropmap.models.inference import eval_fast, eval_fast_path

    model = make_model().eval()
    with torch.no_grad():
        model.decoder[-1].weight.mul_(50.0)  # outputs that vary from sample to sample
    padded = random_batch(B=16, T=12, seed=3)
    x, present, days, _ = random_batch(B=16, T=12, seed=4)
    full = (x, present, days, torch.ones(16, 12, dtype=torch.bool))
    with torch.inference_mode():
        assert not eval_fast_path()  # predict_proba and training never take the shortcut
        want = [model(*b) for b in (padded, full)]
        with eval_fast():
            got = [model(*b) for b in (padded, full)]
    for g, w in zip(got, want):
        assert w.std() > 0.1
        assert torch.allclose(g, w, atol=1e-4, rtol=1e-5)
