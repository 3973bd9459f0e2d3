"""The export task manager driven by the fake client: success, retry, split, pending cap, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cropmap.pipeline.errors import DataError, StageError
from cropmap.pipeline.ingest.gee.client import TaskStatus, output_files, status_from_operation
from cropmap.pipeline.ingest.gee.fake import FakeClient, write_shards
from cropmap.pipeline.ingest.gee.tasks import Backoff, Job, TaskManager, classify_error
from cropmap.pipeline.ingest.gee.tiles import ExportTile


def serve_constant(name, request, folder):
    """Write a tiny one-band GeoTIFF for the export (its content does not matter here)."""
    from affine import Affine

    write_shards(np.ones((1, 2, 2), np.uint8), Affine(10, 0, 0, 0, -10, 0), 32631, name, folder, 256)


def make_task(ee):
    def make(job):
        img = ee.Image.constant(1)
        return ee.batch.Export.image.toCloudStorage(image=img, description=job.description, bucket="b", fileNamePrefix=job.name,
                                                    crs="EPSG:32631", crsTransform=job.tile.crs_transform(),
                                                    dimensions=f"{job.tile.width}x{job.tile.height}")
    return make


def jobs(n):
    return [Job(f"p/site/2020/s2/t{i}", "s2", ExportTile(f"t{i}", 32631, 0.0, 640.0, 64, 64, 10.0)) for i in range(n)]


def manager(client, tmp_path, ee, **kw):
    sleeps = []
    m = TaskManager(client, tmp_path / "state.json", make_task(ee), backoff=Backoff(1, 8, 1), sleep=sleeps.append, **kw)
    return m, sleeps


def test_all_succeed_with_eecu_recorded_and_backoff(ee_offline, tmp_path):
    client = FakeClient(tmp_path / "out", serve_constant)
    m, sleeps = manager(client, tmp_path, ee_offline)
    leaves = m.run(jobs(3))
    assert leaves == {j.name: [j.name] for j in jobs(3)}
    assert len(client.started) == 3 and m.eecu_seconds() == 7.5
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["eecu_seconds"] == 7.5 and {j["status"] for j in state["jobs"].values()} == {"done"}
    assert sleeps and max(sleeps) <= 8


def test_backoff_grows_and_resets():
    b = Backoff(15, 300, 15)
    assert [b.next(False) for _ in range(6)] == [30, 60, 120, 240, 300, 300] and b.next(True) == 15


def test_retryable_failure_is_resubmitted(ee_offline, tmp_path):
    client = FakeClient(tmp_path / "out", serve_constant, script={"t1": ["retry", "retry", "ok"]})
    m, _ = manager(client, tmp_path, ee_offline, max_attempts=3)
    m.run(jobs(2))
    assert client.started.count("p/site/2020/s2/t1") == 3 and m.jobs["p/site/2020/s2/t1"].status == "done"


def test_fatal_and_exhausted_failures_raise_after_the_rest(ee_offline, tmp_path):
    client = FakeClient(tmp_path / "out", serve_constant, script={"t0": ["fatal"], "t1": ["retry", "retry"]})
    m, _ = manager(client, tmp_path, ee_offline, max_attempts=2)
    with pytest.raises(StageError, match=r"2 Earth Engine export\(s\) failed; first p/site/2020/s2/t0: Image.select"):
        m.run(jobs(3))
    assert m.jobs["p/site/2020/s2/t2"].status == "done" and client.started.count("p/site/2020/s2/t0") == 1


def test_memory_error_splits_the_tile(ee_offline, tmp_path):
    client = FakeClient(tmp_path / "out", serve_constant, script={"t0": ["memory"], "t0q2": ["memory"]})
    m, _ = manager(client, tmp_path, ee_offline, max_split_depth=2)
    leaves = m.run(jobs(1))["p/site/2020/s2/t0"]
    assert leaves == ["p/site/2020/s2/t0q0", "p/site/2020/s2/t0q1", "p/site/2020/s2/t0q2q0", "p/site/2020/s2/t0q2q1",
                      "p/site/2020/s2/t0q2q2", "p/site/2020/s2/t0q2q3", "p/site/2020/s2/t0q3"]
    assert m.jobs["p/site/2020/s2/t0q2q3"].tile.width == 16


def test_split_depth_is_bounded(ee_offline, tmp_path):
    client = FakeClient(tmp_path / "out", serve_constant, script={"t0": ["memory", "memory"]})
    m, _ = manager(client, tmp_path, ee_offline, max_split_depth=0)
    with pytest.raises(StageError, match="cannot be split further: lower gee.tile_size_m"):
        m.run(jobs(1))


def test_pending_cap_counts_other_work_of_the_project(ee_offline, tmp_path):
    others = [TaskStatus(f"O{i}", f"other{i}", "RUNNING") for i in range(3)]
    client = FakeClient(tmp_path / "out", serve_constant, other_tasks=others)
    m, _ = manager(client, tmp_path, ee_offline, max_pending=5)
    m.run(jobs(12))
    assert client.max_active_seen == 5 and len(client.started) == 12


def test_waits_while_the_project_is_full(ee_offline, tmp_path):
    others = [TaskStatus("O1", "other", "RUNNING")]
    client = FakeClient(tmp_path / "out", serve_constant, other_tasks=others)
    m, sleeps = manager(client, tmp_path, ee_offline, max_pending=1)

    def free_after_two(seconds):
        sleeps.append(seconds)
        if len(sleeps) == 2:
            client.other_tasks.clear()

    m.sleep = free_after_two
    m.run(jobs(1))
    assert sleeps[:2] == [2, 4] and client.started == ["p/site/2020/s2/t0"]


def test_resume_polls_running_tasks_and_skips_finished(ee_offline, tmp_path):
    client = FakeClient(tmp_path / "out", serve_constant)
    m, _ = manager(client, tmp_path, ee_offline, max_pending=2)
    polls = {"n": 0}
    real = client.task_statuses

    def interrupted(ids):
        polls["n"] += 1
        if polls["n"] == 3:
            raise KeyboardInterrupt
        return real(ids)

    client.task_statuses = interrupted
    with pytest.raises(KeyboardInterrupt):
        m.run(jobs(4))
    state = {n: j["status"] for n, j in json.loads((tmp_path / "state.json").read_text())["jobs"].items()}
    assert sorted(state.values()) == ["done", "done", "submitted", "submitted"]
    client.task_statuses = real
    m2, _ = manager(client, tmp_path, ee_offline, max_pending=2)  # a new process: state from the file
    m2.run(jobs(4))
    assert len(client.started) == 4  # nothing resubmitted
    assert all(j.status == "done" for j in m2.jobs.values())


def test_existing_outputs_and_queued_tasks_are_not_resubmitted(ee_offline, tmp_path):
    serve_constant("p/site/2020/s2/t0", {}, tmp_path / "out")
    queued = [TaskStatus("Q1", "p_site_2020_s2_t1", "RUNNING")]
    client = FakeClient(tmp_path / "out", serve_constant, other_tasks=queued)
    client.tasks["Q1"] = {"name": "p/site/2020/s2/t1", "request": {}, "description": "p_site_2020_s2_t1", "state": "RUNNING", "outcome": "ok"}
    client.other_tasks.clear()
    m, _ = manager(client, tmp_path, ee_offline)
    m.run(jobs(3))
    assert client.started == ["p/site/2020/s2/t2"] and m.jobs["p/site/2020/s2/t1"].task_id == "Q1"


def test_damaged_state_file_is_one_clear_error(ee_offline, tmp_path):
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable.*delete it"):
        manager(FakeClient(tmp_path), tmp_path, ee_offline)


def test_error_classes():
    assert classify_error("User memory limit exceeded.") == "split"
    assert classify_error("Computation timed out.") == "split"
    assert classify_error("Too many concurrent aggregations.") == "split"
    assert classify_error("Internal error: try again") == "retry"
    assert classify_error("Image.select: Pattern 'B99' did not match any bands.") == "fatal"


def test_operation_status_and_output_names():
    op = {"name": "projects/p/operations/ABC", "done": True, "error": {"message": "User memory limit exceeded."},
          "metadata": {"state": "FAILED", "description": "d", "batchEecuUsageSeconds": 12.5}}
    assert status_from_operation(op) == TaskStatus("ABC", "d", "FAILED", "User memory limit exceeded.", 12.5)
    assert status_from_operation({"name": "x/y/Z", "metadata": {"state": "PENDING"}}).state == "READY"
    names = ["a/t0.tif", "a/t0-0000000000-0000002560.tif", "a/t0q1.tif", "a/t0.csv", "a/t0.tif.aux"]
    assert output_files(names, "a/t0") == ["a/t0-0000000000-0000002560.tif", "a/t0.csv", "a/t0.tif"]
