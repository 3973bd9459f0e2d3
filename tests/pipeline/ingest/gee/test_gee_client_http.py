"""The REAL :class:`EarthEngineClient` driven through earthengine-api's own HTTP layer.

``ee.apitestcase.UsingCloudApi(mock_http=HttpMockSequence([...]))`` (earthengine-api 1.7.50) builds
the real Cloud API resource from the discovery document shipped in the wheel and answers its
HTTP requests from a list: everything between our client and the socket is the real library
(request bodies, ``requestId`` idempotency, pagination, googleapiclient's retry of 429/5xx,
error translation to ``ee.EEException``). Retries sleep ``random() * 2**n`` seconds; the tests
make ``random()`` return 0 so nothing waits.
"""

from __future__ import annotations

import contextlib
import json
import random

import numpy as np
import pytest
from conftest import TILE_FULL, gee_demo_doc, write_site

from cropmap.pipeline.errors import StageError
from cropmap.pipeline.ingest.gee import builders as b
from cropmap.pipeline.ingest.gee.client import EarthEngineClient, LocalExports
from cropmap.pipeline.ingest.gee.fake import DemoServer, export_grid
from cropmap.pipeline.ingest.gee.pixels import FetchStats, Window, fetch_pixels, grid_request
from cropmap.pipeline.ingest.gee.tasks import Backoff, Job, TaskManager, classify_error
from cropmap.pipeline.ingest.gee.tiles import site_tiles
from cropmap.pipeline.ingest.local import read_label_raster, read_tile
from cropmap.pipeline.sites import load_site


def ok(body) -> tuple[dict, str | bytes]:
    return {"status": "200"}, body if isinstance(body, bytes) else json.dumps(body)


def error(status: int, message: str, code: str) -> tuple[dict, str]:
    return {"status": str(status)}, json.dumps({"error": {"code": status, "message": message, "status": code}})


def op(tid: str, state: str, description: str, *, error_message: str | None = None, eecu: float | None = None) -> dict:
    meta = {"@type": "type.googleapis.com/google.earthengine.v1alpha.OperationMetadata", "state": state,
            "description": description, "type": "EXPORT_IMAGE"}
    if eecu is not None:
        meta["batchEecuUsageSeconds"] = eecu
    out = {"name": f"projects/test/operations/{tid}", "metadata": meta, "done": state in ("SUCCEEDED", "FAILED", "CANCELLED")}
    if error_message:
        out["error"] = {"code": 8, "message": error_message}
    return out


@pytest.fixture
def http(ee_offline, monkeypatch):
    """``http(responses)``: a context under which the real client answers from ``responses``."""
    from ee import apitestcase
    from googleapiclient.http import HttpMockSequence

    monkeypatch.setattr(random, "random", lambda: 0.0)  # googleapiclient's retry backoff: sleep(0)

    class Mock:
        @contextlib.contextmanager
        def __call__(self, responses):
            self.mock = HttpMockSequence(list(responses))
            with apitestcase.UsingCloudApi(mock_http=self.mock):
                yield
            assert not self.mock._iterable, f"{len(self.mock._iterable)} scripted response(s) never requested"

        @property
        def requests(self) -> list[tuple[str, str, dict | None]]:
            return [(method, uri.split("/v1alpha/")[1].split("?")[0], json.loads(body) if body else None)
                    for uri, method, body, _ in self.mock.request_sequence]

    return Mock()


@pytest.fixture
def site(tmp_path, sites_dir):
    write_site(sites_dir, gee_demo_doc(tmp_path / "exports"))
    return load_site("demo-gee")


def real_client(tmp_path) -> tuple[EarthEngineClient, list]:
    inits = []
    return EarthEngineClient("test", LocalExports(tmp_path / "exports"), initialize=lambda: inits.append(1)), inits


