import pandas as pd

from cropmap.pipeline.splits import ParcelSplit, parcel_split


def parcels():
    rows = []
    pid = 0
    for label, name, n in [(1, "maize", 13), (2, "cereals", 8), (3, "potatoes", 4), (4, "sugar beet", 1), (5, "grass", 24), (6, "veg", 2)]:
        for _ in range(n):
            pid += 1
            rows.append({"parcel_id": pid, "label": label, "class_name": name})
    return pd.DataFrame(rows)


def test_every_evaluated_class_has_parcels_on_both_sides():
    p = parcels()
    for seed in range(10):
        sp = parcel_split(p, seed, test_fraction=0.3, val_fraction=0.15)
        assert set(sp.assignment) == set(p.parcel_id)
        assert sp.train_only == ["sugar beet"]
        for name, c in sp.parcels_per_class.items():
            if name != "sugar beet":
                assert c["test"] >= 1 and c["train"] >= 1, (seed, name, c)
        assert sp.parcels_per_class["sugar beet"] == {"train": 1, "val": 0, "test": 0}


def test_split_is_seeded_and_round_trips():
    p = parcels()
    a, b, c = parcel_split(p, 0), parcel_split(p, 0), parcel_split(p, 1)
    assert a.assignment == b.assignment
    assert a.assignment != c.assignment
    assert ParcelSplit.from_dict(a.to_dict()).assignment == a.assignment


def test_no_validation_when_asked():
    sp = parcel_split(parcels(), 0, val_fraction=0.0)
    assert "val" not in set(sp.assignment.values())


def test_label_budgets_are_stratified_and_seeded():
    import numpy as np

    from cropmap.pipeline.levels.pixel.train import subsample_labels

    y = np.array([0] * 100 + [1] * 10 + [2] * 1)
    idx = np.arange(len(y))
    a = subsample_labels(y, idx, seed=0, fraction=0.1)
    assert np.bincount(y[a]).tolist() == [10, 1, 1]  # at least one per class
    assert list(a) == list(subsample_labels(y, idx, seed=0, fraction=0.1))
    assert list(a) != list(subsample_labels(y, idx, seed=1, fraction=0.1))
    b = subsample_labels(y, idx, seed=0, per_class=5)
    assert np.bincount(y[b]).tolist() == [5, 5, 1]
    assert list(subsample_labels(y, idx, seed=0)) == list(idx)


# --- spatial blocks ---------------------------------------------------------------------------

def pixel_table(seed=0, n_parcels=120, pixel=10.0):
    """Rectangular parcels of 3-30 x 3-30 pixels on a 2 km x 2 km site (many cross block borders), 5 classes."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for pid in range(1, n_parcels + 1):
        x0, y0 = rng.uniform(500_000, 502_000), rng.uniform(5_600_000, 5_602_000)
        w, h = rng.integers(3, 30, 2)
        label = int(rng.choice(5, p=[0.35, 0.3, 0.2, 0.1, 0.05])) + 1
        for i in range(w):
            for j in range(h):
                rows.append({"parcel_id": pid, "label": label, "x": x0 + i * pixel, "y": y0 + j * pixel})
    return pd.DataFrame(rows)


def block_of(t, size):
    import numpy as np

    return np.floor(t.x / size).astype(int).astype(str) + ":" + np.floor(t.y / size).astype(int).astype(str)


def test_no_test_pixel_shares_a_block_with_training_or_validation_pixels():
    from cropmap.pipeline.splits import spatial_split

    for seed in range(4):
        t = pixel_table(seed)
        for size in (250.0, 500.0):
            sp = spatial_split(t, seed, test_fraction=0.3, val_fraction=0.15, block_size_m=size)
            side = sp.row_sides(t)
            t = t.assign(side=side, block=block_of(t, size))
            used = t[t.side != "excluded"]
            sides_per_block = used.groupby("block").side.nunique()
            assert (sides_per_block == 1).all(), sides_per_block[sides_per_block > 1]
            blocks = {s: set(used.block[used.side == s]) for s in ("train", "val", "test")}
            assert blocks["test"] and blocks["train"] and blocks["val"]
            assert not blocks["test"] & (blocks["train"] | blocks["val"])
            assert not blocks["val"] & blocks["train"]
            # parcel-disjoint inside the blocks: a parcel's used pixels are all on its side
            assert (used.groupby("parcel_id").side.nunique() == 1).all()
            assert set(sp.assignment) == set(t.parcel_id)
            # only pixels lying outside their parcel's home block can be excluded, and few are
            assert (t.side == "excluded").mean() < 0.3
            assert "blocks of" in sp.protocol and sp.block_size_m == size


def test_block_split_is_stratified_seeded_and_round_trips():
    from cropmap.pipeline.splits import ParcelSplit, spatial_split

    t = pixel_table(1)
    a, b, c = (spatial_split(t, s, 0.3, 0.0, 250.0) for s in (0, 0, 1))
    assert a.assignment == b.assignment and a.assignment != c.assignment
    back = ParcelSplit.from_dict(a.to_dict())
    assert (back.row_sides(t) == a.row_sides(t)).all()
    for name, n in a.parcels_per_class.items():
        total = sum(n.values())
        assert n["train"] >= 1
        if total >= 10:  # common classes get roughly their share of test parcels
            assert 0.1 <= n["test"] / total <= 0.5, (name, n)
    assert "val" not in set(a.assignment.values())


def test_geographic_coordinates_are_blocked_in_metres():
    import numpy as np

    from cropmap.pipeline.splits import metric_xy

    x, y = metric_xy(np.array([1.0, 1.0 + 0.0135]), np.array([47.0, 47.0]), 4326)
    assert 950 < x[1] - x[0] < 1100  # 0.0135 deg of longitude at 47 N is about 1 km
    xp, yp = metric_xy(np.array([500_000.0]), np.array([5e6]), 32631)
    assert xp[0] == 500_000.0 and yp[0] == 5e6


def test_split_for_falls_back_to_parcels_without_locations():
    from cropmap.pipeline.splits import split_for

    t = pixel_table(2)
    assert "blocks" in split_for(t, 0, 0.3, 0.1, 500.0).protocol
    assert "no spatial blocks" in split_for(t.drop(columns=["x", "y"]), 0, 0.3, 0.1, 500.0).protocol
    assert "no spatial blocks" in split_for(t, 0, 0.3, 0.1, None).protocol


def test_a_small_site_still_gets_a_test_block():
    """One 640 m tile of a few large parcels, 320 m blocks: the quota greedy alone can leave test empty."""

    from cropmap.pipeline.splits import spatial_split

    rows = []
    for pid, (x0, y0, lab) in enumerate([(0, 0, 1), (330, 0, 1), (0, 330, 2), (330, 330, 2), (100, 100, 1), (400, 420, 2)], 1):
        for i in range(20):
            for j in range(20):
                rows.append({"parcel_id": pid, "label": lab, "x": 500_000 + x0 + i * 10.0, "y": 5_600_000 + y0 + j * 10.0})
    t = pd.DataFrame(rows)
    for seed in range(20):
        sp = spatial_split(t, seed, 0.3, 0.15, 320.0)
        side = sp.row_sides(t)
        assert (side == "test").any() and (side == "train").any(), seed
        assert all(v["train"] >= 1 for v in sp.parcels_per_class.values())
