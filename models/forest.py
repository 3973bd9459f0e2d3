"""Random-forest baseline on fixed-length features.

Each series is summarised per band by the median of its observations in fixed day bins
(30 days by default, from 5 months before to the end of the season year); empty bins stay NaN,
which scikit-learn's trees (>= 1.4) route natively. 500 trees of depth 25 as in the SITS-MoCo study.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.ensemble import RandomForestClassifier

from cropmap.models.series import Series

DEFAULT_EDGES = np.arange(-150, 366 + 30, 30, dtype=np.float32)


def binned_features(series: Series, edges: np.ndarray = DEFAULT_EDGES) -> np.ndarray:
    n, c = len(series), series.values.shape[1]
    nb = len(edges) - 1
    sample = np.repeat(np.arange(n), series.lengths)
    b = np.digitize(series.days, edges) - 1
    ok = (b >= 0) & (b < nb)
    df = pd.DataFrame(np.asarray(series.values)[ok], columns=[f"c{j}" for j in range(c)])
    df["key"] = sample[ok] * nb + b[ok]
    med = df.groupby("key").median()
    feats = np.full((n * nb, c), np.nan, dtype=np.float32)
    feats[med.index.to_numpy()] = med.to_numpy(dtype=np.float32)
    return feats.reshape(n, nb * c)


def make_forest(seed: int = 0, n_jobs: int = -1, n_estimators: int = 500, max_depth: int = 25) -> RandomForestClassifier:
    return RandomForestClassifier(n_estimators=n_estimators, max_depth=max_depth, n_jobs=n_jobs, random_state=seed,
                                  class_weight="balanced_subsample")
