"""Per-epoch training logs: a CSV (always) and TensorBoard scalars (when tensorboard is installed).

Both are written as training goes, so a long run can be watched live
(``tensorboard --logdir DIR/tensorboard``) and a crashed run still shows how far it got.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


class TrainingLog:
    """Callable that records one row per epoch into ``directory`` (``history.csv``, ``tensorboard/``).

    ``rows`` seeds the log with the epochs of a resumed run, so the CSV stays complete.
    """

    def __init__(self, directory: Path, rows: list[dict] | None = None, tensorboard: bool = True) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = list(rows or [])
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional: the CSV is always there
                log.info("tensorboard is not installed: epoch logs go to history.csv only")
            else:
                self._writer = SummaryWriter(log_dir=str(self.directory / "tensorboard"))

    @property
    def csv_path(self) -> Path:
        return self.directory / "history.csv"

    def __call__(self, row: dict) -> None:
        self.rows = [r for r in self.rows if r.get("epoch") != row.get("epoch")] + [dict(row)]
        write_history(self.csv_path, self.rows)
        if self._writer is not None:
            step = int(row.get("epoch", len(self.rows)))
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self._writer.add_scalar(key.replace("_", "/", 1), float(value), step)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def write_history(path: Path, rows: list[dict]) -> None:
    """Write ``rows`` as CSV (``epoch`` first), atomically."""
    keys = sorted({k for row in rows for k in row}, key=lambda k: (k != "epoch", k))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)
