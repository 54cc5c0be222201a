"""Reports as a person sees them: headless Chromium (Debian's package) opens each kind of report.

A real ``medray embed`` run (tiny checkpoint, a few generated files, output on
the S3 server) writes its report through the storage layer; the evaluation and
probe reports are written from sample documents shaped as the jobs write them.
Each page is downloaded from S3 and opened from ``file://``, the way someone
opens a report they fetched from a bucket. The browser is driven over the
DevTools pipe (see :mod:`medray.testing.browser`): its own network log must
hold the page and nothing else, and every figure must have drawn its data
(marked groups with a non-empty box, and coloured pixels in its screenshot
region).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medray.encoders import build_tiny_checkpoint
from medray.platform.report import REPORT_FILE, evaluation_report, probe_report
from medray.testing.browser import PageVisit, chromium_path, open_page
from medray.testing.reports import sample_evaluation, sample_probe
from medray.testing.samples import generate_samples

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(chromium_path() is None, reason="needs Debian's chromium: `make system-deps`"),
]

MEDRAY = str(Path(sys.executable).parent / "medray")
_WEB_REF = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", re.I)


def _download(s3, uri: str, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    s3.filesystem().get(uri.split("://", 1)[1], str(dest))
    return dest


def _coloured_pixels(png: bytes, box: dict, scale: float) -> int:
    """Coloured pixels in the box (data is drawn in colour; axes and text are grey)."""
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    x0, y0 = int(box["x"] * scale), int(box["y"] * scale)
    x1, y1 = int((box["x"] + box["width"]) * scale), int((box["y"] + box["height"]) * scale)
    region = img[y0:y1, x0:x1]
    if region.size == 0:
        return 0
    chroma = region.max(axis=2) - region.min(axis=2)
    return int((chroma > 40).sum())


def check_page(page: Path, expected: list[str], shots: Path) -> PageVisit:
    """Open ``page`` in Chromium; every expected figure drew its data and nothing was requested but the page."""
    html = page.read_text(encoding="utf-8")
    assert not _WEB_REF.findall(html), "the page references the web"
    visit = open_page(page.resolve().as_uri())
    shots.mkdir(parents=True, exist_ok=True)
    (shots / f"{page.parent.parent.name}.png").write_bytes(visit.screenshot)  # kept for a person to look at
    # (b) no request left the page: the browser's own log holds the page itself and nothing else
    assert visit.requests == [page.resolve().as_uri()], visit.requests
    assert not visit.failed
    # (a) every plot rendered
    assert [f["name"] for f in visit.figures] == expected
    for fig in visit.figures:
        assert fig["svg"] and fig["svg"]["width"] > 100 and fig["svg"]["height"] > 100, fig
        assert fig["drawn"] > 20, fig
        assert fig["data"] >= 1, f"{fig['name']}: nothing drawn from data"
        assert _coloured_pixels(visit.screenshot, fig["svg"], visit.scale) > 150, f"{fig['name']}: blank"
    return visit


def test_the_network_check_sees_a_request(tmp_path: Path):
    """The check is honest: a page that asks the web for an image shows that request in the log."""
    page = tmp_path / "leak.html"
    page.write_text('<!DOCTYPE html><html><body><img src="https://example.org/pixel.png"></body></html>')
    visit = open_page(page.as_uri())
    assert "https://example.org/pixel.png" in visit.requests
    assert "https://example.org/pixel.png" in visit.failed  # host names resolve to nothing


@pytest.fixture(scope="module")
def embed_output(s3, tmp_path_factory):
    """A real `medray embed` run: a few generated files, a tiny checkpoint, output on S3."""
    root = tmp_path_factory.mktemp("report-embed")
    samples = root / "samples"
    generate_samples(str(samples), n=4)
    for name in ("samples.json", "manifest.csv", "manifest.parquet"):  # descriptions, not inputs (as the demo)
        if (samples / name).exists():
            (samples / name).unlink()
    ckpt = build_tiny_checkpoint("hf_image", str(root / "ckpt"), arch="dinov2", image_size=32)
    out = f"s3://{s3.bucket}/report/embed"
    env = dict(os.environ)
    env.update({"MEDRAY_HOME": str(root / "home"), "MEDRAY_PROGRESS": "0", "MEDRAY_PATIENT_SALT": "test-salt"})
    proc = subprocess.run(
        [
            MEDRAY,
            "embed",
            f"input={samples}",
            f"output={out}",
            "encoder=hf_image",
            f"encoder.checkpoint={ckpt}",
            "ray.num_cpus=2",
            "tracking.enabled=false",
            "max_error_fraction=0.9",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"out": out, "root": root, "proc": proc}


def test_embed_report_renders_from_an_s3_download(s3, embed_output, tmp_path: Path):
    out = embed_output["out"]
    assert f"report {out}/{REPORT_FILE}" in embed_output["proc"].stdout
    summary = json.loads(s3.filesystem().cat(f"{out.split('://', 1)[1]}/summary.json"))
    assert summary["report"] == f"{out}/{REPORT_FILE}"
    assert summary["timeline"] and sum(n for _t, n in summary["timeline"]) == summary["records_read"]
    print(f"embed run: wall {summary['wall_s']:.1f}s, driver phases {summary['driver_seconds']}")
    page = _download(s3, summary["report"], tmp_path / "embed" / "report" / "index.html")
    check_page(page, ["outcomes", "throughput", "projection-hf_image"], tmp_path / "shots")
    html = page.read_text(encoding="utf-8")
    assert "quarantined: " in html or summary["quarantined"] == 0
    for sentinel in ("SENTINEL", "PHIID", "PHI-HOSPITAL", "PHIACC", "19700101"):  # planted by generate_samples
        assert sentinel not in html


def test_evaluation_and_probe_reports_render(s3, tmp_path: Path):
    ev = evaluation_report(sample_evaluation())
    uri = ev.write(f"s3://{s3.bucket}/report/evaluate", s3.storage_options())
    page = _download(s3, uri, tmp_path / "evaluate" / "report" / "index.html")
    check_page(page, ["roc", "reliability", "forest-effusion", "forest-cardiomegaly", "history"], tmp_path / "shots")

    pr = probe_report([sample_probe("rad_dino", quality=0.85), sample_probe("dinov2", quality=0.72)])
    local = tmp_path / "probe"
    pr.write(str(local))
    check_page(local / "report" / "index.html", ["efficiency"], tmp_path / "shots")
    keep = os.environ.get("MEDRAY_REPORT_SHOTS")  # set to a directory to keep the screenshots
    if keep:
        shutil.copytree(tmp_path / "shots", keep, dirs_exist_ok=True)
