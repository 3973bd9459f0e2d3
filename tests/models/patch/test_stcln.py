"""STCLN (windowed STA), U-TAE, masked pre-training and the patch training loop, on tiny tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cropmap.models.patch.checkpoint import build_patch_model, load_patch_model, load_patch_weights, save_patch_encoder, save_patch_model
from cropmap.models.patch.stcln import window_attention
from cropmap.models.patch.training import PatchFitConfig, fit_patches, predict_patch_proba
from cropmap.models.pretrain.masked import MaskedConfig, masked_cells, masked_loss, pretrain_masked

BANDS = ["B04", "B08", "VV"]
TINY = {"conv_dim": 8, "d_model": 16, "n_heads": 2, "n_layers": 1, "d_ff": 32, "sta_dim": 2, "sta_window": 4}
TINY_UTAE = {"encoder_widths": [8, 8, 16], "decoder_widths": [8, 8, 16], "n_heads": 2, "d_model": 16, "d_k": 4}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def batch(b=2, t=5, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, t, len(BANDS), h, w, generator=g)
    days = torch.arange(t, dtype=torch.float32)[None].repeat(b, 1) * 20.0 - 30.0
    valid = torch.rand(b, t, h, w, generator=g) > 0.2
    return x, days, valid


def model(name="stcln", n_classes=3, **kw):
    torch.manual_seed(0)
    opts = {**(TINY if name == "stcln" else TINY_UTAE), **kw}
    m, _ = build_patch_model(name, bands=BANDS, n_classes=n_classes, mean=[0.5] * 3, std=[0.3] * 3, **opts)
    return m.eval()


@pytest.mark.parametrize("name", ["stcln", "utae"])
def test_shapes_gradients_and_nan_inputs(name):
    m = model(name).train()
    x, days, valid = batch(h=10, w=6)  # not a multiple of the window / of 2^levels
    x[0, 1, :, 2, 3] = float("nan")
    out = m(x, days, valid)
    assert out.shape == (2, 3, 10, 6) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if p.requires_grad and n not in ("mask_token", "recon.weight", "recon.bias"))


def test_sta_gamma_starts_at_zero():
    assert float(model().decoder.gamma.detach()) == 0.0


def test_window_attention_equals_full_attention_when_the_window_covers_the_patch():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, c, 5, 6, generator=g) for c in (3, 3, 4))
    out = window_attention(q, k, v, window=8)
    qf, kf, vf = q.flatten(2)[0].T, k.flatten(2)[0].T, v.flatten(2)[0].T
    full = torch.softmax(qf @ kf.T / math.sqrt(3), -1) @ vf
    torch.testing.assert_close(out[0].flatten(1).T, full, rtol=1e-5, atol=1e-5)


def test_window_attention_is_local_and_aligned_on_the_global_grid():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 8, 8, generator=g) for _ in range(3))
    base = window_attention(q, k, v, window=4)
    v2 = v.clone()
    v2[:, :, 6, 6] += 10.0  # a pixel of the bottom-right window
    out = window_attention(q, k, v2, window=4)
    assert torch.equal(out[:, :, :4, :4], base[:, :, :4, :4])  # another window: unchanged
    assert not torch.equal(out[:, :, 4:, 4:], base[:, :, 4:, 4:])
    # the same pixels seen from a patch starting at (2, 2): windows stay on the global grid
    sub = window_attention(q[:, :, 2:, 2:], k[:, :, 2:, 2:], v[:, :, 2:, 2:], window=4, origin=(2, 2))
    torch.testing.assert_close(sub[:, :, 2:, 2:], base[:, :, 4:, 4:])


def test_real_day_offsets_matter_and_invalid_dates_are_ignored():
    m = model()
    x, days, valid = batch()
    valid[:, 2] = False  # one date invalid everywhere
    ref = m(x, days, valid)
    x2 = x.clone()
    x2[:, 2] = 123.0
    torch.testing.assert_close(m(x2, days, valid), ref)
    assert not torch.allclose(m(x, days + 40.0, valid), ref)  # dates, not positions


def test_utae_ignores_invalid_dates():
    m = model("utae")
    x, days, valid = batch()
    valid[:, 3] = False
    ref = m(x, days, valid)
    x2 = x.clone()
    x2[:, 3] = -50.0
    torch.testing.assert_close(m(x2, days, valid), ref)


def test_masked_cells_respect_ratio_validity_and_the_vegetation_gate():
    valid = torch.ones(4, 10, 16, 16, dtype=torch.bool)
    valid[:, :, :4] = False
    veg = torch.full((4, 10), 0.95)
    veg[:, 5:] = 0.5
    veg[:, 9] = float("nan")
    g = torch.Generator().manual_seed(0)
    m = masked_cells(valid, veg, 0.4, None, g)
    assert not (m & ~valid).any()
    assert abs(float(m[valid].float().mean()) - 0.4) < 0.03
    gated = masked_cells(valid, veg, 0.4, 0.9, g)
    assert gated[:, :5].any() and not gated[:, 5:].any()  # unvegetated and unknown dates never masked


def test_masked_loss_counts_masked_observed_cells_only():
    m = model()
    x, days, valid = batch()
    none = torch.zeros_like(valid)
    assert float(masked_loss(m, x, days, valid, none)) == 0.0
    mask = torch.zeros_like(valid)
    mask[:, 1, 2, 2] = True
    x[:, 1, :, 2, 2] = float("nan")  # masked but not observed: nothing to reconstruct
    assert float(masked_loss(m, x, days, valid, mask)) == 0.0
    mask[:, 1, 3, 3] = True
    assert float(masked_loss(m, x, days, valid, mask)) > 0


def test_masked_pretraining_learns_and_keeps_the_best_epoch():
    rng = np.random.default_rng(0)
    n, t = 6, 4
    # smooth fields: each band is a constant per patch, so masked cells are predictable from neighbours
    base = rng.random((n, 1, 3, 1, 1)).astype(np.float32)
    x = np.broadcast_to(base, (n, t, 3, 8, 8)).copy()
    valid = np.ones((n, t, 8, 8), bool)
    days = np.tile(np.arange(t, dtype=np.float32) * 30, (n, 1))
    veg = np.ones((n, t), np.float32)
    m = model().train()
    res = pretrain_masked(m, x, days, valid, veg, MaskedConfig(epochs=8, batch_size=2, lr=3e-3, val_fraction=0.34, augment=False))
    hist = [r["val_mse"] for r in res.history]
    assert min(hist) < hist[0] and res.best_epoch == int(np.argmin(hist)) + 1


def test_fit_learns_a_spatial_pattern_and_ignores_void(tmp_path):
    rng = np.random.default_rng(0)
    n, t = 8, 3
    y = np.zeros((n, 8, 8), np.int64)
    y[:, :, 4:] = 1
    x = rng.normal(0.5, 0.05, (n, t, 3, 8, 8)).astype(np.float32)
    x[:, :, 0] += 0.4 * y[:, None]  # class 1 is bright in band 0
    y[:, 0, :] = -1  # void row
    valid = np.ones((n, t, 8, 8), bool)
    days = np.tile(np.arange(t, dtype=np.float32) * 30, (n, 1))
    m = model(n_classes=2).train()
    fit_patches(m, x, days, valid, y, 2, PatchFitConfig(epochs=15, batch_size=4, lr=3e-3, augment=True))
    proba = predict_patch_proba(m, x, days, valid)
    keep = y >= 0
    assert (proba.argmax(1)[keep] == y[keep]).mean() > 0.9
    with pytest.raises(ValueError, match="no labelled pixel"):
        fit_patches(m, x, days, valid, np.full_like(y, -1), 2, PatchFitConfig(epochs=1))


def test_checkpoint_round_trip_and_encoder_weights(tmp_path):
    m = model()
    x, days, valid = batch()
    meta = {"model": "stcln", "model_config": {**m.config.to_dict()}, "bands": BANDS,
            "normalisation": {"mean": [0.5] * 3, "std": [0.3] * 3}, "classes": []}
    (tmp_path / "m").mkdir()
    save_patch_model(tmp_path / "m", m, meta)
    back, _ = load_patch_model(tmp_path / "m")
    torch.testing.assert_close(back(x, days, valid), m(x, days, valid))
    (tmp_path / "e").mkdir()
    save_patch_encoder(tmp_path / "e", m, {k: v for k, v in meta.items() if k != "classes"})
    state, emeta = load_patch_weights(tmp_path / "e")
    assert emeta["level"] == "patch" and not any(k.startswith("decoder.") for k in state) and "mask_token" in state
    with pytest.raises(ValueError, match="encoder"):
        load_patch_model(tmp_path / "e")


def test_bad_options_are_rejected():
    with pytest.raises(TypeError, match="unknown option"):
        build_patch_model("stcln", bands=BANDS, n_classes=2, mean=[0] * 3, std=[1] * 3, heads=3)
    with pytest.raises(ValueError, match="multiple of n_heads"):
        build_patch_model("stcln", bands=BANDS, n_classes=2, mean=[0] * 3, std=[1] * 3, d_model=10, n_heads=4)
