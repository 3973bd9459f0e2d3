"""Tests for cropmap.pipeline.stages.maps: streaming class/confidence maps to Cloud-Optimized GeoTIFFs."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

from cropmap.pipeline.errors import OutputError
from cropmap.pipeline.stages.maps import (
    CLASSES_TAG,
    CONFIDENCE_UNITS_TAG,
    MapClass,
    MapWriter,
    read_class_table,
    validate_cog,
    write_preview,
)

W, H = 1100, 900
TRANSFORM = from_origin(574680, 5622440, 10, 10)
CLASSES = [
    MapClass(1, "Blé tendre", "#e6c229"),  # non-ASCII name must survive GDAL metadata
    MapClass(5, "Maize", "#F17105"),  # upper-case colour is normalised
    MapClass(9, "Grassland = pasture: permanent", "#1a8fe3"),  # separators inside a value
]
# Windows cover the raster except the strip of columns 1000..1099 in rows 0..299.
WINDOWS = [
    Window(0, 0, 1000, 300),
    Window(0, 300, 700, 600),
    Window(700, 300, 400, 450),
    Window(700, 750, 400, 150),
]


def pattern() -> tuple[np.ndarray, np.ndarray]:
    """Full-raster truth: stripes of 1 and 5 (averaging them would give 3), a block of 9, holes."""
    cols = np.arange(W)
    cls = np.where(cols % 2 == 0, 1, 5).astype(np.uint8)[None, :].repeat(H, axis=0)
    cls[400:600, 200:500] = 9
    cls[800:, :100] = 0  # written but nodata
    conf = ((np.arange(H)[:, None] + cols[None, :]) % 101 / 100.0).astype(np.float32)
    conf[100:110, :] = np.nan
    return cls, conf


def expected_confidence(cls: np.ndarray, conf: np.ndarray) -> np.ndarray:
    out = np.rint(np.nan_to_num(conf) * 100).astype(np.uint8)
    out[np.isnan(conf) | (cls == 0)] = 255
    return out


def write_big(tmp_path: Path, **kw) -> tuple[Path, Path]:
    cls, conf = pattern()
    with MapWriter(
        tmp_path / "out" / "crops.tif", tmp_path / "out" / "confidence.tif", crs="EPSG:32631",
        transform=TRANSFORM, width=W, height=H, classes=CLASSES, tags={"site": "demo"}, **kw,
    ) as mw:  # fmt: skip
        for win in [WINDOWS[2], WINDOWS[0], WINDOWS[3], WINDOWS[1]]:  # out of order
            sl = win.toslices()
            mw.write(win, cls[sl], conf[sl])
    return mw.map_path, mw.confidence_path


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[Path, Path]:
    return write_big(tmp_path_factory.mktemp("big"))


def test_class_map_is_cog_with_legend(big):
    map_path, _ = big
    cls, _ = pattern()
    with rasterio.open(map_path) as ds:
        assert ds.driver == "GTiff"
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert ds.tags(ns="IMAGE_STRUCTURE").get("COMPRESSION") == "DEFLATE"
        assert ds.tags(ns="IMAGE_STRUCTURE").get("PREDICTOR") == "2"
        assert (ds.count, ds.dtypes[0], ds.nodata) == (1, "uint8", 0)
        assert (ds.width, ds.height) == (W, H)
        assert ds.crs.to_epsg() == 32631
        assert ds.transform == TRANSFORM
        assert ds.block_shapes[0] == (512, 512)
        assert ds.overviews(1) == [2, 4]
        cmap = ds.colormap(1)
        assert cmap[0] == (0, 0, 0, 0)
        assert cmap[1] == (0xE6, 0xC2, 0x29, 255)
        assert cmap[5] == (0xF1, 0x71, 0x05, 255)
        assert cmap[9] == (0x1A, 0x8F, 0xE3, 255)
        band = ds.tags(1)
        assert band["CLASS_1"] == "Blé tendre"
        assert band["CLASS_9"] == "Grassland = pasture: permanent"
        assert [d["code"] for d in json.loads(band[CLASSES_TAG])] == [1, 5, 9]
        assert ds.tags()["site"] == "demo"

        full = ds.read(1)
        expected = cls.copy()
        expected[:300, 1000:] = 0  # never written
        np.testing.assert_array_equal(full, expected)

        # Overviews must be nearest: averaging stripes of 1 and 5 would create 3 (or 2, 4).
        present = set(np.unique(full).tolist())
        for f in (2, 4):
            ov = ds.read(1, out_shape=(H // f, W // f))
            assert set(np.unique(ov).tolist()) <= present, f"overview 1/{f} invents codes"
            assert 9 in np.unique(ov)
    assert validate_cog(map_path) == []


def test_class_table_roundtrip_and_sidecar(big):
    map_path, _ = big
    assert read_class_table(map_path) == CLASSES
    assert CLASSES[1].color == "#f17105"
    sidecar = map_path.with_name("crops.tif.classes.json")
    assert json.loads(sidecar.read_text(encoding="utf-8")) == [
        {"code": c.code, "name": c.name, "color": c.color} for c in CLASSES
    ]


def test_class_table_falls_back_to_sidecar(big, tmp_path):
    map_path, _ = big
    plain = tmp_path / "plain.tif"
    with rasterio.open(map_path) as src:
        profile = src.profile
        data = src.read()
    with rasterio.open(plain, "w", **profile) as dst:
        dst.write(data)
    with pytest.raises(Exception, match="no class table"):
        read_class_table(plain)
    (tmp_path / "plain.tif.classes.json").write_text(json.dumps([CLASSES[0].to_dict()]))
    assert read_class_table(plain) == [CLASSES[0]]


def test_confidence_map(big):
    _, conf_path = big
    cls, conf = pattern()
    with rasterio.open(conf_path) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert (ds.count, ds.dtypes[0], ds.nodata) == (1, "uint8", 255)
        assert ds.tags()[CONFIDENCE_UNITS_TAG] == "percent"
        assert ds.overviews(1) == [2, 4]
        full = ds.read(1)
    expected = expected_confidence(cls, conf)
    expected[:300, 1000:] = 255
    np.testing.assert_array_equal(full, expected)
    assert full.max() == 255 and full[full != 255].max() == 100
    assert validate_cog(conf_path) == []


def test_output_directory_is_clean(big):
    names = sorted(p.name for p in big[0].parent.iterdir())
    assert names == ["confidence.tif", "crops.tif", "crops.tif.classes.json"]


def test_small_map_without_overviews(tmp_path):
    cls = np.zeros((64, 64), np.uint8)
    cls[:, :32] = 1
    conf = np.full((64, 64), 0.5, np.float32)
    mw = MapWriter(
        tmp_path / "s.tif", tmp_path / "c.tif", crs=rasterio.crs.CRS.from_epsg(32631),
        transform=TRANSFORM, width=64, height=64, classes=CLASSES[:1],
    )  # fmt: skip
    mw.write(Window(0, 0, 64, 64), cls, conf)
    assert mw.close() == (tmp_path / "s.tif", tmp_path / "c.tif")
    with rasterio.open(tmp_path / "s.tif") as ds:
        assert ds.overviews(1) == []
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        np.testing.assert_array_equal(ds.read(1), cls)
    with rasterio.open(tmp_path / "c.tif") as ds:
        assert set(np.unique(ds.read(1)).tolist()) == {50, 255}
    assert validate_cog(tmp_path / "s.tif") == []
    assert validate_cog(tmp_path / "c.tif") == []


def test_validate_cog_reports_plain_geotiffs(tmp_path):
    profile = dict(driver="GTiff", width=600, height=600, count=1, dtype="uint8",
                   crs="EPSG:32631", transform=TRANSFORM)  # fmt: skip
    with rasterio.open(tmp_path / "strip.tif", "w", **profile) as ds:
        ds.write(np.ones((1, 600, 600), np.uint8))
    problems = validate_cog(tmp_path / "strip.tif")
    assert any("LAYOUT=COG" in p for p in problems)
    assert any("overviews" in p for p in problems)
    assert any("not tiled" in p for p in problems)
    assert validate_cog(tmp_path / "missing.tif") == [f"{str(tmp_path / 'missing.tif')!r} does not exist"]
    (tmp_path / "junk.tif").write_bytes(b"not a tiff")
    assert validate_cog(tmp_path / "junk.tif")


def test_validate_cog_detects_later_edits(big, tmp_path):
    import shutil

    copy = tmp_path / "edited.tif"
    shutil.copy(big[0], copy)
    with rasterio.open(copy, "r+", IGNORE_COG_LAYOUT_BREAK="YES") as ds:
        ds.update_tags(edited="yes")
    assert validate_cog(copy)


def test_abort_keeps_previous_files(tmp_path):
    final, conf_final = tmp_path / "m.tif", tmp_path / "c.tif"
    final.write_bytes(b"previous map")
    conf_final.write_bytes(b"previous confidence")
    with pytest.raises(RuntimeError, match="boom"):
        with MapWriter(final, conf_final, crs="EPSG:32631", transform=TRANSFORM, width=300,
                       height=300, classes=CLASSES) as mw:  # fmt: skip
            mw.write(Window(0, 0, 10, 10), np.ones((10, 10), np.uint8), np.ones((10, 10), np.float32))
            assert any(p.name.startswith(".") for p in tmp_path.iterdir())  # hidden work files
            raise RuntimeError("boom")
    assert final.read_bytes() == b"previous map"
    assert conf_final.read_bytes() == b"previous confidence"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.tif", "m.tif"]

    mw = MapWriter(final, conf_final, crs="EPSG:32631", transform=TRANSFORM, width=50, height=50,
                   classes=CLASSES)  # fmt: skip
    mw.abort()
    mw.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.tif", "m.tif"]
    with pytest.raises(RuntimeError):
        mw.write(Window(0, 0, 1, 1), np.ones((1, 1), np.uint8), np.ones((1, 1), np.float32))


def test_unwritable_destination(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OutputError) as info:
        MapWriter(blocker / "sub" / "m.tif", tmp_path / "c.tif", crs="EPSG:32631",
                  transform=TRANSFORM, width=10, height=10, classes=CLASSES)  # fmt: skip
    msg = str(info.value)
    assert "a_file" in msg and "\n" not in msg and info.value.fix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.parametrize(
    "args",
    [(0, "x", "#000000"), (256, "x", "#000000"), (1, "", "#000000"), (1, "x", "red"), (True, "x", "#000000")],
)
def test_bad_map_class(args):
    with pytest.raises(ValueError):
        MapClass(*args)


def test_bad_writer_arguments(tmp_path):
    kw = dict(crs="EPSG:32631", transform=TRANSFORM, width=100, height=80)
    with pytest.raises(ValueError, match="duplicate"):
        MapWriter(tmp_path / "m.tif", tmp_path / "c.tif", classes=[CLASSES[0], MapClass(1, "y", "#ffffff")], **kw)
    with pytest.raises(ValueError, match="multiple of 16"):
        MapWriter(tmp_path / "m.tif", tmp_path / "c.tif", classes=CLASSES, block=100, **kw)
    with pytest.raises(ValueError, match="tag name"):
        MapWriter(tmp_path / "m.tif", tmp_path / "c.tif", classes=CLASSES, tags={"a:b": "c"}, **kw)
    assert list(tmp_path.iterdir()) == []

    with MapWriter(tmp_path / "m.tif", tmp_path / "c.tif", classes=CLASSES, **kw) as mw:
        ones, conf = np.ones((10, 10), np.uint8), np.ones((10, 10), np.float32)
        for win in (Window(95, 0, 10, 10), Window(-1, 0, 10, 10), Window(0, 75, 10, 10)):
            with pytest.raises(ValueError, match="outside"):
                mw.write(win, ones, conf)
        with pytest.raises(ValueError, match="shape"):
            mw.write(Window(0, 0, 10, 5), ones, conf)
        with pytest.raises(ValueError, match="not in the class table"):
            mw.write(Window(0, 0, 10, 10), ones * 3, conf)
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            mw.write(Window(0, 0, 10, 10), ones, conf * 2)
        mw.write(Window(90, 70, 10, 10), ones, conf)  # last pixel corner is fine
    with rasterio.open(tmp_path / "m.tif") as ds:
        data = ds.read(1)
    assert data[70:, 90:].all() and data.sum() == 100


def test_preview(big, tmp_path):
    png = write_preview(big[0], tmp_path / "prev" / "crops.png", max_size=300, title="Demo site")
    assert png == tmp_path / "prev" / "crops.png"
    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert img.shape[0] > 100 and img.shape[1] > 300  # map plus legend to its right
    rgb = img[..., :3]
    assert rgb.std() > 0.05  # not blank
    # Class colours appear (map pixels and legend patches). Maize is not required: its 1-px
    # stripes alternate with wheat and vanish at this decimation (nearest), legend included.
    for c in (CLASSES[0], CLASSES[2]):
        target = np.array(c.rgb) / 255.0
        assert (np.abs(rgb - target).max(axis=2) < 0.02).any(), c.name
    assert sorted(p.name for p in png.parent.iterdir()) == ["crops.png"]


def test_preview_legend_only_present_classes(tmp_path):
    cls = np.full((40, 40), 1, np.uint8)
    with MapWriter(tmp_path / "m.tif", tmp_path / "c.tif", crs="EPSG:32631", transform=TRANSFORM,
                   width=40, height=40, classes=CLASSES) as mw:  # fmt: skip
        mw.write(Window(0, 0, 40, 40), cls, np.full((40, 40), 0.9, np.float32))
    rgb = matplotlib.image.imread(write_preview(tmp_path / "m.tif", tmp_path / "p.png"))[..., :3]
    for c, present in zip(CLASSES, (True, False, False)):
        found = (np.abs(rgb - np.array(c.rgb) / 255.0).max(axis=2) < 0.02).any()
        assert found == present, c.name
