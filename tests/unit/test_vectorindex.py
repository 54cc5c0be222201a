"""The search index (medray.platform.vectorindex): build, search, filters, save/load, refusal, duplicates."""

from __future__ import annotations

import numpy as np
import pytest

from medray.platform.errors import ConfigError
from medray.platform.vectorindex import IndexMismatch, build_index, load_index, normalise, read_index_manifest


def _clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(8, dim))
    return normalise(centres[rng.integers(0, 8, n)] + 0.3 * rng.normal(size=(n, dim)))


def _records(n: int) -> dict:
    return {
        "record_id": [f"r{i}" for i in range(n)],
        "uri": [f"s3://b/x/{i}.dcm" for i in range(n)],
        "member": [""] * n,
        "frame": [0] * n,
        "modality": ["CT" if i % 3 == 0 else "DX" for i in range(n)],
        "site": ["a" if i % 2 else "b" for i in range(n)],
        "year": [2019 + i % 4 for i in range(n)],
        "content_sha256": [f"h{i}" for i in range(n)],
    }


@pytest.fixture(scope="module")
def small():
    x = _clustered(600, 32)
    return x, build_index(x, _records(600), encoder={"encoder": "tiny", "weights_hash": "w" * 64})


def test_every_record_finds_itself_first_with_its_provenance(small):
    x, idx = small
    for i in (0, 17, 599):
        hit = idx.search(x[i], k=3)[0]
        assert hit["record_id"] == f"r{i}" and hit["uri"] == f"s3://b/x/{i}.dcm"
        assert hit["distance"] < 1e-3 and hit["frame"] == 0


def test_recall_at_10_against_exact_search(small):
    x, idx = small
    exact = np.argsort(-(x[:50] @ x.T), axis=1)[:, :10]
    found = [idx.search_keys(q, 10)[0] for q in x[:50]]
    recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)])
    assert recall >= 0.95


def test_filters_keep_only_matching_records_exact_and_over_fetched(small):
    x, idx = small
    hits = idx.search(x[1], k=5, filters={"modality": "CT", "year": [2019, 2020]})
    assert len(hits) == 5
    assert all(h["modality"] == "CT" and h["year"] in (2019, 2020) for h in hits)
    # exact over the filtered rows gives the same answer
    keep = [i for i in range(600) if i % 3 == 0 and 2019 + i % 4 in (2019, 2020)]
    best = [f"r{keep[j]}" for j in np.argsort(-(x[keep] @ x[1]))[:5]]
    assert [h["record_id"] for h in hits] == best
    assert all(h["site"] == "a" for h in idx.search(x[0], k=7, filters={"site": "a"}))
    with pytest.raises(ConfigError, match="filter on one of"):
        idx.search(x[0], k=1, filters={"patient": "x"})


def test_save_load_memory_mapped_refuses_other_weights(small, tmp_path):
    x, idx = small
    uri = str(tmp_path / "index")
    idx.save(uri)
    manifest = read_index_manifest(uri)
    assert manifest["count"] == 600 and manifest["dim"] == 32 and manifest["metric"] == "cos"
    assert manifest["encoder"]["weights_hash"] == "w" * 64 and manifest["build"]["seconds"] >= 0
    back = load_index(uri, weights_hash="w" * 64)
    assert back.search(x[5], k=1)[0]["record_id"] == "r5"
    np.testing.assert_allclose(back.vector("r5"), x[5], atol=2e-3)  # f16 storage
    with pytest.raises(IndexMismatch, match="rebuild it"):
        load_index(uri, weights_hash="0" * 64)
    with pytest.raises(IndexMismatch, match="rebuild it"):
        back.check_encoder({"name": "other", "weights_hash": "1" * 64, "dim": 32})
    back.check_encoder({"name": "tiny", "weights_hash": "w" * 64, "dim": 32})
    with pytest.raises(ConfigError, match="medray index"):
        load_index(str(tmp_path / "nothing"))


def test_save_and_load_through_s3_style_fs(small, tmp_path):
    # memory:// is fsspec's in-process object store: the remote path (download to a cache, then mmap)
    x, idx = small
    idx.save("memory://medray-test/emb/index")
    back = load_index("memory://medray-test/emb/index", cache_dir=str(tmp_path / "cache"))
    np.testing.assert_allclose(back.vector("r9"), x[9], atol=2e-3)  # ids and vectors still line up
    for i in (9, 123, 480):
        # the loaded graph is the saved one: the same hits as before saving (HNSW is approximate, so
        # the record is asked for among its few nearest, not necessarily first)
        expected = [h["record_id"] for h in idx.search(x[i], k=5)]
        assert [h["record_id"] for h in back.search(x[i], k=5)] == expected
        assert f"r{i}" in expected


def test_near_duplicates_find_the_same_image_sent_twice():
    x = _clustered(200, 16, seed=3)
    x[150] = x[20]  # sent twice
    x[151] = normalise(x[30] + 1e-4)  # re-encoded: nearly the same
    recs = _records(200)
    recs["content_sha256"][150] = recs["content_sha256"][20]
    idx = build_index(x, recs, encoder={"weights_hash": "w"})
    pairs = idx.near_duplicates(threshold=0.999)
    found = {(p["a_record_id"], p["b_record_id"]): p for p in pairs}
    assert set(found) == {("r20", "r150"), ("r30", "r151")}
    assert found[("r20", "r150")]["same_bytes"] and not found[("r30", "r151")]["same_bytes"]


def test_bad_parameters_name_the_key():
    with pytest.raises(ConfigError, match="dtype"):
        build_index(np.ones((2, 4)), {"record_id": ["a", "b"]}, encoder={}, dtype="f8")
    with pytest.raises(ConfigError, match="one value per vector"):
        build_index(np.ones((2, 4)), {"record_id": ["a"]}, encoder={})


def test_query_ef_is_adjustable_and_size_reported(small):
    _, idx = small
    before = idx.expansion_search
    idx.expansion_search = 200
    assert idx.expansion_search == 200 and idx.nbytes > 600 * 32 * 2
    idx.expansion_search = before
