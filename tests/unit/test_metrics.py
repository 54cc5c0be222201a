"""Validation metrics: AUROC, accuracy, calibration error, subgroups (numpy only, no Ray)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from medray.platform.metrics import (
    accuracy,
    age_band,
    auroc,
    expected_calibration_error,
    flatten_metrics,
    json_safe,
    subgroup_metrics,
    task_metrics,
)


def _auroc_pairs(y, s):
    """Definition: P(score_pos > score_neg) + 0.5 P(tie), over all pairs."""
    pos = [b for a, b in zip(y, s) if a]
    neg = [b for a, b in zip(y, s) if not a]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_perfect_reversed_and_chance():
    y = np.array([0, 0, 1, 1])
    assert auroc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert auroc(y, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert auroc(y, np.full(4, 0.5)) == 0.5  # all tied


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_the_pairwise_definition_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 60)
    y[:2] = [0, 1]
    s = np.round(rng.random(60), 1)  # many ties
    assert auroc(y, s) == pytest.approx(_auroc_pairs(y, s), abs=1e-12)


def test_auroc_of_one_class_is_nan_and_shapes_are_checked():
    assert math.isnan(auroc(np.ones(5), np.arange(5)))
    with pytest.raises(ValueError):
        auroc(np.ones(3), np.ones(4))


def test_accuracy_per_task():
    assert accuracy("binary", np.array([1, 0, 1]), np.array([0.9, 0.2, 0.4])) == pytest.approx(2 / 3)
    y = np.array([[1, 0], [0, 1]])
    p = np.array([[0.7, 0.6], [0.1, 0.9]])
    assert accuracy("multilabel", y, p) == pytest.approx(3 / 4)
    assert accuracy("multiclass", np.array([2, 0]), np.array([[0.1, 0.2, 0.7], [0.2, 0.5, 0.3]])) == 0.5


def test_ece_zero_when_calibrated_and_known_value_otherwise():
    # 10 predictions at 0.8 with 8 positives: perfectly calibrated
    y = np.array([1] * 8 + [0] * 2)
    assert expected_calibration_error("binary", y, np.full(10, 0.8)) == pytest.approx(0.0)
    # always 0.9 but only half positive: gap 0.4
    y = np.array([1, 0] * 5)
    assert expected_calibration_error("binary", y, np.full(10, 0.9)) == pytest.approx(0.4)
    # multiclass: top-label confidence 0.6, always right -> gap 0.4
    p = np.tile([0.6, 0.3, 0.1], (4, 1))
    assert expected_calibration_error("multiclass", np.zeros(4), p) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        expected_calibration_error("binary", y, np.full(10, 0.9), n_bins=0)


def test_task_metrics_multilabel_and_multiclass():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (200, 2))
    p = np.clip(y * 0.6 + rng.random((200, 2)) * 0.4, 0, 1)
    m = task_metrics("multilabel", y, p, ["a", "b"])
    assert m["n"] == 200 and set(m["auroc"]) == {"a", "b"}
    assert m["auroc_macro"] == pytest.approx(np.mean(list(m["auroc"].values())))
    assert m["auroc"]["a"] > 0.9 and 0 <= m["ece"] <= 1
    yc = rng.integers(0, 3, 90)
    pc = np.eye(3)[yc] * 0.5 + 0.5 / 3
    mc = task_metrics("multiclass", yc, pc, ["x", "y", "z"])
    assert mc["auroc"] == {"x": 1.0, "y": 1.0, "z": 1.0} and mc["accuracy"] == 1.0


def test_task_metrics_regression_and_missing_class():
    m = task_metrics("regression", np.array([[1.0], [3.0]]), np.array([[2.0], [3.0]]), ["v"])
    assert m == {"n": 2, "mse": 0.5, "mae": 0.5}
    m = task_metrics("binary", np.zeros(4), np.array([0.1, 0.2, 0.3, 0.4]), ["a"])
    assert math.isnan(m["auroc"]["a"]) and math.isnan(m["auroc_macro"])


def test_subgroup_metrics_split_by_value_and_small_groups_report_size_only():
    y = np.array([1, 0, 1, 0, 1, 0, 1])
    p = np.array([0.9, 0.1, 0.8, 0.3, 0.2, 0.7, 0.6])
    groups = {"sex": ["F", "F", "F", "F", "M", "M", None]}
    out = subgroup_metrics("binary", y, p, ["les"], groups, min_size=2)
    assert set(out["sex"]) == {"F", "M", "unknown"}
    assert out["sex"]["F"]["auroc"]["les"] == 1.0 and out["sex"]["M"]["auroc"]["les"] == 0.0
    assert out["sex"]["unknown"] == {"n": 1}
    with pytest.raises(ValueError):
        subgroup_metrics("binary", y, p, ["les"], {"site": ["a"]})


@pytest.mark.parametrize(
    "age,band",
    [
        (12, "<40"),
        (40, "40-59"),
        (59.9, "40-59"),
        (60, "60-79"),
        (95, "80+"),
        (None, None),
        ("n/a", None),
        (float("nan"), None),
    ],
)
def test_age_band(age, band):
    assert age_band(age, [40, 60, 80]) == band


def test_flatten_and_json_safe():
    m = {"val": {"auroc": {"a": 0.5}, "n": 3, "label": "x"}, "flag": True}
    assert flatten_metrics(m) == {"val/auroc/a": 0.5, "val/n": 3.0}
    safe = json_safe({"a": float("nan"), "b": [np.float32(1.5), np.int64(2)], "c": {"d": float("inf")}})
    assert safe == {"a": None, "b": [1.5, 2], "c": {"d": None}}
    json.dumps(safe, allow_nan=False)
