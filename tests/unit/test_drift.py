"""Drift statistics and OOD scores on synthetic embeddings with a known shift (no Ray)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medray.platform.drift import OODReference, mmd_test, time_window
from medray.platform.errors import ConfigError


def _cloud(n: int, seed: int, dim: int = 32, shift: float = 0.0) -> np.ndarray:
    """Embeddings around a fixed mean direction (as an encoder's are), optionally shifted."""
    rng = np.random.default_rng(seed)
    centre = np.random.default_rng(1234).normal(size=dim) * 2.0
    x = centre + rng.normal(size=(n, dim))
    if shift:
        x[:, : dim // 4] += shift
    return x


def test_mmd_no_alarm_on_an_in_distribution_split() -> None:
    r = mmd_test(_cloud(300, 1), _cloud(300, 2), permutations=500)
    assert r.p_value > 0.05
    assert r.n_reference == r.n_current == 300 and r.permutations == 500
    assert r.bandwidth > 0


def test_mmd_detects_a_shift() -> None:
    r = mmd_test(_cloud(300, 1), _cloud(300, 2, shift=0.5), permutations=500)
    assert r.p_value < 0.01
    assert r.statistic > 0


def test_mmd_p_values_are_calibrated_under_the_null() -> None:
    ps = [mmd_test(_cloud(80, 2 * s), _cloud(80, 2 * s + 1), permutations=200, seed=s).p_value for s in range(40)]
    assert 0.0 < float(np.mean(np.asarray(ps) < 0.05)) <= 0.15  # nominal 5%
    assert 0.35 < float(np.mean(ps)) < 0.65  # uniform under the null: mean 0.5


def test_mmd_subsamples_each_side_and_is_seeded() -> None:
    a, b = _cloud(500, 1), _cloud(400, 2, shift=0.3)
    r1 = mmd_test(a, b, max_per_side=100, permutations=100, seed=3)
    r2 = mmd_test(a, b, max_per_side=100, permutations=100, seed=3)
    assert (r1.n_reference, r1.n_current) == (100, 100)
    assert r1 == r2


def test_mmd_degenerate_inputs() -> None:
    r = mmd_test(_cloud(1, 1), _cloud(10, 2))
    assert math.isnan(r.statistic) and math.isnan(r.p_value)
    assert r.as_dict()["p_value"] is None
    with pytest.raises(ValueError, match="one dim"):
        mmd_test(np.zeros((5, 3)), np.zeros((5, 4)))
    same = mmd_test(np.ones((5, 3)), np.ones((5, 3)), permutations=50)  # zero distances: no crash
    assert same.p_value > 0.05


def test_ood_threshold_is_calibrated_on_the_reference() -> None:
    ref = OODReference.fit(_cloud(400, 1), k=5, quantile=0.95)
    assert ref.k == 5 and ref.dim == 32
    assert ref.threshold == pytest.approx(float(np.quantile(ref.reference_scores, 0.95)))
    held_out = ref.score(_cloud(400, 7))
    assert float(np.mean(held_out > ref.threshold)) < 0.15  # ~5% by construction
    shifted = ref.score(_cloud(400, 8, shift=3.0))  # per record: a shift beyond the noise
    y = np.r_[np.zeros(len(held_out)), np.ones(len(shifted))]
    assert roc_auc_score(y, np.r_[held_out, shifted]) >= 0.9
    assert float(np.mean(shifted > ref.threshold)) > 0.5


def test_ood_score_is_cosine_and_scale_free() -> None:
    ref = OODReference.fit(_cloud(50, 1), k=3)
    x = _cloud(5, 2)
    np.testing.assert_allclose(ref.score(x), ref.score(10 * x), atol=1e-5)
    assert ref.score(x[0]).shape == (1,)
    assert np.all((ref.score(x) >= 0) & (ref.score(x) <= 2))
    with pytest.raises(ValueError, match="dim 32"):
        ref.score(np.zeros((2, 5)))
    assert OODReference.fit(np.eye(3), k=10).k == 2  # k capped at n - 1
    with pytest.raises(ValueError, match="at least 2"):
        OODReference.fit(np.zeros((1, 4)))


def test_ood_scores_equal_scikit_learns_nearest_neighbours() -> None:
    from sklearn.neighbors import NearestNeighbors

    ref = OODReference.fit(_cloud(300, 1), k=7, max_calibration=50)
    assert len(ref.reference_scores) == 50
    x = _cloud(40, 2, shift=0.5)
    nn = NearestNeighbors(metric="cosine", algorithm="brute").fit(ref.vectors)
    dist, _ = nn.kneighbors(x / np.linalg.norm(x, axis=1, keepdims=True), n_neighbors=7)
    np.testing.assert_allclose(ref.score(x), dist.mean(axis=1), atol=1e-5)


def test_ood_reference_saves_and_loads(tmp_path) -> None:
    ref = OODReference.fit(_cloud(60, 1), k=4, provenance={"weights_hash": "abc", "encoder": "tiny"})
    uri = ref.save(str(tmp_path / "sub" / "ref.npz"))
    back = OODReference.load(uri)
    assert (back.k, back.threshold, back.quantile) == (ref.k, ref.threshold, ref.quantile)
    assert back.provenance == {"weights_hash": "abc", "encoder": "tiny"}
    x = _cloud(6, 3)
    np.testing.assert_allclose(back.score(x), ref.score(x), atol=1e-6)
    with pytest.raises(ConfigError, match="serve.ood.reference"):
        OODReference.load(str(tmp_path / "none.npz"), key="serve.ood.reference")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="not a medray OOD reference"):
        OODReference.load(str(tmp_path / "bad.npz"))


def test_time_windows() -> None:
    dates = ["2024-01-02", "20240315", "2024-02-29T10:00:00", 2023, "2022", None, "garbage"]
    assert time_window(dates, "day")[:3] == ["2024-01-02", "2024-03-15", "2024-02-29"]
    assert time_window(dates, "week")[:2] == ["2024-W01", "2024-W11"]
    assert time_window(dates, "month") == ["2024-01", "2024-03", "2024-02", "2023-01", "2022-01", "unknown", "unknown"]
    assert time_window(dates, "year")[:5] == ["2024", "2024", "2024", "2023", "2022"]
    with pytest.raises(ConfigError, match="window"):
        time_window(dates, "fortnight")
