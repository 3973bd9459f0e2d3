"""MoCo pre-training: view transforms, queue and momentum mechanics, validation side effects, learning."""

import copy

import numpy as np
import pytest
import torch

from cropmap.models.pretrain.moco import (
    DateNoise,
    DropDates,
    MoCo,
    MoCoConfig,
    Resample,
    TemporalShift,
    _validate,
    effective_queue,
    pretrain_moco,
    sits_moco_views,
)
from cropmap.models.registry import build_model
from cropmap.models.series import Series, band_statistics

BANDS = ["B04", "B08", "VV"]


def synthetic(n=96, seed=0):
    """Two phenologies (NDVI peak at day 120 or 200), irregular dates, radar-only dates."""
    rng = np.random.default_rng(seed)
    vals, days, lengths = [], [], []
    for i in range(n):
        t = np.sort(rng.choice(np.arange(-60, 300, 5), size=rng.integers(15, 40), replace=False)).astype(np.float32)
        ndvi = 0.2 + 0.6 * np.exp(-((t - (120 if i % 2 else 200)) / 40) ** 2)
        red = 0.08 * (1 - ndvi) + rng.normal(0, 0.005, len(t))
        nir = red * (1 + ndvi) / (1 - ndvi)
        v = np.stack([red, nir, -12 + 3 * ndvi + rng.normal(0, 0.5, len(t))], 1).astype(np.float32)
        v[rng.random(len(t)) < 0.3, :2] = np.nan
        vals.append(v), days.append(t), lengths.append(len(t))
    return Series(np.concatenate(vals), np.concatenate(days), np.concatenate([[0], np.cumsum(lengths)]))


def encoder(series, name="stnet"):
    torch.manual_seed(0)
    mean, std = band_statistics(series)
    model, _ = build_model(name, bands=BANDS, n_classes=1, mean=mean.tolist(), std=std.tolist())
    return model, mean, std


def test_temporal_shift_rolls_values_and_keeps_dates():
    rows = np.arange(10, 20)
    shifted = []
    rng = np.random.default_rng(0)
    for _ in range(200):
        v, d = TemporalShift(p=1.0)(rows, rows, rng)
        assert list(d) == list(rows) and sorted(v) == list(rows)
        k = int((v[0] - rows[0]) % 10)
        assert k in {0, 1, 2, 3, 4, 5, 6} or (10 - k) <= 6
        shifted.append(k)
    assert len(set(shifted)) > 3  # several shifts are drawn
    v, d = TemporalShift(p=0.0)(rows, rows, rng)
    assert list(v) == list(rows)


def test_drop_and_resample():
    rng = np.random.default_rng(1)
    rows = np.arange(50)
    kept = [len(DropDates(p=0.15)(rows, rows, rng)[0]) for _ in range(400)]
    assert 0.80 < np.mean(kept) / 50 < 0.90
    v, d = DropDates(p=1.0)(rows, rows, rng)
    assert len(v) == 1  # never empty
    v, d = Resample(70)(rows[:20], rows[:20], rng)  # shorter: with replacement, sorted
    assert len(v) == 70 and (np.diff(d) >= 0).all() and set(d) <= set(range(20))
    v, d = Resample(10)(rows, rows, rng)
    assert len(v) == 10 and (np.diff(d) > 0).all()


def test_date_noise_hits_whole_present_dates_only():
    rng = np.random.default_rng(2)
    x = torch.zeros(64, 30, 3)
    present = torch.rand(64, 30, 3) < 0.7
    out = DateNoise(p=0.15).apply({"x": x, "present": present, "days": torch.zeros(64, 30), "mask": torch.ones(64, 30, dtype=torch.bool)}, rng)
    noise = out["x"]
    assert (noise[~present] == 0).all()
    hit = (noise != 0).any(-1)
    assert 0.10 < hit.float().mean() < 0.20
    both = present.all(-1) & hit  # a hit date moves all its present bands by the same signed amount
    assert torch.allclose(noise[both][:, 0], noise[both][:, 1])


def test_views_of_the_same_series_differ_but_keep_its_dates():
    s = synthetic(8)
    mean, std = band_statistics(s)
    rng = np.random.default_rng(0)
    views = sits_moco_views(length=24)
    a = views.make(s, np.arange(8), mean, std, rng)
    b = views.make(s, np.arange(8), mean, std, rng)
    assert a["x"].shape == (8, 24, 3) and a["mask"].all()
    assert not torch.equal(a["x"], b["x"])
    for i in range(8):
        own = set(s.days[s.offsets[i]:s.offsets[i + 1]].tolist())
        assert set(a["days"][i].tolist()) <= own


def test_queue_wraps_and_momentum_moves_keys_towards_queries():
    s = synthetic(16)
    model, _, _ = encoder(s)
    moco = MoCo(model, queue_size=10, momentum=0.9)
    keys = torch.nn.functional.normalize(torch.randn(6, 128), dim=1)
    moco.enqueue(keys)
    moco.enqueue(keys)
    assert int(moco.queue_ptr) == 2
    assert torch.allclose(moco.queue[:2], keys[4:]) and torch.allclose(moco.queue[6:10], keys[:4])
    with torch.no_grad():
        for p in moco.encoder_q.parameters():
            p.add_(1.0)
    before = [p.clone() for p in moco.encoder_k.parameters()]
    moco.momentum_update()
    for b, k, q in zip(before, moco.encoder_k.parameters(), moco.encoder_q.parameters()):
        assert torch.allclose(k, 0.9 * b + 0.1 * q, atol=1e-6)
    assert not any(p.requires_grad for p in moco.encoder_k.parameters())