def test_start_export_posts_the_task_and_a_429_is_retried_by_the_client(tmp_path, site, http):
    client, inits = real_client(tmp_path)
    tile = site_tiles(site)[0]
    periods = b.composite_periods(site.gee, 2019)
    name = "cropmap/demo-gee/2019/s2/x0000y0000"
    task = b.image_export(b.s2_composites(b.tile_geometry(tile), periods, site.gee, list(site.bands.s2)), tile, name, site.gee, no_data=0)
    with http([error(429, "Too many requests", "RESOURCE_EXHAUSTED"), ok(op("OPABC123", "PENDING", task.config["description"]))]):
        tid = client.start_export(task)
    assert tid == "OPABC123" and inits == [1]
    (m1, path1, body1), (m2, path2, body2) = http.requests
    assert (m1, path1) == (m2, path2) == ("POST", "projects/test/image:export")
    assert body1 == body2 and body1["requestId"]  # the retry is the same idempotent request
    dest = body1["fileExportOptions"]
    gcs = dest["cloudStorageDestination"]
    assert (gcs["bucket"], gcs["filenamePrefix"]) == ("test-bucket", name)
    assert dest["fileFormat"] == "GEO_TIFF" and body1["description"] == "cropmap_demo-gee_2019_s2_x0000y0000"
    epsg, transform, width, height = export_grid(body1)  # the explicit grid, read from the posted expression
    assert (epsg, width, height) == (32631, 64, 64) and transform == tile.transform


def test_list_tasks_pages_and_parses_operations(tmp_path, http):
    client, _ = real_client(tmp_path)
    page1 = {"operations": [op("A1", "RUNNING", "job_a")], "nextPageToken": "page-2"}
    page2 = {"operations": [op("B2", "FAILED", "job_b", error_message="User memory limit exceeded.", eecu=12.5),
                            op("C3", "SUCCEEDED", "job_c", eecu=3600.0), op("D4", "PENDING", "job_d")]}
    with http([ok(page1), ok(page2)]):
        tasks = client.list_tasks()
    assert [(t.id, t.description, t.state) for t in tasks] == [("A1", "job_a", "RUNNING"), ("B2", "job_b", "FAILED"),
                                                                ("C3", "job_c", "COMPLETED"), ("D4", "job_d", "READY")]
    assert tasks[1].error == "User memory limit exceeded." and classify_error(tasks[1].error) == "split"
    assert tasks[1].eecu_seconds == 12.5 and tasks[2].eecu_seconds == 3600.0 and tasks[0].error == ""
    assert [(m, p) for m, p, _ in http.requests] == [("GET", "projects/test/operations")] * 2
    assert "pageToken=page-2" in http.mock.request_sequence[1][0]

    with http([ok(op("C3", "SUCCEEDED", "job_c", eecu=7.0))]):
        st = client.task_statuses(["C3"])
    assert st["C3"].state == "COMPLETED" and st["C3"].eecu_seconds == 7.0
    assert http.requests == [("GET", "projects/test/operations/C3", None)]


def test_task_manager_over_http_splits_on_memory_errors(tmp_path, http, ee_offline):
    """One tile job through the real client: the export fails on the server with "User memory limit
    exceeded" (a FAILED operation), the manager splits it into four quadrants, all succeed."""
    from cropmap.pipeline.ingest.gee.tiles import ExportTile

    client, _ = real_client(tmp_path)
    tile = ExportTile("x0000y0000", 32631, 0.0, 640.0, 64, 64, 10.0)

    def make_task(job):
        return ee_offline.batch.Export.image.toCloudStorage(
            image=ee_offline.Image.constant(1), description=job.description, bucket="b", fileNamePrefix=job.name,
            crs=job.tile.crs, crsTransform=job.tile.crs_transform(), dimensions=f"{job.tile.width}x{job.tile.height}")

    empty = ok({})
    kids = [f"K{i}" for i in range(4)]
    responses = [empty, empty, ok(op("T1", "PENDING", "p_s2_x0000y0000")),
                 ok(op("T1", "FAILED", "p_s2_x0000y0000", error_message="User memory limit exceeded.", eecu=40.0)),
                 empty, *[ok(op(k, "PENDING", f"p_s2_x0000y0000q{i}")) for i, k in enumerate(kids)],
                 *[ok(op(k, "SUCCEEDED", f"p_s2_x0000y0000q{i}", eecu=5.0)) for i, k in enumerate(kids)]]
    sleeps = []
    mgr = TaskManager(client, tmp_path / "state.json", make_task, backoff=Backoff(1, 8, 1), sleep=sleeps.append)
    with http(responses):
        leaves = mgr.run([Job("p/s2/x0000y0000", "s2", tile)])
    assert leaves == {"p/s2/x0000y0000": [f"p/s2/x0000y0000q{i}" for i in range(4)]}
    assert mgr.jobs["p/s2/x0000y0000"].status == "split" and mgr.eecu_seconds() == 60.0
    exports = [body for m, p, body in http.requests if p == "projects/test/image:export"]
    assert [export_grid(e)[2:] for e in exports] == [(64, 64)] + [(32, 32)] * 4


