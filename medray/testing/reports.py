"""Sample ``evaluation.json`` and ``probe.json`` documents, shaped as the jobs write them.

For tests and demos of :mod:`medray.platform.report`: the numbers come from a
seeded simulation (scores of positives shifted above negatives), so the curves
look like real ones and are the same on every call.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

__all__ = ["sample_evaluation", "sample_probe"]


def _ci(value: float, half: float) -> dict[str, float]:
    return {"value": round(value, 4), "lo": round(max(0.0, value - half), 4), "hi": round(min(1.0, value + half), 4)}


def sample_evaluation(
    labels: tuple[str, ...] = ("effusion", "cardiomegaly"), *, history: bool = True
) -> dict[str, Any]:
    """An ``evaluation.json``: metrics with CIs, ROC and reliability curves, subgroups and (finetune) history.

    Args:
        labels: the label names.
        history: add the per-epoch ``history`` that ``medray finetune`` writes.
    """
    rng = np.random.default_rng(16)
    doc: dict[str, Any] = {
        "kind": "evaluate",
        "labels": list(labels),
        "aggregate": "patient",
        "counts": {"records": 120, "patients": 40},
        "metrics": {},
        "macro": {},
        "roc": {},
        "reliability": {},
        "subgroups": {"site": {}, "sex": {}},
    }
    aurocs = []
    for i, label in enumerate(labels):
        y = np.r_[np.ones(12), np.zeros(28)]
        score = np.clip(rng.normal(0.35 + 0.3 * y + 0.05 * i, 0.18), 0, 1)
        thresholds = np.r_[np.inf, np.sort(np.unique(score))[::-1]]
        tpr = [float((score[y == 1] >= t).mean()) for t in thresholds]
        fpr = [float((score[y == 0] >= t).mean()) for t in thresholds]
        auroc = float(np.trapezoid(tpr, fpr))
        aurocs.append(auroc)
        bins = np.linspace(0, 1, 6)
        which = np.clip(np.digitize(score, bins) - 1, 0, 4)
        conf, freq, count = [], [], []
        for b in range(5):
            sel = which == b
            if sel.any():
                conf.append(round(float(score[sel].mean()), 4))
                freq.append(round(float(y[sel].mean()), 4))
                count.append(int(sel.sum()))
        doc["metrics"][label] = {
            "auroc": _ci(auroc, 0.08),
            "auprc": _ci(auroc - 0.15, 0.1),
            "sensitivity": _ci(0.75, 0.12),
            "specificity": _ci(0.7, 0.1),
            "ece": _ci(0.08 + 0.02 * i, 0.03),
            "threshold": 0.5,
            "n_pos": 12,
            "n_neg": 28,
        }
        doc["roc"][label] = {"fpr": fpr, "tpr": tpr}
        doc["reliability"][label] = {"confidence": conf, "frequency": freq, "count": count}
        for column, values in (("site", ("A", "B", "C")), ("sex", ("F", "M"))):
            for j, value in enumerate(values):
                sub = auroc - 0.05 + 0.04 * j
                doc["subgroups"][column].setdefault(value, {})[label] = {
                    "auroc": _ci(sub, 0.12),
                    "gap": round(sub - auroc, 4),
                    "n": 40 // len(values),
                }
    doc["macro"] = {"auroc": _ci(float(np.mean(aurocs)), 0.07), "auprc": _ci(float(np.mean(aurocs)) - 0.15, 0.09)}
    if history:
        doc["history"] = [
            {
                "epoch": e,
                "train_loss": round(0.7 * 0.85**e, 4),
                "val_loss": round(0.68 * 0.9**e + 0.02, 4),
                "val_auroc_macro": round(0.6 + 0.2 * (1 - 0.7**e), 4),
            }
            for e in range(1, 7)
        ]
    return doc


def sample_probe(
    encoder: str = "rad_dino", *, quality: float = 0.8, sizes: tuple[int, ...] = (8, 16, 32, 64, 128)
) -> dict[str, Any]:
    """A ``probe.json`` of one encoder: logreg and MLP curves over nested training-set sizes, 5 repeats each.

    Args:
        encoder: the encoder name.
        quality: the AUROC its curves approach with every label.
        sizes: labelled patients per training set.
    """
    digest = hashlib.sha256(encoder.encode()).hexdigest()
    rng = np.random.default_rng(int(digest[:8], 16))
    curves: dict[str, Any] = {}
    best: dict[str, Any] = {"head": "logreg", "size": sizes[-1], "auroc": 0.0}
    for head, lag in (("logreg", 1.0), ("mlp", 1.4)):
        runs, mean, lo, hi = [], [], [], []
        for size in sizes:
            centre = 0.5 + (quality - 0.5) * (1 - np.exp(-size / (24.0 * lag)))
            r = np.clip(rng.normal(centre, 0.06 / np.sqrt(size / 8), 5), 0, 1).round(4).tolist()
            runs.append(r)
            mean.append(round(float(np.mean(r)), 4))
            lo.append(round(float(np.min(r)), 4))
            hi.append(round(float(np.max(r)), 4))
        curves[head] = {"size": list(sizes), "auroc_mean": mean, "auroc_lo": lo, "auroc_hi": hi, "runs": runs}
        if mean[-1] > best["auroc"]:
            best = {"head": head, "size": sizes[-1], "auroc": mean[-1]}
    return {
        "kind": "probe",
        "encoder": {"name": encoder, "weights_hash": digest[:16]},
        "labels": ["effusion", "cardiomegaly"],
        "sizes": list(sizes),
        "curves": curves,
        "best": best,
    }
