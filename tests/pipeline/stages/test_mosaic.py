"""A VRT mosaic of class maps from two UTM zones (Iowa straddles zones 15 and 16)."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.windows import Window

from cropmap.pipeline.errors import DataError
from cropmap.pipeline.stages.maps import MapClass, MapWriter, read_class_table
from cropmap.pipeline.stages.mosaic import zone_mosaic

CLASSES = [MapClass(1, "maize", "#ff0000"), MapClass(2, "soybean", "#00ff00")]


def _map(path, epsg, x0, code):
    with MapWriter(path, path.with_name(path.stem + ".conf.tif"), crs=f"EPSG:{epsg}", transform=Affine(10, 0, x0, 0, -10, 4650000),
                   width=300, height=200, classes=CLASSES) as w:
        w.write(Window(0, 0, 300, 200), np.full((200, 300), code, np.uint8), np.full((200, 300), 0.9, np.float32))
    return path


def test_two_zone_maps_become_one_vrt_without_resampling_the_first_zone(tmp_path):
    # 90 deg W is ~745 km east in zone 15 and ~255 km east in zone 16 at 42 deg N: the two maps touch there
    z15 = _map(tmp_path / "iowa-z15.tif", 32615, 742000, 1)
    z16 = _map(tmp_path / "iowa-z16.tif", 32616, 255000, 2)
    out = zone_mosaic([z16, z15], tmp_path / "iowa.vrt")
    with rasterio.open(out) as ds, rasterio.open(z15) as a:
        assert ds.crs.to_epsg() == 32615 and ds.res == (10.0, 10.0) and ds.nodata == 0
        data = ds.read(1)
        # the zone-15 map is on the mosaic grid: copied pixel for pixel
        col, row = ds.index(a.bounds.left + 5, a.bounds.top - 5)[::-1]
        np.testing.assert_array_equal(data[int(row):int(row) + 200, int(col):int(col) + 300], a.read(1))
        counts = np.bincount(data.ravel(), minlength=3)
        assert counts[1] == 300 * 200 and abs(counts[2] - 300 * 200) < 0.03 * 300 * 200  # zone 16 warped by nearest neighbour
        assert set(np.unique(data)) == {0, 1, 2}  # nearest neighbour: no invented class codes
        assert ds.colormap(1)[2] == (0, 255, 0, 255)
    assert [c.name for c in read_class_table(out)] == ["maize", "soybean"]
    assert (tmp_path / "iowa.iowa-z16.EPSG32616.vrt").read_text().count('relativeToVRT="1">iowa-z16.tif') == 1


def test_mosaic_needs_maps(tmp_path):
    with pytest.raises(DataError, match="no map to mosaic"):
        zone_mosaic([], tmp_path / "x.vrt")
    with pytest.raises(DataError, match="cannot read map"):
        zone_mosaic([tmp_path / "missing.tif"], tmp_path / "x.vrt")
