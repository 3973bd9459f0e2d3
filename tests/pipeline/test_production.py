"""Production reruns without the full pipeline: lock, run versions, --year auto, schedules, faults, hygiene."""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import demo_doc, write_site

from cropmap.pipeline import production, schedule, versions
from cropmap.pipeline.availability import resolve_auto_year
from cropmap.pipeline.errors import CropmapError, LockError, NotReadyError, OutputError, SiteError
from cropmap.pipeline.fsio import atomic_path, sha256_path
from cropmap.pipeline.lock import run_lock
from cropmap.pipeline.runner import Runner, Stage, redact
from cropmap.pipeline.sites import load_site

# --------------------------------------------------------------------------- lock


def test_lock_names_a_live_holder_and_takes_over_a_stale_one(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "since": "t", "command": "cropmap run"}))
        with pytest.raises(LockError, match=f"pid {sleeper.pid} on {socket.gethostname()}"):
            with run_lock(tmp_path):
                pass
    finally:
        sleeper.kill()
        sleeper.wait()
    with run_lock(tmp_path) as path:  # the holder is dead now: stale, taken over
        assert json.loads(path.read_text())["pid"] == os.getpid()
        with pytest.raises(LockError, match="already held by this process"):
            with run_lock(tmp_path):
                pass
    assert not (tmp_path / ".lock").exists()
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "other-host", "since": "t"}))
    with pytest.raises(LockError, match="other-host") as err:
        with run_lock(tmp_path):
            pass
    assert "delete the lock file" in str(err.value)


# --------------------------------------------------------------------------- versions on toy stages


def toy_stages(tmp_path, value="a", fail_in=None, log=None):
    def make(name, after):
        def run(ctx):
            if log is not None:
                log.append(name)
            if fail_in == name:
                raise RuntimeError(f"injected failure in {name}")
            text = name + value + "".join(p["out"].read_text() for p in ctx.upstream.values())
            with atomic_path(ctx.path(f"{name}/out.txt")) as tmp:
                tmp.write_text(text)
            return {"out": f"{name}/out.txt"}
        return run

    src = tmp_path / "input.txt"
    if not src.exists():
        src.write_text("input")
    return [Stage("ingest", make("ingest", []), inputs=[src]),
            Stage("train", make("train", ["ingest"]), after=["ingest"], config={"value": value}),
            Stage("report", make("report", ["train"]), after=["train"])]


def run_toy(ydir, stages, force=False):
    with production.locked(ydir) as prepare:
        plan, header = prepare(stages, {"site": "toy", "year": 2019}, force)
        runner = Runner(plan.dir, header, reuse_from=plan.reuse_from, on_save=lambda doc: production.publish(plan, doc))
        try:
            return plan, runner.run(stages, lambda done: {"report": done["report"]["out"]})
        except RuntimeError:
            return plan, runner.manifest


def tree_sums(d):
    return {str(p.relative_to(d)): sha256_path(p) for p in sorted(d.rglob("*")) if p.is_file()}


def test_versions_rerun_new_version_and_failed_attempt(tmp_path):
    ydir = tmp_path / "runs" / "toy" / "2019"
    plan, m = run_toy(ydir, toy_stages(tmp_path))
    assert plan.name == "v1" and m["status"] == "succeeded"
    top = json.loads((ydir / "run.json").read_text())
    assert top["version"] == "v1" and top["outputs"]["report"] == "versions/v1/report/out.txt"
    assert (ydir / "report" / "out.txt").read_text() == "reportatrainaingesta"  # the top-level link
    # unchanged: same version, nothing runs
    log = []
    plan, m = run_toy(ydir, toy_stages(tmp_path, log=log))
    assert plan.name == "v1" and plan.existing and log == [] and all(s["skipped"] for s in m["stages"].values())
    v1 = tree_sums(ydir / "versions" / "v1")
    # changed config: v2; the unchanged ingest is linked from v1, not rerun
    log = []
    plan, m = run_toy(ydir, toy_stages(tmp_path, "b", log=log))
    assert plan.name == "v2" and log == ["train", "report"] and m["stages"]["ingest"]["reused_from"] == "v1"
    assert json.loads((ydir / "run.json").read_text())["version"] == "v2"
    assert (ydir / "report" / "out.txt").read_text() == "reportbtrainbingesta"
    # a failing v3 leaves v2 current (latest_attempt says what happened) and v1/v2 untouched
    v2 = tree_sums(ydir / "versions" / "v2")
    plan, m = run_toy(ydir, toy_stages(tmp_path, "c", fail_in="report"))
    top = json.loads((ydir / "run.json").read_text())
    assert plan.name == "v3" and top["version"] == "v2" and top["status"] == "succeeded"
    assert top["latest_attempt"]["version"] == "v3" and top["latest_attempt"]["status"] == "failed"
    assert top["latest_attempt"]["stage"] == "report" and "injected failure" in top["latest_attempt"]["error"]
    assert tree_sums(ydir / "versions" / "v1") == v1 and tree_sums(ydir / "versions" / "v2") == v2
    # its rerun resumes v3 (only the failed stage runs) and makes it current
    log = []
    plan, m = run_toy(ydir, toy_stages(tmp_path, "c", log=log))
    assert plan.name == "v3" and log == ["report"] and json.loads((ydir / "run.json").read_text())["version"] == "v3"
    rows = versions.runs_table(tmp_path / "runs", "toy")
    assert [(r["version"], r["status"], r["current"]) for r in rows] == [("v1", "succeeded", False), ("v2", "succeeded", False),
                                                                        ("v3", "succeeded", True)]
    # --force: a new version, everything rerun
    log = []
    plan, m = run_toy(ydir, toy_stages(tmp_path, "c", log=log), force=True)
    assert plan.name == "v4" and log == ["ingest", "train", "report"]


