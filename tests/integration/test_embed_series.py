"""CT/MR series as volumes through ``medray embed``: real Ray, real S3 (SeaweedFS), the CLI in a subprocess.

Three series (a CT and an MR that are whole, a CT with a missing slice), one
instance claiming 10 000 slices and a photo are uploaded with shuffled file
names. Slicewise: each good series gives one row per slice plus a pooled row,
the broken ones one quarantine row each with the reason, the photo its usual
row; a rerun adds nothing. Volume: a torchvision r3d_18 (random weights)
embeds each good series once.
"""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pyarrow as pa
import pydicom
import pytest
from PIL import Image
from test_embed_cli import read_parts, run_medray  # same directory (pytest rootdir-relative import)

from medray.encoders import build_tiny_checkpoint
from medray.encoders.video import build_video_checkpoint
from medray.platform.decoders.series import series_key
from medray.testing.samples import claiming_series_instance, ct_phantom, ct_series

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SALT = "test-salt"  # run_medray's MEDRAY_PATIENT_SALT


@pytest.fixture(scope="module")
def series_corpus(s3, tmp_path_factory):
    root = tmp_path_factory.mktemp("series")
    fs = s3.filesystem()
    rng = random.Random(0)
    series = {
        "ct": ct_series(ct_phantom(16, 32, seed=1), seed=1, series="ct", patient_id="PHIID-SERIES-1"),
        "mr": ct_series(
            ct_phantom(12, 32, seed=2) + 1100,
            seed=2,
            series="mr",
            modality="MR",
            patient_id="PHIID-SERIES-2",
            orientation=(0, 1, 0, 0, 0, -1),
        ),
        "gap": ct_series(ct_phantom(16, 32, seed=3), seed=3, series="gap", patient_id="PHIID-SERIES-3"),
    }
    del series["gap"][6]
    uids, expected = {}, {}
    for name, files in series.items():
        first = pydicom.dcmread(io.BytesIO(files[0]), stop_before_pixels=True)
        uids[name] = str(first.SeriesInstanceUID)
        expected[name] = series_key(uids[name], SALT)
        names = [f"{rng.randrange(10**6):06d}.dcm" for _ in files]
        for fname, data in zip(names, files):
            fs.pipe(f"{s3.bucket}/series/in/{name}/{fname}", data)
    fs.pipe(f"{s3.bucket}/series/in/claims.dcm", claiming_series_instance(10_000))
    buf = io.BytesIO()
    Image.fromarray(np.full((24, 24, 3), 120, np.uint8)).save(buf, format="PNG")
    fs.pipe(f"{s3.bucket}/series/in/photo.png", buf.getvalue())
    home = root / "home"
    home.mkdir()
    return {
        "bucket": s3.bucket,
        "fs": fs,
        "home": home,
        "uids": uids,
        "keys": expected,
        "image": build_tiny_checkpoint("hf_image", str(root / "img"), arch="vit", image_size=32),
        "volume": build_video_checkpoint(str(root / "r3d"), arch="r3d_18"),
    }


def _args(c, out: str, *extra: str) -> list[str]:
    return [
        "embed",
        f"input=s3://{c['bucket']}/series/in/",
        f"output={out}",
        "ray.num_cpus=2",
        "tracking.enabled=false",
        "max_error_fraction=0.5",
        *extra,
    ]


