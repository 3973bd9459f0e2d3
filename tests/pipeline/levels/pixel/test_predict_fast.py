"""The vectorised, prefetching predict path maps exactly what the reference (per-pixel) path maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TILE_FULL, TILE_NO10M

from cropmap.models.checkpoint import save_model
from cropmap.models.registry import build_model
from cropmap.pipeline.ingest.local import read_tile
from cropmap.pipeline.levels.pixel.predict import TilePredictor, _strip_rows, dense_block
from cropmap.pipeline.levels.pixel.tensors import cube_bands, cube_series, day_offsets
from cropmap.pipeline.sites import load_legend, load_site


def model_dir(root, name, cube, legend, s1_window=0, max_len=16):
    """An untrained model with the demo's real band statistics (its outputs vary from pixel to pixel)."""
    bands = cube_bands(cube)
    values, _, _ = cube_series(cube, rows=slice(0, 8), s1_window=s1_window)
    mean = np.nan_to_num(np.nanmean(values, 0)).astype(float).tolist()
    std = [float(s) if s > 1e-6 else 1.0 for s in np.nan_to_num(np.nanstd(values, 0), nan=1.0)]
    torch.manual_seed(0)
    classes = [c.code for c in legend.classes][:4]
    model, config = build_model(name, bands=bands, n_classes=len(classes), mean=mean, std=std)
    with torch.no_grad():  # untrained outputs are near uniform: sharpen the class layer so maps vary
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.out_features == len(classes):
                m.weight.mul_(100.0)
    d = root / f"model-{name}-{s1_window}"
    d.mkdir()
    save_model(d, model, {"model": name, "model_config": config, "bands": bands, "normalisation": {"mean": mean, "std": std},
                          "classes": [{"index": i, "label": c, "name": str(c)} for i, c in enumerate(classes)], "max_len": max_len,
                          "inputs": {"s1_window_days": s1_window}})
    return d


@pytest.fixture(scope="module")
def demo():
    site = load_site("demo")
    return site, load_legend(site.legend), read_tile(site, TILE_FULL, 2019)[0], read_tile(site, TILE_NO10M, 2019)[0]


def test_dense_block_is_cube_series(demo):
    _, _, cube, _ = demo
    win = cube.isel(y=slice(3, 11))
    y = int(cube.attrs["year"])
    for s1_window in (0, 12):
        dense, days, observed = dense_block(win["s2"].values, win["s2_clear"].values, win["s1"].values,
                                            day_offsets(cube["time_s2"].values, y), day_offsets(cube["time_s1"].values, y), s1_window)
        values, sdays, lengths = cube_series(cube, rows=slice(3, 11), s1_window=s1_window)
        assert list(observed.sum(1)) == list(lengths)
        np.testing.assert_array_equal(dense[observed], values)  # NaN in the same places too
        np.testing.assert_array_equal(np.broadcast_to(days, observed.shape)[observed], sdays)
        assert (np.isnan(dense[~observed])).all()


@pytest.mark.parametrize("name,s1_window", [("tempcnn", 12), pytest.param("stnet", 0, marks=pytest.mark.slow),
                                            pytest.param("ltae", 0, marks=pytest.mark.slow), pytest.param("lstm", 0, marks=pytest.mark.slow)])
def test_fast_path_maps_like_the_reference_on_the_demo_cube(demo, tmp_path, name, s1_window):
    _, legend, cube, no10m = demo
    torch.set_num_threads(1)
    pred = TilePredictor(legend, model_dir(tmp_path, name, cube, legend, s1_window), "cpu", view_batch=97)  # odd: many buckets
    for c in (cube, no10m):
        h = 24
        ref = [pred.rows_reference(c, r0, min(h, r0 + 8)) for r0 in range(0, h, 8)]
        sub = c.isel(y=slice(0, h))
        fast = list(pred.blocks(sub, 8, strip_bytes=10**5))  # small strips: several reader strips per tile
        assert [(r0, r1) for r0, r1, _, _ in fast] == [(0, 8), (8, 16), (16, 24)]
        cls_ref = np.concatenate([a for a, _ in ref])
        conf_ref = np.concatenate([b for _, b in ref])
        cls_new = np.concatenate([a for _, _, a, _ in fast])
        conf_new = np.concatenate([b for _, _, _, b in fast])
        assert np.nanstd(conf_ref) > 1e-3  # the model's outputs vary: the comparison can fail
        np.testing.assert_array_equal(np.isnan(conf_new), np.isnan(conf_ref))
        np.testing.assert_allclose(conf_new, conf_ref, atol=1e-5, equal_nan=True)
        assert (cls_new == cls_ref).mean() > 0.999  # an argmax may flip only on a float tie
        # the single-block entry point and the unprefetched loop give the same
        a, b = pred.rows(c, 8, 16)
        np.testing.assert_array_equal(a, fast[1][2])
        np.testing.assert_allclose(b, fast[1][3], atol=1e-6, equal_nan=True)


def test_reader_strips_are_whole_chunks_within_the_budget(demo):
    _, _, cube, _ = demo
    h = int(cube.sizes["y"])
    assert _strip_rows(cube, 32) == h  # no zarr chunks (in memory): the whole small tile
    assert _strip_rows(cube, 8, budget=1) == 8  # over budget: one block at a time


def test_zarr_strip_reader_reads_what_xarray_reads(tmp_path):
    from cropmap.pipeline.cube import open_cube
    from cropmap.pipeline.levels.pixel.predict import strip_reader
    from cropmap.pipeline.synthetic import make_synthetic_site

    site = make_synthetic_site(tmp_path / "s", tiles_x=1, tiles_y=1, tile_px=24, s2_dates=5, s1_dates=4)
    cube = open_cube(site.cube(site.tiles[0]))
    read = strip_reader(cube)
    assert read.__name__ == "read_zarr"
    for got, v in zip(read(5, 17), ("s2", "s2_clear", "s1")):
        np.testing.assert_array_equal(got, cube[v].isel(y=slice(5, 17)).values)
    assert strip_reader(cube.load().copy()).__name__ in ("read_zarr", "read_xarray")
