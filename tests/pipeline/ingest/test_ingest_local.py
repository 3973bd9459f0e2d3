"""The `local` source on the real demo archive (and damaged copies of it)."""

import numpy as np
import pytest
import xarray as xr
from conftest import DEMO_DATA, TILE_FULL, TILE_NO10M

from cropmap.pipeline.cube import open_cube, s2_reflectance, write_cube
from cropmap.pipeline.errors import DataError
from cropmap.pipeline.ingest.local import read_label_raster, read_tile
from cropmap.pipeline.sites import load_site


@pytest.fixture(scope="module")
def site():
    return load_site("demo")


@pytest.fixture(scope="module")
def cube(site):
    return read_tile(site, TILE_FULL, 2019)


def _raw(pattern):
    path = next((DEMO_DATA / TILE_FULL).glob(pattern))
    return xr.open_dataset(path, mask_and_scale=False).load()


def test_all_s2_bands_on_the_10m_grid_with_raw_dates(cube):
    c, notes = cube
    assert notes == []
    assert c.attrs["bands_s2"] == ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]
    assert c["s2"].shape == (72, 10, 64, 64)
    s10, s20 = _raw("S2_L2A_10m_*.nc"), _raw("S2_L2A_20m_*.nc")
    np.testing.assert_array_equal(c["time_s2"].values, s10["timestamp"].values)  # raw acquisitions, not composites
    np.testing.assert_array_equal(c["s2"].values[:, 0], s10["B02"].values)
    # a 20 m pixel covers exactly 2 x 2 pixels of the 10 m grid
    b05 = c["s2"].values[:, 3]
    np.testing.assert_array_equal(b05[:, ::2, ::2], s20["B05"].values)
    np.testing.assert_array_equal(b05[:, 1::2, 1::2], s20["B05"].values)
    assert c.attrs["transform"] == [574680.0, 10.0, 0.0, 5622440.0, 0.0, -10.0]


def test_scl_mask_marks_cloud_shadow_and_nodata(cube, site):
    c, _ = cube
    scl = _raw("S2_L2A_20m_*.nc")["SCL"].values.repeat(2, 1).repeat(2, 2)
    clear = c["s2_clear"].values
    assert not clear[np.isin(scl, [3, 8, 9, 10])].any()
    assert clear[np.isin(scl, [4, 5])].mean() > 0.99
    refl = s2_reflectance(c)
    assert np.isnan(refl[~np.broadcast_to(clear[:, None], refl.shape)]).all()
    assert 0.0 < np.nanmedian(refl) < 0.5  # DN * 1e-4 = reflectance


def test_s1_keeps_its_own_dates_in_db(cube):
    c, _ = cube
    s1 = _raw("S1_GRD-*.nc")
    assert c.sizes["time_s1"] == s1.sizes["timestamp"] == 80
    assert not np.array_equal(c["time_s1"].values[:72], c["time_s2"].values)
    vv = c["s1"].values[:, 0]
    assert -30 < np.nanmedian(vv) < 0  # backscatter in dB
    np.testing.assert_allclose(vv[:, ::2, ::2], s1["VV"].values * 1e-4, rtol=1e-6)


def test_missing_10m_export_falls_back_to_20m_bands_with_a_note(site):
    c, notes = read_tile(site, TILE_NO10M, 2019)
    assert c.attrs["missing_bands"] == ["B02", "B03", "B04", "B08"]
    assert any("no S2 10 m export" in n for n in notes)
    assert c["s2"].shape[1] == 10 and c.sizes["y"] == 64
    assert (c["s2"].values[:, [0, 1, 2, 6]] == 0).all()  # no data, not invented values
    assert (c["s2"].values[:, 3] > 0).any()


def test_cube_round_trips_through_zarr(cube, tmp_path):
    c, _ = cube
    write_cube(c, tmp_path / "t.zarr")
    back = open_cube(tmp_path / "t.zarr").load()
    np.testing.assert_array_equal(back["s2"].values, c["s2"].values)
    np.testing.assert_array_equal(back["s2_clear"].values, c["s2_clear"].values)
    np.testing.assert_array_equal(back["s1"].values, c["s1"].values)
    assert back.attrs["bands_s1"] == ["VV", "VH"] and back.attrs["year"] == 2019


def _site_on(data_root):
    site = load_site("demo")
    return site.model_copy(update={"local": site.local.model_copy(update={"root": str(data_root)})})


def test_truncated_file_is_a_clear_data_error(data_copy):
    path = next((data_copy / TILE_FULL).glob("S2_L2A_10m_*.nc"))
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match="truncated or not a netCDF file") as err:
        read_tile(_site_on(data_copy), TILE_FULL, 2019)
    assert path.name in str(err.value)


def test_missing_20m_export_is_an_error(data_copy):
    next((data_copy / TILE_FULL).glob("S2_L2A_20m_*.nc")).unlink()
    with pytest.raises(DataError, match="20 m export .* is missing"):
        read_tile(_site_on(data_copy), TILE_FULL, 2019)


def test_missing_tile_folder_is_an_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_tile(_site_on(tmp_path), TILE_FULL, 2019)


def test_crs_mismatch_is_refused():
    site = load_site("demo-tanzania").model_copy(update={"crs": "EPSG:32631"})
    with pytest.raises(DataError, match="EPSG:32737"):
        read_tile(site, site.local.tiles[0].id, 2021)


def test_label_raster(site):
    codes, grid = read_label_raster(site, TILE_FULL)
    assert codes.shape == (64, 64) and grid.epsg == 32631
    assert set(np.unique(codes)) == {0, 1110, 1200, 1500, 1510, 5100, 8100, 9120}
