"""The three levels behind one interface: the device is resolved once and reaches every level, the
report stage is fingerprinted the same way at every level, ``--until`` has one parser."""

from __future__ import annotations

import pytest
import torch
from conftest import TILE_FULL, demo_doc, write_site

from cropmap.pipeline.errors import CropmapError
from cropmap.pipeline.runner import Runner, _file_fingerprint  # noqa: F401  (the runner's own fingerprint)
from cropmap.pipeline.sites import load_site
from cropmap.pipeline.stages import report as report_mod
from cropmap.pipeline.workflow import LEVELS, build_stages, get_level, resolve_device

TRAIN_CALL = {"pixel": "train_model", "parcel": "train_parcel_model", "patch": "train_patch_model"}


class _Stop(Exception):
    pass


@pytest.fixture
def one_tile_site(sites_dir):
    doc = demo_doc("demo-one-tile")
    doc["local"]["tiles"] = [t for t in doc["local"]["tiles"] if t["id"] == TILE_FULL]
    doc["years"], doc["default_year"] = [2019], 2019
    write_site(sites_dir, doc)
    return load_site("demo-one-tile")


def test_levels_are_known_by_name():
    assert sorted(LEVELS) == ["parcel", "patch", "pixel"]
    assert get_level("parcel").sample_store == "samples/parcels"
    with pytest.raises(CropmapError, match="unknown level 'voxel'"):
        get_level("voxel")


@pytest.mark.parametrize("cuda", [True, False])
def test_device_auto_resolves_to_cuda_only_when_torch_sees_one(cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert resolve_device("auto") == resolve_device(None) == ("cuda" if cuda else "cpu")
    assert resolve_device("cpu") == "cpu"
    if not cuda:
        with pytest.raises(CropmapError, match="no CUDA device"):
            resolve_device("cuda")


@pytest.mark.parametrize("level", ["pixel", "parcel", "patch"])
def test_device_auto_reaches_the_training_of_every_level(level, one_tile_site, tmp_path, monkeypatch):
    """With CUDA reported available, `--device auto` trains on cuda at every level (the patch level
    used to fall back to cpu); without it, on cpu. The training call is stopped before any CUDA use."""
    import importlib

    stages_mod = importlib.import_module(f"cropmap.pipeline.levels.{level}.stages")
    for cuda in (True, False):
        seen: list[str] = []

        def stop(*args, seen=seen, **kwargs):
            cfg = kwargs.get("fit_config") or next(a for a in args if type(a).__name__.endswith("FitConfig"))
            seen.append(cfg.device)
            raise _Stop

        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        monkeypatch.setattr(stages_mod, TRAIN_CALL[level], stop)
        stages, _ = build_stages(one_tile_site, 2019, device="auto", level=level)
        with pytest.raises(_Stop):
            Runner(tmp_path / f"{level}-{cuda}", {"site": one_tile_site.name, "year": 2019}).run(stages, lambda done: {})
        assert seen == ["cuda" if cuda else "cpu"], (level, cuda, seen)


def test_run_command_resolves_the_device_at_the_entry_point(one_tile_site, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import cropmap.pipeline.workflow as wf
    from cropmap.pipeline.cli import app

    got = {}

    def capture(site, year, **kw):
        got.update(kw)
        raise CropmapError("stop here")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(wf, "build_stages", capture)
    for level in ("pixel", "parcel", "patch"):
        got.clear()
        CliRunner().invoke(app, ["run", "--site", one_tile_site.name, "--level", level, "--out", str(tmp_path)])
        assert got["device"] == "cuda" and got["level"] == level


def test_report_stage_config_holds_the_report_version_at_every_level(one_tile_site, monkeypatch):
    for level in ("pixel", "parcel", "patch"):
        stages, _ = build_stages(one_tile_site, 2019, device="cpu", level=level)
        report = next(s for s in stages if s.name == "report")
        assert report.config["report"] == report_mod.REPORT_VERSION, level


def test_changing_the_report_version_reruns_the_report_of_a_parcel_run(one_tile_site, tmp_path, monkeypatch):
    """A parcel-level run, rerun unchanged, skips every stage; after a REPORT_VERSION bump it reruns the
    report stage and nothing else (the parcel report used to leave the version out of its config)."""
    run_dir = tmp_path / "run"
    header = {"site": one_tile_site.name, "year": 2019}

    def run() -> dict[str, str]:
        events: dict[str, str] = {}
        stages, _ = build_stages(one_tile_site, 2019, device="cpu", level="parcel", epochs=1)
        Runner(run_dir, header, on_event=lambda name, event, rec: events.__setitem__(name, event)).run(stages, get_level("parcel").outputs)
        return events

    first = run()
    assert first["report"] == "done"
    assert set(run().values()) == {"skipped"}
    monkeypatch.setattr(report_mod, "REPORT_VERSION", report_mod.REPORT_VERSION + "-next")
    third = run()
    assert third["report"] == "done"
    assert {n for n, e in third.items() if e != "skipped"} == {"report"}


@pytest.mark.parametrize("level", ["pixel", "parcel", "patch"])
def test_until_with_or_without_the_year_gives_the_same_run(level, one_tile_site):
    """`--until 2019-06-30` and `--until 06-30` build identical stages (same cut, same fingerprints)."""
    a, _ = build_stages(one_tile_site, 2019, device="cpu", level=level, until="2019-06-30")
    b, _ = build_stages(one_tile_site, 2019, device="cpu", level=level, until="06-30")
    assert [(s.name, s.config, s.after) for s in a] == [(s.name, s.config, s.after) for s in b]
    assert next(s for s in a if s.name == "ingest").config["until"] == [6, 30]


def test_parcel_until_uses_the_same_parser():
    import numpy as np

    from cropmap.pipeline.levels.parcel.train import ParcelOptions, until_days

    years = np.array([2019, 2020])
    assert until_days("2019-06-30", years).tolist() == until_days("06-30", years).tolist() == [180.0, 181.0]
    ParcelOptions("psetae", "none", "s2", "nn", None, "2019-06-30").check()
    with pytest.raises(CropmapError, match="not a date"):
        ParcelOptions("psetae", "none", "s2", "nn", None, "06-31").check()
