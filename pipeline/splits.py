"""Train/val/test splits shared by every level: spatially blocked where locations are known,
parcel-disjoint always, class-stratified.

Why blocks: neighbouring fields share soil, weather and farmer, so a split that only keeps
parcels apart still puts near-copies of test fields into training (pixel splits leak even more:
0.92 overall accuracy vs about 0.66 parcel-disjoint for a random forest on the demo). Where a
sample's location is known (pixel and parcel tables with ``x``/``y``, long tables with
``x``/``y``/``epsg``), the map is cut into square *blocks* of ``block_size_m`` metres (site file:
``training.block_size_m``) and whole blocks go to one side.

The rule, precisely (:func:`assign_blocks`):

1. every sample falls in the block ``(floor(x / b), floor(y / b))`` of its own coordinates
   (geographic coordinates, EPSG:4326, are first projected to the UTM zone of their centre);
2. a parcel belongs to its *home block*, the block holding most of its pixels, and goes wholly
   to that block's side (parcel-disjoint). Merging blocks that share a parcel does not work:
   fields of 100-450 m chain every block of a 640 m demo tile into one. Instead the few pixels of
   a parcel that lie in a block of *another* side are ``excluded`` (used neither for training nor
   for evaluation), so no block holds pixels of two sides, by the pixels' own coordinates;
3. blocks are assigned in a seeded random order, each to the side (test, val, train) whose
   per-class quota it fills most (quotas: ``test_fraction`` of each class's parcels for test,
   ``val_fraction`` of the rest for validation), so sides stay roughly class-stratified;
4. a class left without training parcels gets its smallest home block moved to train; a class left
   without test parcels (all its parcels in one block, or too few) is *train-only* and named in
   the metrics, never hidden.

Without locations (or ``block_size_m=None``), :func:`parcel_split` is the older parcel-disjoint,
per-class split. :attr:`ParcelSplit.protocol` says which one produced a split, in words that go
into ``metrics.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

SIDES = ("train", "val", "test")
DEFAULT_BLOCK_SIZE_M = 1000.0
"""Default block side: larger than the fields of most agricultural landscapes (1-10 ha), small enough
that a site of a few km still has tens of blocks."""


@dataclass
class ParcelSplit:
    seed: int
    assignment: dict[int, str]  # parcel id -> "train" | "val" | "test"
    train_only: list[str]  # class names with too few parcels (or units) to be evaluated
    parcels_per_class: dict[str, dict[str, int]]
    protocol: str = "parcel-disjoint, class-stratified (no spatial blocks)"
    block_size_m: float | None = None
    blocks: dict[str, int] = field(default_factory=dict)  # side -> number of blocks (spatial splits)
    block_sides: dict[str, str] = field(default_factory=dict)  # block "bx:by" -> side (spatial splits)
    epsg: int | None = None

    def to_dict(self) -> dict:
        return {
            "seed": self.seed,
            "protocol": self.protocol,
            "block_size_m": self.block_size_m,
            "blocks": self.blocks,
            "epsg": self.epsg,
            "block_sides": self.block_sides,
            "train_only_classes": self.train_only,
            "parcels_per_class": self.parcels_per_class,
            "parcels": {str(k): v for k, v in sorted(self.assignment.items())},
        }

    @classmethod
    def from_dict(cls, d: dict) -> ParcelSplit:
        return cls(d["seed"], {int(k): v for k, v in d["parcels"].items()}, d["train_only_classes"], d["parcels_per_class"],
                   d.get("protocol", cls.protocol), d.get("block_size_m"), d.get("blocks", {}), d.get("block_sides", {}),
                   d.get("epsg"))

    def sides(self, parcel_ids) -> np.ndarray:
        """The side of each parcel id ("none" for parcels outside the split)."""
        return pd.Series(np.asarray(parcel_ids)).map(self.assignment).fillna("none").to_numpy()

    def row_sides(self, table: pd.DataFrame) -> np.ndarray:
        """The side of each row (pixel) of ``table``: its parcel's side, except ``"excluded"`` for a
        pixel lying in a block of another side (spatial splits); "none" for parcels outside the split."""
        side = self.sides(table["parcel_id"].to_numpy())
        if not self.block_size_m or not self.block_sides or not {"x", "y"} <= set(table.columns):
            return side
        xm, ym = metric_xy(table["x"].to_numpy(), table["y"].to_numpy(), self.epsg)
        bx, by = block_keys(xm, ym, self.block_size_m)
        block = np.char.add(np.char.add(bx.astype(str), ":"), by.astype(str))
        own = pd.Series(block).map(self.block_sides).fillna("none").to_numpy()
        return np.where((side == own) | (side == "none"), side, "excluded")


def block_protocol(block_size_m: float) -> str:
    return (f"spatial blocks of {block_size_m:g} m, whole blocks to train/val/test; each parcel wholly on the side of the "
            "block holding most of its pixels, its pixels in blocks of another side excluded; class-stratified by greedy quota")


def parcel_split(parcels: pd.DataFrame, seed: int, test_fraction: float = 0.3, val_fraction: float = 0.15) -> ParcelSplit:
    """Split a parcel table (columns ``parcel_id``, ``label``, ``class_name``) by parcel, without locations.

    Per class, parcels are shuffled with the split seed; a class with at least two parcels gets at
    least one test and one training parcel; a class with one parcel is train-only. Validation
    parcels are taken from the training side only where a class keeps at least two training parcels.
    """
    rng = np.random.default_rng(seed)
    assignment: dict[int, str] = {}
    train_only: list[str] = []
    counts: dict[str, dict[str, int]] = {}
    for label, group in sorted(parcels.groupby("label"), key=lambda kv: kv[0]):
        name = str(group["class_name"].iloc[0])
        ids = group["parcel_id"].to_numpy()
        ids = ids[rng.permutation(len(ids))]
        n = len(ids)
        if n < 2:
            n_test, n_val = 0, 0
            train_only.append(name)
        else:
            n_test = min(n - 1, max(1, int(round(n * test_fraction))))
            n_train = n - n_test
            n_val = int(round(n_train * val_fraction)) if n_train >= 3 else 0
            n_val = min(n_val, n_train - 2) if n_val else 0
        for k, pid in enumerate(ids):
            assignment[int(pid)] = "test" if k < n_test else ("val" if k < n_test + max(n_val, 0) else "train")
        counts[name] = {"train": n - n_test - max(n_val, 0), "val": max(n_val, 0), "test": n_test}
    return ParcelSplit(seed, assignment, train_only, counts)


# --- spatial blocks ---------------------------------------------------------------------------

def block_split(block_x: np.ndarray, block_y: np.ndarray, seed: int, test_fraction: float, val_fraction: float) -> np.ndarray:
    """train/val/test per spatial block by a seeded integer hash of the block (Earth Engine sample
    tables, whose rows carry their block already): no block straddles splits; not class-stratified."""
    h = (np.asarray(block_x, np.int64) * 73856093) ^ (np.asarray(block_y, np.int64) * 19349663) ^ (seed * 83492791)
    u = (h % 10007) / 10007.0
    return np.where(u < test_fraction, "test", np.where(u < test_fraction + val_fraction, "val", "train"))


def metric_xy(x, y, epsg: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates in metres: projected CRSs are taken as they are; geographic ones (EPSG:4326 and
    other lon/lat CRSs) are projected to the UTM zone of their centre."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if epsg is None:
        return x, y
    from pyproj import CRS, Transformer

    crs = CRS.from_epsg(int(epsg))
    if not crs.is_geographic:
        return x, y
    lon, lat = float(np.nanmean(x)), float(np.nanmean(y))
    zone = int((lon + 180) // 6) + 1
    utm = 32600 + zone if lat >= 0 else 32700 + zone
    tx = Transformer.from_crs(crs, CRS.from_epsg(utm), always_xy=True)
    return tuple(np.asarray(v) for v in tx.transform(x, y))  # type: ignore[return-value]


def block_keys(x, y, block_size_m: float) -> tuple[np.ndarray, np.ndarray]:
    """The block column and row of each point (metres)."""
    if not block_size_m > 0:
        raise ValueError(f"block size must be positive, got {block_size_m}")
    return (np.floor(np.asarray(x, np.float64) / block_size_m).astype(np.int64),
            np.floor(np.asarray(y, np.float64) / block_size_m).astype(np.int64))


def home_blocks(groups, block: np.ndarray) -> np.ndarray:
    """Per row, the *home block* of its group: the block that holds most of the group's rows (ties: first seen)."""
    df = pd.DataFrame({"g": pd.factorize(pd.Series(groups))[0], "b": block})
    n = df.groupby(["g", "b"], sort=False).size().reset_index(name="n")
    home = n.sort_values("n", ascending=False, kind="stable").drop_duplicates("g").set_index("g")["b"]
    return home.reindex(df["g"]).to_numpy()