@pytest.mark.parametrize("stage", ["ingest", "train", "report"])
def test_failure_in_each_stage_keeps_the_current_version_and_resumes(tmp_path, stage):
    ydir = tmp_path / "runs" / "toy" / "2019"
    run_toy(ydir, toy_stages(tmp_path))
    before = tree_sums(ydir / "versions" / "v1")
    (tmp_path / "input.txt").write_text("new input data")  # every stage of v2 has to run
    plan, m = run_toy(ydir, toy_stages(tmp_path, "b", fail_in=stage))
    assert m["status"] == "failed" and m["stages"][stage]["status"] == "failed"
    assert json.loads((ydir / "run.json").read_text())["version"] == "v1" and tree_sums(ydir / "versions" / "v1") == before
    assert not list(plan.dir.rglob("*.tmp")) and not list(plan.dir.rglob(".*.tmp"))  # nothing half-written left
    log = []
    plan, m = run_toy(ydir, toy_stages(tmp_path, "b", log=log))
    assert m["status"] == "succeeded" and log[0] == stage and "ingest" not in log[1:]


def test_corrupted_intermediate_is_detected_and_rebuilt(tmp_path):
    ydir = tmp_path / "runs" / "toy" / "2019"
    run_toy(ydir, toy_stages(tmp_path))
    (ydir / "versions" / "v1" / "train" / "out.txt").write_text("bit rot")
    log = []
    plan, m = run_toy(ydir, toy_stages(tmp_path, log=log))
    assert plan.name == "v1" and log == ["train"]  # report's input checksum is unchanged once train is rebuilt
    assert (ydir / "train" / "out.txt").read_text() == "trainaingesta"


def test_legacy_unversioned_run_becomes_v1(tmp_path):
    ydir = tmp_path / "runs" / "toy" / "2019"
    Runner(ydir, {"site": "toy", "year": 2019}).run(toy_stages(tmp_path), lambda d: {})
    plan, m = run_toy(ydir, toy_stages(tmp_path))
    assert (ydir / "versions" / "v1" / "ingest" / "out.txt").exists()
    assert plan.name == "v2" and all(s.get("reused_from") == "v1" for s in m["stages"].values())


def test_full_disk_and_unwritable_dir_fail_clearly(tmp_path, monkeypatch):
    target = tmp_path / "out.bin"
    with pytest.raises(OutputError, match="check free disk space"):
        with atomic_path(target):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(OutputError, match="not writable"):
            run_toy(ro / "toy" / "2019", toy_stages(tmp_path))
    finally:
        ro.chmod(0o700)


# --------------------------------------------------------------------------- --year auto


