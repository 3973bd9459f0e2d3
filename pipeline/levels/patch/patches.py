"""Patch tensors: T x C x H x W patches cut on a grid from the site cube, for segmentation models.

A tile cube holds raw acquisitions (S2 on its dates, S1 on its own). Patch models need one dense
time axis shared by every pixel of a patch, so the tile is first composited on a fixed calendar
of ``composite_days``-day bins anchored at 1 January of the season year (:func:`tile_composite`):
per pixel, the mean of the clear S2 reflectances of the bin and the mean S1 backscatter (in
linear power, back to dB) of the bin. A (date, pixel) cell is *valid* when any band was observed
there; dates are the bins' centres as real day offsets (never indices). Only bins with an
observation somewhere on the tile are kept, so T differs between tiles and sources; stores pad
to the longest series with invalid dates.

Patches (:class:`PatchSet`) are cut on a regular non-overlapping grid of ``size`` pixels (edge
remainders are not cut: prediction covers them, training does not). Each patch records its tile,
row and column, and its *block*: a square of ``block`` x ``block`` patches. Splits
(:func:`patch_split`) assign whole blocks to train/val/test with a seeded shuffle, so neighbouring
patches (which share parcels) mostly fall on the same side; parcels crossing a block border can
still reach both sides, a leak bounded by the block perimeter.

Every patch also carries ``vegetated`` (N, T): the fraction of its valid pixels with NDVI > 0.2
on real reflectances (NaN when red or NIR is missing), used by the masked pre-training gate.

Augmentations (:func:`augment_batch`) flip and rotate by multiples of 90 degrees inputs, valid
masks and labels together, so geometry and labels stay consistent.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from cropmap.pipeline.cube import S2_SCALE, cube_bands, day_offsets
from cropmap.pipeline.errors import DataError, SamplesError
from cropmap.pipeline.fsio import atomic_path, store_format

FORMAT = "cropmap.patch-samples/1"
NDVI_VEGETATED = 0.2


@dataclass
class TileComposite:
    """One tile on a dense time axis: ``x`` (T, C, H, W) float32 with NaN, ``days`` (T,), ``valid`` (T, H, W)."""

    x: np.ndarray
    days: np.ndarray
    valid: np.ndarray
    bands: list[str]
    tile: str
    year: int


@dataclass
class PatchSet:
    """Patches of one or more tiles (see the module docstring)."""

    x: np.ndarray
    """(N, T, C, H, W) float32, reflectance (S2) or dB (S1), NaN = not observed."""
    days: np.ndarray
    """(N, T) float32 day offsets since 1 January of the season year (padding dates: 0, never valid)."""
    valid: np.ndarray
    """(N, T, H, W) bool: some band observed at that date and pixel."""
    labels: np.ndarray | None
    """(N, H, W) uint8 class codes of the legend, 0 = no label; None for unlabelled patches."""
    vegetated: np.ndarray
    """(N, T) float32 fraction of valid pixels with NDVI > 0.2 (NaN: no red/NIR band)."""
    table: pd.DataFrame
    """One row per patch: ``tile``, ``row``, ``col`` (top-left pixel in the tile), ``season_year``, ``block``."""
    bands: list[str]
    class_names: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, idx) -> PatchSet:
        idx = np.asarray(idx, dtype=np.int64)
        return PatchSet(self.x[idx], self.days[idx], self.valid[idx], None if self.labels is None else self.labels[idx],
                        self.vegetated[idx], self.table.iloc[idx].reset_index(drop=True), list(self.bands), dict(self.class_names))


def _nanmean(a: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells stay NaN
        return np.nanmean(a, axis=axis)


def tile_composite(cube: xr.Dataset, composite_days: int = 15) -> TileComposite:
    """Composite a tile cube on ``composite_days``-day bins anchored at 1 January of its season year."""
    if composite_days < 1:
        raise ValueError(f"composite_days must be >= 1, got {composite_days}")
    year = int(cube.attrs["year"])
    dn = cube["s2"].values
    s2 = dn.astype(np.float32) * np.float32(S2_SCALE)
    s2[dn == 0] = np.nan
    s2[~np.broadcast_to(cube["s2_clear"].values[:, None], s2.shape)] = np.nan
    s1 = cube["s1"].values.astype(np.float32)
    d2 = day_offsets(cube["time_s2"].values, year)
    d1 = day_offsets(cube["time_s1"].values, year)
    b2, b1 = np.floor_divide(d2, composite_days), np.floor_divide(d1, composite_days)
    bins = np.unique(np.concatenate([b2, b1]))
    h, w = s2.shape[2:]
    c2, c1 = s2.shape[1], s1.shape[1]
    x = np.full((len(bins), c2 + c1, h, w), np.nan, np.float32)
    for k, b in enumerate(bins):
        if (b2 == b).any():
            x[k, :c2] = _nanmean(s2[b2 == b], 0)
        if (b1 == b).any():
            power = np.power(10.0, s1[b1 == b].astype(np.float64) / 10.0)
            x[k, c2:] = (10.0 * np.log10(_nanmean(power, 0))).astype(np.float32)
    # every bin with an acquisition is kept, observed here or not: any window of the tile gets the same dates
    days = (bins * composite_days + (composite_days - 1) / 2.0).astype(np.float32)
    return TileComposite(x, days, ~np.isnan(x).all(axis=1), cube_bands(cube), str(cube.attrs["tile"]), year)


def netcdf_composite(path: Path, bands: list[str], tile: str | None = None) -> TileComposite:
    """An openEO/WorldCereal ``*_preprocessed_inputs.nc`` cube (monthly composites, no labels) as a composite.

    S2 bands ``S2-L2A-Bxx`` are uint16 reflectance x 1e4; S1 ``S1-SIGMA0-VV|VH`` are uint16 with
    dB = 20 log10(DN) - 83; 0 and 65535 are no data. Bands of ``bands`` absent from the file stay NaN.
    Composites are stamped with the first day of their month: dates are moved to the 15th.
    """
    path = Path(path)
    try:
        ds = xr.open_dataset(path)
    except Exception as exc:  # netCDF backends raise many kinds
        raise DataError(f"cannot read cube {str(path)!r} ({type(exc).__name__})", fix="pass a netCDF cube with S2-L2A-*/S1-SIGMA0-* variables") from None
    with ds:
        if "t" not in ds.dims or not any(v.startswith("S2-L2A-") for v in ds.data_vars):
            raise DataError(f"{str(path)!r} is not an openEO inputs cube (needs dimension t and S2-L2A-* variables)",
                            fix="pass a *_preprocessed_inputs.nc file")
        times = ds["t"].values.astype("datetime64[D]")
        year = int(str(times.max())[:4])
        days = (day_offsets(times, year) + 14).astype(np.float32)
        h, w = ds.sizes["y"], ds.sizes["x"]
        x = np.full((len(times), len(bands), h, w), np.nan, np.float32)
        for i, b in enumerate(bands):
            name = f"S2-L2A-{b}" if b.startswith("B") else f"S1-SIGMA0-{b}"
            if name not in ds:
                continue
            dn = ds[name].transpose("t", "y", "x").values
            bad = (dn == 0) | (dn == 65535)
            v = dn.astype(np.float32) * np.float32(S2_SCALE) if b.startswith("B") else \
                (20.0 * np.log10(np.maximum(dn, 1).astype(np.float64)) - 83.0).astype(np.float32)
            v[bad] = np.nan
            x[:, i] = v
    valid = ~np.isnan(x).all(axis=1)
    keep = valid.any(axis=(1, 2))
    return TileComposite(x[keep], days[keep], valid[keep], list(bands), tile or path.stem, year)


def vegetated_fraction(x: np.ndarray, valid: np.ndarray, bands: list[str]) -> np.ndarray:
    """(..., T) fraction of valid pixels with NDVI > 0.2 on reflectances ``x`` (..., T, C, H, W); NaN without red/NIR."""
    if "B04" not in bands or "B08" not in bands:
        return np.full(x.shape[:-3], np.nan, np.float32)
    red, nir = x[..., bands.index("B04"), :, :], x[..., bands.index("B08"), :, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        ndvi = (nir - red) / (nir + red)
    seen = ~np.isnan(ndvi) & valid
    n = seen.sum(axis=(-2, -1))
    frac = ((ndvi > NDVI_VEGETATED) & seen).sum(axis=(-2, -1)) / np.maximum(n, 1)
    return np.where(n > 0, frac, np.nan).astype(np.float32)


def cut_patches(comp: TileComposite, size: int, labels: np.ndarray | None = None, block: int = 2,
                class_names: dict[int, str] | None = None) -> PatchSet:
    """Cut a composite into non-overlapping ``size`` x ``size`` patches (grid from the top-left corner)."""
    if size < 4:
        raise ValueError(f"patch size must be >= 4, got {size}")
    t, c, h, w = comp.x.shape
    if h < size or w < size:
        raise SamplesError(f"tile {comp.tile} ({h} x {w} px) is smaller than the patch size {size}", fix="use a smaller patch size")
    if labels is not None and labels.shape != (h, w):
        raise DataError(f"label raster of tile {comp.tile} is {labels.shape}, the cube {(h, w)}", fix="rerun the labels stage")
    rows = list(range(0, h - size + 1, size))
    cols = list(range(0, w - size + 1, size))
    xs, vs, ls, recs = [], [], [], []
    for r in rows:
        for cc in cols:
            xs.append(comp.x[:, :, r:r + size, cc:cc + size])
            vs.append(comp.valid[:, r:r + size, cc:cc + size])
            if labels is not None:
                ls.append(labels[r:r + size, cc:cc + size])
            recs.append({"tile": comp.tile, "row": r, "col": cc, "season_year": comp.year,
                         "block": f"{comp.tile}:{r // (size * block)}:{cc // (size * block)}"})
    x, valid = np.stack(xs), np.stack(vs)
    return PatchSet(x, np.broadcast_to(comp.days, (len(xs), t)).astype(np.float32).copy(), valid,
                    np.stack(ls).astype(np.uint8) if labels is not None else None, vegetated_fraction(x, valid, comp.bands),
                    pd.DataFrame(recs), list(comp.bands), dict(class_names or {}))


def concat_patches(parts: list[PatchSet]) -> PatchSet:
    """Concatenate patch sets of one band list and size, padding shorter series with invalid dates."""
    if not parts:
        raise SamplesError("no patches to concatenate", fix="check the tiles of the site")
    bands, shape = parts[0].bands, parts[0].x.shape[-2:]
    for p in parts[1:]:
        if p.bands != bands:
            raise SamplesError(f"band lists differ: {bands} vs {p.bands}", fix="build every patch set with the site's bands")
        if p.x.shape[-2:] != shape:
            raise SamplesError(f"patch sizes differ: {tuple(shape)} vs {tuple(p.x.shape[-2:])}", fix="use one patch size")
    t = max(p.x.shape[1] for p in parts)

    def pad(a: np.ndarray, value) -> np.ndarray:
        if a.shape[1] == t:
            return a
        widths = [(0, 0)] * a.ndim
        widths[1] = (0, t - a.shape[1])
        return np.pad(a, widths, constant_values=value)

    labelled = all(p.labels is not None for p in parts)
    names: dict[int, str] = {}
    for p in parts:
        names.update(p.class_names)
    return PatchSet(np.concatenate([pad(p.x, np.nan) for p in parts]), np.concatenate([pad(p.days, 0.0) for p in parts]),
                    np.concatenate([pad(p.valid, False) for p in parts]),
                    np.concatenate([p.labels for p in parts]) if labelled else None,
                    np.concatenate([pad(p.vegetated, np.nan) for p in parts]),
                    pd.concat([p.table for p in parts], ignore_index=True), list(bands), names)


@dataclass(frozen=True)
class PatchSplit:
    """Which patches train, validate and test, by whole spatial blocks."""

    seed: int
    train: list[int]
    val: list[int]
    test: list[int]

    def to_dict(self) -> dict:
        return {"seed": self.seed, "train": self.train, "val": self.val, "test": self.test}

    @classmethod
    def from_dict(cls, d: dict) -> PatchSplit:
        return cls(int(d["seed"]), list(d["train"]), list(d["val"]), list(d["test"]))


def patch_split(table: pd.DataFrame, seed: int, test_fraction: float = 0.3, val_fraction: float = 0.0,
                eligible: np.ndarray | None = None) -> PatchSplit:
    """Assign whole blocks of patches to test, val and train with a seeded shuffle (at least one test block).

    ``eligible`` (bool per patch) restricts the split to some patches (e.g. labelled tiles); the others
    are on no side.
    """
    if not 0 < test_fraction < 1 or not 0 <= val_fraction < 1 or test_fraction + val_fraction >= 1:
        raise SamplesError(f"test_fraction {test_fraction} and val_fraction {val_fraction} must be in (0, 1) with a sum below 1",
                           fix="lower them")
    ok = np.ones(len(table), bool) if eligible is None else np.asarray(eligible, bool)
    blocks = sorted(table.loc[ok, "block"].unique())
    if len(blocks) < 2:
        raise SamplesError(f"only {len(blocks)} block(s) of patches: nothing to hold out", fix="use a smaller patch size or block")
    order = np.random.default_rng(seed).permutation(len(blocks))
    n_test = max(1, int(round(test_fraction * len(blocks))))
    n_val = int(round(val_fraction * len(blocks))) if len(blocks) - n_test > 1 else 0
    side = {}
    for rank, i in enumerate(order):
        side[blocks[i]] = "test" if rank < n_test else ("val" if rank < n_test + n_val else "train")
    sides = np.array([side.get(b, "none") if o else "none" for b, o in zip(table["block"], ok)])
    return PatchSplit(seed, *(np.nonzero(sides == k)[0].tolist() for k in ("train", "val", "test")))


def budget_patches(labels: np.ndarray, train: list[int], n: int | None, seed: int) -> list[int]:
    """A label budget: ``n`` training patches drawn (seeded) among those with at least one labelled pixel."""
    has = [i for i in train if (labels[i] > 0).any()]
    if n is None or n >= len(has):
        return has
    rng = np.random.default_rng(seed + 7919)
    return sorted(rng.choice(has, size=n, replace=False).tolist())


def augment_batch(x, valid, labels, rng: np.random.Generator):
    """Random flips and 90-degree rotations applied identically to inputs ``x`` (B, T, C, H, W),
    ``valid`` (B, T, H, W) and ``labels`` (B, H, W) of each sample (torch tensors; square patches)."""
    import torch

    xs, vs, ls = [], [], []
    for i in range(x.shape[0]):
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        a, v, lab = x[i], valid[i], labels[i]
        if flip:
            a, v, lab = a.flip(-1), v.flip(-1), lab.flip(-1)
        xs.append(torch.rot90(a, k, (-2, -1)))
        vs.append(torch.rot90(v, k, (-2, -1)))
        ls.append(torch.rot90(lab, k, (-2, -1)))
    return torch.stack(xs), torch.stack(vs), torch.stack(ls)


def save_patch_store(ps: PatchSet, path: Path) -> Path:
    """Write a patch store directory atomically (npy arrays + table.parquet + meta.json)."""
    with atomic_path(Path(path), is_dir=True) as tmp:
        np.save(tmp / "x.npy", ps.x.astype(np.float32))
        np.save(tmp / "days.npy", ps.days.astype(np.float32))
        np.save(tmp / "valid.npy", ps.valid)
        np.save(tmp / "vegetated.npy", ps.vegetated.astype(np.float32))
        if ps.labels is not None:
            np.save(tmp / "labels.npy", ps.labels)
        ps.table.to_parquet(tmp / "table.parquet", index=False)
        (tmp / "meta.json").write_text(json.dumps({"format": FORMAT, "bands": ps.bands, "n_patches": len(ps),
                                                   "shape": list(ps.x.shape), "labelled": ps.labels is not None,
                                                   "class_names": {str(k): v for k, v in ps.class_names.items()}}, indent=1))
    return Path(path)


def is_patch_store(path: Path) -> bool:
    return store_format(path) == FORMAT


def load_patch_store(path: Path, *, labelled: bool = True) -> PatchSet:
    """Read a patch store (``labelled``: it must hold labels); one clear error when it is not one."""
    path = Path(path)
    if not is_patch_store(path):
        raise SamplesError(f"{str(path)!r} is not a patch store ({FORMAT})",
                           fix="pass runs/SITE/YEAR/samples/patches (made by `cropmap run --level patch`)")
    meta = json.loads((path / "meta.json").read_text())
    if labelled and not meta["labelled"]:
        raise SamplesError(f"patch store {str(path)!r} has no labels", fix="train on a labelled patch store")
    try:
        return PatchSet(np.load(path / "x.npy"), np.load(path / "days.npy"), np.load(path / "valid.npy"),
                        np.load(path / "labels.npy") if meta["labelled"] else None, np.load(path / "vegetated.npy"),
                        pd.read_parquet(path / "table.parquet"), list(meta["bands"]),
                        {int(k): v for k, v in meta.get("class_names", {}).items()})
    except (OSError, ValueError) as exc:
        raise SamplesError(f"patch store {str(path)!r} is damaged ({type(exc).__name__})", fix="delete it and rebuild it") from None


def load_unlabelled(paths: list[Path], bands: list[str], size: int) -> PatchSet:
    """Unlabelled patches from patch stores and/or openEO ``.nc`` input cubes (labels dropped), on ``bands``."""
    parts = []
    for p in paths:
        p = Path(p)
        if p.suffix == ".nc":
            parts.append(cut_patches(netcdf_composite(p, bands), size))
            continue
        ps = load_patch_store(p, labelled=False)
        if ps.bands != bands:
            raise SamplesError(f"patch store {str(p)!r} has bands {ps.bands}, expected {bands}", fix="build it with the same bands")
        ps.labels = None
        parts.append(ps)
    return concat_patches(parts)
