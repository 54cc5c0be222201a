"""``medray index`` on a hand-written embed output: the index beside it, near-duplicates, the report."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medray.jobs.index import DuplicatesConf, IndexConf, run_index
from medray.platform.errors import ConfigError
from medray.platform.records import embedding_schema, record_id
from medray.platform.vectorindex import load_index


def _embed_output(root, n: int = 40, dim: int = 16) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, dim)).astype("f4")
    x[n - 1] = x[3]  # the same image sent twice
    (root / "embeddings").mkdir(parents=True)
    (root / "_medray.json").write_text(json.dumps({"encoder": "tiny", "weights_hash": "w" * 64}))
    schema = embedding_schema(dim, pa.schema([("site", pa.string())]))
    rows = []
    for i in range(n):
        uri = f"/data/{i}.dcm"
        frames = [0, 1] if i == 5 else [0]  # a 2-frame record: its mean, frame -1
        for f in frames:
            rows.append(
                {
                    "record_id": record_id(uri),
                    "uri": uri,
                    "member": "",
                    "frame": f,
                    "n_frames": len(frames),
                    "content_sha256": "same" if i in (3, n - 1) else f"h{i}",
                    "modality": "CT" if i % 2 else "DX",
                    "metadata": json.dumps({"study_year": 2020 + i % 3, "body_part": "CHEST"}),
                    "embedding": x[i].tolist(),
                    "encoder": "tiny",
                    "weights_hash": "w" * 64,
                    "series_key": f"s{i // 4}",
                    "site": "north" if i < 20 else "south",
                }
            )
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, root / "embeddings" / "part-0.parquet")
    return x


def test_index_job_writes_index_duplicates_and_report(tmp_path):
    x = _embed_output(tmp_path / "emb")
    doc = run_index(IndexConf(embeddings=str(tmp_path / "emb")))
    out = tmp_path / "emb" / "index"
    assert doc["output"] == str(out) and doc["manifest"]["count"] == 40
    idx = load_index(str(out), weights_hash="w" * 64)
    hit = idx.search(x[7], k=1, filters={"site": "north", "year": 2021})[0]
    assert hit["uri"] == "/data/7.dcm" and hit["series"] == "s1" and hit["year"] == 2021 and hit["frame"] == 0
    assert idx.search(x[5], k=1)[0]["frame"] == -1  # two frames: the record's mean
    with open(out / "near_duplicates.csv") as f:
        pairs = list(csv.DictReader(f))
    assert [(p["a_uri"], p["b_uri"], p["same_bytes"]) for p in pairs] == [("/data/3.dcm", "/data/39.dcm", "True")]
    html = (out / "report" / "index.html").read_text()
    assert "Near-duplicate" in html and "/data/" not in html  # record ids only, no URIs
    assert json.loads((out / "index.json").read_text())["duplicates"]["pairs"] == 1


def test_index_job_refuses_bad_settings_and_missing_embeddings(tmp_path):
    with pytest.raises(ConfigError, match="duplicates.threshold"):
        run_index(IndexConf(embeddings=str(tmp_path), duplicates=DuplicatesConf(threshold=1.5)))
    with pytest.raises(ConfigError, match="not the output of `medray embed`"):
        run_index(IndexConf(embeddings=str(tmp_path)))


def test_index_job_reads_and_writes_object_storage(tmp_path):
    # memory:// is fsspec's in-process object store: the same code path as s3:// (no local paths)
    import fsspec

    x = _embed_output(tmp_path / "emb")
    fs = fsspec.filesystem("memory")
    fs.put(str(tmp_path / "emb"), "/bucket/emb", recursive=True)
    doc = run_index(IndexConf(embeddings="memory://bucket/emb"))
    assert doc["output"] == "memory://bucket/emb/index" and fs.exists("/bucket/emb/index/manifest.json")
    idx = load_index("memory://bucket/emb/index", cache_dir=str(tmp_path / "cache"), weights_hash="w" * 64)
    assert idx.search(x[11], k=1)[0]["uri"] == "/data/11.dcm"
    assert fs.exists("/bucket/emb/index/near_duplicates.csv") and fs.exists("/bucket/emb/index/report/index.html")
