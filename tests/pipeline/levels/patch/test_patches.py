"""Patch tensors from the real demo and WorldCereal cubes, block splits, augmentations, the patch store,
seam-free sliding-window prediction, the patch commands and `cropmap run --level patch` (slow)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from conftest import TILE_FULL, TILE_NO10M, assert_one_line_error, cropmap, demo_doc, write_site

from cropmap.models.patch.checkpoint import build_patch_model
from cropmap.pipeline.errors import SamplesError
from cropmap.pipeline.ingest.local import read_label_raster, read_tile
from cropmap.pipeline.levels.patch.patches import (
    augment_batch,
    budget_patches,
    concat_patches,
    cut_patches,
    load_patch_store,
    netcdf_composite,
    patch_split,
    save_patch_store,
    tile_composite,
)
from cropmap.pipeline.levels.patch.predict import crop_weights, predict_composite, window_starts
from cropmap.pipeline.levels.patch.train import encode_targets, segmentation_metrics
from cropmap.pipeline.sites import load_legend, load_site
from cropmap.pipeline.stages.labels import tile_labels

WORLDCEREAL = "/work/shared/data/worldcereal/points/belgium_cube_2020-11_2021-10_preprocessed_inputs.nc"


@pytest.fixture(scope="module")
def demo():
    site = load_site("demo")
    legend = load_legend(site.legend)
    names = {c.code: c.name for c in legend.classes}
    parts = {}
    for i, tid in enumerate([TILE_FULL, TILE_NO10M]):
        cube, _ = read_tile(site, tid, 2019)
        codes, grid = read_label_raster(site, tid)
        tl = tile_labels(codes, legend, tile=tid, tile_index=i, year=2019, transform=grid.transform)
        parts[tid] = (cube, tl.classes)
    return site, names, parts


def tiny_cube():
    """A 1 x 1-pixel cube with two S2 dates in one bin (one cloudy) and two S1 acquisitions."""
    t2 = np.array(["2019-01-02", "2019-01-05", "2019-02-20"], dtype="datetime64[ns]")
    t1 = np.array(["2019-01-03", "2019-01-09"], dtype="datetime64[ns]")
    s2 = np.zeros((3, 2, 1, 1), np.uint16)
    s2[0, :, 0, 0] = [1000, 3000]
    s2[1, :, 0, 0] = [9000, 9000]  # cloudy
    s2[2, :, 0, 0] = [500, 0]  # second band no data
    clear = np.array([True, False, True]).reshape(3, 1, 1)
    s1 = np.array([[-10.0, -20.0], [-20.0, np.nan]], np.float32).reshape(2, 2, 1, 1)
    return xr.Dataset({"s2": (("time_s2", "band_s2", "y", "x"), s2), "s2_clear": (("time_s2", "y", "x"), clear),
                       "s1": (("time_s1", "band_s1", "y", "x"), s1)},
                      coords={"time_s2": t2, "time_s1": t1},
                      attrs={"year": 2019, "tile": "t", "bands_s2": ["B04", "B08"], "bands_s1": ["VV", "VH"]})


def test_composite_averages_clear_optical_and_radar_in_power_on_real_days():
    comp = tile_composite(tiny_cube(), composite_days=15)
    np.testing.assert_array_equal(comp.days, [7.0, 52.0])  # bin centres, day offsets
    np.testing.assert_allclose(comp.x[0, :2, 0, 0], [0.1, 0.3], rtol=1e-6)  # the cloudy date is left out
    np.testing.assert_allclose(comp.x[0, 2, 0, 0], 10 * np.log10((0.1 + 0.01) / 2), rtol=1e-5)
    np.testing.assert_allclose(comp.x[0, 3, 0, 0], -20.0, rtol=1e-6)
    assert np.isnan(comp.x[1, 1, 0, 0]) and comp.valid.all()


def test_demo_patches_align_inputs_labels_and_blocks(demo):
    _, names, parts = demo
    cube, classes = parts[TILE_FULL]
    comp = tile_composite(cube)
    ps = cut_patches(comp, 16, classes, block=2, class_names=names)
    assert ps.x.shape == (16, len(comp.days), 12, 16, 16) and len(ps.table) == 16
    r, c = int(ps.table.row[5]), int(ps.table.col[5])
    np.testing.assert_array_equal(ps.labels[5], classes[r:r + 16, c:c + 16])
    np.testing.assert_array_equal(ps.x[5], comp.x[:, :, r:r + 16, c:c + 16])
    assert ps.table["block"].nunique() == 4
    assert np.nanmax(ps.vegetated) <= 1 and (np.diff(comp.days) > 0).all()
    no10 = cut_patches(tile_composite(parts[TILE_NO10M][0]), 16)
    assert np.isnan(no10.vegetated).all()  # no red/NIR: NDVI unknown


def test_worldcereal_cube_is_read_with_real_units():
    comp = netcdf_composite(WORLDCEREAL, ["B04", "B08", "B8A", "VV", "VH"])
    assert comp.x.shape[1:] == (5, 100, 100) and len(comp.days) == 12
    assert np.isnan(comp.x[:, 2]).all()  # no B8A in the file
    vv = comp.x[:, 3][~np.isnan(comp.x[:, 3])]
    assert -25 < np.median(vv) < -3  # backscatter in dB
    red = comp.x[:, 0][~np.isnan(comp.x[:, 0])]
    assert 0 < np.median(red) < 0.3  # reflectance
    assert comp.days[0] < 0 < comp.days[-1]  # November of the previous year


def test_block_split_is_disjoint_seeded_and_budgets_are_labelled(demo):
    _, names, parts = demo
    ps = concat_patches([cut_patches(tile_composite(c), 16, cl, 2, names) for c, cl in parts.values()])
    a, b = patch_split(ps.table, 3, 0.3, 0.2), patch_split(ps.table, 3, 0.3, 0.2)
    assert a == b and a != patch_split(ps.table, 4, 0.3, 0.2)
    sides = [set(ps.table.block[s]) for s in (a.train, a.val, a.test)]
    assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
    assert sorted(a.train + a.val + a.test) == list(range(len(ps)))
    pick = budget_patches(ps.labels, a.train, 3, 0)
    assert len(pick) == 3 and set(pick) <= set(a.train) and all((ps.labels[i] > 0).any() for i in pick)
    with pytest.raises(SamplesError, match="block"):
        patch_split(ps.table.iloc[:1], 0)


def test_augmentations_keep_inputs_masks_and_labels_together():
    rng = np.random.default_rng(0)
    lab = torch.from_numpy(rng.integers(0, 5, (6, 8, 8)))
    x = lab[:, None, None].float().repeat(1, 3, 2, 1, 1)  # inputs encode the label
    valid = (lab[:, None] % 2 == 0).repeat(1, 3, 1, 1)
    xa, va, la = augment_batch(x, valid, lab, rng)
    assert torch.equal(xa[:, 0, 0].long(), la) and torch.equal(va[:, 0], la % 2 == 0)
    assert not torch.equal(la, lab)  # something moved


def test_store_round_trip_and_errors(demo, tmp_path):
    _, names, parts = demo
    cube, classes = parts[TILE_FULL]
    ps = cut_patches(tile_composite(cube), 32, classes, 1, names)
    save_patch_store(ps, tmp_path / "p")
    back = load_patch_store(tmp_path / "p")
    np.testing.assert_array_equal(back.x, ps.x)
    np.testing.assert_array_equal(back.labels, ps.labels)
    assert back.class_names == names and list(back.table.block) == list(ps.table.block)
    with pytest.raises(SamplesError, match="not a patch store"):
        load_patch_store(tmp_path)
    (tmp_path / "p" / "x.npy").write_bytes(b"broken")
    with pytest.raises(SamplesError, match="damaged"):
        load_patch_store(tmp_path / "p")


def test_background_policy_in_targets_and_metrics():
    labels = np.array([[[0, 1], [2, 2]]], np.uint8)
    valid = np.ones((1, 2, 2, 2), bool)
    valid[0, :, 1, 1] = False  # never observed: void under both policies
    void = encode_targets(labels, valid, [{"label": 1, "index": 0}, {"label": 2, "index": 1}], "void")
    np.testing.assert_array_equal(void, [[[-1, 0], [1, -1]]])
    cls = encode_targets(labels, valid, [{"label": 0, "index": 0}, {"label": 1, "index": 1}, {"label": 2, "index": 2}], "class")
    np.testing.assert_array_equal(cls, [[[0, 1], [2, -1]]])
    true = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    m = segmentation_metrics(true, pred, np.ones(6, bool), {1: "a", 2: "b"}, [1, 2])
    iou_a, iou_b, iou_bg = 2 / 3, 1 / 2, 1 / 3
    assert m["miou"] == pytest.approx((iou_a + iou_b) / 2)
    assert m["miou_with_background"] == pytest.approx((iou_a + iou_b + iou_bg) / 3)


def test_patch_metrics_follow_the_shared_class_set_rule():
    # class 3 is predicted but absent from the reference: it counts with F1 = IoU = 0 (models/metrics.py's rule)
    true = np.array([1, 1, 2, 2, 2, 2])
    pred = np.array([1, 3, 2, 2, 2, 2])
    m = segmentation_metrics(true, pred, np.ones(6, bool), {1: "a", 2: "b", 3: "c"}, [1, 2])
    assert m["averaged_classes"] == ["a", "b", "c"]
    assert m["miou"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert "predicted but absent" in m["class_set_rule"]
    # a legend class neither in the reference nor predicted has no score and is left out
    m = segmentation_metrics(true, np.array([1, 1, 2, 2, 2, 2]), np.ones(6, bool), {1: "a", 2: "b", 3: "c"}, [1, 2])
    assert m["averaged_classes"] == ["a", "b"] and m["miou"] == pytest.approx(1.0)


def test_windows_cover_everything_and_keep_their_core():
    assert window_starts(64, 32, 8) == [0, 24, 32]
    assert window_starts(20, 32, 8) == [0]
    w = crop_weights(8, 8, 2, (True, False, False, False))  # top edge is the tile's
    assert w.min() > 0 and w[0, 2:6].min() == 1 and w[7, 4] < 1e-2 and w[4, 0] < 1e-2
    with pytest.raises(SamplesError, match="overlap"):
        window_starts(64, 8, 8)


def test_two_window_layouts_give_the_same_map(demo):
    """No seams: two sliding-window layouts (window starts on the STA grid, overlap >= 2 (sta_window + 3)) give one map."""
    _, _, parts = demo
    torch.set_num_threads(1)
    comp = tile_composite(parts[TILE_FULL][0])
    comp.x, comp.valid = comp.x[:, :, :40, :40], comp.valid[:, :40, :40]
    mean = np.nanmean(comp.x, axis=(0, 2, 3)).tolist()
    torch.manual_seed(0)
    m, _ = build_patch_model("stcln", bands=comp.bands, n_classes=4, mean=mean, std=[0.1] * 12, conv_dim=8, d_model=16, n_heads=2,
                             n_layers=1, d_ff=32, sta_window=4)
    with torch.no_grad():
        m.decoder.gamma.fill_(1.0)  # let the spatial attention act
    m.eval()
    a = predict_composite(m, comp, window=32, overlap=16)
    b = predict_composite(m, comp, window=24, overlap=16)
    assert a.shape == (4, 40, 40) and np.allclose(a.sum(0), 1, atol=1e-4)
    np.testing.assert_allclose(a, b, atol=1e-4)
    whole = predict_composite(m, comp, window=40, overlap=0)  # one window: the reference
    np.testing.assert_allclose(a, whole, atol=1e-4)
    # without enough overlap the windows' edges show (what the cropped overlap prevents)
    seams = predict_composite(m, comp, window=16, overlap=2)
    assert np.abs(seams - whole).max() > 1e-3


def test_patch_commands_train_pretrain_evaluate(demo, tmp_path):
    from cropmap.pipeline.errors import CropmapError
    from cropmap.pipeline.levels.patch.commands import pretrain_patches, train_patches

    _, names, parts = demo
    cube, classes = parts[TILE_FULL]
    ps = cut_patches(tile_composite(cube), 16, classes, 1, names)
    save_patch_store(ps.subset(range(6)), tmp_path / "p")
    enc, mod = tmp_path / "enc", tmp_path / "mod"
    proc = cropmap("pretrain", "--method", "masked", "--model", "stcln", "--samples", tmp_path / "p", "--out", enc, "--epochs", "1",
                   "--gate", "0.9")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((enc / "config.json").read_text())["pretrain"]["method"] == "masked"
    proc = cropmap("train", "--model", "stcln", "--samples", tmp_path / "p", "--pretrained", enc, "--out", mod, "--epochs", "1")
    assert proc.returncode == 0, proc.stderr
    proc = cropmap("evaluate", "--model", mod, "--samples", tmp_path / "p", "--json")
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)
    assert {"overall_accuracy", "miou", "miou_with_background", "kappa", "macro_f1", "per_class"} <= set(m)
    with pytest.raises(CropmapError, match="nothing.*patch store"):
        pretrain_patches([tmp_path / "nothing"], tmp_path / "y", model="stcln", epochs=1, lr=1e-3, batch_size=2, mask_ratio=0.4,
                         gate=None, patch_size=16, seed=0, device="cpu")
    kw = dict(model="utae", pretrained=enc, label_fraction=None, epochs=1, lr=1e-3, batch_size=2, seed=0, device="cpu",
              background="void", augment=False, class_weighting="none")
    with pytest.raises(CropmapError, match="'stcln'.*--model stcln"):
        train_patches(tmp_path / "p", tmp_path / "x", **kw)
    with pytest.raises(CropmapError, match="'sky'.*void"):
        train_patches(tmp_path / "p", tmp_path / "x", **{**kw, "model": "stcln", "pretrained": None, "background": "sky"})
    with pytest.raises(CropmapError, match="not --model 'utae'"):
        pretrain_patches([tmp_path / "p"], tmp_path / "y", model="utae", epochs=1, lr=1e-3, batch_size=2, mask_ratio=0.4, gate=None,
                         patch_size=16, seed=0, device="cpu")


def test_site_patch_section_is_validated(sites_dir):
    doc = demo_doc("demo-bad-patch")
    doc["level"] = "patch"
    doc["patch"] = {"window": 16, "overlap": 16}
    write_site(sites_dir, doc)
    proc = cropmap("run", "--site", "demo-bad-patch", "--out", sites_dir / "runs")
    assert_one_line_error(proc, "overlap 16 must be smaller than window 16")


@pytest.mark.slow
def test_run_level_patch_writes_the_contract(tmp_path, sites_dir):
    doc = demo_doc("demo-patch", split_seeds=[0])
    doc["patch"] = {"epochs": 2, "model_options": {"conv_dim": 8, "d_model": 16, "n_heads": 2, "n_layers": 1, "d_ff": 32},
                    "pretrain": {"method": "masked", "epochs": 1}}
    write_site(sites_dir, doc)
    proc = cropmap("run", "--site", "demo-patch", "--level", "patch", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "demo-patch" / "2019"
    man = json.loads((run / "run.json").read_text())
    assert man["status"] == "succeeded" and {"map", "metrics", "model", "report", "encoder"} <= set(man["outputs"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["level"] == "patch" and "miou_with_background" in metrics and metrics["baseline"]["overall_accuracy"] > 0
    assert metrics["boosting"]["overall_accuracy"] > 0 and "miou_with_background" in metrics["boosting"]
    assert pd.notna(metrics["miou"])


def test_training_level_is_another_spelling_of_level(sites_dir):
    from cropmap.pipeline.errors import SiteError

    doc = demo_doc("demo-tl")
    doc["training"]["level"] = "patch"
    write_site(sites_dir, doc)
    assert load_site("demo-tl").level == "patch"
    doc = demo_doc("demo-tl2")
    doc["training"]["level"] = "patch"
    doc["level"] = "parcel"
    write_site(sites_dir, doc)
    with pytest.raises(SiteError, match="training.level 'patch' disagree"):
        load_site("demo-tl2")


def test_patch_validation_share_is_its_own_or_the_training_sections(sites_dir, demo):
    _, names, parts = demo
    ps = concat_patches([cut_patches(tile_composite(c), 16, cl, 2, names) for c, cl in parts.values()])
    # the demo's patches train on every non-test block (a fixed schedule): no validation blocks
    site = load_site("demo")
    assert site.training.val_fraction > 0 and site.patch.split_val_fraction(site.training) == 0.0
    split = patch_split(ps.table, 0, site.training.test_fraction, site.patch.split_val_fraction(site.training))
    assert split.val == [] and len(split.train) > 0
    # without patch.val_fraction the training section's share applies, and the test blocks stay the same
    doc = demo_doc("demo-patch-val")
    doc["patch"] = {}
    write_site(sites_dir, doc)
    other = load_site("demo-patch-val")
    share = other.patch.split_val_fraction(other.training)
    assert share == other.training.val_fraction > 0
    held = patch_split(ps.table, 0, other.training.test_fraction, share)
    assert len(held.val) > 0 and held.test == split.test
