"""STAC items for crop maps (pystac): where a map lies, on which grid, and what its codes mean.

One item per map, written next to it as ``<map>.stac.json`` (relative asset hrefs, so the map
folder can be moved or uploaded as is). The item's geometry is the map's footprint in WGS84;
its time range is the season year. Assets:

* ``map`` (class COG, role ``data``) with the projection extension (``proj:code``,
  ``proj:transform``, ``proj:shape``, ``proj:bbox``) and the classification extension
  (``classification:classes``: value, name, colour hint; 0 marked as nodata);
* ``confidence`` (confidence COG in percent, role ``data``, same projection fields);
* ``preview`` (PNG, role ``overview``) and ``classes`` (the sidecar JSON, role ``metadata``)
  when they exist.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import rasterio
from rasterio.warp import transform_geom

from cropmap.pipeline.fsio import write_json
from cropmap.pipeline.stages.maps import CLASS_NODATA, read_class_table

__all__ = ["map_item", "write_map_item", "stac_path"]


def stac_path(map_path: Path) -> Path:
    return Path(map_path).with_name(Path(map_path).stem + ".stac.json")


def _projection(path: Path) -> dict:
    with rasterio.open(path) as ds:
        epsg = ds.crs.to_epsg()
        code = f"EPSG:{epsg}" if epsg else None
        return {"code": code, "wkt2": None if code else ds.crs.to_wkt(), "transform": list(ds.transform)[:6],
                "shape": [ds.height, ds.width], "bbox": list(ds.bounds), "crs": ds.crs}


def map_item(map_path: Path, confidence_path: Path | None = None, preview_path: Path | None = None, *, item_id: str,
             year: int, properties: dict | None = None):
    """The :class:`pystac.Item` of a class map (and its confidence map / preview)."""
    import pystac
    from pystac.extensions.classification import Classification, ClassificationExtension
    from pystac.extensions.projection import ProjectionExtension

    map_path = Path(map_path)
    proj = _projection(map_path)
    xmin, ymin, xmax, ymax = proj["bbox"]
    ring = [[xmin, ymin], [xmax, ymin], [xmax, ymax], [xmin, ymax], [xmin, ymin]]
    # densified ring: UTM straight edges are curves in WGS84
    geom = transform_geom(proj["crs"], "EPSG:4326", {"type": "Polygon", "coordinates": [_densify(ring)]})
    xs = [p[0] for p in geom["coordinates"][0]]
    ys = [p[1] for p in geom["coordinates"][0]]
    item = pystac.Item(
        id=item_id, geometry=geom, bbox=[min(xs), min(ys), max(xs), max(ys)], datetime=None,
        properties={"start_datetime": f"{year}-01-01T00:00:00Z", "end_datetime": f"{year}-12-31T23:59:59Z",
                    "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), **(properties or {})},
    )
    base = map_path.parent

    def add(key: str, path: Path, media: str, roles: list[str], title: str, projected: bool):
        asset = pystac.Asset(href=str(Path(path).relative_to(base)) if Path(path).parent == base else str(path), media_type=media,
                             roles=roles, title=title)
        item.add_asset(key, asset)
        if projected:
            p = _projection(path)
            ProjectionExtension.ext(asset, add_if_missing=True).apply(code=p["code"], wkt2=p["wkt2"], transform=p["transform"],
                                                                      shape=p["shape"], bbox=p["bbox"])
        return asset

    cog = pystac.MediaType.COG
    asset = add("map", map_path, cog, ["data"], "crop classes (uint8, 0 = nodata)", True)
    classes = [Classification.create(value=CLASS_NODATA, name="nodata", description="no observation or outside the tiles", nodata=True)]
    classes += [Classification.create(value=c.code, name=_stac_name(c.name), description=c.name, color_hint=c.color.lstrip("#").upper())
                for c in read_class_table(map_path)]
    ClassificationExtension.ext(asset, add_if_missing=True).classes = classes
    if confidence_path is not None and Path(confidence_path).exists():
        add("confidence", Path(confidence_path), cog, ["data"], "confidence of the class (percent, 255 = nodata)", True)
    if preview_path is not None and Path(preview_path).exists():
        add("preview", Path(preview_path), pystac.MediaType.PNG, ["overview"], "preview with legend", False)
    side = map_path.with_name(map_path.name + ".classes.json")
    if side.exists():
        add("classes", side, pystac.MediaType.JSON, ["metadata"], "class table", False)
    return item


def _densify(ring: list[list[float]], n: int = 16) -> list[list[float]]:
    out = []
    for (x0, y0), (x1, y1) in zip(ring[:-1], ring[1:]):
        out += [[x0 + (x1 - x0) * k / n, y0 + (y1 - y0) * k / n] for k in range(n)]
    return out + [ring[-1]]


def _stac_name(name: str) -> str:
    """Classification names must match ``^[0-9A-Za-z-_]+$``."""
    import re

    return re.sub(r"[^0-9A-Za-z_-]+", "_", name).strip("_") or "class"


def write_map_item(map_path: Path, confidence_path: Path | None = None, preview_path: Path | None = None, *, item_id: str,
                   year: int, properties: dict | None = None) -> Path:
    """Write the item next to the map (``<map stem>.stac.json``), atomically; returns its path."""
    item = map_item(map_path, confidence_path, preview_path, item_id=item_id, year=year, properties=properties)
    out = stac_path(map_path)
    write_json(out, item.to_dict(include_self_link=False, transform_hrefs=False))
    return out
