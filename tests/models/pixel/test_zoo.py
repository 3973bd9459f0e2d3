"""Every registered network: batch convention, padding invariance, config round-trip, learning."""

import copy
import json
import time

import pytest
import torch
from conftest import seasonal_series as synthetic

from cropmap.models.registry import build_model, fitted_without_gradients, model_from_config, model_names
from cropmap.models.series import band_statistics
from cropmap.models.training import FitConfig, fit, predict_proba

BANDS = ["B02", "B03", "B04", "B08", "B11", "B12", "VV", "VH"]
OPTICAL = slice(0, 6)
RADAR = slice(6, 8)
MEAN = [0.05, 0.08, 0.07, 0.30, 0.20, 0.12, -12.0, -18.0]
STD = [0.03, 0.03, 0.04, 0.10, 0.06, 0.05, 3.0, 3.0]

NAMES = [n for n in model_names("pixel") if n not in fitted_without_gradients()]  # tests/models/pixel/test_{presto,trees}.py
ZOO = [n for n in NAMES if n != "stnet"]
ORDER_FREE = ["stnet", "transformer", "ltae"]  # set models: dates have no order but their day


def make(name, n_classes=3, **options):
    torch.manual_seed(0)
    model, cfg = build_model(name, bands=BANDS, n_classes=n_classes, mean=MEAN, std=STD, **options)
    return model, cfg


def embed_dim(model):
    return getattr(model, "embed_dim", None) or model.config.d_model


def random_batch(B=5, T=12, seed=0, min_len=3):
    """A batch in the cropmap convention with mixed S1/S2 dates and end padding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, len(BANDS), generator=g)
    is_s2 = torch.rand(B, T, generator=g) < 0.6
    present = torch.zeros(B, T, len(BANDS), dtype=torch.bool)
    present[..., OPTICAL] = is_s2.unsqueeze(-1)
    present[..., RADAR] = (~is_s2).unsqueeze(-1)
    lengths = torch.randint(min_len, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    present &= mask.unsqueeze(-1)
    x = torch.where(present, x, torch.zeros_like(x))
    days = torch.rand(B, T, generator=g) * 480 - 150
    return x, present, days, mask


def with_garbage_padding(x, present, days, mask, extra=5, seed=1):
    """The same batch with ``extra`` more padded dates; all padding holds garbage and NaN."""
    B, T, C = x.shape
    g = torch.Generator().manual_seed(seed)
    x2 = torch.cat([x, torch.randn(B, extra, C, generator=g) * 100], dim=1)
    present2 = torch.cat([present, torch.rand(B, extra, C, generator=g) < 0.5], dim=1)
    days2 = torch.cat([days, torch.randn(B, extra, generator=g) * 1e4], dim=1)
    mask2 = torch.cat([mask, torch.zeros(B, extra, dtype=torch.bool)], dim=1)
    pad = ~mask2
    x2[pad] = 55.0
    x2[:, -1, 0] = float("nan")
    present2[pad] = True
    days2[pad] = -999.5
    return x2, present2, days2, mask2


def no_dropout(model):
    """Switch every dropout off, so train-mode outputs are deterministic."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(m, (torch.nn.LSTM, torch.nn.MultiheadAttention)):
            m.dropout = 0.0
    if hasattr(model, "weight_dropout"):
        model.weight_dropout = 0.0
    return model


@pytest.mark.parametrize("name", NAMES)
def test_shapes_finite_and_encode(name):
    model, _ = make(name)
    x, present, days, mask = random_batch()
    model.eval()
    with torch.no_grad():
        logits = model(x, present, days, mask)
        z = model.encode(x, present, days, mask)
        assert logits.shape == (5, 3) and torch.isfinite(logits).all()
        assert z.shape == (5, embed_dim(model)) and torch.isfinite(z).all()
        assert torch.allclose(model.decoder(z), logits, atol=1e-6)
    model.train()
    out = model(x, present, days, mask)
    assert out.shape == (5, 3) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", NAMES)
def test_runs_under_bfloat16_autocast(name):
    """Training and prediction autocast to bfloat16 on CUDA; the CPU autocast checks the same dtype plumbing."""
    model, _ = make(name)
    batch = random_batch()
    for train in (True, False):
        model.train(train)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            out = model(*batch)
        assert out.shape == (5, 3) and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("name", NAMES)
def test_padding_invariance_with_garbage(name):
    model, _ = make(name)
    model.eval()
    batch = random_batch()
    with torch.no_grad():
        ref = model(*batch)
        out = model(*with_garbage_padding(*batch))
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()