@dataclass
class BlockAssignment:
    side: np.ndarray  # per row: "train" | "val" | "test" | "excluded" (its group's pixels in a block of another side)
    block: np.ndarray  # per row: the block id "bx:by"
    group_side: dict  # group -> side
    block_side: dict  # block id -> side
    train_only: list  # labels without a test group
    groups_per_class: dict  # label -> {side: n groups}
    blocks: dict  # side -> n blocks


def assign_blocks(groups, labels, x, y, *, block_size_m: float, seed: int, test_fraction: float, val_fraction: float,
                  epsg: int | None = None) -> BlockAssignment:
    """Spatially blocked, group-disjoint, class-stratified sides for rows (see the module docstring).

    ``groups`` (parcel or sample ids) never straddle sides; ``labels`` are the rows' classes (a group
    takes its first row's label); ``x``/``y`` are coordinates in ``epsg`` (metres when ``None``).
    """
    groups, labels = np.asarray(groups), np.asarray(labels)
    xm, ym = metric_xy(x, y, epsg)
    bx, by = block_keys(xm, ym, block_size_m)
    block = np.char.add(np.char.add(bx.astype(str), ":"), by.astype(str)) if len(bx) else np.zeros(0, str)
    home = home_blocks(groups, block) if len(block) else block
    block_ids, block_idx = np.unique(block, return_inverse=True)
    home_idx = np.searchsorted(block_ids, home)
    g = pd.DataFrame({"group": groups, "label": labels, "unit": home_idx}).drop_duplicates("group")
    classes = sorted(g["label"].unique().tolist(), key=str)
    cidx = {c: i for i, c in enumerate(classes)}
    n_units = len(block_ids)
    k = np.zeros((n_units, len(classes)))
    np.add.at(k, (g["unit"].to_numpy(), g["label"].map(cidx).to_numpy()), 1)
    n_c = k.sum(0)
    target = np.stack([n_c * (1 - test_fraction) * (1 - val_fraction), n_c * (1 - test_fraction) * val_fraction, n_c * test_fraction])
    cur = np.zeros_like(target)
    side_of = np.zeros(n_units, np.int64)
    rng = np.random.default_rng(seed)
    # blocks with home groups first (seeded order), then blocks only crossed by groups homed elsewhere
    order = rng.permutation(n_units)
    order = np.concatenate([order[k[order].sum(1) > 0], order[k[order].sum(1) == 0]])
    filled = np.zeros(3)
    for u in order:
        room = np.maximum(target - cur, 0)
        fill = (np.minimum(k[u], room) / np.maximum(n_c, 1)).sum(1)
        if fill.max() <= 0:  # nothing to fill: the side furthest below its share of blocks
            share = np.array([(1 - test_fraction) * (1 - val_fraction), (1 - test_fraction) * val_fraction, test_fraction])
            fill = share - filled / max(filled.sum(), 1) + np.array([1e-9, 0, 0])
            fill[share == 0] = -np.inf
        s = int(np.argmax(fill))
        side_of[u] = s
        cur[s] += k[u]
        filled[s] += 1
    # a class without training groups: move its smallest home block to train
    for c in range(len(classes)):
        if cur[0, c] == 0 and n_c[c] > 0:
            cand = np.nonzero(k[:, c] > 0)[0]
            u = cand[np.argmin(k[cand].sum(1))]
            cur[side_of[u]] -= k[u]
            side_of[u] = 0
            cur[0] += k[u]
    # at least one test block: the smallest training block whose move leaves every class a training group
    if not (cur[2] > 0).any() and n_units > 1:
        cand = [u for u in np.nonzero((side_of == 0) & (k.sum(1) > 0))[0] if ((cur[0] - k[u])[n_c > 0] > 0).all()]
        if cand:
            u = min(cand, key=lambda v: (k[v].sum(), v))
            cur[0] -= k[u]
            side_of[u] = 2
            cur[2] += k[u]
    names = np.array(SIDES)
    group_side = names[side_of[home_idx]]
    own_side = names[side_of[block_idx]]
    row_side = np.where(group_side == own_side, group_side, "excluded")
    train_only = [c for c in classes if cur[2, cidx[c]] == 0]
    counts = {c: {s: int(cur[i, cidx[c]]) for i, s in enumerate(SIDES)} for c in classes}
    block_side = dict(zip(block_ids.tolist(), names[side_of].tolist()))
    per_side = pd.Series(list(block_side.values())).value_counts()
    return BlockAssignment(row_side, block, dict(zip(groups.tolist(), group_side.tolist())), block_side, train_only, counts,
                           {s: int(per_side.get(s, 0)) for s in SIDES})


