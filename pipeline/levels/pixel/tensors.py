"""Tensors: per-pixel time series cut from the site cube, labelled or not.

One function, :func:`cube_series`, turns a window of a tile cube into ragged per-pixel series
(optical and radar observations merged on one day axis, cloudy optical dates dropped, day
offsets since 1 January of the tile's season year). The tensors stage uses it for labelled
pixels (the training store) and the predict stage for every pixel of the site, so training and
mapping see exactly the same inputs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from cropmap.pipeline.cube import S2_SCALE, composite_s1, cube_bands, day_offsets  # noqa: F401  (cube helpers, re-exported)
from cropmap.pipeline.samples import PixelSamples, concat_samples, from_ragged  # noqa: F401  (concat_samples re-exported)


def cube_series(cube: xr.Dataset, rows: slice = slice(None), cols: slice = slice(None),
                pixel_mask: np.ndarray | None = None, s1_window: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ragged series of the pixels of a cube window, row-major.

    ``s1_window`` > 1 averages radar acquisitions over that many days (see :func:`composite_s1`);
    optical observations always stay raw acquisitions.

    Returns ``values`` (n_obs, C) float32, ``days`` (n_obs,) float32 and ``lengths`` (P,) where P
    is the number of pixels in the window (or of True pixels in ``pixel_mask``, shaped like the
    window). A pixel with no observation has length 0.
    """
    year = int(cube.attrs["year"])
    win = cube.isel(y=rows, x=cols)
    dn = win["s2"].values  # (T2, C2, h, w)
    clear = win["s2_clear"].values
    s1 = win["s1"].values  # (T1, C1, h, w)
    t2, c2, h, w = dn.shape
    t1, c1 = s1.shape[:2]
    sel = np.ones((h, w), bool) if pixel_mask is None else np.asarray(pixel_mask, bool)
    p = int(sel.sum())

    s2 = dn[:, :, sel].astype(np.float32) * np.float32(S2_SCALE)  # (T2, C2, P)
    s2[dn[:, :, sel] == 0] = np.nan
    s2[~np.broadcast_to(clear[:, None][:, :, sel], s2.shape)] = np.nan
    s1 = s1[:, :, sel]

    d2 = day_offsets(cube["time_s2"].values, year)
    d1 = day_offsets(cube["time_s1"].values, year)
    s1, d1 = composite_s1(s1, d1, s1_window)
    union = np.unique(np.concatenate([d2, d1]))
    arr = np.full((len(union), c2 + c1, p), np.nan, dtype=np.float32)
    # several acquisitions on one day (overlapping orbits): keep the first observed value
    for src, d, lo in ((s2, d2, 0), (s1, d1, c2)):
        idx = np.searchsorted(union, d)
        for k in range(len(d)):
            block = arr[idx[k], lo:lo + src.shape[1]]
            np.copyto(block, src[k], where=np.isnan(block))
    arr = arr.transpose(2, 0, 1)  # (P, U, C)
    observed = ~np.isnan(arr).all(axis=2)  # (P, U)
    lengths = observed.sum(axis=1)
    values = arr[observed]
    days = np.broadcast_to(union[None, :], observed.shape)[observed].astype(np.float32)
    return values, days, lengths


def labelled_samples(cube: xr.Dataset, classes: np.ndarray, parcels: np.ndarray,
                     class_names: dict[int, str], s1_window: int = 0) -> PixelSamples:
    """The labelled pixels of one tile as samples (label = class code, with parcel ids)."""
    sel = classes > 0
    values, days, lengths = cube_series(cube, pixel_mask=sel, s1_window=s1_window)
    rr, cc = np.nonzero(sel)
    tile = str(cube.attrs["tile"])
    xs = cube["x"].values[cc]
    ys = cube["y"].values[rr]
    table = pd.DataFrame({
        "sample_id": [f"{tile}:{r}:{c}" for r, c in zip(rr, cc)],
        "label": classes[sel].astype(np.int64),
        "parcel_id": parcels[sel].astype(np.int64),
        "tile": tile,
        "x": xs, "y": ys,
        "epsg": int(cube.attrs["epsg"]),
        "season_year": int(cube.attrs["year"]),
    })
    keep = lengths > 0
    if not keep.all():
        rows = np.repeat(keep, lengths)
        values, days, lengths, table = values[rows], days[rows], lengths[keep], table[keep]
    return from_ragged(cube_bands(cube), values, days, lengths, table, class_names)


def unlabelled_samples(cube: xr.Dataset, n: int, rng: np.random.Generator, s1_window: int = 0) -> PixelSamples:
    """``n`` pixels drawn at random from a tile (labelled or not), for self-supervised pre-training."""
    h, w = int(cube.sizes["y"]), int(cube.sizes["x"])
    sel = np.zeros(h * w, bool)
    sel[rng.choice(h * w, size=min(n, h * w), replace=False)] = True
    sel = sel.reshape(h, w)
    values, days, lengths = cube_series(cube, pixel_mask=sel, s1_window=s1_window)
    rr, cc = np.nonzero(sel)
    tile = str(cube.attrs["tile"])
    table = pd.DataFrame({"sample_id": [f"{tile}:{r}:{c}" for r, c in zip(rr, cc)], "label": "unlabelled", "tile": tile,
                          "x": cube["x"].values[cc], "y": cube["y"].values[rr], "epsg": int(cube.attrs["epsg"]),
                          "season_year": int(cube.attrs["year"])})
    keep = lengths > 0
    if not keep.all():
        rows = np.repeat(keep, lengths)
        values, days, lengths, table = values[rows], days[rows], lengths[keep], table[keep]
    return from_ragged(cube_bands(cube), values, days, lengths, table)
