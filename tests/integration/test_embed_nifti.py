"""NIfTI volumes through ``medray embed`` and ``medray finetune``: real Ray, real S3 (SeaweedFS), the CLI.

One CT phantom is written twice: as a DICOM series (shuffled file names) and as
a NIfTI file (gzipped, voxel columns stored in reverse with the affine saying
so), and a third time, uncompressed, inside a zip archive. Whichever file it
came in, the volume gets the same embeddings (slicewise through a 2D encoder
and whole through a 3D encoder). A manifest of labelled NIfTI volumes then
trains a head on their pooled embeddings.
"""

from __future__ import annotations

import io
import json
import random
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_embed_cli import read_parts, run_medray  # same directory (pytest rootdir-relative import)

from medray.encoders import build_tiny_checkpoint
from medray.encoders.video import build_video_checkpoint
from medray.testing.samples import ct_nifti, ct_phantom, ct_series

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def nifti_corpus(s3, tmp_path_factory):
    root = tmp_path_factory.mktemp("nifti")
    fs = s3.filesystem()
    phantom = ct_phantom(12, 32, seed=7)
    rng = random.Random(0)
    for data in ct_series(phantom, seed=7, series="nifti-twin", patient_id="PHIID-NIFTI-1"):
        fs.pipe(f"{s3.bucket}/nifti/in/series/{rng.randrange(10**6):06d}.dcm", data)
    fs.pipe(f"{s3.bucket}/nifti/in/ct.nii.gz", ct_nifti(phantom, flip_columns=True, compress=True))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("inside/ct.nii", ct_nifti(phantom))
    fs.pipe(f"{s3.bucket}/nifti/in/bundle.zip", buf.getvalue())
    home = root / "home"
    home.mkdir()
    return {
        "bucket": s3.bucket,
        "fs": fs,
        "home": home,
        "root": root,
        "image": build_tiny_checkpoint("hf_image", str(root / "img"), arch="vit", image_size=32),
        "volume": build_video_checkpoint(str(root / "r3d"), arch="r3d_18"),
    }


def _embed(c, name: str, *extra: str) -> list[dict]:
    out = f"s3://{c['bucket']}/nifti/out/{name}"
    args = ["embed", f"input=s3://{c['bucket']}/nifti/in/", f"output={out}", "ray.num_cpus=2", "tracking.enabled=false"]
    proc = run_medray(c, *args, *extra)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(c["fs"].cat(f"{c['bucket']}/nifti/out/{name}/summary.json"))
    assert summary["records_embedded"] == 3 and summary["quarantined"] == 0, summary
    return read_parts(c["fs"], out + "/embeddings").to_pylist()


def _by_source(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        key = "zip" if r["member"] else ("nifti" if r["uri"].endswith(".nii.gz") else "series")
        groups.setdefault(key, []).append(r)
    return {k: sorted(v, key=lambda r: r["frame"]) for k, v in groups.items()}


def test_one_array_as_dicom_series_and_as_nifti_embeds_the_same_slicewise(nifti_corpus):
    c = nifti_corpus
    rows = _by_source(
        _embed(c, "slicewise", "encoder=hf_image", f"encoder.checkpoint={c['image']}", "series.mode=slicewise")
    )
    assert set(rows) == {"series", "nifti", "zip"}
    for source in ("nifti", "zip"):
        got, want = rows[source], rows["series"]
        assert [r["frame"] for r in got] == [-1, *range(12)] == [r["frame"] for r in want]
        assert [r["segment"] for r in got] == ["pooled"] + ["slice"] * 12
        assert [(r["slice_start"], r["slice_end"]) for r in got] == [(r["slice_start"], r["slice_end"]) for r in want]
        diff = np.abs(np.asarray([r["embedding"] for r in got]) - np.asarray([r["embedding"] for r in want])).max()
        assert diff <= 1e-5, diff
        assert all(r["spacing_mm"] == [2.5, 0.8, 0.8] for r in got)
        assert {r["modality"] for r in got} == {"CT"} and all(r["patient_key"] is None for r in got)
        meta = json.loads(got[0]["metadata"])
        assert meta["series"]["shape"] == [12, 32, 32] and meta["source_format"] == "nifti1"
    assert rows["zip"][0]["member"] == "inside/ct.nii"


def test_one_array_as_dicom_series_and_as_nifti_embeds_the_same_as_a_volume(nifti_corpus):
    c = nifti_corpus
    rows = _by_source(_embed(c, "volume", "encoder=torchvision_video", f"encoder.checkpoint={c['volume']}"))
    for source in ("nifti", "zip"):
        (got,), (want,) = rows[source], rows["series"]
        assert (got["segment"], got["slice_start"], got["slice_end"]) == ("volume", 0, 11)
        diff = np.abs(np.asarray(got["embedding"]) - np.asarray(want["embedding"])).max()
        assert diff <= 1e-5, diff


def test_a_manifest_of_labelled_nifti_volumes_trains_a_head_on_their_pooled_embeddings(nifti_corpus, tmp_path):
    c = nifti_corpus
    data = tmp_path / "volumes"
    data.mkdir()
    rows = []
    for k in range(24):
        label = k % 2
        phantom = ct_phantom(6, 32, seed=100 + k) + (400.0 if label else 0.0)  # positives are brighter
        (data / f"v{k:02d}.nii.gz").write_bytes(ct_nifti(phantom, compress=True))
        rows.append({"uri": str(data / f"v{k:02d}.nii.gz"), "dense": label, "patient": f"p{k:02d}"})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "labels.parquet")
    out = tmp_path / "run"
    proc = run_medray(
        c,
        "finetune",
        f"data.train={tmp_path / 'labels.parquet'}",
        "data.group_by=patient",
        "encoder=hf_image",
        f"encoder.checkpoint={c['image']}",
        "task=binary",
        "task.labels=[dense]",
        "train=linear_probe",
        "train.epochs=10",
        "train.batch_size=8",
        "train.lr=3e-2",
        "scaling.num_workers=1",
        "tracking.mode=offline",
        f"output={out}",
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["features"] == "embeddings" and summary["quarantined"] == 0
    splits = summary["splits"]
    assert splits["train"]["usable"] + splits["val"]["usable"] == 24  # one example per volume, not per slice
    preds = pq.read_table(out / "predictions" / "val.parquet").to_pylist()
    assert len(preds) == splits["val"]["usable"] and all(r["frame"] == -1 for r in preds)
