"""benchmarks/convert_points.py decodes the WorldCereal point encodings into the long format."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd

from cropmap.pipeline.samples import long_table_to_samples

spec = importlib.util.spec_from_file_location("convert_points", Path(__file__).resolve().parents[2] / "benchmarks" / "convert_points.py")
cp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cp)


def test_encodings():
    assert np.allclose(cp.decode_s2([1234, 65535]), [0.1234, np.nan], equal_nan=True)
    db = cp.decode_s1([1000, 65535, 0])
    assert np.isclose(db[0], 20 * np.log10(1000) - 83) and np.isnan(db[1:]).all()


def test_wide_and_monthly_tables_become_long_tables():
    wide = pd.DataFrame({"sample_id": ["a", "b"], "start_date": ["2016-12-01", "2016-12-01"], "ewoc_code": [1101060000, 1101070000],
                         "lon": [33.5, 33.6], "lat": [4.7, 4.8],
                         "OPTICAL-B02-ts0-10m": [500, 65535], "OPTICAL-B02-ts1-10m": [65535, 65535],
                         "SAR-VV-ts0-20m": [2000, 2100], "SAR-VV-ts1-20m": [65535, 2200]})
    out = cp.convert_wide(wide)
    assert list(out["date"]) == ["2016-12-01", "2016-12-01", "2017-01-01"]  # a's empty January is dropped
    assert np.isclose(out["B02"].iloc[0], 0.05) and out["epsg"].eq(4326).all()
    s = long_table_to_samples(out)
    assert s.bands == ["B02", "VV"] and list(s.lengths) == [1, 2]
    monthly = pd.DataFrame({"sample_id": ["a", "a"], "timestamp": pd.to_datetime(["2021-01-01", "2021-02-01"]),
                            "S2-L2A-B04": [800, 65535], "S2-L2A-B8A": [65535, 65535], "S1-SIGMA0-VH": [1500, 1600],
                            "ewoc_code": [1200000000, 1200000000], "lon": [5.0, 5.0], "lat": [51.0, 51.0]})
    out = cp.convert_monthly(monthly)
    assert "B8A" not in out.columns and list(out.columns[:4]) == ["sample_id", "date", "B04", "VH"]
    assert np.isnan(out["B04"].iloc[1]) and np.isclose(out["VH"].iloc[1], 20 * np.log10(1600) - 83)
