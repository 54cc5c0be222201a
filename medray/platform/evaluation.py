"""Held-out evaluation: metrics per label with patient-level bootstrap intervals, subgroups, aggregation.

The arithmetic is scikit-learn's (``roc_auc_score``, ``average_precision_score``,
``roc_curve``, ``calibration_curve``); what is ours is the resampling: the
95 % intervals come from a bootstrap over *patients* (every record of a drawn
patient comes along, as many times as the patient is drawn), so records of one
patient never make an interval look tighter than the number of patients allows.
The resample is expressed as sample weights (the number of times each record's
patient was drawn), so no data is copied per draw.

:func:`evaluate` returns the ``evaluation.json`` document that ``medray
evaluate`` and ``medray finetune`` write and the report reads::

    {"kind": "evaluate", "labels", "aggregate", "counts": {"records", "patients"},
     "metrics": {label: {"auroc": {"value", "lo", "hi"}, "auprc", "sensitivity",
                         "specificity", "ece", "threshold", "n_pos", "n_neg"}},
     "macro": {"auroc": {...}}, "roc": {label: {"fpr", "tpr"}},
     "reliability": {label: {"confidence", "frequency", "count"}},
     "subgroups": {column: {value: {label: {"auroc": {...}, "gap", "n"}}}}}

Example:
    >>> import numpy as np
    >>> y = np.array([[0], [0], [1], [1]]); p = np.array([[0.1], [0.4], [0.35], [0.8]])
    >>> evaluate(y, p, ["x"], groups=np.array(["a", "b", "c", "d"]), n_boot=0)["metrics"]["x"]["auroc"]["value"]
    0.75
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "AGGREGATES",
    "aggregate",
    "bootstrap_weights",
    "evaluate",
    "label_metrics",
]

#: ``eval.aggregate`` levels: score each record, or pool records per study or patient first.
AGGREGATES = ("frame", "study", "patient")
_METRICS = ("auroc", "auprc", "sensitivity", "specificity", "ece")


def _finite(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def label_metrics(y: np.ndarray, p: np.ndarray, *, threshold: float = 0.5, weights: np.ndarray | None = None) -> dict:
    """AUROC, AUPRC, sensitivity and specificity at ``threshold``, and ECE (10 equal-width bins).

    ``nan`` for a metric a sample cannot define (AUROC with one class present).
    ``weights``: per-record sample weights (a bootstrap draw), ``None`` for all ones.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64)
    pos, neg = (w * (y == 1)).sum(), (w * (y == 0)).sum()
    out = dict.fromkeys(_METRICS, float("nan"))
    if pos > 0 and neg > 0:
        out["auroc"] = float(roc_auc_score(y, p, sample_weight=w))
        out["auprc"] = float(average_precision_score(y, p, sample_weight=w))
    called = p >= threshold
    if pos > 0:
        out["sensitivity"] = float((w * (called & (y == 1))).sum() / pos)
    if neg > 0:
        out["specificity"] = float((w * (~called & (y == 0))).sum() / neg)
    if w.sum() > 0:
        out["ece"] = _ece(y, p, w)
    return out


def _ece(y: np.ndarray, p: np.ndarray, w: np.ndarray, n_bins: int = 10) -> float:
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    total = w.sum()
    gap = 0.0
    for b in range(n_bins):
        m = bins == b
        wb = w[m].sum()
        if wb > 0:
            gap += wb / total * abs((w[m] * p[m]).sum() / wb - (w[m] * y[m]).sum() / wb)
    return float(gap)


def bootstrap_weights(groups: np.ndarray, n_boot: int, seed: int = 0) -> np.ndarray:
    """``(n_boot, n_records)`` weights: how often each record's group (patient) was drawn.

    Each draw picks as many groups as there are, with replacement; every record
    of a drawn group counts once per draw of its group.
    """
    codes, inverse = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(codes), np.full(len(codes), 1.0 / len(codes)), size=n_boot)
    return counts[:, inverse].astype(np.float64)


