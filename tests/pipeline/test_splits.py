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