def test_year_auto_local_picks_the_latest_year_with_labels(sites_dir, data_copy):
    doc = demo_doc("auto-site")
    doc["local"]["root"] = str(data_copy)
    write_site(sites_dir, doc)
    site = load_site("auto-site")
    assert resolve_auto_year(site)[0] == 2019
    label = next((data_copy / "000028085BF08E7E").glob("OUTPUT_POLY-*.nc"))
    label.rename(data_copy / "held-back.nc")
    year, notes = resolve_auto_year(site)
    assert year == 2018 and any("2019 waits" in n and "no label raster" in n for n in notes)
    for t in ("00002806639B424A",):
        (data_copy / t).rename(data_copy / f"{t}.away")
    with pytest.raises(NotReadyError) as err:
        resolve_auto_year(site)
    assert err.value.exit_code == 75 and "no year of site 'auto-site' is available" in str(err.value)
    with pytest.raises(CropmapError, match="neither a year nor 'auto'"):
        production.resolve_year(site, "latest")


def test_year_auto_gee_waits_for_the_season_and_the_cdl(tmp_path, sites_dir):
    from conftest import gee_demo_doc

    doc = gee_demo_doc(tmp_path / "exports", name="iowa-like")
    doc["years"] = [2023, 2024, 2025]
    write_site(sites_dir, doc)
    site = load_site("iowa-like")
    asked = []

    def cdl():
        asked.append(1)
        return {2022, 2023}

    year, notes = resolve_auto_year(site, today=dt.date(2025, 6, 1), cdl_years=cdl)
    assert year == 2023 and len(asked) == 1
    assert any("2025 waits" in n and "season ends on 2026-01-01" in n for n in notes)
    assert any("2024 waits" in n and "CDL 2024 is not published" in n for n in notes)
    assert resolve_auto_year(site, today=dt.date(2025, 2, 20), cdl_years=lambda: {2023, 2024})[0] == 2024
    with pytest.raises(NotReadyError):
        resolve_auto_year(site, today=dt.date(2025, 6, 1), cdl_years=lambda: {2020})


# --------------------------------------------------------------------------- schedule


def test_cron_expressions_and_systemd_calendar():
    assert schedule.on_calendar("0 6 * * 1") == "Mon *-*-* 06:00:00"
    assert schedule.on_calendar("30 2 1 2,8 *") == "*-02,08-01 02:30:00"
    assert schedule.on_calendar("*/15 1-5 * * 1-5") == "Mon..Fri *-*-* 01..05:00/15:00"
    for bad in ("0 6 * *", "61 6 * * 1", "0 6 * * 9", "0 5-2 * * *", "x 6 * * 1"):
        with pytest.raises(CropmapError, match="--at"):
            schedule.parse_cron(bad)


def test_install_cron_replaces_the_site_line_and_systemd_units(tmp_path):
    calls, crontab = [], {"text": "MAILTO=me\n0 1 * * * old # cropmap:demo\n5 5 * * * other-job\n"}

    def fake(args, input=None, **kw):
        calls.append(args)
        if args == ["crontab", "-l"]:
            return subprocess.CompletedProcess(args, 0, crontab["text"], "")
        crontab["text"] = input
        return subprocess.CompletedProcess(args, 0, "", "")

    entry = schedule.cron_entry("demo", "0 6 * * 1", tmp_path / "runs", exe="cropmap", env={"CROPMAP_SITES_DIR": "/s", "EE_TOKEN": "x"})
    assert "cropmap run --site demo --year auto --out" in entry and "CROPMAP_SITES_DIR=/s" in entry and "EE_TOKEN" not in entry
    schedule.install_cron(entry, "demo", run=fake)
    lines = crontab["text"].splitlines()
    assert lines == ["MAILTO=me", "5 5 * * * other-job", entry]
    units = schedule.systemd_units("demo", "0 6 * * 1", tmp_path / "runs", exe="cropmap")
    assert "SuccessExitStatus=75" in units["cropmap-demo.service"] and "OnCalendar=Mon *-*-* 06:00:00" in units["cropmap-demo.timer"]
    done = schedule.install_systemd(units, "demo", unit_dir=tmp_path / "units", run=fake)
    assert (tmp_path / "units" / "cropmap-demo.timer").exists() and calls[-1][-1] == "cropmap-demo.timer" and len(done) == 4
    cj = schedule.kubernetes_cronjob("demo", "0 6 * * 1")
    assert "kind: CronJob" in cj and "args: [run, --site, demo, --year, auto, --out, /runs]" in cj and "values: [75]" in cj


