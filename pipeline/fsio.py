"""Atomic file output and checksums.

Every output is written under a temporary name in the destination directory and renamed into
place, so a crash never leaves a half-written file under the final name and never destroys the
previous version before the new one is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cropmap.pipeline.errors import OutputError


def ensure_writable_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and check it is writable, or raise :class:`OutputError`."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"cannot create output directory {str(path)!r}: {exc.strerror}",
            fix="choose a writable location with --out",
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputError(
            f"output directory {str(path)!r} is not writable",
            fix="fix its permissions or choose another location with --out",
        )
    return path


@contextlib.contextmanager
def atomic_path(final: Path, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path; on success rename it to ``final`` (replacing it).

    On error the temporary is removed and ``final`` is left as it was.
    """
    final = Path(final)
    ensure_writable_dir(final.parent)
    suffix = "".join(final.suffixes)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.stem}.", suffix=".tmp", dir=final.parent))
    if is_dir:  # mkdtemp makes 0700 directories; give outputs the usual permissions
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
    target = tmp if is_dir else tmp / f"data{suffix}"
    try:
        yield target
        if final.is_dir() and not final.is_symlink():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(target, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, final)
    except OSError as exc:
        raise OutputError(
            f"cannot write {str(final)!r}: {exc.strerror or exc}",
            fix="check free disk space and permissions of the output directory",
        ) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")
    return Path(path)


def write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256_path(path: Path, chunk: int = 1 << 20) -> str:
    """Checksum of a file, or of a directory tree (relative names and contents, sorted)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if f is not path:
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


def link_output(src: Path, dst: Path) -> None:
    """Make ``dst`` a hard-linked copy of the file or tree ``src`` (a real copy across filesystems), atomically."""
    src, dst = Path(src), Path(dst)

    def one(a: Path, b: Path) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if src.is_dir():
        with atomic_path(dst, is_dir=True) as tmp:
            for p in sorted(src.rglob("*")):
                q = tmp / p.relative_to(src)
                if p.is_dir():
                    q.mkdir(parents=True, exist_ok=True)
                else:
                    q.parent.mkdir(parents=True, exist_ok=True)
                    one(p, q)
    else:
        with atomic_path(dst) as tmp:
            one(src, tmp)


def store_format(path: Path) -> str | None:
    """The ``format`` of the sample store or model directory at ``path`` (its ``meta.json``), or None."""
    meta = Path(path) / "meta.json"
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None
