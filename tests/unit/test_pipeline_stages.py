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


def test_a_fused_actor_reads_decodes_embeds_and_writes_its_own_parts(setup, tmp_path):
    """The CPU plan's actor, called directly: the same rows as the stages, written by itself."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from medray.pipeline.fused import STATS_COLUMN, FusedEmbedder

    root, info, spec = setup
    rows = [{"uri": str(root / p), "member": "", "label": i} for i, p in enumerate(info["dicom"][:3])]
    rows.append({"uri": str(root / info["hostile"]["bomb"]), "member": "", "label": 7})
    opts = StageOptions(encoder_spec=spec, salt="s")
    kwargs = {"spec": spec_to_dict(spec), "device": "cpu", "batch_size": 4, "provenance": {"encoder": "tiny"}}
    fused = FusedEmbedder(opts, str(tmp_path / "out"), {}, "test", {}, threads=1, actor_kwargs=kwargs)
    stats = json.loads(fused(_table(rows)).column(STATS_COLUMN)[0].as_py())
    assert (stats["records"], stats["quarantined"]) == (3, 1)
    written = pq.read_table(tmp_path / "out" / "embeddings")
    staged = EncoderActor(**kwargs)(decode_batch(read_batch(_table(rows), opts), opts))
    ok = staged.filter(pc.equal(staged.column("status"), "ok"))
    assert sorted(written.column("record_id").to_pylist()) == sorted(ok.column("record_id").to_pylist())
    assert sorted(written.column("label").to_pylist()) == [0, 1, 2]  # manifest columns ride along
    by_id = dict(zip(ok.column("record_id").to_pylist(), ok.column("embedding").to_pylist()))
    for rid, emb in zip(written.column("record_id").to_pylist(), written.column("embedding").to_pylist()):
        np.testing.assert_allclose(emb, by_id[rid], atol=1e-6)
    assert pq.read_table(tmp_path / "out" / "quarantine").column("error_class").to_pylist() == ["LimitExceeded"]


def test_batched_preprocessing_isolates_the_record_it_fails_on():
    """Frames of a batch go through one preprocessing call; a failure falls back record by record."""
    from medray.pipeline.stages import _preprocess_frames

    class Pre:
        calls = 0

        def preprocess(self, images):
            Pre.calls += 1
            if any(img.shape[0] == 3 for img in images):
                raise ValueError("bad size")
            return np.stack([np.full((3, 2, 2), img.mean(), np.float32) for img in images])

    good = [np.full((4, 4, 3), 10, np.uint8)]
    two = [np.full((4, 4, 3), 20, np.uint8), np.full((4, 4, 3), 30, np.uint8)]
    bad = [np.zeros((3, 4, 3), np.uint8)]
    cols = ("pixel_values", "pixel_shape", "pixel_dtype", "t_preprocess", "status", "stage", "error_class", "message")
    new = {c: [None] * 3 for c in cols}
    _preprocess_frames([(0, good), (1, bad), (2, two)], Pre(), new)
    assert new["pixel_shape"] == [[1, 3, 2, 2], None, [2, 3, 2, 2]]
    assert (new["status"][1], new["stage"][1], new["error_class"][1]) == ("error", "preprocess", "RecordError")
    assert np.frombuffer(new["pixel_values"][2], np.float32).reshape(2, 3, 2, 2)[1].max() == 30
    new = {c: [None] * 2 for c in cols}
    Pre.calls = 0
    _preprocess_frames([(0, good), (1, two)], Pre(), new)
    assert Pre.calls == 1 and new["pixel_shape"] == [[1, 3, 2, 2], [2, 3, 2, 2]]
