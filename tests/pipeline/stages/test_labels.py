import numpy as np

from cropmap.pipeline.ingest.local import read_label_raster
from cropmap.pipeline.sites import load_legend, load_site
from cropmap.pipeline.stages.labels import PARCEL_STRIDE, map_codes, recover_parcels, tile_labels


def test_codes_map_through_the_legend_and_unmapped_codes_are_counted():
    legend = load_legend("demo")
    codes = np.array([[1200, 1200, 0], [9120, 4242, 4242]])
    classes, unmapped = map_codes(codes, legend)
    np.testing.assert_array_equal(classes, [[1, 1, 0], [5, 0, 0]])
    assert unmapped == {4242: 2}


def test_parcels_are_connected_regions_of_one_code():
    codes = np.array([
        [1, 1, 0, 2],
        [0, 0, 0, 2],
        [1, 0, 2, 0],   # the lower-left 1 is a second field; the diagonal 2 is a separate field
    ])
    p = recover_parcels(codes, tile_index=3)
    assert (p[codes == 0] == 0).all()
    assert p[0, 0] == p[0, 1] and p[0, 0] != p[2, 0]
    assert p[0, 3] == p[1, 3] and p[2, 2] != p[1, 3]
    assert len(np.unique(p[p > 0])) == 4
    assert (p[p > 0] // PARCEL_STRIDE == 3).all()


def test_demo_parcels():
    site, legend = load_site("demo"), load_legend("demo")
    total = 0
    for i, t in enumerate(site.local.tiles):
        codes, grid = read_label_raster(site, t.id)
        tl = tile_labels(codes, legend, tile=t.id, tile_index=i, year=t.year, transform=grid.transform)
        assert not tl.unmapped
        assert tl.parcel_table["n_pixels"].sum() == (codes > 0).sum()
        assert tl.parcel_table["parcel_id"].is_unique
        x0, y0 = grid.transform @ (0, 0)
        assert (tl.parcel_table["x"] > x0).all() and (tl.parcel_table["y"] < y0).all()
        total += len(tl.parcel_table)
    assert 45 <= total <= 65  # "about 50 parcels"