def test_schedule_cli_prints_and_checks(tmp_path):
    from conftest import assert_one_line_error, cropmap

    proc = cropmap("schedule", "--site", "demo", "--at", "0 6 * * 1", "--out", tmp_path / "runs", "--print")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("0 6 * * 1 ") and "run --site demo --year auto --out" in proc.stdout
    assert_one_line_error(cropmap("schedule", "--site", "demo", "--print", "--at", "0 25 * * *"), "hour field '25'")
    assert_one_line_error(cropmap("schedule", "--site", "../etc", "--print"), "invalid site name")
    assert_one_line_error(cropmap("schedule", "--site", "demo"), "exactly one of --print and --install")


# --------------------------------------------------------------------------- security hygiene


def test_secrets_from_the_environment_never_reach_the_manifest(tmp_path, monkeypatch):
    monkeypatch.setenv("EE_ACCESS_TOKEN", "ya29.super-secret-token")
    stages = toy_stages(tmp_path)
    stages[1].config["note"] = "token ya29.super-secret-token leaked into a config"
    run_toy(tmp_path / "runs" / "toy" / "2019", stages)
    for p in (tmp_path / "runs").rglob("*.json"):
        assert "super-secret" not in p.read_text(), p
    assert redact({"a": ["x ya29.super-secret-token"]}) == {"a": ["x ***"]}


def test_site_names_tiles_and_years_cannot_leave_the_run_directory(tmp_path, sites_dir):
    for bad in ("../x", "a/b", "..", ""):
        with pytest.raises(SiteError):
            versions.year_dir(tmp_path, bad, 2019)
    with pytest.raises(SiteError):
        versions.year_dir(tmp_path, "demo", "../2019")
    doc = demo_doc("evil")
    doc["local"]["tiles"][0]["id"] = "../../../etc"
    write_site(sites_dir, doc)
    with pytest.raises(SiteError, match="tiles"):
        load_site("evil")


def test_checkpoints_never_execute_code(tmp_path):
    """Training checkpoints are read with torch.load(weights_only=True): a pickle payload is refused, not run."""
    import torch

    from cropmap.models import training

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"signature": {}, "evil": Payload()}, tmp_path / "ckpt.pt")
    assert training._load_state(tmp_path / "ckpt.pt", {}) is None
    assert not marker.exists()


def test_early_season_run_end_to_end(tmp_path, sites_dir):
    """`cropmap run --until` maps with the dates up to the cut only, says so, and is its own run version."""
    import xarray as xr
    from conftest import cropmap

    write_site(sites_dir, demo_doc())
    out = tmp_path / "runs"
    env = {**os.environ, "CROPMAP_SITES_DIR": str(sites_dir)}
    proc = cropmap("run", "--site", "demo-fast", "--until", "05-31", "--out", out, env=env)
    assert proc.returncode == 0, proc.stderr
    ydir = out / "demo-fast" / "2019"
    doc = json.loads((ydir / "run.json").read_text())
    assert doc["status"] == "succeeded" and doc["early_season_until"] == "05-31" and doc["version"] == "v1"
    for cube in sorted((ydir / "cube").glob("*.zarr")):
        ds = xr.open_zarr(cube, consolidated=False)
        cut = np.datetime64(f"{ds.attrs['year']}-06-01")
        assert ds["time_s2"].values.max() < cut and ds["time_s1"].values.max() < cut, cube
        assert ds["time_s2"].values.min() < cut  # earlier dates are kept
    assert "Early-season map:" in (ydir / doc["outputs"]["report"]).read_text()
    map_sum = sha256_path(ydir / doc["outputs"]["map"])
    # the full-season run is another version; the early-season one stays as it was
    proc = cropmap("run", "--site", "demo-fast", "--out", out, env=env)
    assert proc.returncode == 0, proc.stderr
    full = json.loads((ydir / "run.json").read_text())
    assert full["version"] == "v2" and not full.get("early_season_until")
    assert sha256_path(ydir / "versions" / "v1" / "map" / "crops.tif") == map_sum
    assert "Early-season map:" not in (ydir / full["outputs"]["report"]).read_text()


def test_transfer_is_refused_plainly_at_the_parcel_level(tmp_path, sites_dir):
    write_site(sites_dir, demo_doc())
    site = load_site("demo-fast")
    opts = production.run_options(site, 2019, tmp_path, transfer="previous-year", level="parcel")
    assert "transfer_from" not in opts.stage_args and "transfer_from" not in opts.header
    assert any("parcel path trains from scratch" in n for n in opts.notes)
    opts = production.run_options(site, 2019, tmp_path, transfer="previous-year", level="pixel")
    assert any("no complete 2018 run" in n for n in opts.notes)  # the pixel path looks for last year's models
