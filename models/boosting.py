"""Gradient-boosting baseline and head (LightGBM), on the forest's monthly features or on embeddings.

Why LightGBM rather than CatBoost (WorldCereal's head): the wheel is 3.5 MB against CatBoost's
97 MB, it has no dependency beyond numpy/scipy, it routes NaN (empty monthly bins) natively as
the forest does, and its histogram trees train a few hundred samples x 100-300 features in
seconds on 2 cores.

Use it like :func:`cropmap.models.forest.make_forest`::

    from cropmap.models.boosting import make_boosting
    from cropmap.models.forest import binned_features
    clf = make_boosting(seed).fit(binned_features(train_series), y_train)
    proba = clf.predict_proba(binned_features(test_series))      # columns: clf.classes_

or, with validation data for early stopping (the number of boosting rounds is then chosen on
validation, never on test): :func:`fit_boosting`. :func:`proba_for_classes` spreads
``predict_proba`` columns over all ``n_classes`` (a class absent from training gets 0).
"""

from __future__ import annotations

import inspect

import numpy as np

__all__ = ["fit_boosting", "make_boosting", "proba_for_classes"]


def make_boosting(seed: int = 0, n_jobs: int = -1, n_estimators: int = 300, learning_rate: float = 0.05,
                  num_leaves: int = 15, min_child_samples: int = 5):
    """A LightGBM classifier (scikit-learn API) with settings for small labelled sets.

    Balanced class weights (as the forest's ``balanced_subsample``), row and feature subsampling
    for variance, small leaves so that classes with a handful of samples can still be split.
    """
    from lightgbm import LGBMClassifier

    return LGBMClassifier(
        n_estimators=n_estimators, learning_rate=learning_rate, num_leaves=num_leaves, max_depth=-1,
        min_child_samples=min_child_samples, subsample=0.8, subsample_freq=1, colsample_bytree=0.5,
        reg_lambda=1.0, class_weight="balanced", random_state=seed, n_jobs=n_jobs, verbose=-1,
    )


def fit_boosting(X: np.ndarray, y: np.ndarray, X_val: np.ndarray | None = None, y_val: np.ndarray | None = None,
                 seed: int = 0, n_jobs: int = -1, early_stopping_rounds: int = 30, **options):
    """Fit :func:`make_boosting`; with validation data, stop when its log-loss has not improved for
    ``early_stopping_rounds`` rounds and keep the best round (``best_iteration_``).

    Validation samples of classes unseen in training are left out of the early-stopping set.
    """
    import lightgbm as lgb

    clf = make_boosting(seed=seed, n_jobs=n_jobs, **options)
    X = np.asarray(X, dtype=np.float32)
    if X_val is not None and y_val is not None and len(y_val):
        keep = np.isin(y_val, np.unique(y))
        if keep.sum() >= 1 and len(np.unique(y)) > 1:
            xv, yv = np.asarray(X_val, np.float32)[keep], np.asarray(y_val)[keep]
            # lightgbm >= 4.6 names the validation set eval_X/eval_y (eval_set is deprecated)
            evals = {"eval_X": (xv,), "eval_y": (yv,)} if "eval_X" in inspect.signature(clf.fit).parameters else {"eval_set": [(xv, yv)]}
            clf.fit(X, y, callbacks=[lgb.early_stopping(early_stopping_rounds, verbose=False)], **evals)
            return clf
    clf.fit(X, y)
    return clf


def proba_for_classes(clf, X: np.ndarray, n_classes: int) -> np.ndarray:
    """``predict_proba`` as (N, n_classes) float32, columns in class-index order."""
    p = clf.predict_proba(np.asarray(X, dtype=np.float32))
    out = np.zeros((len(p), n_classes), dtype=np.float32)
    out[:, np.asarray(clf.classes_, dtype=np.int64)] = p
    return out
