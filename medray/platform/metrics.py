"""Classification metrics for validation and model cards (numpy only).

Every function takes plain arrays, so the training loop, the model card and
the tests compute the same numbers:

* :func:`auroc`: area under the ROC curve (Mann-Whitney U with average ranks
  for ties); ``nan`` when only one class is present.
* :func:`accuracy`: threshold 0.5 per output (binary, multi-label) or arg-max
  (multi-class).
* :func:`expected_calibration_error`: equal-width confidence bins, weighted
  gap between confidence and observed frequency.
* :func:`task_metrics`: all of the above for one task (per class and macro).
* :func:`subgroup_metrics`: the same per value of each subgroup column (sex,
  age band, site, manufacturer...), for fairness reporting.

Example:
    >>> import numpy as np
    >>> auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    0.75
    >>> age_band(47, [40, 60, 80])
    '40-59'
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "accuracy",
    "age_band",
    "auroc",
    "expected_calibration_error",
    "flatten_metrics",
    "json_safe",
    "subgroup_metrics",
    "task_metrics",
]


def auroc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of one binary output.

    Args:
        y_true: 0/1 labels, shape ``(N,)``.
        scores: any monotone score (probability or logit), shape ``(N,)``.

    Returns:
        AUROC in ``[0, 1]``; ``nan`` when ``y_true`` holds a single class.
    """
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"y_true {y.shape} and scores {s.shape} differ in shape")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(x.size, dtype=np.float64)
    # boundaries of runs of equal values
    change = np.flatnonzero(np.diff(sorted_x)) + 1
    starts = np.concatenate(([0], change))
    ends = np.concatenate((change, [x.size]))
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + b + 1) / 2.0  # mean of ranks a+1 .. b
    return ranks


def accuracy(task: str, y_true: np.ndarray, probs: np.ndarray) -> float:
    """Share of correct decisions.

    Binary and multi-label: each output thresholded at 0.5, averaged over all
    outputs. Multi-class: arg-max against the class index.
    """
    y, p = _shape(task, y_true, probs)
    if y.shape[0] == 0:
        return float("nan")
    if task == "multiclass":
        return float(np.mean(np.argmax(p, axis=1) == y))
    return float(np.mean((p >= 0.5) == (y >= 0.5)))