@pytest.mark.parametrize("name", NAMES)
def test_padding_never_enters_batchnorm_in_training(name):
    model_a, _ = make(name)
    no_dropout(model_a).train()
    model_b = copy.deepcopy(model_a)
    batch = random_batch()
    out_a = model_a(*batch)
    out_b = model_b(*with_garbage_padding(*batch))
    assert torch.allclose(out_a, out_b, atol=1e-4)
    norms_a = [m for m in model_a.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    norms_b = [m for m in model_b.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(norms_a) == len(norms_b)  # (the LSTM has none)
    for a, b in zip(norms_a, norms_b):
        assert torch.allclose(a.running_mean, b.running_mean, atol=1e-5)
        assert torch.allclose(a.running_var, b.running_var, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_unobserved_values_are_ignored(name):
    model, _ = make(name)
    model.eval()
    x, present, days, mask = random_batch(seed=2)
    g = torch.Generator().manual_seed(5)
    noisy = torch.where(present, x, torch.randn(x.shape, generator=g) * 50)
    noisy[~present & mask.unsqueeze(-1)] = float("nan")
    noisy[0, -1] = torch.where(present[0, -1], noisy[0, -1], torch.full_like(noisy[0, -1], float("inf")))
    with torch.no_grad():
        assert torch.allclose(model(noisy, present, days, mask), model(x, present, days, mask), atol=1e-6)


@pytest.mark.parametrize("name", ORDER_FREE)
def test_set_models_ignore_the_order_of_dates(name):
    model, _ = make(name)
    model.eval()
    x, present, days, mask = random_batch(seed=3)
    xp, pp, dp = x.clone(), present.clone(), days.clone()
    g = torch.Generator().manual_seed(7)
    for b in range(x.shape[0]):
        n = int(mask[b].sum())
        perm = torch.randperm(n, generator=g)
        xp[b, :n], pp[b, :n], dp[b, :n] = x[b, perm], present[b, perm], days[b, perm]
    with torch.no_grad():
        assert torch.allclose(model(xp, pp, dp, mask), model(x, present, days, mask), atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trip(name):
    model, cfg = make(name)
    text = json.dumps(cfg)  # plain JSON types only
    clone = model_from_config(name, json.loads(text))
    clone.load_state_dict(model.state_dict())
    model.eval()
    clone.eval()
    batch = random_batch(seed=4)
    with torch.no_grad():
        assert torch.equal(model(*batch), clone(*batch))
    assert clone.config.to_dict() == cfg


@pytest.mark.parametrize("name", NAMES)
def test_single_real_date_rows(name):
    model, _ = make(name)
    x, present, days, mask = random_batch(B=4, T=6)
    mask[:] = False
    mask[:, 0] = True
    present &= mask.unsqueeze(-1)
    x = torch.where(present, x, torch.zeros_like(x))
    for train in (True, False):
        model.train(train)
        out = model(x, present, days, mask)
        assert out.shape == (4, 3) and torch.isfinite(out).all()
    with torch.no_grad():  # batch of one, one date, no padding
        out = model.eval()(x[:1, :1], present[:1, :1], days[:1, :1], mask[:1, :1])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ZOO)
def test_rows_without_any_real_date_do_not_crash(name):
    model, _ = make(name)
    x, present, days, mask = random_batch(B=4)
    mask[1] = False
    present &= mask.unsqueeze(-1)
    for train in (True, False):
        model.train(train)
        out = model(x, present, days, mask)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_invalid_options_and_inputs(name):
    with pytest.raises((TypeError, ValueError)):
        make(name, bogus_option=1)
    with pytest.raises(ValueError):
        make(name, n_classes=0)
    model, _ = make(name)
    x, present, days, mask = random_batch()
    with pytest.raises(ValueError, match="x must be"):
        model(x[..., :-1], present[..., :-1], days, mask)
    with pytest.raises(ValueError, match="days and mask"):
        model(x, present, days[:, :-1], mask)


@pytest.mark.parametrize("name", ZOO)
def test_hyper_parameters_are_validated(name):
    cfg = make(name)[1]
    bad = {k: 0 for k in cfg if k not in ("n_bands", "n_classes", "band_names", "mean", "std") and isinstance(cfg[k], int) and not isinstance(cfg[k], bool)}
    for key in bad:
        if key in ("bottleneck", "first_month", "head_bytes", "grid_days", "grid_start", "grid_end"):
            continue  # 0 means no bottleneck / no regular grid; grid bounds are days (0 is a day); Presto: month 0 is January,
            # an untrained head has 0 bytes
        with pytest.raises(ValueError, match=key):
            make(name, **{key: 0})


def test_parameter_counts_and_options():
    names = ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12", "VV", "VH"]
    counts = {}
    for name in NAMES:
        model, _ = build_model(name, bands=names, n_classes=21, mean=[0.1] * 12, std=[0.05] * 12)
        counts[name] = sum(p.numel() for p in model.parameters())
    print("parameters (12 bands, 21 classes):", counts)
    for name, n in counts.items():
        assert 30_000 <= n <= 600_000, (name, n)
    bi, cfg = build_model("lstm", bands=names, n_classes=21, mean=[0.1] * 12, std=[0.05] * 12, bidirectional=True)
    assert bi.embed_dim == 256 and cfg["bidirectional"] is True
    small, cfg = build_model("inceptiontime", bands=names, n_classes=21, mean=[0.1] * 12, std=[0.05] * 12,
                             kernel_sizes=[9, 5], depth=3, bottleneck=0)
    assert small.embed_dim == 3 * 32 and cfg["kernel_sizes"] == [9, 5]


@pytest.mark.parametrize("name", NAMES)
def test_learns_the_synthetic_seasons(name):
    s, y = synthetic()
    mean, std = band_statistics(s)
    torch.manual_seed(3)
    model, _ = build_model(name, bands=["B04", "B08", "VV"], n_classes=2, mean=mean.tolist(), std=std.tolist())
    start = time.perf_counter()
    fit(model, s, y, mean, std, FitConfig(epochs=15, batch_size=32, max_len=32, seed=3))
    acc = (predict_proba(model, s, mean, std, 32).argmax(1) == y).mean()
    print(f"{name}: training accuracy {acc:.3f} in {time.perf_counter() - start:.1f}s")
    assert acc > 0.85


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_matches_cpu(name):
    model, _ = make(name)
    model.eval()
    batch = random_batch()
    with torch.no_grad():
        ref = model(*batch)
        model = model.cuda()
        out = model(*(t.cuda() for t in batch)).cpu()
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            low = model(*(t.cuda() for t in batch)).float().cpu()
    assert torch.allclose(out, ref, atol=1e-4)
    assert torch.isfinite(low).all()
