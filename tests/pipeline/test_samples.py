"""Sample stores and the Parquet long table of DESIGN.md (real example table)."""


import numpy as np
import pandas as pd
import pytest
from conftest import TEST_DATA

from cropmap.pipeline.errors import SamplesError
from cropmap.pipeline.samples import load_samples, load_store, long_table_to_samples, read_long_table, save_store, to_long_table, write_long_table

EXAMPLE = TEST_DATA / "rpg2023_dekad_long_60.parquet"  # real, MIT (tests/data/README.md)


def small_table():
    return pd.DataFrame({
        "sample_id": ["a", "a", "a", "b", "b"],
        "date": ["2019-03-01", "2019-01-10", "2018-11-20", "2019-05-01", "2019-06-01"],
        "B04": [0.1, np.nan, 0.3, 0.05, np.nan],
        "VV": [-12.0, -11.0, np.nan, np.nan, np.nan],
        "label": [1, 1, 1, 2, 2],
    })


def test_long_table_sorts_dates_and_merges_sensors():
    s = long_table_to_samples(small_table())
    assert s.bands == ["B04", "VV"]
    assert list(s.lengths) == [3, 1]  # b's all-NaN row carries nothing and is dropped
    vals, days = s.series(0)
    assert list(days) == [-42.0, 9.0, 59.0]  # days since 1 January of the season year (median date's year)
    np.testing.assert_allclose(vals[:, 0], [0.3, np.nan, 0.1])
    assert list(s.table["season_year"]) == [2019, 2019]


def test_round_trip_long_table_and_store(tmp_path):
    s = long_table_to_samples(small_table())
    write_long_table(s, tmp_path / "t.parquet")
    back = read_long_table(tmp_path / "t.parquet")
    np.testing.assert_array_equal(back.values, s.values)
    np.testing.assert_array_equal(back.days, s.days)
    save_store(s, tmp_path / "store")
    st = load_store(tmp_path / "store")
    np.testing.assert_array_equal(st.values, s.values)
    assert list(st.table["sample_id"]) == ["a", "b"]
    assert load_samples(tmp_path / "store").bands == s.bands


def test_doy_column_is_accepted():
    df = small_table().drop(columns="date").assign(doy=[60, 10, 320, 121, 152])
    s = long_table_to_samples(df)
    assert list(s.series(0)[1]) == [10.0, 60.0, 320.0]
    assert "doy" in to_long_table(s).columns


@pytest.mark.parametrize("drop, message", [("label", "label"), ("sample_id", "sample_id"), ("date", "date \\(or doy\\)")])
def test_missing_columns_are_named(drop, message):
    with pytest.raises(SamplesError, match=f"lacks column\\(s\\) {message}"):
        long_table_to_samples(small_table().drop(columns=drop))


def test_label_must_be_constant_per_sample():
    df = small_table()
    df.loc[1, "label"] = 7
    with pytest.raises(SamplesError, match="sample 'a' .* more than one label"):
        long_table_to_samples(df)


def test_non_numeric_band_and_bad_dates():
    with pytest.raises(SamplesError, match="not numeric"):
        long_table_to_samples(small_table().assign(crop="x"))
    with pytest.raises(SamplesError, match="unparseable date"):
        long_table_to_samples(small_table().assign(date=["2019-01-01"] * 4 + ["soon"]))


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(SamplesError, match="cannot read"):
        load_samples(tmp_path / "x.parquet")
    with pytest.raises(SamplesError, match="does not exist"):
        load_samples(tmp_path / "nope.parquet")
    (tmp_path / "d").mkdir()
    with pytest.raises(SamplesError, match="not a sample store"):
        load_samples(tmp_path / "d")


def test_real_example_table():
    s = read_long_table(EXAMPLE)
    assert len(s) == 60
    assert s.bands == ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B11", "B12", "VV", "VH"]
    assert s.lengths.max() <= 51 and s.lengths.min() >= 30
    assert np.isnan(s.values[:, 0]).mean() > 0.3  # cloudy optical dates stay missing, radar fills in
    sub = s.subset(np.array([5, 2]))
    np.testing.assert_array_equal(sub.series(0)[0], s.series(5)[0])
