"""A mixed archive (DICOMs, WAVs, reports, a DICOM SR, a lying WAV) through ``medray embed``.

Real Ray, real S3 (SeaweedFS), the console script in a subprocess. The first
run has image and audio encoders: text records are skipped and counted, the
hostile WAV is quarantined. The second run adds a text encoder on the same
output: only the skipped reports are embedded, nothing else is redone.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pydicom
import pytest
from test_embed_cli import read_parts, run_medray  # same directory (pytest rootdir-relative import)

from medray.encoders import build_tiny_checkpoint
from medray.testing.media import REPORT, encode, lying_wav, sr_dataset, tone

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def mixed(s3, tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    fs = s3.filesystem()
    ct = (Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm").read_bytes()
    members = {
        "study/ct.dcm": ct,
        "audio/cough_8k.wav": encode(tone(8000, 3.0), 8000),
        "audio/breath_44k.flac": encode(tone(44100, 1.5, channels=2), 44100, "FLAC"),
        "audio/ten_hours.wav": lying_wav(36000),
        "reports/r1.txt": REPORT.encode(),
        "reports/sr.dcm": sr_dataset("small left pleural effusion"),
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    fs.pipe(f"{s3.bucket}/mixed/archive.zip", buf.getvalue())
    ckpts = {}
    for family, arch in (("hf_image", "vit"), ("hf_audio", "wav2vec2"), ("hf_text", "bert")):
        local = build_tiny_checkpoint(family, str(root / family), arch=arch, image_size=32)
        fs.put(local, f"{s3.bucket}/models/mixed-{family}", recursive=True)
        ckpts[family] = f"s3://{s3.bucket}/models/mixed-{family}"
    home = root / "home"
    home.mkdir()
    return {"bucket": s3.bucket, "fs": fs, "ckpt": ckpts, "home": home}


def test_mixed_archive_routes_by_content_skips_then_resumes(mixed):
    fs, bucket, ck = mixed["fs"], mixed["bucket"], mixed["ckpt"]
    out = f"s3://{bucket}/out/mixed"
    base = [
        "embed",
        f"input=s3://{bucket}/mixed/archive.zip",
        f"output={out}",
        "encoder=hf_image",
        f"encoder.checkpoint={ck['hf_image']}",
        f"encoders.audio={{family:hf_audio,checkpoint:'{ck['hf_audio']}'}}",
        "ray.num_cpus=2",
        "tracking.mode=offline",
        "max_error_fraction=0.5",
    ]
    proc = run_medray(mixed, *base)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 skipped (NoEncoder 2)" in proc.stdout
    summary = json.loads(fs.cat(f"{bucket}/out/mixed/summary.json"))
    assert summary["skipped"] == 2 and summary["skipped_by_modality"] == {"text": 2}
    assert summary["quarantined"] == 1 and summary["records_embedded"] == 3

    images = read_parts(fs, out + "/embeddings").to_pylist()
    assert [(r["member"], r["segment"]) for r in images] == [("study/ct.dcm", "frame")]
    audio = read_parts(fs, out + "/embeddings/audio").to_pylist()
    segs = sorted((r["member"], r["segment"], r["start_s"], r["end_s"], r["frame"]) for r in audio)
    assert segs == [
        ("audio/breath_44k.flac", "pooled", 0.0, 1.5, -1),
        ("audio/breath_44k.flac", "window", 0.0, 1.5, 0),
        ("audio/cough_8k.wav", "pooled", 0.0, 3.0, -1),
        ("audio/cough_8k.wav", "window", 0.0, 2.0, 0),
        ("audio/cough_8k.wav", "window", 2.0, 3.0, 1),
    ]
    assert {r["encoder"] for r in audio} == {"hf_audio"} and all(len(r["embedding"]) == 32 for r in audio)
    quarantine = read_parts(fs, out + "/quarantine").to_pylist()
    assert [(q["member"], q["error_class"]) for q in quarantine] == [("audio/ten_hours.wav", "LimitExceeded")]

    # same output, a text encoder added: only the two reports are new
    proc = run_medray(mixed, *base, f"encoders.text={{family:hf_text,checkpoint:'{ck['hf_text']}'}}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    fs.invalidate_cache()  # s3fs caches listings of the first run's output
    summary = json.loads(fs.cat(f"{bucket}/out/mixed/summary.json"))
    assert summary["records_done_before"] == 4 and summary["records_embedded"] == 2 and summary["skipped"] == 0
    text = read_parts(fs, out + "/embeddings/text").to_pylist()
    by = {}
    for r in text:
        by.setdefault(r["member"], []).append(r)
    assert set(by) == {"reports/r1.txt", "reports/sr.dcm"}
    assert by["reports/sr.dcm"][0]["modality"] == "SR" and by["reports/sr.dcm"][0]["patient_key"]
    chunks = [r for r in by["reports/r1.txt"] if r["segment"] == "chunk"]
    assert len(chunks) > 2 and chunks[0]["token_start"] == 0
    assert [r["segment"] for r in by["reports/r1.txt"]].count("pooled") == 1
    assert len(read_parts(fs, out + "/embeddings/audio")) == len(audio)  # nothing redone
    # the report text is nowhere in what was written
    for path in fs.find(f"{bucket}/out/mixed"):
        blob = fs.cat(path)
        assert b"pleural effusion" not in blob and b"Impression" not in blob and b"DOE^JANE" not in blob
