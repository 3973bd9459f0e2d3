"""Two consecutive years through the scheduler entry and ``--year auto``, and runs killed in every stage.

Full pipeline runs on the real demo data with the fast recipe (about a minute each on 2 cores): slow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cropmap, demo_doc, write_site

from cropmap.pipeline.fsio import sha256_path

pytestmark = pytest.mark.slow
TILES_2019 = ("0000280849BAC91C", "000028085BF08E7E")
SECRET = "ya29.never-write-this-token"


def sums(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): sha256_path(p) for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def yearly(tmp_path_factory):
    """A site whose 2019 tiles arrive after a first scheduled run: 2018, then 2019 initialised from 2018."""
    root = tmp_path_factory.mktemp("yearly")
    data, held = root / "data", root / "held"
    shutil.copytree(Path(demo_doc()["local"]["root"]), data)
    held.mkdir()
    for t in TILES_2019:
        shutil.move(data / t, held / t)
    doc = demo_doc("yearly", transfer="previous-year")
    doc["local"]["root"] = str(data)
    write_site(root / "sites", doc)
    keyfile = root / "key.json"
    keyfile.write_text(json.dumps({"private_key": SECRET}))
    env = {**os.environ, "CROPMAP_SITES_DIR": str(root / "sites"), "EE_ACCESS_TOKEN": SECRET,
           "GOOGLE_APPLICATION_CREDENTIALS": str(keyfile)}
    out = root / "runs"
    entry = cropmap("schedule", "--site", "yearly", "--out", out, "--print", env=env)
    assert entry.returncode == 0, entry.stderr
    line = entry.stdout.strip()
    assert line.startswith("0 6 * * 1 ") and "--year auto" in line
    command = line.split(" ", 5)[5].rsplit("# cropmap:", 1)[0]  # what cron would run (logs to OUT/SITE/schedule.log)

    def scheduled():
        return subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=900)

    first = scheduled()
    for t in TILES_2019:  # the 2019 labels are published
        shutil.move(held / t, data / t)
    second = scheduled()
    third = scheduled()
    log = (out / "yearly" / "schedule.log").read_text()
    return {"out": out, "first": first, "second": second, "third": third, "log": log, "env": env}


def test_two_years_through_the_scheduler_with_transfer(yearly):
    out, log = yearly["out"], yearly["log"]
    assert yearly["first"].returncode == 0 and yearly["second"].returncode == 0, log
    assert "--year auto: 2018" in log and "2019 waits" in log and "--year auto: 2019" in log
    r18 = json.loads((out / "yearly" / "2018" / "run.json").read_text())
    r19 = json.loads((out / "yearly" / "2019" / "run.json").read_text())
    assert r18["status"] == r19["status"] == "succeeded" and r19["transfer_from"] == 2018
    cfg = json.loads((out / "yearly" / "2019" / r19["outputs"]["model"] / "config.json").read_text())
    assert cfg["fit"]["pretrained"].endswith("2018/versions/v1/models/seed-0")
    t = json.loads((out / "yearly" / "2019" / r19["outputs"]["transfer"]).read_text())
    assert t["runs"] and set(t["mean_gain"]) >= {"overall_accuracy", "macro_f1"}
    html = (out / "yearly" / "2019" / r19["outputs"]["report"]).read_text()
    assert "Changes since 2018" in html and "Cross-year transfer" in html and "Mapped area per class" in html
    assert "Comparison with the label source" in html and html.count("data:image/png;base64,") >= 6
    # the third scheduled run has nothing new: it does nothing
    assert yearly["third"].returncode == 0
    assert all(s["skipped"] for s in json.loads((out / "yearly" / "2019" / "run.json").read_text())["stages"].values())
    proc = cropmap("runs", "--out", out, env=yearly["env"])
    assert proc.returncode == 0 and "* yearly" in proc.stdout and "2018 v1" in proc.stdout and "2019 v1" in proc.stdout


def test_credentials_are_never_written(yearly):
    assert SECRET not in yearly["log"]
    for p in yearly["out"].rglob("*"):
        if p.is_file() and p.suffix in (".json", ".html", ".log", ".csv", ".txt", ".yaml"):
            assert SECRET not in p.read_text(errors="ignore"), p


STAGES = ["ingest", "labels", "tensors", "train", "predict", "evaluate", "report"]


def test_killed_in_every_stage_then_rerun(yearly, tmp_path):
    """SIGKILL during each stage in turn (each rerun resumes and is killed one stage further), then finish."""
    out, env = tmp_path / "runs", yearly["env"]
    shutil.copytree(yearly["out"] / "yearly" / "2018", out / "yearly" / "2018", symlinks=True)
    last_year = sums(out / "yearly" / "2018" / "versions")
    helper = Path(__file__).with_name("faultrun.py")
    ydir = out / "yearly" / "2019"
    done_before: dict[str, dict] = {}
    for stage in STAGES:
        proc = subprocess.run([sys.executable, str(helper), stage, "run", "--site", "yearly", "--year", "2019", "--out", str(out),
                               "--transfer", "none"], env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == -9, (stage, proc.stderr[-2000:])
        m = json.loads((ydir / "versions" / "v1" / "run.json").read_text())
        assert m["stages"][stage]["status"] == "running" and m["status"] == "running"
        for name, rec in done_before.items():  # nothing lost: earlier stages are still done, outputs intact
            assert m["stages"][name]["fingerprint"] == rec["fingerprint"]
            for o in rec["outputs"].values():
                assert sha256_path(ydir / "versions" / "v1" / o["path"]) == o["sha256"], (stage, o)
        done_before = {n: s for n, s in m["stages"].items() if s["status"] == "done"}
        assert list(done_before) == STAGES[:STAGES.index(stage)]
        assert not (ydir / "map").exists()  # nothing published before a version completes
        assert sums(out / "yearly" / "2018" / "versions") == last_year
    # a corrupted intermediate (the cube of one tile) is detected by its checksum and rebuilt
    chunk = next(p for p in (ydir / "versions" / "v1" / "cube").rglob("*") if p.is_file() and p.stat().st_size > 100)
    chunk.write_bytes(b"\0" * chunk.stat().st_size)
    proc = cropmap("run", "--site", "yearly", "--year", "2019", "--out", out, "--transfer", "none", env=env)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((ydir / "run.json").read_text())
    assert m["status"] == "succeeded" and m["version"] == "v1" and not m["stages"]["ingest"]["skipped"]
    assert not list(ydir.rglob("*.tmp")) and (ydir / "map" / "crops.tif").exists()
    assert sums(out / "yearly" / "2018" / "versions") == last_year