def test_export_refused_at_start_is_classified(tmp_path, http, ee_offline):
    """A 400 answered to the export request itself surfaces as ``ee.EEException``; the manager
    classifies it like a failed task (here: memory -> split, then fatal once it cannot split)."""
    from cropmap.pipeline.ingest.gee.tiles import ExportTile

    client, _ = real_client(tmp_path)
    tile = ExportTile("t", 32631, 0.0, 20.0, 2, 2, 10.0)

    def make_task(job):
        return ee_offline.batch.Export.image.toCloudStorage(
            image=ee_offline.Image.constant(1), description=job.description, bucket="b", fileNamePrefix=job.name,
            crs=job.tile.crs, crsTransform=job.tile.crs_transform(), dimensions=f"{job.tile.width}x{job.tile.height}")

    memory = error(400, "User memory limit exceeded.", "INVALID_ARGUMENT")
    mgr = TaskManager(client, tmp_path / "state.json", make_task, max_split_depth=0, sleep=lambda s: None)
    with http([ok({}), ok({}), memory]), pytest.raises(StageError, match="User memory limit exceeded. \\(tile cannot be split further"):
        mgr.run([Job("p/s2/t", "s2", tile)])
    with http([memory]), pytest.raises(ee_offline.EEException) as info:
        client.start_export(make_task(Job("p/s2/u", "s2", tile)))
    assert classify_error(str(info.value)) == "split"


def test_compute_pixels_over_http_real_demo_pixels(tmp_path, site, http):
    """computePixels through the real client: a 429 is retried by the client itself, a 400 "User
    memory limit exceeded" reaches the tiler as EEException and the window is split into four,
    whose NPY answers (real demo pixels) are decoded and assembled."""
    cube, _ = read_tile(load_site("demo"), TILE_FULL, 2019)
    labels = read_label_raster(load_site("demo"), TILE_FULL)
    server = DemoServer(site, 2019, [cube], [labels])
    client, _ = real_client(tmp_path)
    tile = site_tiles(site)[0]
    image = b.cdl_labels(2019, site.gee, has_confidence=True)
    import ee

    def answer(window: Window) -> bytes:
        request = grid_request(image, tile.grid, window, ["label"])
        return server.pixels(ee.serializer.encode(image, for_cloud_api=True), request)

    quads = Window(0, 0, 64, 64).split()
    responses = [error(429, "Too many requests", "RESOURCE_EXHAUSTED"), error(400, "User memory limit exceeded.", "INVALID_ARGUMENT"),
                 *[ok(answer(q)) for q in quads]]
    stats = FetchStats()
    with http(responses):
        data = fetch_pixels(client, image, tile.grid, ["label"], np.uint16, concurrency=1, stats=stats)
    np.testing.assert_array_equal(data[0], labels[0])
    assert stats.splits == 1 and stats.retries == 0 and stats.requests == 5  # the 429 never reached the tiler
    bodies = [body for _, p, body in http.requests]
    assert [p for _, p, _ in http.requests] == ["projects/test/image:computePixels"] * 6
    assert bodies[0] == bodies[1] and bodies[0]["fileFormat"] == "NPY" and bodies[0]["bandIds"] == ["label"]
    assert [bd["grid"]["dimensions"] for bd in bodies[2:]] == [{"width": 32, "height": 32}] * 4
    assert bodies[3]["grid"]["affineTransform"]["translateX"] == tile.x0 + 320
