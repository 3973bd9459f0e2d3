"""Training loop, batching, checkpoints and the forest baseline on small synthetic series."""

import numpy as np
import pytest
import torch
from conftest import seasonal_series as synthetic

from cropmap.models.checkpoint import load_model, read_meta, save_model
from cropmap.models.forest import binned_features
from cropmap.models.registry import build_model, model_names
from cropmap.models.series import Series, band_statistics, make_batch, select_positions
from cropmap.models.training import FitConfig, class_weights, fit, predict_proba

BANDS = ["B04", "B08", "VV"]


def stnet(series, n_classes=2):
    mean, std = band_statistics(series)
    model, cfg = build_model("stnet", bands=BANDS, n_classes=n_classes, mean=mean.tolist(), std=std.tolist())
    return model, cfg, mean, std


def test_registry_lists_stnet():
    assert "stnet" in model_names()


def test_batches_pad_mask_and_normalise():
    s, _ = synthetic(4)
    mean, std = band_statistics(s)
    b = make_batch(s, np.array([0, 1]), mean, std, max_len=16)
    assert b["x"].shape[0] == 2 and b["x"].shape[1] <= 16
    assert not torch.isnan(b["x"]).any()
    assert (b["present"][..., 0] == b["present"][..., 1]).all()
    assert (b["x"][~b["present"]] == 0).all()
    assert b["mask"].any(1).all()


def test_evaluation_subsampling_is_deterministic_and_training_is_random():
    a = select_positions(100, 10, None)
    assert list(a) == list(select_positions(100, 10, None)) and a[0] == 0 and a[-1] == 99
    rng = np.random.default_rng(0)
    r1, r2 = select_positions(100, 10, rng), select_positions(100, 10, rng)
    assert len(r1) == 10 and (np.diff(r1) > 0).all() and list(r1) != list(r2)
    assert list(select_positions(5, 10, rng)) == [0, 1, 2, 3, 4]


def test_class_weights_favour_rare_classes():
    w = class_weights(np.array([0, 0, 0, 0, 1]), 3)
    assert w[1] > w[0] and w[2] == 0


def test_fit_learns_and_is_reproducible():
    s, y = synthetic()
    results = []
    for _ in range(2):
        torch.manual_seed(3)  # initial weights
        model, _, mean, std = stnet(s)
        fit(model, s, y, mean, std, FitConfig(epochs=15, batch_size=32, max_len=32, seed=3))
        p = predict_proba(model, s, mean, std, 32)
        results.append(p)
    assert (results[0].argmax(1) == y).mean() > 0.9
    np.testing.assert_allclose(results[0], results[1], atol=1e-5)  # same seed, same model
    np.testing.assert_allclose(results[0].sum(1), 1, atol=1e-5)


def test_early_stopping_keeps_the_best_epoch():
    s, y = synthetic()
    model, _, mean, std = stnet(s)
    r = fit(model, s, y, mean, std, FitConfig(epochs=6, batch_size=32, max_len=32, patience=2), val=s, y_val=y)
    assert 1 <= r.best_epoch <= len(r.history) and "val_macro_f1" in r.history[0]