def test_validation_changes_neither_queue_nor_key_encoder():
    s = synthetic(32)
    model, mean, std = encoder(s)
    moco = MoCo(model, queue_size=64)
    queue, ptr = moco.queue.clone(), int(moco.queue_ptr)
    key_state = copy.deepcopy(moco.encoder_k.state_dict())
    views = sits_moco_views(length=20)
    rng = np.random.default_rng(0)
    pairs = [(views.make(s, np.arange(16), mean, std, rng), views.make(s, np.arange(16), mean, std, rng))]
    out = _validate(moco, pairs, "cpu", amp=False)
    assert out["val_infonce"] > 0 and 0 <= out["val_top1"] <= 1
    assert torch.equal(moco.queue, queue) and int(moco.queue_ptr) == ptr
    for k, v in moco.encoder_k.state_dict().items():
        assert torch.equal(v, key_state[k]), k


def test_queue_is_capped_to_the_data():
    assert effective_queue(MoCoConfig(queue_size=65536, batch_size=512), 12000) == 5632
    assert effective_queue(MoCoConfig(queue_size=1024, batch_size=512), 100000) == 1024
    assert effective_queue(MoCoConfig(queue_size=65536, batch_size=512), 100) == 100


@pytest.mark.parametrize("name", ["stnet", "transformer"])
def test_pretraining_lowers_validation_infonce_and_keeps_the_best_epoch(name):
    s = synthetic(160)
    model, mean, std = encoder(s, name)
    cfg = MoCoConfig(epochs=6, batch_size=32, queue_size=64, momentum=0.9, temperature=0.2, view_length=24, patience=100)
    result = pretrain_moco(model, s, mean, std, cfg)
    hist = result.history
    assert len(hist) == 6 and result.n_val == 16 and result.queue_size == 64
    val = [h["val_infonce"] for h in hist]
    assert min(val) < val[0] - 0.2, val
    assert result.best_epoch == int(np.argmin(val)) + 1


def test_early_stopping_on_validation_infonce():
    s = synthetic(64)
    model, mean, std = encoder(s)
    cfg = MoCoConfig(epochs=50, batch_size=16, queue_size=32, lr=0.0, patience=2, view_length=16)  # lr 0: nothing improves
    result = pretrain_moco(model, s, mean, std, cfg)
    assert len(result.history) < 50 and len(result.history) - result.best_epoch == 2


def test_too_few_series_is_an_error():
    s = synthetic(3)
    model, mean, std = encoder(s)
    with pytest.raises(ValueError, match="at least 4"):
        pretrain_moco(model, s, mean, std, MoCoConfig(epochs=1))


def _batch(s, idx, mean, std):
    from cropmap.models.series import pad_batch

    picks = [np.arange(s.offsets[i], s.offsets[i + 1]) for i in idx]
    return pad_batch(s, picks, mean, std, "cpu")


def test_shuffle_bn_keys_are_unshuffled_and_use_other_batch_statistics():
    from cropmap.models.pretrain.moco import has_batch_norm

    s = synthetic(64)  # 4 sub-batches of MIN_BN_GROUP (16) series
    model, mean, std = encoder(s)
    assert has_batch_norm(model)
    moco = MoCo(model, queue_size=32, shuffle_bn_groups=4)
    batch = _batch(s, np.arange(64), mean, std)
    moco.train()
    moco.encoder_k.eval()  # the shuffled path, but running statistics: un-permuted keys equal the plain ones
    plain = F_normalize_key(moco, batch)
    assert moco._groups(64) == 4 and moco._groups(32) == 2 and moco._groups(16) == 1
    assert torch.allclose(moco.key(batch), plain, atol=1e-5)
    # train mode: each key is normalised with its shuffled sub-batch, each query with its contiguous one
    moco.train()
    torch.manual_seed(1)  # dropout draws alike in every call below
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    k1 = moco.key(batch, generator=g)
    # the key of series i depends only on its own sub-batch of the permutation: change a series outside it
    pos = int(torch.nonzero(perm == 0)[0])  # series 0 sits at position pos of the shuffled batch
    group = set(perm[(pos // 16) * 16:(pos // 16) * 16 + 16].tolist())
    outside = next(i for i in range(64) if i not in group)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["x"][outside] += 3.0
    torch.manual_seed(1)
    k2 = moco.key(changed, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(k1[0], k2[0], atol=1e-5)
    inside = next(i for i in group if i != 0)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["x"][inside] += 3.0
    torch.manual_seed(1)
    k3 = moco.key(changed, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(k1[0], k3[0], atol=1e-4)
    # queries: contiguous sub-batches of 16, so series 0's query ignores series 16..63 but not 1..15
    torch.manual_seed(1)
    q1 = moco.query(batch)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["x"][40] += 3.0
    torch.manual_seed(1)
    assert torch.allclose(moco.query(changed)[0], q1[0], atol=1e-5)
    changed["x"][1] += 3.0
    torch.manual_seed(1)
    assert not torch.allclose(moco.query(changed)[0], q1[0], atol=1e-4)


def F_normalize_key(moco, batch):
    with torch.no_grad():
        return torch.nn.functional.normalize(moco.head_k(moco.encoder_k.encode(**batch)).float(), dim=1)


def test_shuffle_bn_is_off_for_encoders_without_batch_norm_and_when_asked():
    s = synthetic(16)
    lstm, _, _ = encoder(s, "lstm")
    assert MoCo(lstm, queue_size=32, shuffle_bn_groups=4).shuffle_bn_groups == 1
    stnet, _, _ = encoder(s)
    assert MoCo(stnet, queue_size=32, shuffle_bn_groups=1).shuffle_bn_groups == 1
    with pytest.raises(ValueError, match="shuffle_bn_groups"):
        MoCo(stnet, queue_size=32, shuffle_bn_groups=0)