def test_slicewise_series_rows_quarantine_and_rerun(series_corpus):
    c = series_corpus
    out = f"s3://{c['bucket']}/series/out/slicewise"
    proc = run_medray(
        c, *_args(c, out, "encoder=hf_image", f"encoder.checkpoint={c['image']}", "series.mode=slicewise")
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(c["fs"].cat(f"{c['bucket']}/series/out/slicewise/summary.json"))
    assert summary["records_embedded"] == 3 and summary["quarantined"] == 2  # 2 series + the photo

    emb = read_parts(c["fs"], out + "/embeddings").to_pylist()
    by_series: dict[str, list] = {}
    for r in emb:
        by_series.setdefault(r["series_key"], []).append(r)
    photo = by_series.pop(None)
    assert [(r["segment"], r["modality"]) for r in photo] == [("frame", "photo")]
    assert set(by_series) == {c["keys"]["ct"], c["keys"]["mr"]}
    # the sagittal MR (12 slices of 32x32) reaches the encoder on the patient axes: 32 axial slices of 32x12
    expected = {"ct": ([16, 32, 32], [2.5, 0.8, 0.8]), "mr": ([32, 32, 12], [0.8, 0.8, 2.5])}
    for name, depth, modality in (("ct", 16, "CT"), ("mr", 32, "MR")):
        rows = sorted(by_series[c["keys"][name]], key=lambda r: r["frame"])
        assert [r["frame"] for r in rows] == [-1, *range(depth)]
        assert [r["segment"] for r in rows] == ["pooled"] + ["slice"] * depth
        assert [(r["slice_start"], r["slice_end"]) for r in rows[1:]] == [(z, z) for z in range(depth)]
        assert (rows[0]["slice_start"], rows[0]["slice_end"]) == (0, depth - 1)
        assert {r["modality"] for r in rows} == {modality} and {r["n_frames"] for r in rows} == {depth}
        assert all(r["spacing_mm"] == expected[name][1] for r in rows)
        assert len({r["record_id"] for r in rows}) == 1 and all(r["patient_key"] for r in rows)
        np.testing.assert_allclose(rows[0]["embedding"], np.mean([r["embedding"] for r in rows[1:]], axis=0), atol=1e-4)
        meta = json.loads(rows[0]["metadata"])
        assert meta["series"]["shape"] == expected[name][0] and meta["series_mode"] == "slicewise"

    quarantine = read_parts(c["fs"], out + "/quarantine").to_pylist()
    reasons = sorted((q["error_class"], q["message"]) for q in quarantine)
    assert [r[0] for r in reasons] == ["LimitExceeded", "SeriesError"]
    assert reasons[0][1].startswith("series of 1 instance(s): series has 10000 slices, over series.max_slices")
    assert reasons[1][1].startswith("series of 15 instance(s): missing slice")
    # PHI: no SeriesInstanceUID or PatientID in any output file
    for sub in ("embeddings", "quarantine"):
        for p in c["fs"].find(f"{c['bucket']}/series/out/slicewise/{sub}"):
            blob = c["fs"].cat(p)
            assert b"PHIID-SERIES" not in blob and not any(u.encode() in blob for u in c["uids"].values())

    again = run_medray(
        c, *_args(c, out, "encoder=hf_image", f"encoder.checkpoint={c['image']}", "series.mode=slicewise")
    )
    assert again.returncode == 0, again.stderr[-4000:]
    assert "0 records embedded (0 rows), 0 quarantined" in again.stdout and "5 already done" in again.stdout
    assert read_parts(c["fs"], out + "/embeddings").num_rows == len(emb)


def test_volume_series_through_a_3d_encoder(series_corpus):
    c = series_corpus
    out = f"s3://{c['bucket']}/series/out/volume"
    proc = run_medray(
        c,
        *_args(
            c,
            out,
            "encoder=torchvision_video",
            f"encoder.checkpoint={c['volume']}",
            "series.mode=volume",
            "series.spacing=[5.0,1.6,1.6]",
        ),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "1 skipped (NoEncoder 1)" in proc.stdout  # the photo
    emb = read_parts(c["fs"], out + "/embeddings")
    assert emb.schema.field("embedding").type == pa.list_(pa.float32(), 512)
    rows = {r["series_key"]: r for r in emb.to_pylist()}
    assert set(rows) == {c["keys"]["ct"], c["keys"]["mr"]} and emb.num_rows == 2
    ct = rows[c["keys"]["ct"]]
    assert (ct["segment"], ct["frame"], ct["n_frames"], ct["slice_start"], ct["slice_end"]) == ("volume", 0, 16, 0, 15)
    assert ct["spacing_mm"] == [5.0, 1.6, 1.6] and ct["encoder"] == "torchvision_video"
    assert json.loads(ct["metadata"])["series"]["shape"] == [8, 16, 16]
    assert read_parts(c["fs"], out + "/quarantine").num_rows == 2
