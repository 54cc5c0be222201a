"""The pipeline's stage functions called directly (no Ray): read, decode, encode.

They are what Ray Data runs; here they run in-process on generated samples so
per-record failure handling is checked quickly.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from medray.encoders import build_tiny_checkpoint, get_spec, spec_to_dict
from medray.pipeline import EncoderActor, StageOptions, decode_batch, read_batch
from medray.platform.records import record_id
from medray.platform.sources import ARCHIVE_MEMBER_PENDING
from medray.testing.samples import generate_samples


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    info = generate_samples(str(root / "s"), n=8)
    ckpt = build_tiny_checkpoint("hf_image", str(root / "ckpt"), arch="vit", image_size=32)
    spec = get_spec("hf_image", checkpoint=ckpt)
    return root / "s", info, spec


def _table(rows):
    return pa.Table.from_pylist(rows)


def test_read_expands_archives_and_skips_done(setup):
    root, info, spec = setup
    files = [str(root / p) for p in info["dicom"][:3]]
    rows = [{"uri": u, "member": "", "label": i} for i, u in enumerate(files)]
    rows.append({"uri": str(root / "archive.zip"), "member": ARCHIVE_MEMBER_PENDING, "label": 9})
    opts = StageOptions(encoder_spec=spec, done=frozenset({record_id(files[0])}))
    out = read_batch(_table(rows), opts)
    uris = out.column("uri").to_pylist()
    assert files[0] not in uris and files[1] in uris
    members = [m for m in out.column("member").to_pylist() if m]
    assert set(info["archives"]["archive.zip"]["dicom_members"]) <= set(members)
    # carried column follows each expanded member
    labels = dict(zip(out.column("member").to_pylist(), out.column("label").to_pylist()))
    assert all(labels[m] == 9 for m in members)
    bad = [r for r in out.to_pylist() if r["status"] != "ok"]
    assert [r["member"] for r in bad] == ["../../etc/x"]


def test_decode_marks_bad_records_and_keeps_neighbours(setup):
    root, info, spec = setup
    rows = [
        {"uri": str(root / info["dicom"][0]), "member": ""},
        {"uri": str(root / info["hostile"]["bomb"]), "member": ""},
        {"uri": str(root / info["multiframe"][0]), "member": ""},
    ]
    opts = StageOptions(encoder_spec=spec, salt="s")
    out = decode_batch(read_batch(_table(rows), opts), opts).to_pylist()
    assert [r["status"] for r in out] == ["ok", "error", "ok"]
    assert out[1]["error_class"] == "LimitExceeded" and out[1]["stage"] == "decode"
    assert out[2]["frames"] == list(range(info["frames"][info["multiframe"][0]]))
    assert out[2]["pixel_shape"][0] == len(out[2]["frames"])
    assert "data" not in out[0]
    meta = json.loads(out[0]["metadata"])
    assert meta["modality"] in ("DX", "CR", "CT")


def test_encoder_isolates_a_poison_record(setup):
    root, info, spec = setup
    rows = [{"uri": str(root / p), "member": ""} for p in info["dicom"][:3]]
    opts = StageOptions(encoder_spec=spec)
    decoded = decode_batch(read_batch(_table(rows), opts), opts)
    # corrupt the second record's tensor: wrong channel count makes the model raise
    pv = decoded.column("pixel_values").to_pylist()
    shapes = decoded.column("pixel_shape").to_pylist()
    f, c, h, w = shapes[1]
    pv[1] = np.zeros((f, c + 2, h, w), np.float32).tobytes()
    shapes[1] = [f, c + 2, h, w]
    decoded = decoded.set_column(
        decoded.column_names.index("pixel_values"), "pixel_values", pa.array(pv, pa.large_binary())
    )
    decoded = decoded.set_column(
        decoded.column_names.index("pixel_shape"), "pixel_shape", pa.array(shapes, pa.list_(pa.int64()))
    )
    actor = EncoderActor(spec_to_dict(spec), device="cpu", batch_size=8, provenance={"encoder": "x"})
    out = actor(decoded).to_pylist()
    status = [(r["uri"], r["status"]) for r in out]
    assert [s for _, s in status] == ["ok", "error", "ok"]
    assert out[1]["stage"] == "encode" and out[1]["embedding"] is None
    assert len(out[0]["embedding"]) == 32 and out[0]["encoder"] == "x"
