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
import os
import platform
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cropmap
from cropmap.pipeline.errors import CropmapError, StageError
from cropmap.pipeline.fsio import ensure_writable_dir, link_output, sha256_path, write_json

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


SECRET_ENV = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|PRIVATE|API_?KEY|ACCESS_KEY|CREDENTIAL)", re.IGNORECASE)


def secret_values() -> list[str]:
    """Values of environment variables whose names say they hold a secret (long enough to be one)."""
    return [v for k, v in os.environ.items() if SECRET_ENV.search(k) and len(v) >= 8]


def redact(obj: Any, secrets: list[str] | None = None) -> Any:
    """``obj`` with every occurrence of a secret environment value replaced by ``***`` (a safety net:
    no stage is meant to record credentials)."""
    secrets = secret_values() if secrets is None else secrets
    if not secrets:
        return obj
    if isinstance(obj, str):
        for v in secrets:
            obj = obj.replace(v, "***")
        return obj
    if isinstance(obj, dict):
        return {k: redact(v, secrets) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact(v, secrets) for v in obj]
    return obj


class Runner:
    """Runs stages in order, recording each in ``run_dir/run.json``."""

    def __init__(self, run_dir: Path, header: dict[str, Any], on_event: Callable[[str, str, dict], None] | None = None,
                 progress: Callable[[str, int | None], Any] | None = None, force: bool = False,
                 reuse_from: Path | None = None, on_save: Callable[[dict[str, Any]], None] | None = None):
        self.run_dir = ensure_writable_dir(Path(run_dir))
        self.on_save = on_save
        self.reuse_from = Path(reuse_from) if reuse_from is not None else None
        self.reuse: dict[str, Any] = ((load_manifest(self.reuse_from) or {}).get("stages", {})
                                      if self.reuse_from is not None and not force else {})
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
        doc = redact(self.manifest)  # a copy when there is anything to redact: records stay live
        write_json(self.path, doc)
        if self.on_save is not None:
            self.on_save(doc)

    def _outputs_intact(self, record: dict[str, Any], run_dir: Path | None = None) -> bool:
        for out in record.get("outputs", {}).values():
            p = (run_dir or self.run_dir) / out["path"]
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
            elif (reused := self.reuse.get(stage.name)) and reused.get("status") == "done" and reused.get("fingerprint") == fp \
                    and self._outputs_intact(reused, self.reuse_from):
                linked: set[str] = set()
                for out in sorted(reused["outputs"].values(), key=lambda o: o["path"]):
                    if not any(out["path"].startswith(p + "/") for p in linked):
                        link_output(self.reuse_from / out["path"], self.run_dir / out["path"])
                        linked.add(out["path"])
                record = {**reused, "status": "done", "skipped": True, "reused_from": self.reuse_from.name}
                self.manifest["stages"][stage.name] = record
                self._save()
                self.on_event(stage.name, "skipped", record)
            else:
                record = {"status": "running", "skipped": False, "started": _now(), "fingerprint": fp, "config": stage.config,
                          "inputs": {str(p): _file_fingerprint(p) for p in sorted(stage.inputs, key=str)}}
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
