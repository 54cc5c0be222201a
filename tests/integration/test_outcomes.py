"""Every input accounted for: pydicom's whole bundled test corpus through ``medray embed`` from S3.

Real Ray, real S3 (SeaweedFS), the console script as a user runs it. Each
input object must end in exactly one of ``embeddings/``, ``quarantine/`` or
``skipped/`` (with its reason), the closing line counts outcomes by reason,
``show=outcomes`` prints the table, and a rerun treats skipped records as done
unless their reason no longer applies.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydicom.data import get_testdata_files

from medray.encoders import build_tiny_checkpoint
from medray.platform.records import record_id
from medray.testing.samples import generate_samples

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MEDRAY = str(Path(sys.executable).parent / "medray")


@pytest.fixture(scope="module")
def corpus(s3, tmp_path_factory):
    """pydicom's bundled files (DICOM of every kind, dumps, JSON, text, ICC, gzip) plus a burned-in SC image."""
    root = tmp_path_factory.mktemp("outcomes")
    src = root / "in"
    src.mkdir()
    for k, path in enumerate(sorted(p for p in get_testdata_files() if Path(p).is_file())):
        shutil.copy(path, src / f"{k:03d}-{Path(path).name}")
    samples = root / "samples"
    generate_samples(str(samples))
    import pydicom

    first = sorted((samples / "dicom").rglob("*.dcm"))[0]
    ds = pydicom.dcmread(first)
    ds.BurnedInAnnotation = "YES"
    ds.save_as(src / "zzz-burned-in.dcm")
    fs = s3.filesystem()
    fs.put(str(src), f"{s3.bucket}/outcomes/", recursive=True)
    ckpt = build_tiny_checkpoint("hf_image", str(root / "ckpt"), arch="vit", image_size=32)
    home = root / "home"
    home.mkdir()
    names = sorted(p.name for p in src.iterdir())
    return {"fs": fs, "bucket": s3.bucket, "names": names, "ckpt": ckpt, "home": home, "root": root}


def _medray(corpus, *args: str) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        MEDRAY_HOME=str(corpus["home"]),
        MEDRAY_CACHE_DIR=str(corpus["home"] / "cache"),
        MEDRAY_PATIENT_SALT="test-salt",
        MEDRAY_PROGRESS="0",
    )
    return subprocess.run([MEDRAY, *args], env=env, capture_output=True, text=True, timeout=900)


def _args(corpus, out: str, *extra: str) -> list[str]:
    return [
        "embed",
        f"input=s3://{corpus['bucket']}/outcomes/in/",
        f"output={out}",
        "encoder=hf_image",
        f"encoder.checkpoint={corpus['ckpt']}",
        "decode.frames=first",
        "max_error_fraction=1.0",
        "tracking.enabled=false",
        "ray.num_cpus=2",
        *extra,
    ]


def _table(out: Path, sub: str) -> pa.Table:
    d = out / sub
    files = sorted(d.rglob("*.parquet")) if d.exists() else []
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive") if files else pa.table({})


@pytest.fixture(scope="module")
def first_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("outcomes-out") / "emb"
    proc = _medray(corpus, *_args(corpus, str(out)))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"out": out, "proc": proc}


def test_every_input_ends_in_exactly_one_place_with_its_reason(corpus, first_run):
    out = first_run["out"]
    expected = {record_id(f"s3://{corpus['bucket']}/outcomes/in/{n}"): n for n in corpus["names"]}
    places: dict[str, list[str]] = {}
    for sub in ("embeddings", "quarantine", "skipped"):
        t = _table(out, sub)
        for rid in set(t.column("record_id").to_pylist()) if t.num_rows else set():
            places.setdefault(rid, []).append(sub)
    missing = sorted(expected[r] for r in expected if r not in places)
    assert not missing, f"inputs that left no trace: {missing}"
    assert all(len(p) == 1 for p in places.values()), {r: p for r, p in places.items() if len(p) > 1}
    assert set(places) == set(expected)
    skipped = _table(out, "skipped").to_pylist()
    reasons = {r["reason"] for r in skipped}
    # non-image DICOM objects, documents with no text encoder, and the burned-in secondary capture
    assert {"NonImageObject", "NoEncoder", "BurnedInAnnotation"} <= reasons, reasons
    assert all(r["message"] and r["stage"] for r in skipped)
    burned = [r for r in skipped if r["uri"].endswith("zzz-burned-in.dcm")]
    assert burned and burned[0]["reason"] == "BurnedInAnnotation"
    q = _table(out, "quarantine").to_pylist()
    assert all(r["error_class"] and r["message"] and r["stage"] for r in q)
    summary = json.loads((out / "summary.json").read_text())
    assert sum(summary["skipped_by_reason"].values()) == summary["skipped"] == len(skipped)
    assert sum(summary["quarantined_by_class"].values()) == summary["quarantined"] == len(q)
    line = first_run["proc"].stdout
    assert "skipped (" in line and "NonImageObject" in line and "quarantined" in line


def test_show_outcomes_prints_the_table_of_an_existing_output(corpus, first_run):
    proc = _medray(corpus, "embed", f"output={first_run['out']}", "show=outcomes")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{len(corpus['names'])} records" in proc.stdout
    for word in ("embedded", "quarantined", "skipped", "NonImageObject", "BurnedInAnnotation"):
        assert word in proc.stdout
    assert "Traceback" not in proc.stderr
    bad = _medray(corpus, "embed", "output=/nonexistent/out", "show=outcomes")
    assert bad.returncode == 2 and "config key 'output'" in bad.stderr and "Traceback" not in bad.stderr


def test_rerun_counts_skips_as_done_until_their_reason_no_longer_applies(corpus, first_run):
    out = first_run["out"]
    again = _medray(corpus, *_args(corpus, str(out)))
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records_read"] == 0 and summary["skipped"] == 0
    # allowing burned-in pixels: only the records skipped for that reason are read again, and embedded
    allowed = _medray(corpus, *_args(corpus, str(out), "decode.allow_burned_in=true"))
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    burned = {r["record_id"] for r in _table(out, "skipped").to_pylist() if r["reason"] == "BurnedInAnnotation"}
    embedded = set(_table(out, "embeddings").column("record_id").to_pylist())
    quarantined = set(_table(out, "quarantine").column("record_id").to_pylist())
    # each now embedded, or quarantined where its pixels cannot be decoded (e.g. 32-bit RLE colour)
    assert burned and burned <= embedded | quarantined and len(burned & embedded) > len(burned) // 2
    assert summary["records_embedded"] + summary["quarantined"] + summary["skipped"] == len(burned)
    table = _medray(corpus, "embed", f"output={out}", "show=outcomes").stdout
    assert "BurnedInAnnotation" not in table  # now counted once, as embedded
