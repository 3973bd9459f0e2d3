"""Convert the WorldCereal point tables to cropmap's long format (one row per sample and date).

Usage:
    python benchmarks/convert_points.py [--src ../shared/data/worldcereal/points] [--out DIR]

Inputs (real data, ESA WorldCereal, MIT licence; see ../shared/data/README.md):
- ``2022_FRA_LPIS_POLY_110_monthly.geoparquet`` (Corsica, 500 samples x 17 months) and
  ``2021_BEL_LPIS-Flanders_POLY_110_monthly.parquet`` (Flanders, 100 samples x 16 months): already
  long, one row per sample and month (``timestamp``), bands ``S2-L2A-Bxx``, ``S1-SIGMA0-VV/VH``;
- ``2017_africa_public_extractions_wide.parquet`` (Uganda / South Sudan / Kenya 2017, 500 samples
  x 12 months): wide, one column per band and step (``OPTICAL-B02-ts0-10m`` ...), months counted
  from ``start_date``.

Encodings decoded as documented there: 65535 = nodata (NaN), S2 digital numbers x 1e-4 =
reflectance, S1 stored as uint16 with dB = 20 * log10(DN) - 83 (DN 0 is nodata too). Band
columns entirely without data (B8A in the monthly tables) are dropped. Output columns, as the
shipped ``examples/rpg2023_dekad_long.parquet``: ``sample_id``, ``date``, S2 bands as
reflectance, ``VV``/``VH`` in dB, ``label`` = the WorldCereal ``ewoc_code``, ``x``/``y`` =
lon/lat, ``epsg`` = 4326. Static and weather inputs (DEM, AgERA5) are left out: they are not
bands of a time series. Every output is written under a temporary name and renamed; the MIT
licence notice is copied next to the files.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT.parent / "shared" / "data" / "worldcereal" / "points"
NODATA = 65535
S2_BANDS = ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]

DATASETS = {
    "corsica2022": "2022_FRA_LPIS_POLY_110_monthly.geoparquet",
    "flanders2021": "2021_BEL_LPIS-Flanders_POLY_110_monthly.parquet",
    "africa2017": "2017_africa_public_extractions_wide.parquet",
}


def decode_s2(dn: pd.Series | np.ndarray) -> np.ndarray:
    v = np.asarray(dn, dtype=np.float64)
    return np.where((v == NODATA) | ~np.isfinite(v), np.nan, v * 1e-4).astype(np.float32)


def decode_s1(dn: pd.Series | np.ndarray) -> np.ndarray:
    v = np.asarray(dn, dtype=np.float64)
    bad = (v == NODATA) | (v <= 0) | ~np.isfinite(v)
    with np.errstate(divide="ignore", invalid="ignore"):
        db = 20.0 * np.log10(np.where(bad, 1.0, v)) - 83.0
    return np.where(bad, np.nan, db).astype(np.float32)


def _finish(out: pd.DataFrame) -> pd.DataFrame:
    bands = [b for b in [*S2_BANDS, "VV", "VH"] if b in out.columns]
    empty = [b for b in bands if out[b].isna().all()]
    out = out.drop(columns=empty)
    bands = [b for b in bands if b not in empty]
    out = out[~out[bands].isna().all(axis=1)]  # a date with nothing observed carries nothing
    out["epsg"] = 4326
    cols = ["sample_id", "date", *bands, "label", "x", "y", "epsg"]
    return out[cols].sort_values(["sample_id", "date"], kind="stable").reset_index(drop=True)


def convert_monthly(df: pd.DataFrame) -> pd.DataFrame:
    """A WorldCereal long monthly table (``timestamp``, ``S2-L2A-*``, ``S1-SIGMA0-*``) to the long format."""
    out = pd.DataFrame({"sample_id": df["sample_id"].astype(str),
                        "date": pd.to_datetime(df["timestamp"]).dt.strftime("%Y-%m-%d")})
    for b in S2_BANDS:
        col = f"S2-L2A-{b}"
        if col in df.columns:
            out[b] = decode_s2(df[col])
    for b in ("VV", "VH"):
        col = f"S1-SIGMA0-{b}"
        if col in df.columns:
            out[b] = decode_s1(df[col])
    out["label"] = df["ewoc_code"].astype(np.int64)
    out["x"] = df["lon"].astype(np.float64)
    out["y"] = df["lat"].astype(np.float64)
    return _finish(out)


WIDE = re.compile(r"^(OPTICAL|SAR)-(B\d[\dA]|VV|VH)-ts(\d+)-\d+m$")


def convert_wide(df: pd.DataFrame) -> pd.DataFrame:
    """The WorldCereal wide table (``OPTICAL-B02-ts0-10m`` ..., monthly steps from ``start_date``)."""
    cols: dict[tuple[str, int], str] = {}
    for c in df.columns:
        m = WIDE.match(c)
        if m:
            cols[(m.group(2), int(m.group(3)))] = c
    steps = sorted({t for _, t in cols})
    start = pd.to_datetime(df["start_date"])
    parts = []
    for t in steps:
        part = pd.DataFrame({"sample_id": df["sample_id"].astype(str),
                             "date": (start + pd.DateOffset(months=t)).dt.strftime("%Y-%m-%d")})
        for b in S2_BANDS:
            if (b, t) in cols:
                part[b] = decode_s2(df[cols[(b, t)]])
        for b in ("VV", "VH"):
            if (b, t) in cols:
                part[b] = decode_s1(df[cols[(b, t)]])
        part["label"] = df["ewoc_code"].astype(np.int64).to_numpy()
        part["x"] = df["lon"].astype(np.float64).to_numpy()
        part["y"] = df["lat"].astype(np.float64).to_numpy()
        parts.append(part)
    return _finish(pd.concat(parts, ignore_index=True))


def convert(name: str, src: Path = SRC) -> pd.DataFrame:
    path = Path(src) / DATASETS[name]
    df = pd.read_parquet(path)
    return convert_wide(df) if "timestamp" not in df.columns else convert_monthly(df)


def write(df: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


def convert_all(out: Path, src: Path = SRC, names: list[str] | None = None) -> dict[str, Path]:
    """Convert (once) into ``out``; returns {name: path}. Copies the licence notice next to the files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lic = Path(src) / "LICENSE.MIT.txt"
    if lic.exists() and not (out / "LICENSE.MIT.txt").exists():
        shutil.copyfile(lic, out / "LICENSE.MIT.txt")
    paths = {}
    for name in names or list(DATASETS):
        p = out / f"{name}_long.parquet"
        if not p.exists():
            write(convert(name, src), p)
        paths[name] = p
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=SRC)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/data"))
    ap.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    args = ap.parse_args(argv)
    missing = [DATASETS[n] for n in args.datasets if not (args.src / DATASETS[n]).exists()]
    if missing:
        print(f"convert_points: error: {', '.join(missing)} not found under {args.src} (pass --src)", file=sys.stderr)
        return 2
    for name, p in convert_all(args.out, args.src, args.datasets).items():
        d = pd.read_parquet(p)
        print(f"{name}: {p} ({d['sample_id'].nunique()} samples, {len(d)} rows, bands "
              f"{[c for c in d.columns if c not in ('sample_id', 'date', 'label', 'x', 'y', 'epsg')]}, "
              f"{d.groupby('sample_id')['label'].first().nunique()} labels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