def test_checkpoint_round_trip_without_pickle(tmp_path):
    s, y = synthetic(20)
    model, cfg, mean, std = stnet(s)
    meta = {"model": "stnet", "model_config": cfg, "bands": BANDS, "normalisation": {"mean": mean.tolist(), "std": std.tolist()},
            "classes": [{"index": 0, "label": 1, "name": "a"}, {"index": 1, "label": 2, "name": "b"}], "max_len": 32}
    save_model(tmp_path, model, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    back, meta2 = load_model(tmp_path)
    np.testing.assert_allclose(predict_proba(back, s, mean, std, 32), predict_proba(model, s, mean, std, 32), atol=1e-6)
    assert meta2["classes"][1]["name"] == "b"
    (tmp_path / "config.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="format"):
        read_meta(tmp_path)


def test_forest_features_are_binned_medians_with_nan_for_gaps():
    s = Series(np.array([[1.0], [3.0], [10.0]], np.float32), np.array([0.0, 10.0, 100.0], np.float32), np.array([0, 3]))
    f = binned_features(s, edges=np.array([0, 30, 60, 120], np.float32))
    np.testing.assert_allclose(f, [[2.0, np.nan, 10.0]])


def test_interleaved_views_cover_every_observation_once():
    from cropmap.models.series import interleaved_views

    views = interleaved_views(10, 4)
    assert [list(v) for v in views] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(np.concatenate(interleaved_views(157, 48)).tolist()) == list(range(157))
    assert [list(v) for v in interleaved_views(3, 48)] == [[0, 1, 2]]


def test_prediction_averages_views_and_ignores_batch_size():
    s, y = synthetic(30)
    torch.manual_seed(0)
    model, _, mean, std = stnet(s)
    a = predict_proba(model, s, mean, std, max_len=8, batch_size=7)
    b = predict_proba(model, s, mean, std, max_len=8, batch_size=1000)
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(a.sum(1), 1, atol=1e-5)


def test_augmentations_touch_only_observed_values_and_drop_seen_band_patterns():
    from cropmap.models.series import Augment, missing_band_patterns

    s, _ = synthetic(40)
    # make the first ten series lack band 0 entirely, as a tile without its 10 m export would
    for i in range(10):
        s.values[s.offsets[i]:s.offsets[i + 1], 0] = np.nan
    assert missing_band_patterns(s) == [[0]]
    mean, std = band_statistics(s)
    idx = np.arange(10, 40)
    plain = make_batch(s, idx, mean, std, 16, rng=np.random.default_rng(1))
    aug = make_batch(s, idx, mean, std, 16, rng=np.random.default_rng(1),
                     augment=Augment(jitter_days=10, offset_std=0.3, date_noise_p=0.2, band_drop_p=1.0, band_patterns=[[0]]))
    assert not aug["present"][..., 0].any()  # every series lost band 0
    assert torch.equal(aug["present"][..., 1:], plain["present"][..., 1:])
    assert (aug["x"][~aug["present"]] == 0).all()  # missing stays missing
    assert not torch.allclose(aug["x"][..., 1:], plain["x"][..., 1:])
    shift = (aug["days"] - plain["days"])[plain["mask"]]
    assert shift.abs().max() <= 10 and shift.abs().max() > 0


def test_focal_loss_reduces_to_cross_entropy_and_down_weights_easy_samples():
    from cropmap.models.training import FocalLoss

    logits = torch.tensor([[4.0, 0.0], [0.2, 0.0], [0.0, 1.0]])
    target = torch.tensor([0, 0, 0])
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    assert torch.allclose(FocalLoss(0.0)(logits, target), ce.mean())
    per = torch.stack([FocalLoss(2.0)(logits[i:i + 1], target[i:i + 1]) for i in range(3)])
    assert (per < ce).all() and per[0] / ce[0] < per[2] / ce[2]  # the easy sample loses most
    w = torch.tensor([1.0, 3.0])
    assert torch.allclose(FocalLoss(0.0, w)(logits, torch.tensor([0, 1, 1])),
                          torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 1]), weight=w))


def test_interrupted_fit_resumes_to_the_same_weights(tmp_path):
    s, y = synthetic(64)
    cfg = FitConfig(epochs=5, batch_size=16, max_len=24, seed=1)

    def run(checkpoint=None, crash_at=None):
        torch.manual_seed(0)
        model, _, mean, std = stnet(s)

        def on_epoch(row):
            if row["epoch"] == crash_at:
                raise KeyboardInterrupt

        try:
            result = fit(model, s, y, mean, std, cfg, val=s, y_val=y, on_epoch=on_epoch, checkpoint=checkpoint)
        except KeyboardInterrupt:
            return None, None
        return model, result

    reference, ref_result = run()
    ckpt = tmp_path / "checkpoint.pt"
    assert run(ckpt, crash_at=3) == (None, None) and ckpt.is_file()
    resumed, result = run(ckpt)
    assert result.resumed_from == 4 and len(result.history) == 5
    assert [r["train_loss"] for r in result.history] == pytest.approx([r["train_loss"] for r in ref_result.history])
    for k, v in reference.state_dict().items():
        assert torch.allclose(v.float(), resumed.state_dict()[k].float(), atol=1e-6), k
    # another configuration never resumes from it
    other = FitConfig(epochs=5, batch_size=16, max_len=24, seed=2)
    torch.manual_seed(0)
    model, _, mean, std = stnet(s)
    assert fit(model, s, y, mean, std, other, checkpoint=ckpt).resumed_from == 0


def test_frozen_encoder_trains_only_the_decoder():
    s, y = synthetic(64)
    model, _, mean, std = stnet(s)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, s, y, mean, std, FitConfig(epochs=2, batch_size=16, max_len=24, freeze_encoder=True))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("decoder."))  # incl. BatchNorm statistics
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    assert all(p.requires_grad for p in model.parameters())


def test_training_log_writes_csv_and_tensorboard(tmp_path):
    from cropmap.models.training_log import TrainingLog

    log = TrainingLog(tmp_path)
    log({"epoch": 1, "train_loss": 1.0})
    log({"epoch": 2, "train_loss": 0.5, "val_loss": 0.7})
    log.close()
    lines = (tmp_path / "history.csv").read_text().splitlines()
    assert lines[0] == "epoch,train_loss,val_loss" and len(lines) == 3
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
