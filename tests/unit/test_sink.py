"""Sink helpers: typed output tables, atomic parts, resume ids (no Ray)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from medray.pipeline.sink import embeddings_table, existing_record_ids, write_parquet_atomic
from medray.platform.errors import LimitExceeded
from medray.platform.records import embedding_schema, quarantine_fields, record_id


def _ok_rows(n: int, dim: int = 4) -> pa.Table:
    emb = pa.array([np.arange(dim, dtype=np.float32) + i for i in range(n)], type=pa.list_(pa.float32(), dim))
    cols = {
        "uri": [f"/d/{i}.dcm" for i in range(n)],
        "member": [""] * n,
        "label": list(range(n)),
        "record_id": [record_id(f"/d/{i}.dcm") for i in range(n)],
        "frame": [0] * n,
        "n_frames": [1] * n,
        "content_sha256": ["0" * 64] * n,
        "modality": ["CR"] * n,
        "patient_key": [None] * n,
        "metadata": ["{}"] * n,
        "status": ["ok"] * n,
        "t_encode": [0.1] * n,
        "encoder": ["e"] * n,
        "weights_hash": ["w"] * n,
        "preprocessing_hash": ["p"] * n,
        "medray_version": ["0"] * n,
        "untrained": [True] * n,
    }
    t = pa.table(cols)
    return t.append_column("embedding", emb)


def test_embeddings_table_types_and_carried_columns():
    out = embeddings_table(_ok_rows(3))
    assert out.schema.field("embedding").type == pa.list_(pa.float32(), 4)
    assert out.column_names[-1] == "label"  # carried columns come after the core ones
    assert "status" not in out.column_names and "t_encode" not in out.column_names
    assert out.schema.field("patient_key").type == pa.string()
    assert embedding_schema(4).names == out.column_names[:-1]


def test_atomic_parts_and_existing_ids(tmp_path):
    out = str(tmp_path / "emb")
    assert existing_record_ids(out, None) == frozenset()
    write_parquet_atomic(embeddings_table(_ok_rows(2)), out, "embeddings", None)
    files = os.listdir(tmp_path / "emb" / "embeddings")
    assert len(files) == 1 and files[0].startswith("part-") and files[0].endswith(".parquet")
    assert pq.read_table(tmp_path / "emb" / "embeddings" / files[0]).num_rows == 2
    # a leftover temp file from a killed writer is not a part and is ignored
    (tmp_path / "emb" / "embeddings" / ".part-x.parquet.tmp").write_bytes(b"partial")
    assert existing_record_ids(out, None) == {record_id("/d/0.dcm"), record_id("/d/1.dcm")}


def test_quarantine_fields_withhold_library_messages():
    q = quarantine_fields(ValueError("PatientName=DOE^JOHN"), "decode")
    assert "DOE" not in q["message"] and q["error_class"] == "ValueError" and q["stage"] == "decode"
    q = quarantine_fields(LimitExceeded("too many pixels"))
    assert q == {"status": "error", "stage": "decode", "error_class": "LimitExceeded", "message": "too many pixels"}
