"""Data-efficiency curves: how good a head on frozen embeddings gets with how many labelled patients.

The HAI-DEF recipe, with scikit-learn heads: patients (not records) are split
into a held-out test set and a training pool, the way ``medray finetune`` splits
them (:mod:`medray.platform.splits`: a pure function of seed and patient);
training sets of 8, 16, 32, ... patients up to the whole pool are drawn
``repeats`` times, *nested* (each repeat is one random order of the pool, and a
size takes its first patients, so every smaller set is a subset of the larger
ones); a logistic-regression and a small-MLP head are fitted on each set and
scored by AUROC on the test patients.

:func:`learning_curves` returns the ``curves`` part of ``probe.json``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medray.platform.errors import ConfigError
from medray.platform.splits import SplitFractions, assign_splits

__all__ = ["HEADS", "ProbeData", "default_sizes", "fit_head", "learning_curves", "split_patients"]

#: Head kinds a probe fits.
HEADS = ("logreg", "mlp")


@dataclass
class ProbeData:
    """Examples for a probe: one row per record.

    Attributes:
        x: ``(n, d)`` embeddings.
        y: ``(n, L)`` 0/1 labels, ``nan`` where a record has no label for that column.
        groups: ``(n,)`` patient of each record (the unit of splitting and sampling).
        labels: the ``L`` label names.
    """

    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    labels: list[str]


def default_sizes(n_train: int, smallest: int = 8) -> list[int]:
    """8, 16, 32, ... below ``n_train``, then ``n_train`` itself."""
    sizes, s = [], smallest
    while s < n_train:
        sizes.append(s)
        s *= 2
    return [*sizes, n_train]


def split_patients(groups: np.ndarray, *, test_fraction: float, seed: int) -> np.ndarray:
    """``True`` for rows whose patient is held out for testing (as ``medray finetune`` splits)."""
    splits = assign_splits(list(groups), seed=seed, fractions=SplitFractions(val=0.0, test=test_fraction))
    return np.asarray([s == "test" for s in splits])


class _Head:
    """One fitted head per label: ``predict_proba`` gives ``(n, L)``; a label it could not fit is ``nan``."""

    def __init__(self, models: list[Any | None], scale: tuple[np.ndarray, np.ndarray], joint: bool = False) -> None:
        self.models, (self.mean, self.std), self.joint = models, scale, joint

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        z = (x - self.mean) / self.std
        if self.joint and self.models[0] is not None:  # one multi-label network: a probability per label
            return np.asarray(self.models[0].predict_proba(z), dtype=np.float64)
        cols = [np.full(len(x), np.nan) if m is None else m.predict_proba(z)[:, 1] for m in self.models]
        return np.stack(cols, axis=1)

    def linear(self) -> tuple[np.ndarray, np.ndarray]:
        """Weights and bias in the *unscaled* embedding space (logistic regression only)."""
        models = [m for m in self.models if m is not None]
        if len(models) != len(self.models):
            raise ValueError("a label has no fitted model (its training set lacked a class)")
        weight = np.stack([m.coef_[0] / self.std for m in models])
        bias = np.array([m.intercept_[0] - float((m.coef_[0] * self.mean / self.std).sum()) for m in models])
        return weight.astype(np.float32), bias.astype(np.float32)


def fit_head(kind: str, x: np.ndarray, y: np.ndarray, *, seed: int = 0) -> _Head:
    """Fit one head per label column on standardised embeddings.

    Args:
        kind: ``logreg`` (L2, C=1) or ``mlp`` (one hidden layer of 128, early stopping past 256 rows;
            one network for all labels when every record has every label, else one per label).
        x: ``(n, d)`` embeddings.
        y: ``(n, L)`` labels (``nan``: unlabelled).
        seed: the MLP's initialisation.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std = np.where(std > 1e-8, std, 1.0)
    z = (x - mean) / std
    import warnings

    def mlp(n: int) -> Any:
        return MLPClassifier(
            hidden_layer_sizes=(128,),
            alpha=1e-3,
            max_iter=200,
            early_stopping=n > 256,
            n_iter_no_change=5,
            random_state=seed,
        )

    complete = y.shape[1] > 1 and not np.isnan(y).any()
    if kind == "mlp" and complete and all(len(np.unique(y[:, j])) == 2 for j in range(y.shape[1])):
        joint = mlp(len(y))  # every label known for every record: one network with an output per label
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence warnings on tiny sets: the score tells
            joint.fit(z, y.astype(int))
        return _Head([joint], (mean, std), joint=True)
    models: list[Any | None] = []
    for j in range(y.shape[1]):
        m = ~np.isnan(y[:, j])
        yj = y[m, j].astype(int)
        if len(np.unique(yj)) < 2:  # a set without both classes fits nothing
            models.append(None)
            continue
        model: Any
        if kind == "logreg":
            model = LogisticRegression(C=1.0, max_iter=500)
        elif kind == "mlp":
            model = mlp(int(m.sum()))
        else:
            raise ConfigError("heads", f"unknown head {kind!r}; choose from {', '.join(HEADS)}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence warnings on tiny sets: the score tells
            model.fit(z[m], yj)
        models.append(model)
    return _Head(models, (mean, std))


def _auroc(y: np.ndarray, p: np.ndarray) -> list[float]:
    from sklearn.metrics import roc_auc_score

    out = []
    for j in range(y.shape[1]):
        m = ~np.isnan(y[:, j]) & ~np.isnan(p[:, j])
        yj = y[m, j]
        out.append(float(roc_auc_score(yj, p[m, j])) if len(np.unique(yj)) == 2 else float("nan"))
    return out


def _macro(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def learning_curves(
    data: ProbeData,
    *,
    heads: Sequence[str] = HEADS,
    sizes: Sequence[int] | None = None,
    repeats: int = 5,
    test_fraction: float = 0.3,
    seed: int = 0,
) -> dict[str, Any]:
    """AUROC on held-out patients of heads trained on nested sets of ``sizes`` patients.

    Returns:
        ``{"sizes", "test": {"records", "patients"}, "train_pool": patients, "curves": {head: {"size",
        "auroc_mean", "auroc_lo", "auroc_hi", "runs", "per_label": {label: [mean per size]}}},
        "seconds"}``; ``lo``/``hi`` are the smallest and largest repeat (5 repeats), ``runs`` each
        repeat's macro AUROC per size (``null``: the set lacked a class).

    Raises:
        ConfigError: too few patients for a test set and a training pool.
    """
    t0 = time.perf_counter()
    test = split_patients(data.groups, test_fraction=test_fraction, seed=seed)
    pool = np.unique(data.groups[~test])
    if test.sum() == 0 or len(pool) < 2:
        raise ConfigError(
            "test_fraction",
            f"{len(np.unique(data.groups))} patients leave no test set or training pool at "
            f"test_fraction={test_fraction}; label more patients or change it",
        )
    sizes = sorted({min(int(s), len(pool)) for s in (sizes or default_sizes(len(pool))) if int(s) >= 1})
    x_test, y_test = data.x[test], data.y[test]
    curves: dict[str, Any] = {}
    for kind in heads:
        runs = np.full((repeats, len(sizes)), np.nan)
        per_label = np.full((repeats, len(sizes), len(data.labels)), np.nan)
        for r in range(repeats):
            order = np.random.default_rng(seed + 1000 + r).permutation(pool)
            for k, size in enumerate(sizes):
                if size == len(pool) and r > 0 and kind == "logreg":  # the whole pool: the same fit every time
                    runs[r, k], per_label[r, k] = runs[0, k], per_label[0, k]
                    continue
                rows = np.isin(data.groups, order[:size]) & ~test
                head = fit_head(kind, data.x[rows], data.y[rows], seed=seed + r)
                scores = _auroc(y_test, head.predict_proba(x_test))
                per_label[r, k], runs[r, k] = scores, _macro(scores)
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # all-nan columns (sets without both classes)
                mean = np.nanmean(runs, axis=0)
                lo, hi = np.nanmin(runs, axis=0), np.nanmax(runs, axis=0)
                label_means = np.nanmean(per_label, axis=0)
        curves[kind] = {
            "size": list(sizes),
            "auroc_mean": [_num(v) for v in mean],
            "auroc_lo": [_num(v) for v in lo],
            "auroc_hi": [_num(v) for v in hi],
            "runs": [[_num(v) for v in row] for row in runs.T],
            "per_label": {lab: [_num(v) for v in label_means[:, j]] for j, lab in enumerate(data.labels)},
        }
    return {
        "sizes": list(sizes),
        "repeats": repeats,
        "test": {"records": int(test.sum()), "patients": int(len(np.unique(data.groups[test])))},
        "train_pool": int(len(pool)),
        "curves": curves,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _num(value: float) -> float | None:
    return round(float(value), 6) if math.isfinite(value) else None
