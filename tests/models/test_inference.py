"""Vectorised views equal the reference per-pixel views; the prefetcher keeps order and passes errors on."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from cropmap.models.inference import Prefetcher, dense_views, predict_views
from cropmap.models.registry import build_model
from cropmap.models.series import Series, interleaved_views, pad_batch
from cropmap.models.training import predict_proba


def random_dense(p=40, u=30, c=3, seed=0):
    rng = np.random.default_rng(seed)
    dense = rng.normal(size=(p, u, c)).astype(np.float32)
    dense[rng.random((p, u, c)) < 0.2] = np.nan  # missing bands
    dense[rng.random((p, u)) < 0.4] = np.nan  # missing dates
    dense[3] = np.nan  # a pixel never observed
    days = np.sort(rng.choice(365, u, replace=False)).astype(np.float32)
    return dense, days


def as_series(dense, days):
    obs = ~np.isnan(dense).all(2)
    lengths = obs.sum(1)
    return Series(dense[obs], np.broadcast_to(days, obs.shape)[obs].astype(np.float32), np.concatenate([[0], np.cumsum(lengths)]))


@pytest.mark.parametrize("max_len", [4, 7, 100])
def test_views_are_the_interleaved_views_padded_and_normalised(max_len):
    dense, days = random_dense()
    mean, std = np.array([0.5, -1, 2], np.float32), np.array([2, 0.5, 1], np.float32)
    v = dense_views(dense, days, max_len, mean, std)
    s = as_series(dense, days)
    assert list(np.diff(v.lengths) >= 0) == [True] * (len(v) - 1)  # sorted by length
    assert v.lengths.max() <= max_len
    got = {}
    for i in range(len(v)):
        n = v.lengths[i]
        assert v.mask[i, :n].all() and not v.mask[i, n:].any()
        got.setdefault(int(v.owner[i]), []).append((v.x[i, :n], v.present[i, :n], v.days[i, :n]))
    assert 3 not in got
    for p in range(len(s)):
        views = interleaved_views(int(s.lengths[p]), max_len) if s.lengths[p] else []
        want = [pad_batch(s, [s.offsets[p] + view], mean, std) for view in views]
        assert len(got.get(p, [])) == len(want)
        for (x, present, d), w in zip(sorted(got.get(p, []), key=lambda t: t[2][0]), sorted(want, key=lambda b: float(b["days"][0, 0]))):
            np.testing.assert_array_equal(x, w["x"][0].numpy())
            np.testing.assert_array_equal(present, w["present"][0].numpy())
            np.testing.assert_array_equal(d, w["days"][0].numpy())


def test_predict_views_equals_predict_proba():
    dense, days = random_dense(p=60, u=40)
    mean, std = np.zeros(3, np.float32), np.ones(3, np.float32)
    torch.manual_seed(0)
    model, _ = build_model("stnet", bands=["B04", "B08", "VV"], n_classes=4, mean=[0.0] * 3, std=[1.0] * 3)
    model.eval()
    s = as_series(dense, days)
    keep = s.lengths > 0
    ref = predict_proba(model, s, mean, std, 8)
    got = predict_views(model, dense_views(dense, days, 8, mean, std), batch_size=13)
    np.testing.assert_allclose(got[keep], ref[keep], atol=1e-5)
    assert (got[~keep] == 0).all()


def test_prefetcher_keeps_order_runs_ahead_and_reraises():
    seen = []
    with Prefetcher(range(20), lambda i: (seen.append(threading.current_thread().name), i * i)[1], depth=2) as pf:
        assert list(pf) == [i * i for i in range(20)]
    assert set(seen) == {"cropmap-prefetch"}

    def boom(i):
        if i == 3:
            raise ValueError("bad block 3")
        return i

    out = []
    with pytest.raises(ValueError, match="bad block 3"), Prefetcher(range(10), boom) as pf:
        for r in pf:
            out.append(r)
    assert out == [0, 1, 2]