def expected_calibration_error(task: str, y_true: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> float:
    """Expected calibration error with ``n_bins`` equal-width bins.

    Binary and multi-label: per output, bins over the predicted probability of
    the positive class, ``sum_b |B_b|/N * |mean(y) - mean(p)|``; averaged over
    outputs. Multi-class: the top-label version (confidence of the arg-max
    against whether it is right).
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    y, p = _shape(task, y_true, probs)
    if y.shape[0] == 0:
        return float("nan")
    if task == "multiclass":
        conf = p.max(axis=1)
        correct = (np.argmax(p, axis=1) == y).astype(np.float64)
        return _ece(conf, correct, n_bins)
    return float(np.mean([_ece(p[:, k], y[:, k].astype(np.float64), n_bins) for k in range(p.shape[1])]))


def _ece(conf: np.ndarray, outcome: np.ndarray, n_bins: int) -> float:
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            total += m.sum() * abs(outcome[m].mean() - conf[m].mean())
    return float(total / conf.size)


def _shape(task: str, y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalise to ``y (N,) int`` + ``p (N, K)`` (multi-class) or ``y, p (N, K)``."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true)
    if p.ndim == 1:
        p = p[:, None]
    if task == "multiclass":
        y = y.reshape(-1).astype(np.int64)
    else:
        y = y.reshape(p.shape[0], -1).astype(np.float64)
        if y.shape != p.shape:
            raise ValueError(f"y_true {y.shape} and probs {p.shape} differ in shape")
    return y, p


def task_metrics(
    task: str, y_true: np.ndarray, probs: np.ndarray, labels: Sequence[str], *, n_bins: int = 10
) -> dict[str, Any]:
    """Every metric of one task on one set of predictions.

    Args:
        task: ``binary``, ``multilabel``, ``multiclass`` or ``regression``.
        y_true: binary/multi-label: 0/1 ``(N, K)`` (or ``(N,)``); multi-class:
            class indices ``(N,)``; regression: values ``(N, K)``.
        probs: probabilities ``(N, K)`` (regression: predicted values).
        labels: output names (``K`` of them).
        n_bins: bins of the calibration error.

    Returns:
        ``{"n", "auroc": {label: v}, "auroc_macro", "accuracy", "ece"}`` for
        classification (multi-class AUROC is one-vs-rest per class);
        ``{"n", "mse", "mae"}`` for regression. Undefined values are ``nan``.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:
        p = p[:, None]
    n = int(p.shape[0])
    if task == "regression":
        y = np.asarray(y_true, dtype=np.float64).reshape(p.shape)
        err = p - y
        return {
            "n": n,
            "mse": float(np.mean(err**2)) if n else float("nan"),
            "mae": float(np.mean(np.abs(err))) if n else float("nan"),
        }
    y, p = _shape(task, y_true, p)
    per: dict[str, float] = {}
    for k, name in enumerate(labels):
        truth = (y == k) if task == "multiclass" else y[:, k]
        per[str(name)] = auroc(truth, p[:, k]) if n else float("nan")
    finite = [v for v in per.values() if not math.isnan(v)]
    return {
        "n": n,
        "auroc": per,
        "auroc_macro": float(np.mean(finite)) if finite else float("nan"),
        "accuracy": accuracy(task, y, p),
        "ece": expected_calibration_error(task, y, p, n_bins) if n else float("nan"),
    }


def subgroup_metrics(
    task: str,
    y_true: np.ndarray,
    probs: np.ndarray,
    labels: Sequence[str],
    groups: Mapping[str, Sequence[Any]],
    *,
    n_bins: int = 10,
    min_size: int = 1,
) -> dict[str, dict[str, dict[str, Any]]]:
    """:func:`task_metrics` per value of each subgroup column.

    Args:
        groups: column name -> one value per prediction (``None`` becomes
            ``"unknown"``).
        min_size: subgroups with fewer rows are reported with ``n`` only.

    Returns:
        ``{column: {value: metrics}}``.
    """
    y = np.asarray(y_true)
    p = np.asarray(probs)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for column, values in groups.items():
        vals = np.array(["unknown" if v is None else str(v) for v in values], dtype=object)
        if vals.shape[0] != p.shape[0]:
            raise ValueError(f"subgroup '{column}' has {vals.shape[0]} values for {p.shape[0]} predictions")
        out[column] = {}
        for value in sorted(set(vals.tolist())):
            m = vals == value
            if int(m.sum()) < min_size:
                out[column][value] = {"n": int(m.sum())}
                continue
            out[column][value] = task_metrics(task, y[m], p[m], labels, n_bins=n_bins)
    return out


def age_band(age: Any, edges: Sequence[int]) -> str | None:
    """The band of ``age`` given ascending band edges: ``[40, 60]`` -> ``<40``, ``40-59``, ``60+``."""
    if age is None or (isinstance(age, float) and math.isnan(age)):
        return None
    try:
        a = float(age)
    except (TypeError, ValueError):
        return None
    edges = sorted(int(e) for e in edges)
    if not edges or a < edges[0]:
        return f"<{edges[0]}" if edges else "all"
    for lo, hi in zip(edges, edges[1:]):
        if a < hi:
            return f"{lo}-{hi - 1}"
    return f"{edges[-1]}+"


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested metrics -> flat ``{"a/b/c": float}`` (for W&B and ``ray.train.report``)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, name))
        elif isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def json_safe(value: Any) -> Any:
    """Replace ``nan``/``inf`` by ``None`` (strict JSON has neither), recursively."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
