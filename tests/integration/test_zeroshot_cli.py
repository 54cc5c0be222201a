"""``medray embed`` with an image-text encoder, then ``medray zeroshot`` on its output: CLI, real Ray, real S3.

A tiny random SigLIP checkpoint, twelve generated images and two reports: the
embed run writes image and text embeddings into one output on S3; the
zero-shot run scores the images against three classes written as text, with
a labelled manifest, and writes predictions, ``evaluation.json`` and a report.
Random weights carry no skill, so the scores are checked against numpy (the
unit tests check them against the libraries' own logits).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from medray.encoders import build_tiny_checkpoint, create_encoder, get_spec
from medray.platform.zeroshot import class_embeddings, expand_prompts, zero_shot_scores

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MEDRAY = str(Path(sys.executable).parent / "medray")
LABELS = ["effusion", "pneumothorax", "no finding"]
PROMPTS = ["a chest x-ray showing {}", "{}"]


def _run(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update({"MEDRAY_HOME": str(home), "MEDRAY_CACHE_DIR": str(home / "cache"), "MEDRAY_PATIENT_SALT": "s",
                "WANDB_MODE": "offline", "MEDRAY_PROGRESS": "0"})  # fmt: skip
    env.pop("WANDB_API_KEY", None)
    return subprocess.run([MEDRAY, *args], env=env, capture_output=True, text=True, timeout=300)


def _phantom(i: int) -> np.ndarray:
    """A grey disc on the left or right: the class is visible (not that random weights can see it)."""
    yy, xx = np.mgrid[:48, :48]
    cx = 14 if i % 2 else 34
    img = np.where((yy - 24) ** 2 + (xx - cx) ** 2 < 100, 200, 30 + i).astype(np.uint8)
    return np.repeat(img[..., None], 3, axis=2)


def test_embed_images_and_text_then_zeroshot_with_labels(s3, tmp_path: Path) -> None:
    fs, bucket = s3.filesystem(), s3.bucket
    ckpt = build_tiny_checkpoint("siglip", str(tmp_path / "siglip"))
    uris = []
    for i in range(12):
        buf = io.BytesIO()
        Image.fromarray(_phantom(i)).save(buf, format="PNG")
        uri = f"s3://{bucket}/zs/in/img{i:02d}.png"
        fs.pipe(uri[5:], buf.getvalue())
        uris.append(uri)
    fs.pipe(f"{bucket}/zs/in/r1.txt", b"a chest x-ray showing effusion")
    fs.pipe(f"{bucket}/zs/in/r2.txt", b"no finding")
    manifest = tmp_path / "labels.csv"
    manifest.write_text("uri,effusion,pneumothorax,no finding,site\n" + "".join(
        f"{u},{i % 2},{(i // 2) % 2},{int(i % 4 == 0)},{'ab'[i % 2]}\n" for i, u in enumerate(uris)))  # fmt: skip
    out = f"s3://{bucket}/zs/out"
    home = tmp_path / "home"

    proc = _run(home, "embed", f"input=s3://{bucket}/zs/in/", f"output={out}", "encoder=siglip",
                f"encoder.checkpoint={ckpt}", "ray.num_cpus=2", "tracking.enabled=false")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(fs.cat(f"{bucket}/zs/out/summary.json"))
    assert summary["records_embedded"] == 14 and summary["quarantined"] == 0 and summary["skipped"] == 0
    table = pq.read_table([f for f in fs.glob(f"{bucket}/zs/out/embeddings/*.parquet")], filesystem=fs)
    rows = table.to_pylist()
    mods = {r["modality"] for r in rows}
    assert {"photo", "text"} <= mods  # image and text in one output, one encoder, one space
    assert {r["encoder"] for r in rows} == {"siglip"} and len({len(r["embedding"]) for r in rows}) == 1

    proc = _run(home, "zeroshot", f"embeddings={out}", "labels=[effusion,pneumothorax,'no finding']",
                "prompts=['a chest x-ray showing {}','{}']", f"data.labels={manifest}", "data.subgroups=[site]",
                "eval.bootstrap=50")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "zeroshot: 12 images x 3 classes, macro AUROC" in proc.stdout
    doc = json.loads(fs.cat(f"{bucket}/zs/out/zeroshot/zeroshot.json"))
    assert doc["counts"] == {"images": 12, "text_records_not_scored": 2}
    assert doc["encoder"]["score"] == "sigmoid" and doc["encoder"]["model_temperature"] == pytest.approx(10.0)
    ev = json.loads(fs.cat(f"{bucket}/zs/out/zeroshot/evaluation.json"))
    for label in LABELS:
        assert ev["metrics"][label]["auroc"]["lo"] is not None
    assert set(ev["subgroups"]["site"]) == {"a", "b"}
    html = fs.cat(f"{bucket}/zs/out/zeroshot/report/index.html").decode()
    assert "Zero-shot" in html and "a chest x-ray showing pneumothorax" in html

    # the stored scores are the zero-shot math on the stored embeddings, with the checkpoint's own text tower
    enc = create_encoder(get_spec("siglip", checkpoint=ckpt))
    images = {r["uri"]: r["embedding"] for r in rows if r["modality"] == "photo"}
    pred = pq.read_table(fs.glob(f"{bucket}/zs/out/zeroshot/predictions/*.parquet"), filesystem=fs).to_pydict()
    prompts = [p for row in expand_prompts(LABELS, PROMPTS) for p in row]
    want = zero_shot_scores(np.asarray([images[u] for u in pred["uri"]]), class_embeddings(enc.embed_text(prompts), 3),
                            scale=enc.logit_scale, bias=enc.logit_bias, score="sigmoid")  # fmt: skip
    for j, label in enumerate(LABELS):
        np.testing.assert_allclose(pred[f"p_{label}"], want[:, j], atol=1e-5)

    # the same checkpoint behind `medray serve`, with an index of this output: /v1/zero_shot gives the job's
    # scores for an image, /v1/search finds a report by its text, HAI-DEF answers carry temperature and bias
    proc = _run(home, "index", f"embeddings={out}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    _check_served(home, ckpt, out, fs, bucket, images, dict(zip(pred["uri"], want)))


def _check_served(home: Path, ckpt: str, out: str, fs, bucket: str, images: dict, want: dict) -> None:
    import base64
    import signal
    import socket
    import time

    import requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    env.update({"MEDRAY_HOME": str(home), "MEDRAY_CACHE_DIR": str(home / "cache"), "MEDRAY_PATIENT_SALT": "s",
                "WANDB_MODE": "offline", "MEDRAY_PROGRESS": "0", "RAY_AUTH_MODE": "disabled"})  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    log_path = home / "serve.log"
    args = [MEDRAY, "serve", "encoder=siglip", f"encoder.checkpoint={ckpt}", f"serve.http.port={port}",
            "ray.num_cpus=2", f"serve.search.index={out}/index", "serve.name=zs",
            "serve.encoder.autoscaling.max_replicas=1", "serve.ingress.autoscaling.max_replicas=1"]  # fmt: skip
    with open(log_path, "w") as log:
        server = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while "ready at" not in log_path.read_text(errors="replace"):
            assert server.poll() is None and time.time() < deadline, log_path.read_text()[-4000:]
            time.sleep(0.5)
        uri = next(iter(want))
        data = fs.cat(uri[5:])
        query = [("labels", label) for label in LABELS] + [("prompts", p) for p in PROMPTS]
        r = requests.post(url + "/v1/zero_shot", params=query, files={"file": ("x.png", data)}, timeout=60)
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["score"] == "sigmoid" and got["model_temperature"] == pytest.approx(10.0)
        np.testing.assert_allclose([got["scores"][label] for label in LABELS], want[uri], atol=1e-5)
        r = requests.post(url + "/v1/search", json={"text": "no finding", "k": 3}, timeout=60)
        assert r.status_code == 200, r.text
        top = r.json()["hits"][0]
        assert top["uri"].endswith("/zs/in/r2.txt") and top["distance"] < 1e-3, r.json()
        r = requests.post(url + "/v1/search", json={"bytes_b64": base64.b64encode(data).decode(), "k": 1}, timeout=60)
        assert r.status_code == 200 and r.json()["hits"][0]["uri"] == uri, r.text
        body = {"instances": [{"image": {"input_bytes": base64.b64encode(data).decode()}}, {"text": "effusion"}]}
        r = requests.post(url + "/predict", json=body, timeout=60)
        assert r.status_code == 200, r.text
        image_pred, text_pred = r.json()["predictions"]
        np.testing.assert_allclose(image_pred["embedding"], images[uri], atol=1e-5)
        assert image_pred["model_temperature"] == pytest.approx(10.0) and "model_bias" in image_pred
        assert text_pred["input_type"] == "text" and len(text_pred["embedding"]) == len(images[uri])
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
