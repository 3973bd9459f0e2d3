"""Table sampling sized for a state: classPoints from a per-tile row budget, and deterministic
same-day de-duplication at read-back."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cropmap.pipeline.ingest.gee.readback import dedupe_same_day
from cropmap.pipeline.ingest.gee.sampling import acquisition_bound, s1_satellites, table_rows_per_tile
from cropmap.pipeline.ingest.gee.tiles import site_tiles
from cropmap.pipeline.sites import load_site


def test_iowa_rows_per_tile_fit_the_budget():
    iowa = load_site("iowa")
    plan = table_rows_per_tile(iowa, 2024)
    assert plan.classes == 10 and plan.s2_days == 110 and plan.s1_days == 46  # 275-day season, S1A alone in 2024
    assert plan.points_per_class == 100_000 // (10 * 156) == 64 < iowa.gee.samples_per_class
    assert set(plan.per_tile) == {t.name for t in site_tiles(iowa)} and len(plan.per_tile) == 228
    assert all(r == 64 * 10 * 156 <= iowa.gee.table_rows_per_tile for r in plan.per_tile.values())
    assert plan.total == 228 * 99_840
    text = "\n".join(plan.describe())
    assert "rows per tile <= 99,840; total <= 22,763,520 over 228 tiles" in text and "lowered" in text
    # the budget scales the points; the old default (500 per CDL code, every granule-date) is far above it
    big = iowa.model_copy(update={"gee": iowa.gee.model_copy(update={"table_rows_per_tile": 10_000_000})})
    assert table_rows_per_tile(big, 2024).points_per_class == 500


def test_satellite_counts_and_bounds():
    assert [s1_satellites(y) for y in (2020, 2022, 2024, 2025)] == [2, 1, 1, 2]
    assert acquisition_bound(275, 10, 2) == 110 and acquisition_bound(3, 10, 3) == 2 and acquisition_bound(5, 1, 3) == 5


def _rows(order):
    base = {"sample_id": "p1", "label": 1, "x": 0.0, "y": 0.0, "block_x": 0, "block_y": 0}
    rows = [
        {**base, "date": "2024-05-01", "B02": 900.0, "B03": 1000.0, "cs_cdf": 0.7, "VV": np.nan},
        {**base, "date": "2024-05-01", "B02": 950.0, "B03": 990.0, "cs_cdf": 0.95, "VV": np.nan},  # the clearest granule
        {**base, "date": "2024-05-01", "B02": np.nan, "B03": np.nan, "cs_cdf": np.nan, "VV": -10.0},
        {**base, "date": "2024-05-01", "B02": np.nan, "B03": np.nan, "cs_cdf": np.nan, "VV": -20.0},
        {**base, "date": "2024-05-06", "B02": 800.0, "B03": 810.0, "cs_cdf": 0.8, "VV": np.nan},
    ]
    return pd.DataFrame([rows[i] for i in order])


@pytest.mark.parametrize("order", [[0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [1, 3, 0, 4, 2]])
def test_same_day_rows_keep_the_clearest_s2_and_the_linear_mean_s1(order):
    out = dedupe_same_day(_rows(order), ["B02", "B03"], ["VV"])
    s2 = out[out["B02"].notna()].set_index("date")
    assert list(s2.sort_index()["B02"]) == [950.0, 800.0]
    s1 = out[out["VV"].notna()]
    assert len(s1) == 1 and s1["VV"].iloc[0] == pytest.approx(10 * np.log10((0.1 + 0.01) / 2), rel=1e-6)
    ref = dedupe_same_day(_rows([0, 1, 2, 3, 4]), ["B02", "B03"], ["VV"])
    key = ["date", "B02", "VV"]
    pd.testing.assert_frame_equal(out.sort_values(key).reset_index(drop=True), ref.sort_values(key).reset_index(drop=True),
                                  check_dtype=False)


def test_the_fake_sample_export_takes_class_points_from_the_expression(tmp_path, sites_dir, ee_offline):
    """The row budget reaches the export: points per class come from the expression's classPoints
    (lowered by table_rows_per_tile), and the fake serves exactly that many per legend class."""
    from conftest import TILE_FULL, gee_demo_doc, write_site

    from cropmap.pipeline.ingest.gee.fake import DemoServer, FakeClient
    from cropmap.pipeline.ingest.gee.source import GeeSource
    from cropmap.pipeline.ingest.local import read_label_raster, read_tile
    from cropmap.pipeline.sites import load_legend

    demo = load_site("demo")
    cube, _ = read_tile(demo, TILE_FULL, 2019)
    labels = read_label_raster(demo, TILE_FULL)
    write_site(sites_dir, gee_demo_doc(tmp_path / "exports", samples="table"))
    base = load_site("demo-gee")
    per_point = table_rows_per_tile(base, 2019)
    budget = 3 * per_point.classes * per_point.rows_per_point
    write_site(sites_dir, gee_demo_doc(tmp_path / "exports", samples="table", table_rows_per_tile=budget))
    site = load_site("demo-gee")
    plan = table_rows_per_tile(site, 2019)
    assert plan.points_per_class == 3 < site.gee.samples_per_class and max(plan.per_tile.values()) <= budget

    def info(expr):
        return ["2018", "2019"] if "AggregateFeatureCollection" in str(expr) else ["cropland", "confidence"]

    client = FakeClient(tmp_path / "exports", DemoServer(site, 2019, [cube.load()], [labels]), info=info)
    src = GeeSource(site, 2019, lambda s: client)
    leaves = src.export_samples(tmp_path / "run")
    table = pd.read_csv(src._files(leaves["x0000y0000"], tmp_path / "cache")[0])
    lookup = load_legend("demo").source_lookup()
    points = table.drop_duplicates("sample_id")
    per_class = points["label"].map(lambda v: lookup.get(int(v))).value_counts()
    assert per_class.max() == 3 and (per_class <= 3).all() and len(per_class) >= 3
    assert "cs_cdf" in table.columns and table.loc[table["B02"].notna(), "cs_cdf"].notna().all()
