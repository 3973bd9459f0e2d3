"""The report's year-over-year change section on maps whose data lie far apart on a large grid."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
from affine import Affine
from PIL import Image

from cropmap.pipeline.stages.maps import MapClass, MapWriter
from cropmap.pipeline.stages.report import _change_preview, data_regions, year_changes

CLASSES = [MapClass(1, "wheat", "#e6c229"), MapClass(2, "maize", "#f17105")]
W = H = 6000  # 60 km at 10 m: the tiles below are tens of kilometres apart
TRANSFORM = Affine(10, 0, 500000, 0, -10, 5700000)


def write_map(path: Path, blocks: dict[tuple[int, int], int]) -> Path:
    """A map with 64 x 64 blocks of one class at (col, row)."""
    from rasterio.windows import Window

    with MapWriter(path / "crops.tif", path / "confidence.tif", crs="EPSG:32631", transform=TRANSFORM,
                   width=W, height=H, classes=CLASSES) as mw:
        for (col, row), code in blocks.items():
            cls = np.full((64, 64), code, np.uint8)
            cls[:, :8] = 0  # a nodata strip inside the tile must not split it into two regions
            mw.write(Window(col, row, 64, 64), cls, np.full((64, 64), 0.9, np.float32))
    return mw.map_path


def test_change_section_finds_each_far_apart_tile(tmp_path):
    # last year: tiles A and B; this year: A (half changed: other class) and C, 40 km from A
    prev = write_map(tmp_path / "prev", {(100, 200): 1, (3000, 300): 2})
    cur = write_map(tmp_path / "cur", {(100, 200): 2, (4100, 4500): 1})

    regions = data_regions([cur, prev])
    assert len(regions) == 3
    for col, row in [(100, 200), (3000, 300), (4100, 4500)]:
        assert any(c <= col and r <= row and col + 64 <= c + w and row + 64 <= r + h for c, r, w, h in regions), (col, row)
    assert all(w < 200 and h < 200 for _, _, w, h in regions)  # windows hug the tiles, not the 6000 px site

    ch = year_changes(cur, prev)
    tile_ha = 64 * 56 * 100 / 1e4
    assert ch["same_grid"] and ch["overlap_ha"] == round(tile_ha, 2) and ch["changed_ha"] == round(tile_ha, 2)
    assert ch["transitions"] == [{"from": "wheat", "to": "maize", "ha": round(tile_ha, 2)}]

    html = _change_preview(cur, prev, 2018, 2019)
    png = Image.open(io.BytesIO(base64.b64decode(re.search(r"base64,([^\"]+)", html).group(1)))).convert("RGB")
    pixels = np.asarray(png).reshape(-1, 3)
    red = np.all(pixels == (0xD6, 0x27, 0x28), axis=1).sum()  # changed
    blue = np.all(pixels == (0x9E, 0xCA, 0xE1), axis=1).sum()  # only last year
    orange = np.all(pixels == (0xFD, 0xAE, 0x6B), axis=1).sum()  # only this year
    # each tile fills a panel of a few hundred pixels: visible, not a few dots in an empty frame
    assert red > 5000 and blue > 5000 and orange > 5000, (red, blue, orange)


def test_no_data_in_either_map(tmp_path):
    empty = write_map(tmp_path / "a", {})
    assert data_regions([empty]) == []
    assert "no change preview" in _change_preview(empty, empty, 2018, 2019)