def _interval(value: float, draws: list[float]) -> dict:
    finite = [d for d in draws if math.isfinite(d)]
    lo = hi = None
    if len(finite) >= max(10, len(draws) // 2):  # too few defined draws: no honest interval
        lo, hi = (float(v) for v in np.percentile(finite, [2.5, 97.5]))
    return {"value": _finite(value), "lo": lo, "hi": hi}


def _draw_metrics(y: np.ndarray, p: np.ndarray, weights: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """The metrics of :func:`label_metrics` for every row of ``weights`` at once, ``(B,)`` each.

    The same definitions as scikit-learn's (AUROC with ties counted half, average
    precision as the recall-weighted mean of precision at each distinct score),
    computed per score level with weighted sums, so a thousand draws cost a few
    matrix products instead of a thousand library calls. Checked against
    :func:`label_metrics` in the tests.
    """
    w = np.asarray(weights, dtype=np.float64)
    pos, neg = (y == 1).astype(np.float64), (y == 0).astype(np.float64)
    p_tot, n_tot = w @ pos, w @ neg
    order = np.argsort(-p, kind="stable")  # descending scores
    ps = p[order]
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
    wp = np.add.reduceat(w[:, order] * pos[order], starts, axis=1)  # (B, levels), highest score first
    wn = np.add.reduceat(w[:, order] * neg[order], starts, axis=1)
    neg_below = n_tot[:, None] - np.cumsum(wn, axis=1)  # negatives with a lower score than the level
    both = (p_tot > 0) & (n_tot > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        auroc = np.where(both, (wp * (neg_below + 0.5 * wn)).sum(axis=1) / (p_tot * n_tot), np.nan)
        tp, fp = np.cumsum(wp, axis=1), np.cumsum(wn, axis=1)
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        auprc = np.where(both, (wp * precision).sum(axis=1) / p_tot, np.nan)
        called = (p >= threshold).astype(np.float64)
        sens = np.where(p_tot > 0, (w @ (called * pos)) / p_tot, np.nan)
        spec = np.where(n_tot > 0, (w @ ((1 - called) * neg)) / n_tot, np.nan)
        bins = np.minimum((p * 10).astype(int), 9)
        onehot = np.eye(10)[bins]  # (n, 10)
        wb, wpb, wyb = w @ onehot, w @ (onehot * p[:, None]), w @ (onehot * pos[:, None])
        total = wb.sum(axis=1)
        gaps = np.where(wb > 0, np.abs(wpb - wyb) / np.where(wb > 0, wb, 1.0) * wb, 0.0).sum(axis=1)
        ece = np.where(total > 0, gaps / total, np.nan)
    return {"auroc": auroc, "auprc": auprc, "sensitivity": sens, "specificity": spec, "ece": ece}


def _with_ci(
    y: np.ndarray, p: np.ndarray, weights: np.ndarray, threshold: float, metrics: Sequence[str] = _METRICS
) -> tuple[dict, dict[str, np.ndarray]]:
    """Point metrics (scikit-learn) with patient-bootstrap intervals, and every draw's metrics."""
    point = label_metrics(y, p, threshold=threshold)
    draws: dict[str, np.ndarray] = {m: np.zeros(0) for m in _METRICS}
    for block in range(0, len(weights), 128):  # bounded memory: 128 draws x n records at a time
        got = _draw_metrics(y, p, weights[block : block + 128], threshold)
        draws = {m: np.concatenate([draws[m], got[m]]) for m in _METRICS}
    return {m: _interval(point[m], draws[m].tolist()) for m in metrics}, draws


def aggregate(
    y: np.ndarray, p: np.ndarray, keys: Sequence[Any] | np.ndarray, how: str = "max"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pool records that share a key (a study or a patient): labels by max, scores by ``max`` or ``mean``.

    Returns:
        ``(y, p, index)``: one row per key, and the first record index of each key.
    """
    if how not in ("max", "mean"):
        raise ValueError(f"aggregation must be max or mean, got {how!r}")
    keys_arr = np.asarray([str(k) for k in keys])
    uniq, first, inverse = np.unique(keys_arr, return_index=True, return_inverse=True)
    n, labels = len(uniq), y.shape[1]
    y_out = np.full((n, labels), np.nan)
    p_out = np.zeros((n, labels)) if how == "mean" else np.full((n, labels), -np.inf)
    counts = np.bincount(inverse, minlength=n).astype(np.float64)
    for j in range(labels):
        yj = np.where(np.isnan(y[:, j]), -np.inf, y[:, j])
        ymax = np.full(n, -np.inf)
        np.maximum.at(ymax, inverse, yj)
        y_out[:, j] = np.where(np.isinf(ymax), np.nan, ymax)
        if how == "mean":
            np.add.at(p_out[:, j], inverse, p[:, j])
            p_out[:, j] /= counts
        else:
            np.maximum.at(p_out[:, j], inverse, p[:, j])
    return y_out, p_out, first


def _roc(y: np.ndarray, p: np.ndarray, max_points: int = 200) -> dict:
    from sklearn.metrics import roc_curve

    if len(np.unique(y)) < 2:
        return {"fpr": [], "tpr": []}
    fpr, tpr, _ = roc_curve(y, p, drop_intermediate=True)
    if len(fpr) > max_points:  # keep the drawing small: a sample of the points, ends included
        idx = np.unique(np.linspace(0, len(fpr) - 1, max_points).astype(int))
        fpr, tpr = fpr[idx], tpr[idx]
    return {"fpr": [round(float(v), 5) for v in fpr], "tpr": [round(float(v), 5) for v in tpr]}


def _reliability(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> dict:
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    conf, freq, count = [], [], []
    for b in range(n_bins):
        m = bins == b
        if m.any():
            conf.append(round(float(p[m].mean()), 5))
            freq.append(round(float(y[m].mean()), 5))
            count.append(int(m.sum()))
    return {"confidence": conf, "frequency": freq, "count": count}


def evaluate(
    y: np.ndarray,
    p: np.ndarray,
    labels: Sequence[str],
    *,
    groups: np.ndarray,
    subgroups: Mapping[str, Sequence[Any] | np.ndarray] | None = None,
    threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    aggregate_level: str = "frame",
    min_subgroup: int = 5,
) -> dict:
    """Metrics per label (and macro AUROC) with patient-bootstrap 95 % intervals, per subgroup too.

    Args:
        y: ``(n, L)`` 0/1 labels (``nan``: not labelled for that label).
        p: ``(n, L)`` predicted probabilities.
        labels: the ``L`` label names.
        groups: ``(n,)`` patient of each row: the unit of resampling.
        subgroups: column -> ``(n,)`` values (sex, site, ...): the metrics per value,
            with ``gap`` = subgroup AUROC minus overall AUROC.
        threshold: operating point of sensitivity and specificity.
        n_boot: bootstrap draws (0: point estimates only).
        seed: the draws are a function of it.
        aggregate_level: recorded in the document (rows are already aggregated).
        min_subgroup: smaller subgroups are reported with their count only.

    Returns:
        The ``evaluation.json`` document (see the module docstring).
    """
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    p = np.asarray(p, dtype=np.float64).reshape(len(p), -1)
    groups = np.asarray(groups).astype(str)
    weights = bootstrap_weights(groups, n_boot, seed) if n_boot else np.zeros((0, len(y)))
    doc: dict[str, Any] = {
        "kind": "evaluate",
        "labels": list(labels),
        "aggregate": aggregate_level,
        "threshold": threshold,
        "bootstrap": {"draws": n_boot, "unit": "patient", "seed": seed},
        "counts": {"records": int(len(y)), "patients": int(len(np.unique(groups)))},
        "metrics": {},
        "roc": {},
        "reliability": {},
        "subgroups": {},
    }
    macro_draws = []
    for j, label in enumerate(labels):
        m = ~np.isnan(y[:, j])
        yj, pj = y[m, j].astype(int), p[m, j]
        stats, draws_j = _with_ci(yj, pj, weights[:, m], threshold)
        stats.update({"threshold": threshold, "n_pos": int((yj == 1).sum()), "n_neg": int((yj == 0).sum())})
        doc["metrics"][label] = stats
        doc["roc"][label] = _roc(yj, pj)
        doc["reliability"][label] = _reliability(yj, pj)
        macro_draws.append(draws_j["auroc"])
    point = [doc["metrics"][lab]["auroc"]["value"] for lab in labels]
    defined = [v for v in point if v is not None]
    macro = float(np.mean(defined)) if defined else float("nan")
    stacked = np.vstack(macro_draws) if macro_draws and len(weights) else np.zeros((1, 0))
    with np.errstate(invalid="ignore"):
        draws = [float(np.nanmean(c)) if np.isfinite(c).any() else float("nan") for c in stacked.T]
    doc["macro"] = {"auroc": _interval(macro, draws)}
    for column, values in (subgroups or {}).items():
        vals = np.asarray([None if v is None else str(v) for v in values], dtype=object)
        table: dict[str, Any] = {}
        for value in sorted({v for v in vals if v is not None}):
            sel = vals == value
            entry = {}
            for j, label in enumerate(labels):
                m = sel & ~np.isnan(y[:, j])
                n = int(m.sum())
                overall = doc["metrics"][label]["auroc"]["value"]
                if n < min_subgroup:
                    entry[label] = {"auroc": {"value": None, "lo": None, "hi": None}, "gap": None, "n": n}
                    continue
                auroc = _with_ci(y[m, j].astype(int), p[m, j], weights[:, m], threshold, ("auroc",))[0]["auroc"]
                gap = None if auroc["value"] is None or overall is None else round(auroc["value"] - overall, 6)
                entry[label] = {"auroc": auroc, "gap": gap, "n": n}
            table[value] = entry
        doc["subgroups"][column] = table
    return doc
