"""The export task manager: submit, poll, retry, split and resume Earth Engine batch exports.

Given export jobs (deterministic names), :meth:`TaskManager.run`

1. skips every job whose outputs already exist, and adopts a task of the project that has the
   job's description and is queued, running or completed (idempotent reruns, no duplicates);
2. submits the rest while the project has fewer than ``max_pending`` queued or running tasks
   (Earth Engine caps a project at 3000 pending tasks);
3. polls with exponential backoff (reset whenever something finishes);
4. resubmits a task that failed for a transient reason (up to ``max_attempts``), splits a tile
   whose export ran out of memory or time into four (up to ``max_split_depth``), and gives up
   on any other error after the other jobs are done;
5. records every change (task id, attempts, EECU seconds, errors) in a JSON state file written
   atomically, so an interrupted ingestion resumes by polling its running tasks instead of
   submitting them again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cropmap.pipeline.errors import DataError, StageError
from cropmap.pipeline.fsio import write_json
from cropmap.pipeline.ingest.gee.client import ACTIVE, Client, output_files
from cropmap.pipeline.ingest.gee.tiles import ExportTile, task_description

log = logging.getLogger(__name__)

STATE_FORMAT = "cropmap.gee-tasks/1"
SPLIT_ERRORS = ("user memory limit exceeded", "computation timed out", "too many concurrent aggregations",
                "out of memory")
RETRYABLE_ERRORS = ("internal error", "backend error", "service unavailable", "server error", "deadline exceeded",
                    "too many requests", "rate limit", "try again", "unavailable", "cancelled")


def classify_error(message: str) -> str:
    """``split`` (memory/timeout: make the region smaller), ``retry`` (transient) or ``fatal``."""
    m = message.lower()
    if any(s in m for s in SPLIT_ERRORS):
        return "split"
    if any(s in m for s in RETRYABLE_ERRORS):
        return "retry"
    return "fatal"


def _server_error(exc: Exception) -> bool:
    """An error answered by Earth Engine (``ee.EEException``, HTTP errors), not a bug of ours."""
    return isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in ("ee", "googleapiclient")


@dataclass
class Job:
    """One export: its deterministic object name, what it exports and the tile (None for tables)."""

    name: str
    kind: str
    tile: ExportTile | None = None
    depth: int = 0
    status: str = "pending"
    """pending, submitted, done, split or failed."""
    task_id: str | None = None
    attempts: int = 0
    eecu_seconds: float = 0.0
    error: str = ""
    children: list[str] = field(default_factory=list)

    @property
    def description(self) -> str:
        return task_description(self.name)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tile"] = asdict(self.tile) if self.tile else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Job:
        d = dict(d)
        d["tile"] = ExportTile(**d["tile"]) if d.get("tile") else None
        return cls(**d)


@dataclass
class Backoff:
    """Poll delays: ``initial`` doubling up to ``maximum``; reset after progress."""

    initial: float = 15.0
    maximum: float = 300.0
    current: float = 15.0

    def next(self, progressed: bool) -> float:
        self.current = self.initial if progressed else min(self.current * 2, self.maximum)
        return self.current


class TaskManager:
    """Runs export jobs to completion through a :class:`~.client.Client` (see the module docstring)."""

    def __init__(self, client: Client, state_path: Path, make_task: Callable[[Job], Any], *, max_pending: int = 20,
                 max_attempts: int = 3, max_split_depth: int = 2, backoff: Backoff | None = None,
                 sleep: Callable[[float], None] | None = None):
        self.client = client
        self.state_path = Path(state_path)
        self.make_task = make_task
        self.max_pending = max_pending
        self.max_attempts = max_attempts
        self.max_split_depth = max_split_depth
        self.backoff = backoff or Backoff()
        self.sleep = sleep or client.sleep
        self.jobs: dict[str, Job] = self._load()

    # ------------------------------------------------------------ state file
    def _load(self) -> dict[str, Job]:
        if not self.state_path.is_file():
            return {}
        try:
            doc = json.loads(self.state_path.read_text())
            if doc.get("format") != STATE_FORMAT:
                raise ValueError(doc.get("format"))
            return {name: Job.from_dict(j) for name, j in doc["jobs"].items()}
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"export task state {str(self.state_path)!r} is unreadable ({type(exc).__name__})",
                            fix="delete it; finished exports are found again in the bucket and not redone") from None

    def save(self) -> None:
        write_json(self.state_path, {"format": STATE_FORMAT, "eecu_seconds": self.eecu_seconds(),
                                     "jobs": {n: j.to_dict() for n, j in self.jobs.items()}})

    def eecu_seconds(self) -> float:
        return round(sum(j.eecu_seconds for j in self.jobs.values()), 3)

    # ------------------------------------------------------------ the loop
    def run(self, jobs: list[Job]) -> dict[str, list[str]]:
        """Run ``jobs`` to completion; return job name -> names of the leaf exports holding its output.

        Raises :class:`StageError` naming the first failure when any job cannot be completed.
        """
        for job in jobs:
            self.jobs.setdefault(job.name, job)
        self._reconcile()
        self.save()
        while True:
            submitted = self._submit()
            waiting = [j for j in self.jobs.values() if j.status == "submitted"]
            if not waiting and not any(j.status == "pending" for j in self.jobs.values()):
                break
            if not waiting and not submitted:  # the project is at its cap with other work: wait for room
                self.sleep(self.backoff.next(False))
                continue
            self.sleep(self.backoff.current)
            progressed = self._poll(waiting)
            self.backoff.next(progressed)
        failed = [j for j in self.jobs.values() if j.status == "failed"]
        if failed:
            f = failed[0]
            raise StageError(f"{len(failed)} Earth Engine export(s) failed; first {f.name}: {f.error}",
                             fix="fix the cause and rerun: finished exports are kept and not redone")
        return {job.name: self.leaves(job.name) for job in jobs}

    def leaves(self, name: str) -> list[str]:
        job = self.jobs[name]
        if job.status == "split":
            return [leaf for child in job.children for leaf in self.leaves(child)]
        return [name]

    def _reconcile(self) -> None:
        """Skip jobs whose outputs exist; adopt tasks of the project that carry a job's description."""
        tasks = {t.description: t for t in self.client.list_tasks()}
        for job in list(self.jobs.values()):
            if job.status in ("done", "split", "submitted"):
                continue
            if output_files(self.client.list_outputs(job.name), job.name):
                job.status = "done"
                log.info("export %s exists; skipped", job.name)
                continue
            task = tasks.get(job.description)
            if task is not None and task.state in ACTIVE:
                job.status, job.task_id = "submitted", task.id
                log.info("export %s is already queued as task %s; not resubmitted", job.name, task.id)
            elif job.status == "failed":
                job.status, job.attempts, job.error = "pending", 0, ""  # a rerun tries failed jobs again

    def _capacity(self) -> int:
        active = sum(1 for t in self.client.list_tasks() if t.state in ACTIVE)
        return max(0, self.max_pending - active)

    def _submit(self) -> int:
        pending = [j for j in self.jobs.values() if j.status == "pending"]
        if not pending:
            return 0
        room = self._capacity()
        for job in pending[:room]:
            task = self.make_task(job)
            job.attempts += 1
            try:
                job.task_id = self.client.start_export(task)
            except Exception as exc:
                if not _server_error(exc):
                    raise
                # refused at submission (after the client's own 429/5xx retries): same rules as a failed task
                log.warning("export %s could not be started: %s", job.name, exc)
                self._failed(job, str(exc) or type(exc).__name__)
                self.save()
                continue
            job.status = "submitted"
            log.info("export %s started as task %s (attempt %d)", job.name, job.task_id, job.attempts)
            self.save()
        return min(room, len(pending))

    def _poll(self, waiting: list[Job]) -> bool:
        statuses = self.client.task_statuses([j.task_id for j in waiting])
        progressed = False
        for job in waiting:
            st = statuses.get(job.task_id)
            if st is None or st.state in ACTIVE:
                continue
            progressed = True
            job.eecu_seconds += st.eecu_seconds
            if st.state == "COMPLETED":
                job.status, job.error = "done", ""
            else:
                self._failed(job, st.error or st.state)
            self.save()
        return progressed

    def _failed(self, job: Job, error: str) -> None:
        kind = classify_error(error)
        job.error = error
        if kind == "split" and job.tile is not None and job.depth < self.max_split_depth and min(job.tile.width, job.tile.height) >= 2:
            job.status = "split"
            for child_tile in job.tile.split():
                child = Job(job.name + child_tile.name[len(job.tile.name):], job.kind, child_tile, job.depth + 1)
                self.jobs[child.name] = child
                job.children.append(child.name)
            log.warning("export %s: %s; split into %d tiles", job.name, error, len(job.children))
        elif kind == "retry" and job.attempts < self.max_attempts:
            job.status = "pending"
            log.warning("export %s: %s; retrying (attempt %d of %d)", job.name, error, job.attempts + 1, self.max_attempts)
        else:
            job.status = "failed"
            if kind == "split":
                job.error += (" (tile cannot be split further: lower gee.tile_size_m or raise gee.max_split_depth)"
                              if job.tile is not None else " (raise gee.tile_scale)")
            log.error("export %s failed: %s", job.name, job.error)
