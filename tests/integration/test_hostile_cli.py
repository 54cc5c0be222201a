"""One folder of good and hostile inputs of every modality through ``medray embed``.

Real Ray, the console script in a subprocess, local input and output. Good
inputs (a photo, a WAV, a report, a whole slide, an archive member) sit
beside one of each hostile kind from :mod:`medray.testing.hostile`: the job
exits 0, the good ones are embedded and every hostile one is one quarantine
or skip row with its reason; the driver's memory stays bounded. (Hostile CT
series go through the same series stages in ``tests/unit/test_hostile_inputs.py``:
``series.mode`` adds a pipeline branch this test leaves out to stay cheap.)
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from medray.encoders import build_tiny_checkpoint
from medray.platform.records import record_id
from medray.testing import hostile
from medray.testing.media import REPORT, encode, slide_tiff, tone

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MEDRAY = str(Path(sys.executable).parent / "medray")


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            if name == "link":
                info = zipfile.ZipInfo("link")
                info.external_attr = 0o120777 << 16
                zf.writestr(info, "/etc/passwd")
            else:
                zf.writestr(name, data)
    out = bytearray(buf.getvalue())
    for sig, flag_at, name_len_at, name_at in ((b"PK\x03\x04", 6, 26, 30), (b"PK\x01\x02", 8, 28, 46)):
        pos = out.find(sig)
        while pos >= 0:  # mark secret.dcm encrypted (zipfile cannot write encrypted members)
            n = int.from_bytes(out[pos + name_len_at : pos + name_len_at + 2], "little")
            if bytes(out[pos + name_at : pos + name_at + n]) == b"secret.dcm":
                out[pos + flag_at] |= 0x1
            pos = out.find(sig, pos + 4)
    return bytes(out)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    src = root / "in"
    src.mkdir()
    photo = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(photo, "PNG")
    files: dict[str, bytes] = {
        # good
        "good/photo.png": photo.getvalue(),
        "good/cough.wav": encode(tone(16000, 1.0), 16000),
        "good/report.txt": REPORT.encode(),
        "good/slide.svs": slide_tiff(size=512, levels=3),
        # hostile: slides, text, audio, archives
        **{f"slides/{name}": make() for name, make in hostile.HOSTILE_SLIDES.items()},
        "text/invalid_utf8.txt": b"Findings: \xff\xfe\xfa not utf-8 \xc3\x28",
        "text/million_tokens.txt": hostile.many_tokens_text(10**6),
        **{f"audio/{name}": make() for name, make in hostile.HOSTILE_AUDIO.items()},
        "archives/many.zip": hostile.zip_many_members(100_000),
        "archives/mixed.zip": _zip(
            {
                "ok.txt": REPORT.encode(),
                "link": b"",
                "secret.dcm": b"not really encrypted",
                "bomb.zip": hostile.zip_lying_member(inflated=32 << 20, claimed=10),
            }
        ),
    }
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    hostile.sparse_text_line(src / "text" / "line_500mb.txt", size=500 << 20)
    ckpts = {
        family: build_tiny_checkpoint(family, str(root / family), arch=arch, image_size=32)
        for family, arch in (("hf_image", "vit"), ("hf_audio", "wav2vec2"), ("hf_text", "bert"))
    }
    home = root / "home"
    home.mkdir()
    return {"src": src, "out": root / "out", "ckpt": ckpts, "home": home}


def _table(out: Path, sub: str) -> pa.Table:
    d = out / sub
    files = sorted(d.rglob("*.parquet")) if d.exists() else []
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive") if files else pa.table({})


def test_a_mixed_folder_of_good_and_hostile_inputs(folder):
    src, out, ck = folder["src"], folder["out"], folder["ckpt"]
    env = dict(
        os.environ,
        MEDRAY_HOME=str(folder["home"]),
        MEDRAY_CACHE_DIR=str(folder["home"] / "cache"),
        MEDRAY_PATIENT_SALT="test-salt",
        MEDRAY_PROGRESS="0",
    )
    args = [
        "embed",
        f"input={src}",
        f"output={out}",
        "encoder=hf_image",
        f"encoder.checkpoint={ck['hf_image']}",
        f"encoders.audio={{family:hf_audio,checkpoint:'{ck['hf_audio']}'}}",
        f"encoders.text={{family:hf_text,checkpoint:'{ck['hf_text']}'}}",
        "slide.tile_size=64",
        "max_error_fraction=1.0",
        "tracking.enabled=false",
        "ray.num_cpus=2",
    ]
    proc = subprocess.run([MEDRAY, *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    def rid(name: str, member: str = "") -> str:
        return record_id(str(src / name), member)

    quarantine = {r["record_id"]: r for r in _table(out, "quarantine").to_pylist()}
    skipped = {r["record_id"]: r for r in _table(out, "skipped").to_pylist()}
    embedded = _table(out, "embeddings")
    emb_ids = set(embedded.column("record_id").to_pylist()) if embedded.num_rows else set()
    for sub in ("audio", "text"):
        t = _table(out, f"embeddings/{sub}")
        emb_ids |= set(t.column("record_id").to_pylist()) if t.num_rows else set()

    # good inputs: embedded (the slide as its pooled row, the series as one record)
    for name in ("good/photo.png", "good/cough.wav", "good/report.txt", "good/slide.svs"):
        assert rid(name) in emb_ids, name
    assert rid("archives/mixed.zip", "ok.txt") in emb_ids

    expected = {
        rid("slides/huge_level.svs"): ("LimitExceeded", "slide.max_pixels"),
        rid("slides/ifd_loop.svs"): ("DecodeError", "IFD chain loops back"),
        rid("slides/tiles_past_end.svs"): ("DecodeError", "past the end of the file"),
        rid("slides/zero_byte_tiles.svs"): ("DecodeError", "empty (0 bytes)"),
        rid("text/line_500mb.txt"): ("LimitExceeded", "refused unread"),
        rid("text/invalid_utf8.txt"): ("UnsupportedFormat", ""),
        rid("text/million_tokens.txt"): ("LimitExceeded", "text.max_chunks"),
        rid("audio/frames_1e12.wav"): ("LimitExceeded", ""),
        rid("audio/zero_channels.wav"): ("DecodeError", ""),
        rid("audio/8ch_768khz.wav"): ("LimitExceeded", ""),
        rid("audio/truncated.flac"): ("", ""),
        rid("audio/lying_data_chunk.wav"): ("DecodeError", ""),
        rid("archives/many.zip"): ("LimitExceeded", "100000 members"),
        rid("archives/mixed.zip", "secret.dcm"): ("ReadError", "encrypted"),
        rid("archives/mixed.zip", "bomb.zip"): ("", ""),
    }
    for key, (cls, words) in expected.items():
        assert key in quarantine, (key, cls, words)
        row = quarantine[key]
        assert row["message"] and row["stage"] and words in row["message"], row
        assert not cls or row["error_class"] == cls, row
    assert skipped[rid("archives/mixed.zip", "link")]["reason"] == "ArchiveLink"
    assert len(quarantine) == len(expected)  # nothing else failed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quarantined"] == len(quarantine) and summary["driver_peak_rss_mb"] < 2048
    assert "quarantined" in proc.stdout and "LimitExceeded" in proc.stdout