def spatial_split(table: pd.DataFrame, seed: int, test_fraction: float, val_fraction: float, block_size_m: float,
                  class_names: dict | None = None, epsg: int | None = None) -> ParcelSplit:
    """A :class:`ParcelSplit` by spatial blocks of a pixel (or parcel) table with ``parcel_id``, ``label``, ``x``, ``y``."""
    missing = [c for c in ("parcel_id", "label", "x", "y") if c not in table.columns]
    if missing:
        raise ValueError(f"a spatial split needs column(s) {missing}")
    if epsg is None and "epsg" in table.columns and len(table):
        epsg = int(table["epsg"].iloc[0])
    a = assign_blocks(table["parcel_id"].to_numpy(), table["label"].to_numpy(), table["x"].to_numpy(), table["y"].to_numpy(),
                      block_size_m=block_size_m, seed=seed, test_fraction=test_fraction, val_fraction=val_fraction, epsg=epsg)
    names = class_names or {}
    name = lambda c: str(names.get(int(c), c)) if isinstance(c, (int, np.integer)) else str(names.get(c, c))  # noqa: E731
    assignment = {int(k): v for k, v in a.group_side.items()}
    return ParcelSplit(seed, assignment, [name(c) for c in a.train_only], {name(c): v for c, v in a.groups_per_class.items()},
                       block_protocol(block_size_m), float(block_size_m), a.blocks, a.block_side, epsg)


def has_locations(table: pd.DataFrame) -> bool:
    return {"x", "y"} <= set(table.columns) and bool(np.isfinite(table[["x", "y"]].to_numpy(np.float64)).all())


def split_for(table: pd.DataFrame, seed: int, test_fraction: float, val_fraction: float, block_size_m: float | None,
              class_names: dict | None = None, parcels: pd.DataFrame | None = None) -> ParcelSplit:
    """The default split: spatial blocks where ``table`` (rows with ``parcel_id``, ``label``, ``x``,
    ``y``) has locations and ``block_size_m`` is set, else :func:`parcel_split` of ``parcels``
    (or of the table's parcels)."""
    if block_size_m and has_locations(table):
        return spatial_split(table, seed, test_fraction, val_fraction, block_size_m, class_names)
    if parcels is None:
        parcels = table.groupby("parcel_id").agg(label=("label", "first")).reset_index()
        names = class_names or {}
        parcels["class_name"] = parcels["label"].map(lambda c: str(names.get(c, c)))
    return parcel_split(parcels, seed, test_fraction, val_fraction)
