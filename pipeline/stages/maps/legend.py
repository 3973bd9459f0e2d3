"""The legend of a class map: :class:`MapClass` (code, name, colour) and the class table a map
file carries (band tag ``cropmap_classes`` and the ``<map>.classes.json`` sidecar).

GDAL note: metadata keys must not contain ``:`` (GDAL splits ``key:value`` like ``key=value``),
hence the ``cropmap_`` prefixes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.errors

from cropmap.pipeline.errors import DataError

CLASSES_TAG = "cropmap_classes"
"""Band tag of the class map holding the JSON class list."""
CLASS_NODATA = 0

_COLOR_RE = re.compile(r"^#[0-9a-fA-F]{6}$")


@dataclass(frozen=True)
class MapClass:
    """One legend entry of a class map: raster code, display name and ``#rrggbb`` colour."""

    code: int  # 1..255 raster value (0 is nodata)
    name: str
    color: str  # "#rrggbb"

    def __post_init__(self) -> None:
        if isinstance(self.code, bool) or not isinstance(self.code, (int, np.integer)):
            raise ValueError(f"class code must be an integer, got {self.code!r}")
        if not 1 <= int(self.code) <= 255:
            raise ValueError(f"class code {self.code} is outside 1..255 (0 is reserved for nodata)")
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"class {self.code} needs a non-empty name, got {self.name!r}")
        if not isinstance(self.color, str) or not _COLOR_RE.match(self.color):
            raise ValueError(f"class {self.code} ({self.name}): colour {self.color!r} is not '#rrggbb'")
        object.__setattr__(self, "code", int(self.code))
        object.__setattr__(self, "color", self.color.lower())

    @property
    def rgb(self) -> tuple[int, int, int]:
        """The colour as 0..255 integers."""
        return tuple(int(self.color[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "name": self.name, "color": self.color}


def sidecar_path(map_path: Path) -> Path:
    return map_path.with_name(map_path.name + ".classes.json")


def classes_json(classes: Sequence[MapClass]) -> str:
    return json.dumps([c.to_dict() for c in classes], ensure_ascii=False)


def check_classes(classes: Sequence[MapClass]) -> tuple[MapClass, ...]:
    classes = tuple(classes)
    if not classes:
        raise ValueError("a class map needs at least one class")
    seen: dict[int, str] = {}
    for c in classes:
        if not isinstance(c, MapClass):
            raise ValueError(f"classes must be MapClass instances, got {type(c).__name__}")
        if c.code in seen:
            raise ValueError(f"duplicate class code {c.code} ({seen[c.code]!r} and {c.name!r})")
        seen[c.code] = c.name
    return classes

def _parse_class_list(obj: Any, source: str) -> list[MapClass]:
    if isinstance(obj, dict) and "classes" in obj:
        obj = obj["classes"]
    if not isinstance(obj, list):
        raise DataError(f"class table in {source} is not a list of classes")
    try:
        return [MapClass(int(d["code"]), str(d["name"]), str(d["color"])) for d in obj]
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"class table in {source} is malformed: {exc}") from None


def read_class_table(map_path: Path) -> list[MapClass]:
    """The classes of a class map: from its ``cropmap_classes`` band tag, else its sidecar JSON."""
    map_path = Path(map_path)
    try:
        with rasterio.open(map_path) as ds:
            raw = ds.tags(1).get(CLASSES_TAG)
    except rasterio.errors.RasterioIOError as exc:
        raise DataError(f"cannot read class map {str(map_path)!r}: {exc}") from None
    if raw is not None:
        try:
            return _parse_class_list(json.loads(raw), f"{str(map_path)!r}")
        except json.JSONDecodeError:
            pass  # fall back to the sidecar
    side = sidecar_path(map_path)
    if side.is_file():
        try:
            obj = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read class table {str(side)!r}: {exc}") from None
        return _parse_class_list(obj, f"{str(side)!r}")
    raise DataError(
        f"{str(map_path)!r} has no class table (no {CLASSES_TAG} tag, no {side.name})",
        fix="use a class map written by cropmap",
    )


