"""A lock per run directory, so two runs of the same site and year never run at once.

The lock is a small JSON file (``.lock``: pid, host, process start time, when, command) created
with ``O_CREAT | O_EXCL``. A lock left behind by a dead process on this host (the pid is gone,
or was reused by another process since) is stale and taken over with a warning; a lock held by
another host cannot be checked and is reported with its holder and how to remove it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from cropmap.pipeline.errors import LockError, OutputError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


def _start_time(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    now = _start_time(pid)
    return started is None or now is None or now == started


def read_lock(path: Path) -> dict | None:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def is_stale(holder: dict | None) -> bool:
    """A lock whose holder is known dead; unreadable locks (a crash while writing one) count as stale."""
    if holder is None:
        return True
    if holder.get("host") != socket.gethostname():
        return False
    return not _alive(int(holder.get("pid", -1)), holder.get("pid_started"))


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')} ({holder.get('command', '?')})"


@contextlib.contextmanager
def run_lock(directory: Path, command: str | None = None) -> Iterator[Path]:
    """Hold ``directory/.lock`` for the duration of the block; raise :class:`LockError` if another live run holds it."""
    directory = Path(directory)
    path = directory / LOCK_NAME
    me = {"pid": os.getpid(), "pid_started": _start_time(os.getpid()), "host": socket.gethostname(),
          "since": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "command": command or " ".join(sys.argv)}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_lock(path)
            if holder is not None and holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                raise LockError(f"{path} is already held by this process", fix="do not nest runs of the same site and year") from None
            if is_stale(holder):
                log.warning("removing stale lock %s (%s)", path, _describe(holder) if holder else "unreadable")
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            raise LockError(f"another run holds {path}: {_describe(holder)}",
                            fix="wait for it to finish; if that process is dead (e.g. another host crashed), delete the lock file") from None
        except OSError as exc:
            raise OutputError(f"cannot create lock file {str(path)!r}: {exc.strerror}",
                              fix="check free disk space and permissions of the output directory") from None
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(me) + "\n")
        except OSError as exc:
            with contextlib.suppress(OSError):
                path.unlink()
            raise OutputError(f"cannot write lock file {str(path)!r}: {exc.strerror}",
                              fix="check free disk space of the output directory") from None
        break
    else:
        raise LockError(f"could not take {path}: it keeps reappearing", fix="another run is starting; retry later")
    try:
        yield path
    finally:
        holder = read_lock(path)
        if holder and holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
