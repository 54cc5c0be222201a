"""``/v1/search`` without Ray: request parsing, the query vector of an encoder answer, error mapping."""

from __future__ import annotations

import numpy as np
import pytest

from medray.serve.ingress import error_for_result
from medray.serve.search import SearchError, parse_search, query_vector


def test_k_and_filters_from_body_and_query_parameters():
    k, filters = parse_search({"k": 3, "filters": {"modality": "CT", "year": [2019, 2020]}}, {}, max_k=10)
    assert k == 3 and filters == {"modality": "CT", "year": [2019, 2020]}
    k, filters = parse_search({}, {"k": "7", "site": "north,south"}, max_k=10)
    assert k == 7 and filters == {"site": ["north", "south"]}
    assert parse_search({}, {}, max_k=100)[0] == 10


@pytest.mark.parametrize(
    "doc,params,match",
    [
        ({"k": 0}, {}, "between 1 and 5"),
        ({"k": 6}, {}, "between 1 and 5"),
        ({"k": "two"}, {}, "integer"),
        ({"k": True}, {}, "integer"),
        ({"filters": {"patient_key": "x"}}, {}, "cannot filter on"),
        ({"filters": ["CT"]}, {}, "must be an object"),
        ({"filters": {"modality": []}}, {}, "non-empty list"),
        ({}, {"patient": "x"}, "unknown query parameter"),
    ],
)
def test_bad_searches_are_400_with_what_to_change(doc, params, match):
    with pytest.raises(SearchError, match=match) as err:
        parse_search(doc, params, max_k=5)
    assert err.value.status == 400


def test_query_vector_is_the_pooled_row_else_the_mean_of_frames():
    frames = {"embeddings": np.asarray([[1.0, 0.0], [0.0, 1.0]], np.float32)}
    np.testing.assert_allclose(query_vector(frames), [0.5, 0.5])
    np.testing.assert_allclose(query_vector({**frames, "pooled": {"embedding": [3.0, 4.0]}}), [3.0, 4.0])


def test_search_errors_keep_their_status_through_the_ingress():
    err = error_for_result(SearchError(409, "index_mismatch", "rebuild it").result())
    assert err is not None and (err.status, err.code, err.message) == (409, "index_mismatch", "rebuild it")
    plain = error_for_result({"error": {"class": "DecodeError", "message": "m"}})
    assert plain is not None and plain.status == 422


def test_medray_serve_refuses_an_index_of_other_weights_before_ray(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    from medray.config import CONF_DIR, register_schemas
    from medray.encoders import build_tiny_checkpoint, hash_directory
    from medray.jobs.serve import ServeJob, register
    from medray.platform.errors import ConfigError
    from medray.platform.vectorindex import build_index

    register_schemas()
    register()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("MEDRAY_CACHE_DIR", str(tmp_path / "cache"))
    ckpt = build_tiny_checkpoint("hf_image", str(tmp_path / "ckpt"), arch="vit", image_size=16)
    x = np.eye(4, 32, dtype=np.float32)
    for name, weights in (("good", hash_directory(ckpt)), ("other", "0" * 64)):
        build_index(x, {"record_id": list("abcd")}, encoder={"weights_hash": weights}).save(str(tmp_path / name))

    def job(index: str) -> ServeJob:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            overrides = ["encoder=hf_image", f"encoder.checkpoint={ckpt}", f"serve.search.index={index}"]
            return ServeJob(compose("serve", overrides=overrides))

    assert job(str(tmp_path / "good")).cfg.serve.search.index == str(tmp_path / "good")
    with pytest.raises(ConfigError, match="medray index") as err:
        job(str(tmp_path / "other"))
    assert err.value.key == "serve.search.index"
    with pytest.raises(ConfigError, match="no search index"):
        job(str(tmp_path / "missing"))
