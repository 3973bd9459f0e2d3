"""Per-pixel series from a cube: sensors merged on one day axis, cloudy dates dropped."""

import numpy as np
import xarray as xr

from cropmap.pipeline.levels.pixel.tensors import cube_series, day_offsets, labelled_samples


def tiny_cube():
    t2 = np.array(["2019-01-05T10:00", "2019-01-10T10:00", "2019-02-01T10:00"], dtype="datetime64[ns]")
    t1 = np.array(["2019-01-05T17:00", "2019-01-20T17:00"], dtype="datetime64[ns]")
    s2 = np.full((3, 2, 2, 2), 1000, dtype=np.uint16)
    s2[1] = 2000
    clear = np.ones((3, 2, 2), bool)
    clear[2, 0, 0] = False  # cloudy on 1 Feb at pixel (0, 0)
    s2[0, :, 1, 1] = 0  # no data at pixel (1, 1) on 5 Jan
    s1 = np.full((2, 1, 2, 2), -10.0, dtype=np.float32)
    s1[1, 0, 0, 1] = np.nan
    return xr.Dataset(
        {"s2": (("time_s2", "band_s2", "y", "x"), s2), "s2_clear": (("time_s2", "y", "x"), clear),
         "s1": (("time_s1", "band_s1", "y", "x"), s1)},
        coords={"time_s2": t2, "time_s1": t1, "x": [5.0, 15.0], "y": [15.0, 5.0]},
        attrs={"year": 2019, "tile": "t", "epsg": 32631, "bands_s2": ["B04", "B08"], "bands_s1": ["VV"],
               "transform": [0.0, 10.0, 0.0, 20.0, 0.0, -10.0]},
    )


def test_day_offsets_are_since_january_first_of_the_season():
    assert list(day_offsets(np.array(["2018-12-31", "2019-01-01", "2019-03-01"], dtype="datetime64[D]"), 2019)) == [-1, 0, 59]


def test_sensors_share_one_day_axis_and_cloudy_dates_are_dropped():
    values, days, lengths = cube_series(tiny_cube())
    # days: S2 on 4, 9, 31; S1 on 4, 19 (pixels row-major)
    assert list(lengths) == [3, 3, 4, 4]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    px = [slice(offsets[i], offsets[i + 1]) for i in range(4)]
    assert list(days[px[0]]) == [4.0, 9.0, 19.0]  # cloudy 1 Feb dropped
    np.testing.assert_allclose(values[px[0]][0], [0.1, 0.1, -10.0])  # same-day S2 + S1: one observation
    np.testing.assert_allclose(values[px[0]][2], [np.nan, np.nan, -10.0])  # radar-only date
    assert list(days[px[1]]) == [4.0, 9.0, 31.0]  # S1 missing on 20 Jan there
    assert list(days[px[3]]) == [4.0, 9.0, 19.0, 31.0]
    np.testing.assert_allclose(values[px[3]][0], [np.nan, np.nan, -10.0])  # optical no data on 5 Jan
    np.testing.assert_allclose(values[px[3]][1], [0.2, 0.2, np.nan])


def test_window_and_mask_select_pixels():
    values, days, lengths = cube_series(tiny_cube(), rows=slice(1, 2))
    assert list(lengths) == [4, 4]
    _, _, lengths = cube_series(tiny_cube(), pixel_mask=np.array([[False, True], [False, False]]))
    assert list(lengths) == [3]


def test_labelled_samples_carry_parcels_and_coordinates():
    classes = np.array([[1, 0], [2, 2]], dtype=np.uint8)
    parcels = np.array([[7, 0], [9, 9]])
    s = labelled_samples(tiny_cube(), classes, parcels, {1: "a", 2: "b"})
    assert len(s) == 3
    assert list(s.table["label"]) == [1, 2, 2] and list(s.table["parcel_id"]) == [7, 9, 9]
    assert list(s.table["x"]) == [5.0, 5.0, 15.0] and list(s.table["y"]) == [15.0, 5.0, 5.0]
    assert s.class_names == {1: "a", 2: "b"}


def test_radar_is_averaged_in_linear_power():
    from cropmap.pipeline.levels.pixel.tensors import composite_s1

    s1 = np.array([-10.0, -20.0, np.nan, -13.0], dtype=np.float32).reshape(4, 1, 1)
    days = np.array([0, 6, 11, 13])
    out, d = composite_s1(s1, days, 12)
    assert list(d) == [6, 13]
    expected = 10 * np.log10((0.1 + 0.01) / 2)  # not the dB mean (-15)
    np.testing.assert_allclose(out[:, 0, 0], [expected, -13.0], rtol=1e-6)
    same, same_days = composite_s1(s1, days, 0)
    assert same is s1 and same_days is days


def test_cube_series_with_radar_windows():
    values, days, lengths = cube_series(tiny_cube(), s1_window=30)
    # the two radar dates (4, 19) fall in one 30-day bin on day 12 (rounded mean)
    assert list(days[: lengths[0]]) == [4.0, 9.0, 12.0]
