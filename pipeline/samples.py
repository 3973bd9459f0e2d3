"""Pixel sample stores and the Parquet long table.

A :class:`PixelSamples` holds variable-length pixel time series as ragged arrays:
``values`` (n_obs, C) float32 (reflectance for optical bands, dB for radar, NaN = not observed),
``days`` (n_obs,) day offsets since 1 January of each sample's season year, and ``offsets``
(N + 1) so that sample ``i`` is rows ``offsets[i]:offsets[i+1]``, sorted by day. Optical and
radar observations share one sequence: a row is a day on which any sensor observed the pixel.

On disk a *store* is a directory (written atomically)::

    meta.json        format version, band names, class names
    values.npy days.npy offsets.npy    memory-mappable arrays, fast to train from
    samples.parquet  one row per sample: sample_id, label, parcel_id, tile, x, y, epsg, season_year, ...

The *long table* of DESIGN.md (one row per sample and date) converts both ways:
:func:`read_long_table` / :func:`to_long_table`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cropmap.models.series import ragged_rows
from cropmap.pipeline.errors import SamplesError
from cropmap.pipeline.fsio import atomic_path, store_format

STORE_FORMAT = "cropmap.pixel-samples/1"
RESERVED = {"sample_id", "date", "doy", "label", "split", "parcel_id", "x", "y", "epsg", "season_year", "tile"}


@dataclass
class PixelSamples:
    bands: list[str]
    values: np.ndarray
    days: np.ndarray
    offsets: np.ndarray
    table: pd.DataFrame
    """Per-sample columns; always ``sample_id`` and ``label``."""
    class_names: dict = field(default_factory=dict)
    """Label value -> class name (when labels are codes with known names)."""

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def series(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.values[a:b], self.days[a:b]

    def subset(self, idx: np.ndarray) -> PixelSamples:
        """The samples at positions ``idx`` (copies the observations)."""
        idx = np.asarray(idx, dtype=np.int64)
        lengths = self.lengths[idx]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        rows = ragged_rows(self.offsets[idx], lengths)
        return PixelSamples(
            bands=list(self.bands),
            values=np.asarray(self.values[rows]),
            days=np.asarray(self.days[rows]),
            offsets=offsets,
            table=self.table.iloc[idx].reset_index(drop=True),
            class_names=dict(self.class_names),
        )


def from_ragged(bands, values, days, lengths, table, class_names=None) -> PixelSamples:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return PixelSamples(list(bands), np.asarray(values, np.float32), np.asarray(days, np.float32), offsets,
                        table.reset_index(drop=True), dict(class_names or {}))


# ---------------------------------------------------------------- store (directory of arrays)
def is_pixel_store(path: Path) -> bool:
    return store_format(path) == STORE_FORMAT


def concat_samples(parts: list[PixelSamples]) -> PixelSamples:
    if not parts:
        raise ValueError("no samples to concatenate")
    bands = parts[0].bands
    for p in parts[1:]:
        if p.bands != bands:
            raise ValueError(f"band lists differ: {bands} vs {p.bands}")
    names: dict = {}
    for p in parts:
        names.update(p.class_names)
    return from_ragged(
        bands,
        np.concatenate([np.asarray(p.values) for p in parts]),
        np.concatenate([np.asarray(p.days) for p in parts]),
        np.concatenate([p.lengths for p in parts]),
        pd.concat([p.table for p in parts], ignore_index=True),
        names,
    )


def save_store(samples: PixelSamples, path: Path) -> Path:
    """Write a sample store directory atomically."""
    with atomic_path(Path(path), is_dir=True) as tmp:
        np.save(tmp / "values.npy", np.ascontiguousarray(samples.values, dtype=np.float32))
        np.save(tmp / "days.npy", np.ascontiguousarray(samples.days, dtype=np.float32))
        np.save(tmp / "offsets.npy", np.ascontiguousarray(samples.offsets, dtype=np.int64))
        samples.table.to_parquet(tmp / "samples.parquet", index=False)
        meta = {
            "format": STORE_FORMAT,
            "bands": samples.bands,
            "n_samples": len(samples),
            "n_observations": int(samples.offsets[-1]),
            "class_names": [[k, v] for k, v in samples.class_names.items()],
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return Path(path)


def load_store(path: Path, mmap: bool = True) -> PixelSamples:
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise SamplesError(f"{str(path)!r} is not a sample store (no meta.json)", fix="pass a store made by `cropmap run` or a Parquet long table")
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != STORE_FORMAT:
            raise SamplesError(f"{str(path)!r} has format {meta.get('format')!r}, expected {STORE_FORMAT!r}", fix="rebuild it with this version of cropmap")
        mode = "r" if mmap else None
        values = np.load(path / "values.npy", mmap_mode=mode)
        days = np.load(path / "days.npy", mmap_mode=mode)
        offsets = np.load(path / "offsets.npy")
        table = pd.read_parquet(path / "samples.parquet")
    except SamplesError:
        raise
    except Exception as exc:
        raise SamplesError(f"sample store {str(path)!r} is damaged ({type(exc).__name__}: {exc})", fix="delete it and rerun the tensors stage") from None
    if len(offsets) != len(table) + 1 or offsets[-1] != len(values) or len(days) != len(values) or values.shape[1] != len(meta["bands"]):
        raise SamplesError(f"sample store {str(path)!r} is inconsistent (array sizes disagree)", fix="delete it and rerun the tensors stage")
    return PixelSamples(meta["bands"], values, days, offsets, table, {k: v for k, v in meta.get("class_names", [])})


# ---------------------------------------------------------------- Parquet long table
def read_long_table(path: Path, labelled: bool = True) -> PixelSamples:
    """Read and validate a long table (one row per sample and date); see DESIGN.md."""
    path = Path(path)
    try:
        df = pd.read_parquet(path)
    except FileNotFoundError:
        raise SamplesError(f"samples file {str(path)!r} does not exist", fix="check the --samples path") from None
    except Exception as exc:
        raise SamplesError(f"cannot read {str(path)!r} as Parquet ({type(exc).__name__})", fix="pass a Parquet long table or a sample store directory") from None
    return long_table_to_samples(df, source=str(path), labelled=labelled)


def long_table_to_samples(df: pd.DataFrame, source: str = "table", labelled: bool = True) -> PixelSamples:
    """Validate a long table and convert it. ``labelled=False`` (self-supervised pre-training)
    accepts a table without ``label`` or with empty labels (they become ``"unlabelled"``)."""
    if not labelled:
        df = df.assign(label=df["label"].astype(object).where(df["label"].notna(), "unlabelled")) if "label" in df.columns else df.assign(label="unlabelled")
    missing = [c for c in ("sample_id", "label") if c not in df.columns]
    if "date" not in df.columns and "doy" not in df.columns:
        missing.append("date (or doy)")
    if missing:
        raise SamplesError(
            f"samples table {source} lacks column(s) {', '.join(missing)} (has: {', '.join(map(str, df.columns))})",
            fix="the long format needs sample_id, date or doy, one column per band, label (see DESIGN.md)",
        )
    bands = [c for c in df.columns if c not in RESERVED]
    if not bands:
        raise SamplesError(f"samples table {source} has no band columns", fix="add one numeric column per band (B02 ... B12, VV, VH, ...)")
    bad = [c for c in bands if not pd.api.types.is_numeric_dtype(df[c])]
    if bad:
        raise SamplesError(f"band column(s) {bad} of {source} are not numeric", fix="store band values as numbers (NaN = missing), or rename non-band columns")
    if df.empty:
        raise SamplesError(f"samples table {source} has no rows", fix="pass a table with samples")
    if df["sample_id"].isna().any() or df["label"].isna().any():
        raise SamplesError(f"samples table {source} has empty sample_id or label values", fix="every row needs a sample_id and a label")

    df = df.copy()
    df["sample_id"] = df["sample_id"].astype(str)
    if "date" in df.columns:
        dates = pd.to_datetime(df["date"], errors="coerce")
        if dates.isna().any():
            bad_val = df.loc[dates.isna(), "date"].iloc[0]
            raise SamplesError(f"samples table {source} has an unparseable date {bad_val!r}", fix="use ISO dates (YYYY-MM-DD)")
        df["_t"] = dates.dt.tz_localize(None) if dates.dt.tz is not None else dates
        # season year: the year of the sample's median date (a season crossing 1 January keeps its dates)
        med = df.groupby("sample_id")["_t"].transform(lambda s: s.sort_values().iloc[len(s) // 2])
        season = df["season_year"].astype(int) if "season_year" in df.columns else med.dt.year
        jan1 = pd.to_datetime(season.astype(str) + "-01-01")
        df["_days"] = (df["_t"] - jan1).dt.days.astype(np.float32)
        df["season_year"] = season.astype(int)
    else:
        df["_days"] = pd.to_numeric(df["doy"], errors="coerce").astype(np.float32)
        if df["_days"].isna().any():
            raise SamplesError(f"samples table {source} has non-numeric doy values", fix="doy must be a number of days")
    df = df.sort_values(["sample_id", "_days"], kind="stable")

    per_sample = df.groupby("sample_id", sort=False)
    if (per_sample["label"].nunique() > 1).any():
        sid = per_sample["label"].nunique().idxmax()
        raise SamplesError(f"sample {sid!r} of {source} has more than one label", fix="label must be constant per sample")
    values = df[bands].to_numpy(dtype=np.float32)
    keep = ~np.isnan(values).all(axis=1)  # rows where no band was observed carry nothing
    df, values = df[keep], values[keep]
    ids_all = pd.unique(per_sample["sample_id"].first())
    first = df.groupby("sample_id", sort=False).first()
    dropped = set(ids_all) - set(first.index)
    if len(first) == 0:
        raise SamplesError(f"samples table {source} has no observed values (all band values are NaN)", fix="check the band columns")
    lengths = df.groupby("sample_id", sort=False).size().loc[first.index].to_numpy()
    cols = ["label"] + [c for c in ("split", "parcel_id", "x", "y", "epsg", "season_year", "tile") if c in first.columns]
    table = first[cols].reset_index()
    if "split" in table.columns:
        bad_split = set(table["split"].dropna().astype(str)) - {"train", "val", "test"}
        if bad_split:
            raise SamplesError(f"samples table {source} has split value(s) {sorted(bad_split)}", fix="split must be train, val or test")
    samples = from_ragged(bands, values, df["_days"].to_numpy(), lengths, table)
    samples.table.attrs["dropped_empty"] = len(dropped)
    return samples


def to_long_table(samples: PixelSamples) -> pd.DataFrame:
    """The long table: one row per sample and observation date."""
    n = len(samples)
    rep = np.repeat(np.arange(n), samples.lengths)
    out = {"sample_id": samples.table["sample_id"].to_numpy()[rep]}
    if "season_year" in samples.table.columns:
        jan1 = pd.to_datetime(samples.table["season_year"].astype(int).astype(str) + "-01-01").to_numpy()[rep]
        out["date"] = jan1 + np.asarray(samples.days, dtype="timedelta64[D]")
    else:
        out["doy"] = np.asarray(samples.days)
    for j, b in enumerate(samples.bands):
        out[b] = np.asarray(samples.values[:, j])
    for c in samples.table.columns:
        if c != "sample_id":
            out[c] = samples.table[c].to_numpy()[rep]
    return pd.DataFrame(out)


def write_long_table(samples: PixelSamples, path: Path) -> Path:
    with atomic_path(Path(path)) as tmp:
        to_long_table(samples).to_parquet(tmp, index=False)
    return Path(path)


def load_samples(path: Path, labelled: bool = True) -> PixelSamples:
    """Load ``--samples PATH``: a store directory or a Parquet long table (``labelled=False``: labels optional)."""
    path = Path(path)
    if path.is_dir():
        return load_store(path)
    if not path.exists():
        raise SamplesError(f"samples path {str(path)!r} does not exist", fix="check the --samples path")
    return read_long_table(path, labelled=labelled)
