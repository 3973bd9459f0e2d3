"""Versioned runs of a site year: ``DIR/SITE/YEAR/versions/vN/`` plus a published "current" view.

Every run of a site and year belongs to a *version*, a complete run directory of its own
(``versions/vN/`` with its ``run.json``). The version is chosen by a *version key*: the code
version plus every stage's name, version, config and input checksums. A run whose key matches an
existing version resumes or repairs that version (and does nothing when it is complete and
intact); a changed config or code version opens ``v(N+1)``, linking in (hard links, no copy) the
outputs of the previous version's stages whose fingerprints are unchanged, so only what changed is
recomputed and the previous version's files are never touched.

The year directory itself is the published view: ``run.json`` is the manifest of the latest
*complete* version (its ``outputs`` point into ``versions/vN/``; ``latest_attempt`` says how the
last run went, e.g. a failed ``v3``), and one symbolic link per top-level entry
(``map -> versions/vN/map``, ``metrics.json``, ``report.html`` ...) keeps the usual paths
working. Before any version completes, ``run.json`` mirrors the running (or failed) one. A year
directory of the earlier, unversioned layout becomes ``versions/v1`` on first use.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cropmap
from cropmap.pipeline.errors import OutputError, SiteError
from cropmap.pipeline.fsio import write_json
from cropmap.pipeline.lock import LOCK_NAME
from cropmap.pipeline.runner import MANIFEST, Stage, _file_fingerprint, load_manifest

log = logging.getLogger(__name__)

VERSIONS = "versions"
_VNAME = re.compile(r"^v(\d+)$")


@functools.cache
def code_version() -> str:
    """``cropmap.__version__``, plus ``+g<commit>`` when running from a git checkout."""
    here = Path(cropmap.__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return cropmap.__version__
    commit = out.stdout.strip()
    return f"{cropmap.__version__}+g{commit}" if out.returncode == 0 and commit else cropmap.__version__


def version_key(stages: list[Stage], code: str, extra: dict[str, Any] | None = None) -> str:
    """What identifies a version: code version, each stage's name/version/config and input checksums."""
    doc = {
        "code": code,
        "extra": extra or {},
        "stages": [{"name": s.name, "version": s.version, "config": s.config, "after": s.after,
                    "inputs": {str(p): _file_fingerprint(p) for p in sorted(s.inputs, key=str)}} for s in stages],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def year_dir(out: Path, site: str, year: int) -> Path:
    """``out/site/year``, refusing names that would lead outside ``out``."""
    if not re.match(r"^[a-z0-9][a-z0-9_-]{0,63}$", site or ""):
        raise SiteError(f"invalid site name {site!r}", fix="site names are lower-case letters, digits, '-' or '_'")
    if not (isinstance(year, int) and 1900 <= year <= 2200):
        raise SiteError(f"invalid year {year!r}", fix="use a four-digit season year")
    base = Path(out).resolve()
    d = (base / site / str(year)).resolve()
    if base not in d.parents:
        raise OutputError(f"run directory {d} is outside the output root {base}", fix="use a plain site name and year")
    return Path(out) / site / str(year)


@dataclass(frozen=True)
class Plan:
    year_dir: Path
    name: str
    """Version name, ``vN``."""
    key: str
    existing: bool
    """True when the version already existed (resume, repair, or nothing to do)."""
    reuse_from: Path | None
    """A previous version whose unchanged stage outputs are linked in (new versions only)."""

    @property
    def dir(self) -> Path:
        return self.year_dir / VERSIONS / self.name


def _number(name: str) -> int:
    m = _VNAME.match(name)
    return int(m.group(1)) if m else -1


def list_versions(ydir: Path) -> list[tuple[str, Path, dict | None]]:
    """``(name, dir, manifest)`` of every version of a year directory, oldest first."""
    root = Path(ydir) / VERSIONS
    if not root.is_dir():
        return []
    dirs = sorted((p for p in root.iterdir() if p.is_dir() and _VNAME.match(p.name)), key=lambda p: _number(p.name))
    return [(p.name, p, load_manifest(p)) for p in dirs]


def current_version(ydir: Path) -> str | None:
    doc = load_manifest(ydir)
    v = (doc or {}).get("version")
    return v if isinstance(v, str) and _VNAME.match(v) and doc.get("status") == "succeeded" else None


def migrate_legacy(ydir: Path) -> None:
    """Move a pre-versioning year directory (run.json and outputs at the top) into ``versions/v1``."""
    ydir = Path(ydir)
    doc = load_manifest(ydir)
    if doc is None or "version" in doc or (ydir / VERSIONS).exists():
        return
    v1 = ydir / VERSIONS / "v1"
    v1.mkdir(parents=True)
    for entry in ydir.iterdir():
        if entry.name in (VERSIONS, LOCK_NAME):
            continue
        os.replace(entry, v1 / entry.name)
    log.warning("moved the unversioned run in %s to %s", ydir, v1)


def plan_version(ydir: Path, key: str, force: bool = False) -> Plan:
    """The version a run with ``key`` goes to: the one with that key, else a new one."""
    versions = list_versions(ydir)
    if not force:
        for name, _, doc in reversed(versions):
            if doc and doc.get("version_key") == key:
                return Plan(Path(ydir), name, key, True, None)
    n = max((_number(name) for name, _, _ in versions), default=0) + 1
    cur = current_version(ydir) or next((name for name, _, doc in reversed(versions) if doc and doc.get("status") == "succeeded"), None)
    reuse = None if force or cur is None else Path(ydir) / VERSIONS / cur
    return Plan(Path(ydir), f"v{n}", key, False, reuse)


def _top_doc(plan: Plan, manifest: dict) -> dict:
    doc = dict(manifest)
    prefix = f"{VERSIONS}/{plan.name}"
    doc["version"] = plan.name
    doc["run_dir"] = prefix
    doc["outputs"] = {k: f"{prefix}/{v}" for k, v in manifest.get("outputs", {}).items()}
    return doc


def _attempt(plan: Plan, manifest: dict) -> dict:
    failed = [n for n, s in manifest.get("stages", {}).items() if s.get("status") in ("failed", "running")]
    out = {"version": plan.name, "status": manifest.get("status"), "started": manifest.get("started"), "finished": manifest.get("finished")}
    if failed:
        out["stage"] = failed[0]
        if err := manifest["stages"][failed[0]].get("error"):
            out["error"] = err
    return out


def _link_entries(plan: Plan) -> None:
    """Point the year directory's top-level entries at the published version."""
    ydir, vdir = plan.year_dir, plan.dir
    wanted = {p.name for p in vdir.iterdir() if p.name != MANIFEST and not p.name.startswith(".")}
    for entry in ydir.iterdir():
        if entry.is_symlink() and entry.name not in wanted and os.readlink(entry).startswith(f"{VERSIONS}/"):
            entry.unlink()
    for name in sorted(wanted):
        top = ydir / name
        if top.exists() and not top.is_symlink():
            log.warning("%s is not a link to a version; left as it is", top)
            continue
        tmp = ydir / f".{name}.link"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            os.symlink(f"{VERSIONS}/{plan.name}/{name}", tmp)
            os.replace(tmp, top)
        except OSError as exc:  # a filesystem without links: run.json still points into versions/
            log.warning("cannot link %s: %s", top, exc)


def publish(plan: Plan, manifest: dict) -> None:
    """Record ``manifest`` (of version ``plan``) in the year directory's ``run.json``.

    A complete version becomes current; an incomplete one only updates ``latest_attempt``, unless
    no version is complete yet (then ``run.json`` mirrors it, so a failure is never invisible).
    """
    ydir = plan.year_dir
    top = ydir / MANIFEST
    current = load_manifest(ydir)
    attempt = _attempt(plan, manifest)
    if manifest.get("status") == "succeeded":
        _link_entries(plan)
        write_json(top, {**_top_doc(plan, manifest), "latest_attempt": attempt})
    elif current is not None and current.get("status") == "succeeded" and current.get("version") != plan.name:
        write_json(top, {**current, "latest_attempt": attempt})
    else:
        write_json(top, {**_top_doc(plan, manifest), "latest_attempt": attempt})


def runs_table(out: Path, site: str | None = None) -> list[dict[str, Any]]:
    """Every version of every run under ``out`` (optionally one site): site, year, version, status, current, ..."""
    out = Path(out)
    rows = []
    sites = [out / site] if site else sorted(p for p in out.iterdir() if p.is_dir()) if out.is_dir() else []
    for sdir in sites:
        if not sdir.is_dir():
            continue
        for ydir in sorted((p for p in sdir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
            top = load_manifest(ydir) or {}
            cur = top.get("version") if top.get("status") == "succeeded" else None
            versions = list_versions(ydir)
            if not versions and top:  # unversioned (earlier layout)
                versions = [("-", ydir, top)]
            for name, vdir, doc in versions:
                doc = doc or {}
                stages = doc.get("stages", {})
                failed = next((n for n, s in stages.items() if s.get("status") in ("failed", "running")), None)
                rows.append({
                    "site": sdir.name, "year": int(ydir.name), "version": name, "current": name == cur,
                    "status": doc.get("status", "incomplete"), "stage": failed, "started": doc.get("started"),
                    "finished": doc.get("finished"), "code_version": doc.get("code_version"),
                    "early_season_until": doc.get("early_season_until"), "transfer_from": doc.get("transfer_from"),
                    "path": str(vdir),
                })
    return rows


def prepare(ydir: Path, stages: list[Stage], header: dict[str, Any], force: bool = False) -> tuple[Plan, dict[str, Any]]:
    """Pick the version of a run (call with the year directory's lock held) and the manifest header recording it."""
    migrate_legacy(ydir)
    code = code_version()
    key = version_key(stages, code)
    plan = plan_version(ydir, key, force)
    sweep_temporaries(plan.dir)
    return plan, {**header, "version": plan.name, "version_key": key, "code_version": code}


def sweep_temporaries(run_dir: Path) -> list[Path]:
    """Remove the temporaries (``.NAME.*.tmp``) a killed run left behind; call with the lock held (no live writer)."""
    gone = []
    if Path(run_dir).is_dir():
        for p in sorted(Path(run_dir).rglob(".*.tmp"), key=lambda q: -len(q.parts)):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink()
            gone.append(p)
    if gone:
        log.warning("removed %d temporary file(s) of an interrupted run in %s", len(gone), run_dir)
    return gone
