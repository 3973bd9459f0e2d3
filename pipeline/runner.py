"""The stage runner: a fixed graph of stages, the run manifest, skip and resume.

A :class:`Stage` declares its upstream stages, the external files it reads, its config and a
function that produces named outputs (paths relative to the run directory). Before running a
stage the runner computes its *fingerprint*: its name and version, its config, the checksums
of its upstream outputs and of its external inputs. A stage is skipped when the manifest holds
a finished record with the same fingerprint whose outputs are all still present with their
recorded checksums; otherwise it runs. The manifest ``run.json`` is rewritten atomically after
every stage, so a crash leaves a manifest that says what finished and the next run resumes
from the first stage that did not.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cropmap

from .errors import CropmapError, StageError
from .fsio import ensure_writable_dir, sha256_path, write_json

log = logging.getLogger(__name__)

MANIFEST = "run.json"
MANIFEST_FORMAT = "cropmap.run/1"


@dataclass
class StageContext:
    run_dir: Path
    upstream: dict[str, dict[str, Path]]
    """Outputs of upstream stages: stage name -> output name -> absolute path."""
    report: dict[str, Any] = field(default_factory=dict)
    """What the stage wants recorded in the manifest (counts, notes, fallbacks taken)."""
    progress: Callable[[str, int | None], Any] | None = None

    def path(self, rel: str) -> Path:
        return self.run_dir / rel


@dataclass
class Stage:
    name: str
    run: Callable[[StageContext], dict[str, str]]
    """Does the work; returns output name -> path relative to the run directory."""
    after: list[str] = field(default_factory=list)
    inputs: list[Path] = field(default_factory=list)
    """External files read (their checksums enter the fingerprint)."""
    config: dict[str, Any] = field(default_factory=dict)
    version: str = "1"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _file_fingerprint(path: Path) -> str:
    path = Path(path)
    if not path.exists():
        return "missing"
    return sha256_path(path)


def fingerprint(stage: Stage, upstream_checksums: dict[str, dict[str, str]]) -> str:
    doc = {
        "stage": stage.name,
        "version": stage.version,
        "config": stage.config,
        "upstream": upstream_checksums,
        "inputs": {str(p): _file_fingerprint(p) for p in sorted(stage.inputs, key=str)},
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def load_manifest(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        log.warning("run manifest %s is unreadable; all stages will run", path)
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == MANIFEST_FORMAT else None


def _environment() -> dict[str, str]:
    import numpy
    import rasterio
    import torch

    return {
        "cropmap": cropmap.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": numpy.__version__,
        "torch": torch.__version__,
        "rasterio": rasterio.__version__,
        "gdal": rasterio.__gdal_version__,
    }


class Runner:
    """Runs stages in order, recording each in ``run_dir/run.json``."""

    def __init__(self, run_dir: Path, header: dict[str, Any], on_event: Callable[[str, str, dict], None] | None = None,
                 progress: Callable[[str, int | None], Any] | None = None, force: bool = False):
        self.run_dir = ensure_writable_dir(Path(run_dir))
        self.header = header
        self.on_event = on_event or (lambda *a: None)
        self.progress = progress
        self.force = force
        old = load_manifest(self.run_dir)
        self.previous: dict[str, Any] = (old or {}).get("stages", {})
        self.manifest: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            **header,
            "status": "running",
            "started": _now(),
            "finished": None,
            "environment": _environment(),
            "stages": {},
            "outputs": {},
        }

    @property
    def path(self) -> Path:
        return self.run_dir / MANIFEST

    def _save(self) -> None:
        write_json(self.path, self.manifest)

    def _outputs_intact(self, record: dict[str, Any]) -> bool:
        for out in record.get("outputs", {}).values():
            p = self.run_dir / out["path"]
            if not p.exists() or sha256_path(p) != out["sha256"]:
                return False
        return True

    def run(self, stages: list[Stage], outputs: Callable[[dict[str, dict[str, str]]], dict[str, str]]) -> dict[str, Any]:
        """Run or skip every stage; ``outputs`` maps stage outputs to the manifest's ``outputs``."""
        done: dict[str, dict[str, str]] = {}
        checksums: dict[str, dict[str, str]] = {}
        self._save()
        for stage in stages:
            missing = [a for a in stage.after if a not in done]
            if missing:
                raise StageError(f"stage {stage.name!r} needs {missing} first")
            fp = fingerprint(stage, {a: checksums[a] for a in stage.after})
            prev = self.previous.get(stage.name)
            if (not self.force and prev and prev.get("status") == "done" and prev.get("fingerprint") == fp
                    and self._outputs_intact(prev)):
                record = {**prev, "status": "done", "skipped": True}
                self.manifest["stages"][stage.name] = record
                self.on_event(stage.name, "skipped", record)
            else:
                record = {"status": "running", "skipped": False, "started": _now(), "fingerprint": fp, "config": stage.config}
                self.manifest["stages"][stage.name] = record
                self._save()
                self.on_event(stage.name, "started", record)
                ctx = StageContext(self.run_dir, {a: {k: self.run_dir / v for k, v in done[a].items()} for a in stage.after},
                                   progress=self.progress)
                t0 = time.perf_counter()
                try:
                    produced = stage.run(ctx)
                except BaseException as exc:
                    record.update(status="failed", finished=_now(), seconds=round(time.perf_counter() - t0, 2),
                                  error=str(exc) if isinstance(exc, CropmapError) else f"{type(exc).__name__}: {exc}")
                    self.manifest["status"] = "failed" if not isinstance(exc, KeyboardInterrupt) else "interrupted"
                    self.manifest["finished"] = _now()
                    self._save()
                    self.on_event(stage.name, "failed", record)
                    raise
                record.update(
                    status="done", finished=_now(), seconds=round(time.perf_counter() - t0, 2), report=ctx.report,
                    outputs={k: {"path": v, "sha256": sha256_path(self.run_dir / v)} for k, v in produced.items()},
                )
                self._save()
                self.on_event(stage.name, "done", record)
            done[stage.name] = {k: v["path"] for k, v in record["outputs"].items()}
            checksums[stage.name] = {k: v["sha256"] for k, v in record["outputs"].items()}
        self.manifest["outputs"] = outputs(done)
        self.manifest["status"] = "succeeded"
        self.manifest["finished"] = _now()
        self._save()
        return self.manifest
