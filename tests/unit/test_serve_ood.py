"""The live OOD score of ``medray serve`` (serve.ood): config checks and the monitor, without Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir

from medray.config import CONF_DIR, register_schemas
from medray.jobs.serve import ServeJob, register
from medray.platform.drift import OODReference
from medray.platform.errors import ConfigError
from medray.platform.records import record_id
from medray.serve.ood import OODMonitor


@pytest.fixture
def compose_serve(tmp_path, monkeypatch):
    register_schemas()
    register()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("MEDRAY_CACHE_DIR", str(tmp_path / "cache"))

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            return compose(
                "serve",
                overrides=["encoder=hf_image", "encoder.checkpoint=/models/x", "check_artifacts=false", *overrides],
            )

    return _compose


def _embed_output(root: Path, x: np.ndarray, weights: str = "w1") -> str:
    (root / "embeddings").mkdir(parents=True)
    (root / "_medray.json").write_text(json.dumps({"encoder": "tiny", "weights_hash": weights}))
    uris = [f"r/{i}.dcm" for i in range(len(x))]
    table = pa.table(
        {
            "record_id": [record_id(u, "") for u in uris],
            "uri": uris,
            "embedding": pa.array(list(x.astype(np.float32)), pa.list_(pa.float32())),
        }
    )
    pq.write_table(table, root / "embeddings" / "part-0.parquet")
    return str(root)


def _cloud(n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    x = np.random.default_rng(5).normal(size=8) * 2 + np.random.default_rng(seed).normal(size=(n, 8))
    x[:, :2] += shift
    return x


def test_ood_is_off_by_default_and_bad_values_name_the_key(compose_serve) -> None:
    job = ServeJob(compose_serve())
    assert job.cfg.serve.ood.reference is None and job.cfg.serve.ood.threshold is None
    ServeJob(compose_serve("serve.ood.reference=s3://b/emb", "serve.ood.threshold=0.2"))  # read by the replica
    for override, key in [
        ("serve.ood.k=0", "serve.ood.k"),
        ("serve.ood.quantile=1.5", "serve.ood.quantile"),
        ("serve.ood.threshold=3", "serve.ood.threshold"),
        ("serve.ood.buckets=[0.2,0.1]", "serve.ood.buckets"),
    ]:
        with pytest.raises(ConfigError) as err:
            ServeJob(compose_serve(override))
        assert err.value.key == key


def test_monitor_scores_requests_against_an_embed_output(tmp_path: Path) -> None:
    uri = _embed_output(tmp_path / "emb", _cloud(200, 1))
    assert OODMonitor.from_conf({"reference": None}) is None
    conf = {"reference": uri, "threshold": None, "k": 5, "quantile": 0.99, "buckets": None}
    mon = OODMonitor.from_conf(conf, encoder={"name": "tiny", "weights_hash": "w1", "dim": 8}, metrics=False)
    assert mon is not None and mon.reference.k == 5
    assert mon.threshold == pytest.approx(float(np.quantile(mon.reference.reference_scores, 0.99)))
    assert mon.threshold in mon.buckets or round(mon.threshold, 6) in mon.buckets
    near = [mon.observe(v) for v in _cloud(50, 2)]
    far = [mon.observe(v) for v in _cloud(50, 3, shift=6.0)]
    assert set(near[0]) == {"score", "threshold", "alarm"}
    assert np.mean([r["alarm"] for r in near]) < 0.2 and np.mean([r["alarm"] for r in far]) > 0.8
    fixed = OODMonitor.from_conf({**conf, "threshold": 2.0}, encoder={"weights_hash": "w1"}, metrics=False)
    assert fixed is not None and not any(fixed.observe(v)["alarm"] for v in _cloud(5, 3, shift=6.0))


def test_monitor_loads_a_saved_reference_and_refuses_misfits(tmp_path: Path) -> None:
    ref = OODReference.fit(_cloud(40, 1), k=3, provenance={"weights_hash": "w1"})
    npz = ref.save(str(tmp_path / "drift" / "reference.npz"))
    mon = OODMonitor.from_conf({"reference": npz, "k": 9}, encoder={"weights_hash": "w1", "dim": 8}, metrics=False)
    assert mon is not None and mon.reference.k == 3 and mon.threshold == pytest.approx(ref.threshold)
    with pytest.raises(ConfigError, match="other weights") as err:
        OODMonitor.from_conf({"reference": npz}, encoder={"weights_hash": "w2"}, metrics=False)
    assert err.value.key == "serve.ood.reference"
    with pytest.raises(ConfigError, match="16-d"):
        OODMonitor.from_conf({"reference": npz}, encoder={"weights_hash": "w1", "dim": 16}, metrics=False)
    with pytest.raises(ConfigError, match="not the output of `medray embed`") as err:
        OODMonitor.from_conf({"reference": str(tmp_path / "nothing")}, metrics=False)
    assert err.value.key == "serve.ood.reference"
