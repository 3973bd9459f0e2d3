"""``training.model: auto``: candidates trained on the same splits, chosen on validation only, the map
drawn by the winner's split-seed models averaged, every candidate in metrics.json and the report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from conftest import demo_doc, write_site

from cropmap.pipeline.runner import Runner
from cropmap.pipeline.sites import load_site
from cropmap.pipeline.workflow import build_stages

CHEAP = [{"model": "ltae", "epochs": 2}, "forest", "boosting"]


@pytest.fixture
def auto_site(sites_dir):
    write_site(sites_dir, demo_doc("demo-auto", model="auto", model_options={}, candidates=CHEAP, split_seeds=[0, 1]))
    return load_site("demo-auto")


def _run(site, out, until=None):
    stages, _ = build_stages(site, 2019, device="cpu")
    if until is not None:
        stages = stages[: [s.name for s in stages].index(until) + 1]
    return Runner(out, {"site": site.name, "year": 2019}).run(stages, lambda done: {})


def test_auto_run_chooses_on_validation_maps_with_the_ensemble_and_reports_every_candidate(auto_site, tmp_path):
    run = tmp_path / "run"
    _run(auto_site, run)
    choice = json.loads((run / "models" / "choice.json").read_text())
    names = [c["name"] for c in choice["candidates"]]
    assert names == ["ltae", "forest", "boosting", "blend"]  # blend: the mean of the three
    # the winner has the best mean validation macro F1 (ties by validation OA)
    mean_f1 = {c["name"]: np.mean([v["macro_f1"] for v in c["validation"]]) for c in choice["candidates"]}
    best_single = max((n for n in mean_f1 if n != "blend"), key=mean_f1.get)
    if "bootstrap" not in choice:  # the blend ranked first (ties: by validation OA)
        assert choice["winner"] == "blend" and mean_f1["blend"] >= mean_f1[best_single]
    else:  # a single model ranks first: it wins only with a bootstrap lead over the blend beyond validation noise
        boot = choice["bootstrap"]
        assert boot["candidate"] == best_single and boot["against"] == "blend" and mean_f1[best_single] >= mean_f1["blend"]
        assert choice["winner"] == ("blend" if boot["p_candidate_better"] < boot["needed"] else best_single)
    assert [r["name"] for r in choice["ranking"]][0] == choice["winner"]
    members = names[:3] if choice["winner"] == "blend" else [choice["winner"]]
    assert choice["members"] == members
    assert choice["ensemble"] == [f"models/seed-{s}/{m}" for s in (0, 1) for m in members]
    for s in (0, 1):
        for n in names[:3]:
            assert (run / "models" / f"seed-{s}" / n / "model.safetensors").is_file()

    m = json.loads((run / "metrics.json").read_text())
    assert m["selection"] == "auto" and m["model"] == choice["winner"] and m["choice"]["winner"] == choice["winner"]
    rows = {r["name"]: r for r in m["candidates"]}
    assert set(rows) == set(names) and rows[choice["winner"]]["winner"]
    for r in rows.values():
        assert 0 <= r["validation_macro_f1"] <= 1 and 0 <= r["test_overall_accuracy"] <= 1
    # the winner's test figures are the run's figures; the forest candidate is the forest baseline
    assert rows[choice["winner"]]["test_overall_accuracy"] == pytest.approx(m["overall_accuracy"], abs=1e-4)
    assert "calibration" in m and set(m["calibration"]["ece"]) == {"validation", "test"}
    assert rows["forest"]["test_overall_accuracy"] == pytest.approx(m["baseline"]["overall_accuracy"], abs=1e-4)
    assert rows["boosting"]["test_overall_accuracy"] == pytest.approx(m["boosting"]["overall_accuracy"], abs=1e-4)
    assert "chosen among the candidates" in m["protocol"] and "validation pixels only" in m["protocol"]

    with rasterio.open(run / "map" / "crops.tif") as ds:
        assert f"auto: mean of {2 * len(members)} split-seed models" in ds.tags()["model"]
    html = (run / "report.html").read_text()
    assert "Model choice" in html and all(n in html for n in names)


def test_the_choice_does_not_read_test_labels(auto_site, tmp_path, monkeypatch):
    """Scramble the labels of the test pixels after each split is drawn: the choice, its ranking and
    every validation figure stay the same (so no test label entered them)."""
    import cropmap.pipeline.levels.pixel.stages as stages_mod

    _run(auto_site, tmp_path / "plain", until="train")
    plain = json.loads((tmp_path / "plain" / "models" / "choice.json").read_text())

    real_load, real_split = stages_mod.load_store, stages_mod.split_for
    held: dict = {}
    changed = []

    def load(*a, **kw):
        held["samples"] = real_load(*a, **kw)
        return held["samples"]

    def split(rows, *a, **kw):
        table = held["samples"].table
        held.setdefault("labels", table["label"].to_numpy().copy())
        table["label"] = held["labels"]  # each seed's split is drawn on the true labels
        sp = real_split(table.loc[rows.index], *a, **kw)
        test = np.nonzero(sp.row_sides(table) == "test")[0]
        labels = held["labels"].copy()
        classes = np.unique(labels)
        new = classes[(np.searchsorted(classes, labels[test]) + 1) % len(classes)]  # every test label becomes another class
        changed.append(int((new != labels[test]).sum()))
        labels[test] = new
        table["label"] = labels
        return sp

    monkeypatch.setattr(stages_mod, "load_store", load)
    monkeypatch.setattr(stages_mod, "split_for", split)
    _run(auto_site, tmp_path / "scrambled", until="train")
    scrambled = json.loads((tmp_path / "scrambled" / "models" / "choice.json").read_text())
    assert changed and all(n > 0 for n in changed)
    assert scrambled["winner"] == plain["winner"] and scrambled["ranking"] == plain["ranking"]
    assert [c["validation"] for c in scrambled["candidates"]] == [c["validation"] for c in plain["candidates"]]


def test_auto_with_pretraining_or_transfer_is_refused_with_one_line(sites_dir):
    from cropmap.pipeline.errors import CropmapError

    write_site(sites_dir, demo_doc("demo-auto-pre", model="auto", model_options={}, pretrain={"method": "moco"}))
    with pytest.raises(CropmapError, match="pre-training .* needs one model"):
        load_site("demo-auto-pre")
    write_site(sites_dir, demo_doc("demo-auto-bad", model="auto", model_options={}, candidates=["ltae", "no-such-model"]))
    with pytest.raises(CropmapError, match="unknown pixel model 'no-such-model'"):
        load_site("demo-auto-bad")


def test_the_blend_is_the_mean_of_the_candidates_probabilities_with_its_own_temperature(auto_site, tmp_path):
    """Its validation figures are those of the mean of the members' raw validation probabilities, and its
    temperature is fitted on that mean (every validation parcel weighted alike)."""
    from cropmap.models.calibration import fit_temperature
    from cropmap.pipeline.levels.common import encode_labels
    from cropmap.pipeline.levels.pixel.evaluate import predict_samples
    from cropmap.pipeline.levels.selection import validation_scores
    from cropmap.pipeline.samples import load_store
    from cropmap.pipeline.splits import ParcelSplit

    run = tmp_path / "run"
    _run(auto_site, run, until="train")
    choice = json.loads((run / "models" / "choice.json").read_text())
    samples = load_store(run / "samples" / "pixels", mmap=False)
    blend = next(c for c in choice["candidates"] if c["name"] == "blend")
    for row in blend["validation"]:
        seed_dir = run / "models" / f"seed-{row['seed']}"
        split = ParcelSplit.from_dict(json.loads((seed_dir / "ltae" / "split.json").read_text()))
        val = samples.subset(np.nonzero(split.row_sides(samples.table) == "val")[0])
        probs = []
        for name in ("ltae", "forest", "boosting"):
            p, meta, aligned = predict_samples(seed_dir / name, val)
            probs.append(p)
        y = encode_labels(aligned, meta["classes"])
        want = validation_scores(y, np.arange(len(y)), np.mean(probs, axis=0))
        assert row["macro_f1"] == pytest.approx(want["macro_f1"]) and row["overall_accuracy"] == pytest.approx(want["overall_accuracy"])
        t = fit_temperature(np.mean(probs, axis=0), y, aligned.table["parcel_id"].to_numpy())["temperature"]
        assert choice["blend_calibration"][str(row["seed"])]["temperature"] == pytest.approx(t)


def test_parcel_level_auto_ranks_psetae_and_series_candidates_on_validation(sites_dir, tmp_path):
    doc = demo_doc("demo-parcel-auto", split_seeds=[0])
    doc["parcel"] = {"model": "auto", "candidates": ["psetae", "forest", "boosting"], "epochs": 2}
    write_site(sites_dir, doc)
    site = load_site("demo-parcel-auto")
    stages, _ = build_stages(site, 2019, device="cpu", level="parcel")
    Runner(tmp_path / "p", {"site": site.name, "year": 2019}).run(stages, lambda done: {})
    choice = json.loads((tmp_path / "p" / "parcel_models" / "choice.json").read_text())
    assert [c["name"] for c in choice["candidates"]] == ["psetae", "forest", "boosting", "blend"]
    f1 = {c["name"]: c["validation"][0]["macro_f1"] for c in choice["candidates"]}
    single = max((n for n in f1 if n != "blend"), key=f1.get)
    if "bootstrap" in choice:  # a single model ranked above the blend: it needs a lead beyond validation noise
        assert choice["bootstrap"]["candidate"] == single and f1[single] >= f1["blend"]
        assert choice["winner"] == ("blend" if choice["bootstrap"]["p_candidate_better"] < choice["bootstrap"]["needed"] else single)
    else:
        assert choice["winner"] == "blend" and f1["blend"] >= f1[single]  # the blend ranked first (ties: by OA)
    m = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert m["selection"] == "auto" and {r["name"] for r in m["candidates"]} == set(f1)
    assert m["runs"][0]["candidates"][choice["winner"]]["overall_accuracy"] == m["runs"][0]["model"]["overall_accuracy"]
    import geopandas as gpd

    parcels = gpd.read_file(tmp_path / "p" / "map" / "parcels.gpkg")
    assert len(parcels) > 0 and parcels["probability"].between(0, 1).all()
