"""Reading and evaluating serialised Earth Engine expressions offline.

Two tools over the graph ``ee.serializer.encode(x, for_cloud_api=True)`` produces:

* :class:`Graph` walks it (shared-value references resolved): the function invocations, their
  arguments, the mapped function bodies. The structural checks of the tests use it.
* :class:`Evaluator` *computes* an image expression with numpy over a small catalog of local
  acquisitions (the fake client's demo pixels), for the algorithms the composite builders use.
  It follows Earth Engine's rules where they decide what a graph selects: an image built by
  arithmetic (``Image.pow``, ``Image.multiply``, comparisons, reducers, constants) carries **no
  properties**, so a later ``filterDate`` (``Filter.dateRangeContains`` on ``system:time_start``)
  drops it; ``select``/``rename``/``updateMask``/``addBands``/``set``/``copyProperties`` keep
  them. Where the server's behaviour is not documented (casts such as ``toFloat``) it takes the
  strict side (properties dropped), so builders must ``copyProperties`` last, which is right on the
  server either way. A graph that would select nothing on the server yields nothing here too.
  It is stricter than the server in one place: merging collections whose bands have different
  types raises (the server silently promotes; the builders cast the padding image instead).

An unsupported algorithm raises :class:`Unsupported` naming it: the evaluator never guesses.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cropmap.pipeline.cube import TileGrid


class Unsupported(ValueError):
    """The evaluator does not implement this algorithm (or argument)."""


# ---------------------------------------------------------------- walking the graph
class Graph:
    """A serialised expression: ``{"result": id, "values": {id: node}}``."""

    def __init__(self, encoded: dict):
        self.values = encoded["values"]
        self.result = encoded["result"]

    def node(self, n: dict) -> dict:
        while "valueReference" in n:
            n = self.values[n["valueReference"]]
        return n

    def root(self) -> dict:
        return self.node(self.values[self.result])

    def invocations(self) -> list[dict]:
        """Every ``functionInvocationValue`` of the graph (each shared value once), depth first."""
        seen: set[int] = set()
        out: list[dict] = []

        def walk(n: Any) -> None:
            if isinstance(n, dict):
                n = self.node(n) if "valueReference" in n else n
                if id(n) in seen:
                    return
                seen.add(id(n))
                if "functionInvocationValue" in n:
                    out.append(n["functionInvocationValue"])
                if "functionDefinitionValue" in n:
                    walk(self.values[n["functionDefinitionValue"]["body"]])
                for v in n.values():
                    walk(v)
            elif isinstance(n, list):
                for v in n:
                    walk(v)

        walk(self.values[self.result])
        return out

    def calls(self, name: str) -> list[dict]:
        return [inv for inv in self.invocations() if inv["functionName"] == name]

    def constant(self, n: dict) -> Any:
        n = self.node(n)
        if "constantValue" in n:
            return n["constantValue"]
        if "arrayValue" in n:
            return [self.constant(v) for v in n["arrayValue"]["values"]]
        raise Unsupported(f"not a constant: {list(n)}")

    def outer(self, n: dict) -> str | None:
        """The function name of the invocation ``n`` resolves to (None for constants, arguments)."""
        n = self.node(n)
        return n["functionInvocationValue"]["functionName"] if "functionInvocationValue" in n else None


PROPERTY_KEEPING = {"Image.select", "Image.rename", "Image.updateMask", "Image.addBands", "Image.clip",
                    "Image.linkCollection", "Element.set", "Element.setMulti", "Element.copyProperties",
                    "Image.copyProperties", "Image.reproject", "Image.clipToBoundsAndScale", "Image.unmask"}
"""Image algorithms whose output keeps the properties of their (first) image input; every other
image algorithm (arithmetic, comparisons, casts, reducers, constants) returns an image without
properties (``Element.set``/``copyProperties`` add them back)."""


def mapped_keeps_time(graph: Graph, fn: dict) -> bool:
    """Does the mapped function ``fn`` (a ``functionDefinitionValue``) return an image that keeps its
    argument's ``system:time_start``? Follows property-keeping algorithms from the body's result
    back to the argument; a property-dropping algorithm on the way breaks the chain unless a later
    ``set``/``copyProperties`` puts ``system:time_start`` back."""
    arg = fn["argumentNames"][0]

    def keeps(n: dict) -> bool:
        n = graph.node(n)
        if n.get("argumentReference") == arg:
            return True
        inv = n.get("functionInvocationValue")
        if inv is None:
            return False
        name, a = inv["functionName"], inv["arguments"]
        if name in ("Element.copyProperties", "Image.copyProperties"):
            props = graph.constant(a["properties"]) if "properties" in a else None
            if keeps(a["source"]) and (props is None or "system:time_start" in props):
                return True
            return keeps(a["destination"])
        if name == "Element.set" and graph.constant(a["key"]) == "system:time_start":
            return True
        if name == "Element.setMulti":
            d = graph.node(a["properties"]).get("dictionaryValue", {}).get("values", {})
            if "system:time_start" in d:
                return True
            return keeps(a["object"])
        if name not in PROPERTY_KEEPING:
            return False
        first = {"Image.select": "input", "Image.rename": "input", "Image.updateMask": "image", "Image.addBands": "dstImg",
                 "Image.clip": "input", "Image.linkCollection": "input", "Element.set": "object",
                 "Image.reproject": "image", "Image.clipToBoundsAndScale": "input", "Image.unmask": "input"}[name]
        return keeps(a[first])

    return keeps(graph.values[fn["body"]])


def time_filtered_maps(graph: Graph) -> list[tuple[dict, bool]]:
    """Every ``Collection.map`` whose output (directly, or through further maps/filters) is filtered
    by date, with whether its function keeps ``system:time_start``."""
    out = []
    for inv in graph.calls("Collection.filter"):
        f = graph.node(inv["arguments"]["filter"])["functionInvocationValue"]
        if f["functionName"] != "Filter.dateRangeContains":
            continue
        n = graph.node(inv["arguments"]["collection"])
        while "functionInvocationValue" in n:
            i = n["functionInvocationValue"]
            if i["functionName"] == "Collection.map":
                fn = graph.node(i["arguments"]["baseAlgorithm"])["functionDefinitionValue"]
                out.append((i, mapped_keeps_time(graph, fn)))
            elif i["functionName"] not in ("Collection.filter", "Collection.map"):
                break
            n = graph.node(i["arguments"]["collection"])
    return out


# ---------------------------------------------------------------- evaluating images
@dataclass
class Img:
    """An image on the evaluation grid: (bands, H, W) values, a validity mask, band types, properties."""

    names: list[str]
    data: np.ndarray
    mask: np.ndarray
    types: list[str]
    props: dict = field(default_factory=dict)
    footprint: tuple[float, float, float, float] | None = None
    """Bounds (grid CRS) of the image's footprint; None: everywhere (constants)."""

    def band(self, i: int) -> Img:
        return Img([self.names[i]], self.data[i:i + 1], self.mask[i:i + 1], [self.types[i]], dict(self.props), self.footprint)


