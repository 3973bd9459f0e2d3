"""The one interface for every Earth Engine side effect, and its real implementation.

:class:`Client` is all the task manager, the ingest stage and the read-back ever call: start an
export, poll tasks, list the project's tasks, list and fetch exported outputs, ``computePixels``
and ``getInfo``. :class:`EarthEngineClient` implements it with ``earthengine-api`` (initialised
lazily, on the first call) and Cloud Storage or a local folder of exports;
:class:`~cropmap.pipeline.ingest.gee.fake.FakeClient` implements it for tests.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cropmap.pipeline.errors import DataError

log = logging.getLogger(__name__)

ACTIVE = ("READY", "RUNNING")
"""Task states that count against the project's pending-task cap."""

_OPERATION_STATES = {"PENDING": "READY", "RUNNING": "RUNNING", "CANCELLING": "RUNNING", "SUCCEEDED": "COMPLETED",
                     "FAILED": "FAILED", "CANCELLED": "CANCELLED"}


@dataclass(frozen=True)
class TaskStatus:
    """One batch task as the server reports it (states as in the Task API)."""

    id: str
    description: str
    state: str
    """READY, RUNNING, COMPLETED, FAILED, CANCELLED or UNKNOWN."""
    error: str = ""
    eecu_seconds: float = 0.0
    """``batchEecuUsageSeconds``: compute charged against the project's EECU quota."""


class Client(Protocol):
    """Every side effect of Earth Engine ingestion."""

    def start_export(self, task: Any) -> str:
        """Start an ``ee.batch.Task``; return its task id."""

    def task_statuses(self, ids: list[str]) -> dict[str, TaskStatus]:
        """The current status of the given tasks."""

    def list_tasks(self) -> list[TaskStatus]:
        """The project's recent tasks (to skip duplicates and to count pending ones)."""

    def list_outputs(self, prefix: str) -> list[str]:
        """Names of exported files starting with ``prefix``."""

    def fetch_output(self, name: str, dest: Path) -> Path:
        """A local path holding the exported file ``name`` (downloaded under ``dest`` when remote)."""

    def compute_pixels(self, request: dict) -> bytes:
        """``ee.data.computePixels`` (interactive, <= 48 MB and 32k px a side per request)."""

    def get_info(self, obj: Any) -> Any:
        """Evaluate a small ``ee`` object (metadata) on the server."""

    def sleep(self, seconds: float) -> None:
        """Wait between polls (the fake client only advances a virtual clock)."""


def status_from_operation(op: dict) -> TaskStatus:
    """A :class:`TaskStatus` from a long-running Operation resource (``ee.data.listOperations``)."""
    meta = op.get("metadata", {})
    error = op.get("error", {}).get("message", "") if op.get("done") else ""
    return TaskStatus(
        id=op.get("name", "").rsplit("/", 1)[-1],
        description=meta.get("description", ""),
        state=_OPERATION_STATES.get(meta.get("state", ""), "UNKNOWN"),
        error=error,
        eecu_seconds=float(meta.get("batchEecuUsageSeconds", 0.0) or 0.0),
    )


# ---------------------------------------------------------------- where exports land
def output_files(names: list[str], prefix: str) -> list[str]:
    """The files of the export ``prefix`` among ``names``: ``prefix.tif``/``.csv`` or its shards
    ``prefix-<row>-<col>.tif`` (not the outputs of other exports that share the prefix)."""
    pat = re.compile(re.escape(prefix) + r"(-\d{10}-\d{10})?\.(tif|csv)$")
    return sorted(n for n in names if pat.fullmatch(n))


class LocalExports:
    """Exports in a local folder (a synced copy of the bucket, or the fake client's output)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix
        folder = base.parent
        if not folder.is_dir():
            return []
        return sorted(str(p.relative_to(self.root)) for p in folder.iterdir() if p.name.startswith(base.name) and p.is_file())

    def fetch(self, name: str, dest: Path) -> Path:
        path = self.root / name
        if not path.is_file():
            raise DataError(f"exported file {str(path)!r} does not exist", fix="rerun the ingest stage to export it again")
        return path


class BucketExports:
    """Exports in a Cloud Storage bucket (google-cloud-storage, same credentials as Earth Engine)."""

    def __init__(self, bucket: str, project: str | None, credentials: Callable[[], Any] | None = None):
        self.bucket, self.project, self.credentials = bucket, project, credentials
        self._client = None

    def _bucket(self):
        if self._client is None:
            from google.cloud import storage

            creds = self.credentials() if self.credentials else None  # loaded on first use only
            self._client = storage.Client(project=self.project, credentials=creds)
        return self._client.bucket(self.bucket)

    def list(self, prefix: str) -> list[str]:
        return sorted(b.name for b in self._bucket().list_blobs(prefix=prefix))

    def fetch(self, name: str, dest: Path) -> Path:
        path = Path(dest) / name
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(path.suffix + ".part")
            self._bucket().blob(name).download_to_filename(str(tmp))
            shutil.move(tmp, path)
        return path


# ---------------------------------------------------------------- the real client
class EarthEngineClient:
    """:class:`Client` backed by ``earthengine-api``; initialises Earth Engine on first use."""

    def __init__(self, project: str, exports: LocalExports | BucketExports, initialize: Callable[[], Any]):
        self.project = project
        self.exports = exports
        self._initialize = initialize
        self._ready = False

    def _ee(self):
        import ee

        if not self._ready:
            self._initialize()
            self._ready = True
        return ee

    def start_export(self, task: Any) -> str:
        self._ee()
        task.start()
        return task.id

    def task_statuses(self, ids: list[str]) -> dict[str, TaskStatus]:
        ee = self._ee()
        out = {}
        for tid in ids:
            out[tid] = status_from_operation(ee.data.getOperation(f"projects/{self.project}/operations/{tid}"))
        return out

    def list_tasks(self) -> list[TaskStatus]:
        ee = self._ee()
        return [status_from_operation(op) for op in ee.data.listOperations(f"projects/{self.project}")]

    def list_outputs(self, prefix: str) -> list[str]:
        return self.exports.list(prefix)

    def fetch_output(self, name: str, dest: Path) -> Path:
        return self.exports.fetch(name, dest)

    def compute_pixels(self, request: dict) -> bytes:
        return self._ee().data.computePixels(request)

    def get_info(self, obj: Any) -> Any:
        self._ee()
        return obj.getInfo()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)