def ms(day: dt.date | str) -> int:
    d = dt.date.fromisoformat(day) if isinstance(day, str) else day
    return int((dt.datetime(d.year, d.month, d.day, tzinfo=dt.UTC)).timestamp() * 1000)


_CASTS = {"Image.toUint16": ("uint16", 0, 65535), "Image.toUint8": ("uint8", 0, 255), "Image.toInt16": ("int16", -32768, 32767),
          "Image.toInt32": ("int32", -2**31, 2**31 - 1), "Image.toFloat": ("float32", None, None),
          "Image.toDouble": ("float64", None, None)}
_BINARY = {"Image.add": np.add, "Image.subtract": np.subtract, "Image.multiply": np.multiply, "Image.divide": np.divide,
           "Image.pow": np.power, "Image.gte": np.greater_equal, "Image.gt": np.greater, "Image.lte": np.less_equal,
           "Image.lt": np.less, "Image.eq": np.equal, "Image.neq": np.not_equal,
           "Image.and": lambda a, b: (a != 0) & (b != 0), "Image.or": lambda a, b: (a != 0) | (b != 0)}
_UNARY = {"Image.log10": np.log10, "Image.exp": np.exp, "Image.log": np.log, "Image.round": lambda v: np.sign(v) * np.floor(np.abs(v) + 0.5)}
_INT = ("uint8", "uint16", "int16", "int32")
_GRID_ONLY = {"Image.clipToBoundsAndScale": ("input",), "Image.reproject": ("image",)}
"""Arguments evaluated of the algorithms that frame an export (the rest describe the grid)."""


def _binary_type(name: str, t1: str, t2: str) -> str:
    if name in ("Image.gte", "Image.gt", "Image.lte", "Image.lt", "Image.eq", "Image.neq", "Image.and", "Image.or"):
        return "uint8"
    if name in ("Image.divide", "Image.pow") or t1 not in _INT or t2 not in _INT:
        return "float64"
    return "int32"


class Evaluator:
    """Evaluates a serialised image expression on ``grid`` over ``catalog`` (collection id -> images)."""

    def __init__(self, encoded: dict, grid: TileGrid, catalog: dict[str, list[Img]]):
        self.graph = Graph(encoded)
        self.grid = grid
        self.catalog = catalog
        self._memo: dict[int, Any] = {}

    def image(self) -> Img:
        out = self.eval(self.graph.values[self.graph.result], {})
        if not isinstance(out, Img):
            raise Unsupported(f"the expression is a {type(out).__name__}, not an image")
        return out

    # ------------------------------------------------------------ nodes
    def eval(self, n: dict, env: dict) -> Any:
        ref = n.get("valueReference")
        if ref is not None and not env:
            key = id(self.graph.values[ref])
            if key not in self._memo:
                self._memo[key] = self.eval(self.graph.values[ref], env)
            return self._memo[key]
        n = self.graph.node(n)
        if "constantValue" in n:
            return n["constantValue"]
        if "arrayValue" in n:
            return [self.eval(v, env) for v in n["arrayValue"]["values"]]
        if "dictionaryValue" in n:
            return {k: self.eval(v, env) for k, v in n["dictionaryValue"]["values"].items()}
        if "argumentReference" in n:
            return env[n["argumentReference"]]
        if "functionDefinitionValue" in n:
            fd = n["functionDefinitionValue"]
            body = self.graph.values[fd["body"]]
            return lambda *args: self.eval(body, {**env, **dict(zip(fd["argumentNames"], args))})
        if "functionInvocationValue" in n:
            inv = n["functionInvocationValue"]
            name = inv["functionName"]
            fn = getattr(self, "f_" + name.replace(".", "_"), None)
            if fn is None:
                raise Unsupported(f"the offline evaluator does not implement {name}")
            used = _GRID_ONLY.get(name)  # export framing: the evaluation grid is already the export's grid
            return fn({k: self.eval(v, env) for k, v in inv["arguments"].items() if used is None or k in used})
        raise Unsupported(f"unknown graph node {list(n)}")

    # ------------------------------------------------------------ helpers
    def _const(self, value) -> Img:
        vals = value if isinstance(value, list) else [value]
        h, w = self.grid.height, self.grid.width
        data = np.stack([np.full((h, w), float(v)) for v in vals])
        types = ["int32" if isinstance(v, int) and not isinstance(v, bool) else "float64" for v in vals]
        return Img([f"constant_{i}" if len(vals) > 1 else "constant" for i in range(len(vals))], data,
                   np.ones(data.shape, bool), types)

    def _img(self, v) -> Img:
        return v if isinstance(v, Img) else self._const(v)

    @staticmethod
    def _broadcast(a: Img, b: Img) -> tuple[Img, Img]:
        if len(a.names) == len(b.names):
            return a, b
        if len(b.names) == 1:
            return a, Img(a.names, np.repeat(b.data, len(a.names), 0), np.repeat(b.mask, len(a.names), 0), b.types * len(a.names))
        if len(a.names) == 1:
            return Img(b.names, np.repeat(a.data, len(b.names), 0), np.repeat(a.mask, len(b.names), 0), a.types * len(b.names)), b
        raise ValueError(f"band counts {len(a.names)} and {len(b.names)} do not match")

    # ------------------------------------------------------------ collections and filters
    def f_ImageCollection_load(self, a):
        if a["id"] not in self.catalog:
            return []
        return list(self.catalog[a["id"]])

    def f_ImageCollection_fromImages(self, a):
        return [self._img(i) for i in a["images"]]

    def f_ImageCollection_merge(self, a):
        c1, c2 = a["collection1"], a["collection2"]
        types = {}
        for img in [*c1, *c2]:
            for n, t in zip(img.names, img.types):
                if types.setdefault(n, t) != t:
                    raise TypeError(f"ImageCollection.merge of images whose band {n!r} is {types[n]} in one and {t} in "
                                    "another: cast the padding image to the collection's type")
        return [*c1, *c2]

    def f_Collection_filter(self, a):
        return [img for img in a["collection"] if a["filter"](img)]

    def f_Collection_map(self, a):
        return [a["baseAlgorithm"](img) for img in a["collection"]]

    def f_Collection_first(self, a):
        return a["collection"][0]

    def f_Filter_dateRangeContains(self, a):
        start, end = a["leftValue"]
        field_ = a["rightField"]
        return lambda img: field_ in img.props and start <= img.props[field_] < end

    def f_DateRange(self, a):
        return (ms(a["start"]), ms(a["end"]))

    def f_Filter_equals(self, a):
        return lambda img: img.props.get(a["leftField"]) == a["rightValue"]

    def f_Filter_lessThan(self, a):
        return lambda img: a["leftField"] in img.props and img.props[a["leftField"]] < a["rightValue"]

    def f_Filter_listContains(self, a):
        return lambda img: a["rightValue"] in (img.props.get(a["leftField"]) or [])

    def f_Filter_and(self, a):
        return lambda img: all(f(img) for f in a["filters"])

    def f_Filter_intersects(self, a):
        xmin, ymin, xmax, ymax = a["rightValue"]

        def inside(img: Img) -> bool:
            if img.footprint is None:
                return True
            x0, y0, x1, y1 = img.footprint
            return x0 < xmax and xmin < x1 and y0 < ymax and ymin < y1

        return inside

    def f_Feature(self, a):
        return a["geometry"]

    def f_GeometryConstructors_Rectangle(self, a):
        crs = a.get("crs")
        if crs is not None and crs != f"EPSG:{self.grid.epsg}":
            raise Unsupported(f"a rectangle in {crs}; the evaluation grid is EPSG:{self.grid.epsg}")
        return tuple(a["coordinates"])

    def f_Projection(self, a):
        return a["crs"]

    # ------------------------------------------------------------ images
    def f_Image_constant(self, a):
        return self._const(a["value"])

    def f_Image_linkCollection(self, a):
        img = a["input"]
        match = a.get("matchPropertyName", "system:index")
        other = next((o for o in a["imageCollection"] if o.props.get(match) == img.props.get(match)), None)
        bands = a["linkedBands"]
        if other is None:  # Earth Engine adds the bands fully masked
            add = Img(bands, np.zeros((len(bands), *img.data.shape[1:])), np.zeros((len(bands), *img.data.shape[1:]), bool),
                      ["float64"] * len(bands))
        else:
            add = self.f_Image_select({"input": other, "bandSelectors": bands})
        return Img([*img.names, *add.names], np.concatenate([img.data, add.data]), np.concatenate([img.mask, add.mask]),
                   [*img.types, *add.types], dict(img.props), img.footprint)

    def f_Image_select(self, a):
        img, sel = a["input"], a["bandSelectors"]
        sel = sel if isinstance(sel, list) else [sel]
        idx = []
        for s in sel:
            if isinstance(s, int):
                idx.append(s)
                continue
            hits = [i for i, n in enumerate(img.names) if n == s or re.fullmatch(str(s), n)]
            if not hits:
                raise LookupError(f"Image.select: Pattern '{s}' did not match any bands.")
            idx += hits
        names = a.get("newNames") or [img.names[i] for i in idx]
        return Img(list(names), img.data[idx], img.mask[idx], [img.types[i] for i in idx], dict(img.props), img.footprint)

    def f_Image_rename(self, a):
        img = a["input"]
        if len(a["names"]) != len(img.names):
            raise ValueError(f"Image.rename: {len(a['names'])} names for {len(img.names)} bands")
        return Img(list(a["names"]), img.data, img.mask, img.types, dict(img.props), img.footprint)

    def f_Image_updateMask(self, a):
        img, m = a["image"], self._img(a["mask"])
        img2, m = self._broadcast(img, m)
        return Img(img.names, img.data, img.mask & m.mask & (m.data != 0), img.types, dict(img.props), img.footprint)

    def f_Image_unmask(self, a):
        img = a["input"]
        value = self._img(a.get("value", 0))
        _, value = self._broadcast(img, value)
        return Img(img.names, np.where(img.mask, img.data, value.data), np.ones(img.mask.shape, bool), img.types,
                   dict(img.props), img.footprint)

    def f_Image_addBands(self, a):
        dst, src = a["dstImg"], a["srcImg"]
        return Img([*dst.names, *src.names], np.concatenate([dst.data, src.data]), np.concatenate([dst.mask, src.mask]),
                   [*dst.types, *src.types], dict(dst.props), dst.footprint)

    def f_Image_remap(self, a):
        img = a["image"]
        if len(img.names) != 1:
            raise Unsupported("Image.remap of a multi-band image")
        out = np.zeros_like(img.data)
        hit = np.zeros(img.data.shape, bool)
        for f, t in zip(a["from"], a["to"]):
            sel = img.data == f
            out[sel], hit[sel] = t, True
        mask = img.mask & hit
        if "defaultValue" in a and a["defaultValue"] is not None:
            out[~hit], mask = a["defaultValue"], img.mask
        return Img(["remapped"], out, mask, ["int32"])

    def f_Element_set(self, a):
        obj = a["object"]
        return Img(obj.names, obj.data, obj.mask, obj.types, {**obj.props, a["key"]: a["value"]}, obj.footprint)

    def f_Element_setMulti(self, a):
        obj = a["object"]
        return Img(obj.names, obj.data, obj.mask, obj.types, {**obj.props, **a["properties"]}, obj.footprint)

    def f_Element_copyProperties(self, a):
        dst, src = a["destination"], a["source"]
        keys = a.get("properties") or [k for k in src.props if not k.startswith("system:")] + ["system:time_start"] * ("system:time_start" in src.props)
        exclude = set(a.get("exclude") or [])
        props = {**dst.props, **{k: src.props[k] for k in keys if k in src.props and k not in exclude}}
        return Img(dst.names, dst.data, dst.mask, dst.types, props, dst.footprint if dst.footprint is not None else src.footprint)

    f_Image_copyProperties = f_Element_copyProperties

    def f_Image_reproject(self, a):
        return a["image"]

    def f_Image_clipToBoundsAndScale(self, a):
        return a["input"]

    def _reduce(self, coll: list[Img], how: str) -> Img:
        if not coll:
            return Img([], np.zeros((0, self.grid.height, self.grid.width)), np.zeros((0, self.grid.height, self.grid.width), bool), [])
        names = coll[0].names
        for img in coll:
            if img.names != names:
                raise ValueError(f"reduce.{how} over images with bands {names} and {img.names}")
        data = np.stack([img.data for img in coll]).astype(np.float64)
        mask = np.stack([img.mask for img in coll])
        n = mask.sum(axis=0)
        if how == "count":
            return Img(list(names), n.astype(np.float64), np.ones(n.shape, bool), ["int32"] * len(names))
        # pixels no image covers are masked in the output: give them a value so numpy does not warn
        vals = np.where(mask | (n == 0)[None], np.where(mask, data, 0.0), np.nan)
        out = np.nanmedian(vals, axis=0) if how == "median" else np.nanmean(vals, axis=0)
        return Img(list(names), out, n > 0, ["float64"] * len(names))

    def f_reduce_median(self, a):
        return self._reduce(a["collection"], "median")

    def f_reduce_mean(self, a):
        return self._reduce(a["collection"], "mean")

    def f_reduce_count(self, a):
        return self._reduce(a["collection"], "count")

    def __getattr__(self, name: str) -> Callable:
        full = name[2:].replace("_", ".", 1) if name.startswith("f_") else None
        if full in _BINARY:
            def binary(a, op=_BINARY[full], full=full):
                x, y = self._broadcast(self._img(a["image1"]), self._img(a["image2"]))
                with np.errstate(all="ignore"):
                    data = op(x.data, y.data).astype(np.float64)
                return Img(x.names, data, x.mask & y.mask, [_binary_type(full, s, t) for s, t in zip(x.types, y.types)])
            return binary
        if full in _UNARY:
            def unary(a, op=_UNARY[full]):
                x = self._img(a["value"] if "value" in a else a["input"])
                with np.errstate(all="ignore"):
                    data = op(x.data)
                return Img(x.names, data, x.mask, ["float64"] * len(x.names))
            return unary
        if full in _CASTS:
            def cast(a, spec=_CASTS[full]):
                x = self._img(a["value"])
                t, lo, hi = spec
                data = x.data if lo is None else np.clip(np.floor(x.data) if t in _INT else x.data, lo, hi)
                return Img(x.names, data.astype(np.float32).astype(np.float64) if t == "float32" else data, x.mask, [t] * len(x.names))
            return cast
        raise AttributeError(name)

    def array(self, img: Img, dtype) -> np.ndarray:
        """``img`` as an export writes it: (bands, H, W) of ``dtype`` (masked pixels 0)."""
        return np.where(img.mask, img.data, 0).astype(dtype)
