"""``medray serve`` end to end: real Ray Serve, real HTTP on loopback, real S3 (SeaweedFS).

One module-scoped stack, started the way users start it:

* ``medray embed`` runs first on the sample files (the reference embeddings);
* ``medray serve`` (a subprocess that starts its own local Ray) serves the
  same tiny encoder with auth on, five heads on S3 (three linear probes, one
  trained on other weights, one fine-tuned with its backbone) and fast
  autoscaling;
* a second application, auth off and tight admission limits, is deployed on
  the same cluster from the config file ``medray serve ... emit_config=``
  writes, with ``serve run --non-blocking`` (the ``serve deploy`` code path).

Replica processes are found by their Ray process title
(``ray::ServeReplica:<app>:<deployment>``), which is how the autoscaling and
replica-kill tests count and kill them.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
import yaml

from medray.encoders import build_tiny_checkpoint, hash_directory
from medray.encoders.heads import LinearHead, ModelCard, save_artifact
from medray.serve.haidef import PREDICTION_SCHEMA, check_against
from medray.testing.dicom_wsi import dicom_wsi_files
from medray.testing.orthanc import OrthancServer
from medray.testing.samples import generate_samples

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = Path(sys.executable).parent
TOKEN = "test-token-" + uuid.uuid4().hex
APP = "mrt" + uuid.uuid4().hex[:6]  # unique: replica processes are found by this name
OPEN_APP = APP + "open"
FUSED_APP = APP + "fused"
TIMEOUT = 30  # client timeout: nothing may hang past it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replica_pids(app: str, deployment: str) -> list[int]:
    """PIDs of live replica processes of ``app``/``deployment``."""
    out = subprocess.run(["ps", "-eo", "pid,stat,args"], capture_output=True, text=True).stdout
    tag = f"ServeReplica:{app}:{deployment}"
    return [int(line.split()[0]) for line in out.splitlines() if tag in line and "Z" not in line.split()[1]]


def _env(home: Path) -> dict:
    env = dict(os.environ)
    env.update(
        {
            "MEDRAY_HOME": str(home),
            "MEDRAY_CACHE_DIR": str(home / "cache"),
            "MEDRAY_SERVE_TOKEN": TOKEN,
            "MEDRAY_PATIENT_SALT": "test-salt",
            "WANDB_MODE": "offline",
            "MEDRAY_PROGRESS": "0",
            "RAY_AUTH_MODE": "disabled",  # loopback-only test cluster; a second driver joins it
            "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
            "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
        }
    )
    env.pop("WANDB_API_KEY", None)
    env.pop("RAY_ADDRESS", None)
    return env


def _stop(proc: subprocess.Popen, grace: float = 60) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def stack(s3, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    home = root / "home"
    home.mkdir()
    env = _env(home)
    # inputs: good DICOMs (DX, CR, CT, a 3-frame DX, compressed syntaxes) and photos
    info = generate_samples(str(root / "samples"), n=8)
    inputs = root / "inputs"
    for sub in ("dicom", "photos"):
        shutil.copytree(root / "samples" / sub, inputs / sub)
    ckpt = build_tiny_checkpoint("hf_image", str(root / "ckpt"), arch="dinov2", image_size=32)
    weights_hash = hash_directory(ckpt)
    fs = s3.filesystem()
    fs.put(str(inputs / "photos" / "derm_0000.png"), f"{s3.bucket}/serve/inputs/derm_0000.png")
    # heads: three linear probes over the 32-d embeddings, one on other weights, one with its backbone
    rng = np.random.default_rng(7)
    heads, uris = {}, []
    enc = {"name": "hf_image", "family": "hf_image", "weights_hash": weights_hash, "dim": 32, "pooling": "cls"}
    for i, (task, labels) in enumerate(
        [("binary", ["effusion"]), ("multilabel", ["a", "b", "c"]), ("multiclass", ["x", "y", "z", "w"])]
    ):
        head = LinearHead(
            rng.normal(size=(len(labels), 32)).astype("f4"), rng.normal(size=len(labels)).astype("f4"), task
        )
        heads[f"probe{i}"] = head
        uris.append(
            save_artifact(
                f"s3://{s3.bucket}/serve/heads/probe{i}",
                head=head,
                card=ModelCard(id=f"probe{i}", task=task, labels=labels, encoder=enc),
            )
        )
    uris.append(
        save_artifact(
            f"s3://{s3.bucket}/serve/heads/other",
            head=LinearHead(np.ones((1, 32), "f4"), np.zeros(1, "f4"), "binary"),
            card=ModelCard(id="other", task="binary", labels=["q"], encoder={**enc, "weights_hash": "f" * 64}),
        )
    )
    ft_head = LinearHead(rng.normal(size=(2, 32)).astype("f4"), np.zeros(2, "f4"), "multiclass")
    uris.append(
        save_artifact(
            f"s3://{s3.bucket}/serve/heads/ft",
            head=ft_head,
            backbone_dir=ckpt,
            card=ModelCard(id="ft", task="multiclass", labels=["neg", "pos"], encoder=enc, strategy="full"),
        )
    )

    # a PACS: Orthanc with DICOMweb and authentication, holding the sample DICOMs; the server's own
    # credentials come from MEDRAY_DICOMWEB_* (a request may bring its own bearer token instead)
    pacs = OrthancServer().start()
    dicoms = sorted(p for p in (inputs / "dicom").rglob("*.dcm"))
    pacs.upload(dicoms)
    # and a whole slide (DICOM WSI, two levels): HAI-DEF patches are read from it frame by frame
    for name, data in dicom_wsi_files(size=256, levels=2, tile=64).items():
        (root / f"wsi_{name}").write_bytes(data)
    pacs.upload(sorted(root.glob("wsi_level*.dcm")))
    env.update(pacs.env())
    # Vertex AI names the HAI-DEF routes in the environment: they win over serve.haidef.*
    env.update({"AIP_PREDICT_ROUTE": "/vertex/predict", "AIP_HEALTH_ROUTE": "/vertex/health"})

    # 2. `medray serve` (auth on, the heads, one refused at load; fast autoscaling), started first
    port, grpc_port = _free_port(), _free_port()
    log_path = root / "serve.log"
    common = [f"encoder.checkpoint={ckpt}", "encoder=hf_image", f"serve.http.port={port}", "ray.num_cpus=8"]
    args = [
        str(BIN / "medray"),
        "serve",
        *common,
        f"serve.name={APP}",
        "check_artifacts=false",
        "heads=[" + ",".join(uris) + "]",
        "serve.auth.enabled=true",
        f"serve.inputs.allowed_uri_prefixes=[s3://{s3.bucket}/serve/inputs/,{pacs.url}/dicom-web/]",
        "serve.heads.max_loaded=3",
        "serve.heads.autoscaling.max_replicas=1",
        "serve.encoder.max_batch_size=8",
        "serve.encoder.batch_wait_timeout_s=0.02",
        "serve.grpc.enabled=true",
        f"serve.grpc.port={grpc_port}",
        "serve.encoder.engine=process",  # the model in a child process of each replica (the open app: in a thread)
        "serve.encoder.autoscaling.min_replicas=1",
        "serve.encoder.autoscaling.max_replicas=2",
        "serve.encoder.autoscaling.target_ongoing_requests=2",
        "serve.encoder.autoscaling.upscale_delay_s=0.5",
        "serve.encoder.autoscaling.downscale_delay_s=2",
        "serve.encoder.autoscaling.metrics_interval_s=0.5",
        "serve.encoder.autoscaling.look_back_period_s=2",
        "serve.graceful_shutdown_wait_loop_s=0.5",
        "serve.graceful_shutdown_timeout_s=10",
        "serve.ingress.autoscaling.max_replicas=1",
        "serve.limits.max_body_bytes=4194304",
        "serve.limits.request_timeout_s=20",
    ]
    cfg = root / "open.yaml"
    # the emitted app also serves an audio and a text encoder: inputs are routed by content
    more = {
        fam: build_tiny_checkpoint(fam, str(root / fam), arch=arch)
        for fam, arch in (("hf_audio", "wav2vec2"), ("hf_text", "bert"))
    }
    # and a linear probe trained on the audio encoder's pooled embeddings (as `medray finetune` exports one)
    audio_head = LinearHead(rng.normal(size=(1, 32)).astype("f4"), np.zeros(1, "f4"), "binary")
    audio_head_uri = save_artifact(
        f"s3://{s3.bucket}/serve/heads/cough",
        head=audio_head,
        card=ModelCard(
            id="cough",
            task="binary",
            labels=["cough"],
            encoder={
                "name": "hf_audio",
                "family": "hf_audio",
                "weights_hash": hash_directory(more["hf_audio"]),
                "dim": 32,
            },
        ),
    )
    t0 = time.time()
    log = open(log_path, "w")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        # 1. meanwhile, the reference: what `medray embed` writes for the same files and checkpoint
        _run_ok(
            [
                str(BIN / "medray"),
                "embed",
                f"input={inputs}",
                f"output={root / 'emb'}",
                "encoder=hf_image",
                f"encoder.checkpoint={ckpt}",
                "ray.num_cpus=2",
                "tracking.enabled=false",
            ],
            env,
            timeout=300,
        )
        rows = pq.read_table(root / "emb" / "embeddings").to_pylist()
        reference = {
            (Path(r["uri"]).relative_to(inputs).as_posix(), r["frame"]): np.asarray(r["embedding"], "f4") for r in rows
        }
        print(f"medray embed: {time.time() - t0:.1f}s")
        # the search index of the reference embeddings, served by the emitted app (/open/v1/search)
        _run_ok(
            [str(BIN / "medray"), "index", f"embeddings={root / 'emb'}"],
            env,
            timeout=120,
        )
        print(f"medray index: {time.time() - t0:.1f}s")
        _run_ok(
            [
                str(BIN / "medray"),
                "serve",
                *common,
                f"serve.name={OPEN_APP}",
                f"serve.search.index={root / 'emb' / 'index'}",  # built by `medray index` just above
                "serve.search.num_cpus=0.1",
                f"encoders.audio={{family:hf_audio,checkpoint:'{more['hf_audio']}'}}",
                f"encoders.text={{family:hf_text,checkpoint:'{more['hf_text']}'}}",
                "serve.encoder.num_cpus=0.5",
                "audio.window_s=1.0",
                f"heads=[{audio_head_uri}]",
                "serve.heads.autoscaling.max_replicas=1",
                "serve.route_prefix=/open",
                f"serve.ood.reference={root / 'emb'}",  # written by `medray embed` just above
                f"emit_config={cfg}",
                "serve.encoder.max_batch_size=1",
                "serve.encoder.max_ongoing_requests=1",
                "serve.encoder.max_queued_requests=1",
                "serve.encoder.batch_wait_timeout_s=0",
                "serve.encoder.autoscaling.max_replicas=1",
                "serve.ingress.autoscaling.max_replicas=1",
            ],
            env,
            timeout=120,
        )
        # a third app: one encoder, no heads or search, so serve.topology=auto fuses the encoder into the ingress
        fused_cfg = root / "fused.yaml"
        _run_ok(
            [
                str(BIN / "medray"),
                "serve",
                *common,
                f"serve.name={FUSED_APP}",
                "serve.route_prefix=/fused",
                f"emit_config={fused_cfg}",
                "serve.encoder.num_cpus=0.5",
                "serve.encoder.max_batch_size=4",
                "serve.encoder.autoscaling.max_replicas=1",
                "serve.limits.max_body_bytes=1048576",
            ],
            env,
            timeout=120,
        )
        both = yaml.safe_load(cfg.read_text())  # one `serve run` file with both apps (a second would replace the first)
        both["applications"] += yaml.safe_load(fused_cfg.read_text())["applications"]
        apps_cfg = root / "apps.yaml"
        apps_cfg.write_text(yaml.safe_dump(both))
        gcs = _wait_ready(proc, log_path, 240)
        print(f"medray serve ready: {time.time() - t0:.1f}s")
        # 3. the emitted config, deployed next to it as `serve deploy` would (auth off, tight admission);
        #    tests that use it wait for it (open_app), the others run meanwhile
        _run_ok(
            [str(BIN / "serve"), "run", "--non-blocking", "--address", gcs, str(apps_cfg)],
            env,
            timeout=120,
        )
        yield {
            "url": url,
            "grpc": f"127.0.0.1:{grpc_port}",
            "open": url + "/open",
            "fused": url + "/fused",
            "fused_config": fused_cfg,
            "auth": {"Authorization": f"Bearer {TOKEN}"},
            "inputs": inputs,
            "reference": reference,
            "heads": heads,
            "ft_head": ft_head,
            "weights_hash": weights_hash,
            "info": info,
            "s3": s3,
            "log": log_path,
            "proc": proc,
            "config": cfg,
            "gcs": gcs,
            "env": env,
            "more": more,
            "audio_head": audio_head,
            "pacs": pacs,
            "dicoms": dicoms,
            "wsi": root / "wsi_level1.dcm",
            "ckpt": ckpt,
        }
    finally:
        t0 = time.time()
        pacs.stop()
        _stop(proc)
        log.close()
        print(f"medray serve stopped: {time.time() - t0:.1f}s (exit {proc.returncode})")


def _run_ok(args: list, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run a CLI (`medray ...`, `serve ...`) to its end; fail the test with its stderr when it fails."""
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _wait_ready(proc: subprocess.Popen, log_path: Path, timeout: float) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = log_path.read_text(errors="replace")
        for line in text.splitlines():
            if line.startswith("medray serve: application") and "ready at" in line:
                return line.rsplit("; ray ", 1)[1].split(";", 1)[0].strip()
        if proc.poll() is not None:
            pytest.fail(f"medray serve exited with {proc.returncode}:\n{text[-4000:]}")
        time.sleep(0.5)
    pytest.fail(f"medray serve not ready after {timeout}s:\n{log_path.read_text()[-4000:]}")


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} not ready after {timeout}s")


@pytest.fixture
def open_app(stack) -> str:
    """The application deployed from the emitted config, once it is ready."""
    _wait_http(stack["open"] + "/readyz", 180)
    return stack["open"]


def _upload(stack, rel: str, path: str = "/v1/embeddings", base: str | None = None, headers=None):
    data = (stack["inputs"] / rel).read_bytes()
    return requests.post(
        (base or stack["url"]) + path,
        files={"file": (Path(rel).name, data)},
        headers=stack["auth"] if headers is None else headers,
        timeout=TIMEOUT,
    )


def _embeddings(body: dict) -> dict:
    return {e["frame"]: np.asarray(e["embedding"], "f4") for e in body["embeddings"]}


# ------------------------------------------------------------------------------ API surface, auth
def test_openapi_health_readiness_and_models(stack):
    spec = requests.get(stack["url"] + "/openapi.json", timeout=TIMEOUT).json()
    assert {"/v1/embeddings", "/v1/predict/{head}", "/v1/models", "/healthz", "/readyz"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]
    assert requests.get(stack["url"] + "/docs", timeout=TIMEOUT).status_code == 200
    r = requests.get(stack["url"] + "/healthz", timeout=TIMEOUT)
    assert r.status_code == 200 and r.headers.get("x-request-id")
    assert requests.get(stack["url"] + "/readyz", timeout=TIMEOUT).json()["status"] == "ready"
    models = requests.get(stack["url"] + "/v1/models", headers=stack["auth"], timeout=TIMEOUT).json()
    assert models["encoder"]["weights_hash"] == stack["weights_hash"] and models["encoder"]["dim"] == 32
    assert [h["id"] for h in models["heads"]] == ["ft", "other", "probe0", "probe1", "probe2"]


def test_auth_required_on_v1_routes(stack):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        r = requests.get(stack["url"] + "/v1/models", headers=headers, timeout=TIMEOUT)
        assert r.status_code == 401 and r.json()["code"] == "unauthorized"
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert _upload(stack, "photos/derm_0000.png", headers={}).status_code == 401
    assert _upload(stack, "photos/derm_0000.png", path="/v1/predict/probe0", headers={}).status_code == 401


# ------------------------------------------------------------------------------ embeddings == medray embed
def test_embeddings_equal_what_medray_embed_writes(stack):
    ref = stack["reference"]
    files = sorted({rel for rel, _ in ref})
    assert len(files) == 10 and any(f.endswith(".jpg") for f in files)
    checked = 0
    for i, rel in enumerate(files):
        data = (stack["inputs"] / rel).read_bytes()
        if i % 3 == 0:  # multipart upload
            r = _upload(stack, rel)
        elif i % 3 == 1:  # base64 JSON
            r = requests.post(
                stack["url"] + "/v1/embeddings",
                json={"bytes_b64": base64.b64encode(data).decode()},
                headers=stack["auth"],
                timeout=TIMEOUT,
            )
        else:  # raw body
            ctype = "application/dicom" if rel.endswith(".dcm") else "application/octet-stream"
            r = requests.post(
                stack["url"] + "/v1/embeddings",
                data=data,
                headers={**stack["auth"], "Content-Type": ctype},
                timeout=TIMEOUT,
            )
        assert r.status_code == 200, (rel, r.text)
        body = r.json()
        assert body["encoder"] == "hf_image" and body["weights_hash"] == stack["weights_hash"]
        got = _embeddings(body)
        want = {f: e for (p, f), e in ref.items() if p == rel}
        assert set(got) == set(want), rel
        for frame, emb in want.items():
            np.testing.assert_allclose(got[frame], emb, atol=1e-5, rtol=0, err_msg=rel)
            checked += 1
    assert checked == 12  # 10 files, one of them with 3 frames
    # an allowed object-storage URI gives the same embedding as the upload
    r = requests.post(
        stack["url"] + "/v1/embeddings",
        headers=stack["auth"],
        timeout=TIMEOUT,
        json={"uri": f"s3://{stack['s3'].bucket}/serve/inputs/derm_0000.png"},
    )
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(_embeddings(r.json())[0], ref[("photos/derm_0000.png", 0)], atol=1e-5, rtol=0)


def test_grpc_embed_answers_as_medray_embed_writes_with_http_limits_and_auth(stack):
    """medray.v1.Embeddings/Embed on Serve's gRPC port: the vectors `medray embed` writes; auth, URI
    prefixes, size limits and bad inputs answer with gRPC status codes carrying the HTTP answer's code."""
    import grpc

    from medray.serve.grpc_api import EmbeddingsStub
    from medray.serve.proto.embeddings_pb2 import EmbedRequest

    ref, inputs = stack["reference"], stack["inputs"]
    meta = [("application", APP), ("authorization", stack["auth"]["Authorization"])]
    with grpc.insecure_channel(stack["grpc"]) as channel:
        stub = EmbeddingsStub(channel)
        for rel in ("dicom/p01/0004_dx.dcm", "photos/derm_0000.png"):
            data = (inputs / rel).read_bytes()
            answer = stub.Embed(EmbedRequest(data=data, name=Path(rel).name), metadata=meta, timeout=TIMEOUT)
            assert answer.encoder == "hf_image" and answer.weights_hash == stack["weights_hash"] and answer.dim == 32
            got = {e.frame: np.asarray(e.values, "f4") for e in answer.embeddings}
            want = {f: e for (p, f), e in ref.items() if p == rel}
            assert set(got) == set(want), rel
            for frame, emb in want.items():
                np.testing.assert_allclose(got[frame], emb, atol=1e-5, rtol=0, err_msg=rel)
        # an allowed object-storage URI instead of bytes
        uri = f"s3://{stack['s3'].bucket}/serve/inputs/derm_0000.png"
        answer = stub.Embed(EmbedRequest(uri=uri), metadata=meta, timeout=TIMEOUT)
        np.testing.assert_allclose(answer.embeddings[0].values, ref[("photos/derm_0000.png", 0)], atol=1e-5, rtol=0)

        hostile = {k: Path(stack["info"]["out_dir"]) / v for k, v in stack["info"]["hostile"].items()}
        cases = [
            (EmbedRequest(data=b"x"), [("application", APP)], grpc.StatusCode.UNAUTHENTICATED, "unauthorized"),
            (
                EmbedRequest(data=hostile["truncated"].read_bytes(), name="t.dcm"),
                meta,
                grpc.StatusCode.INVALID_ARGUMENT,
                "undecodable",
            ),
            (EmbedRequest(uri="s3://elsewhere/x.png"), meta, grpc.StatusCode.PERMISSION_DENIED, "uri_not_allowed"),
            (EmbedRequest(data=b"x", uri=uri), meta, grpc.StatusCode.INVALID_ARGUMENT, "invalid_request"),
            # over serve.limits.max_body_bytes (4 MiB), under gRPC's message limit (sized 1 MiB above it)
            (EmbedRequest(data=b"\x00" * (4 << 20) + b"\x00"), meta, grpc.StatusCode.RESOURCE_EXHAUSTED, "too_large"),
        ]
        sentinels = stack["info"]["phi"]["sentinels"]
        for request, metadata, status, code in cases:
            with pytest.raises(grpc.RpcError) as info:
                stub.Embed(request, metadata=metadata, timeout=TIMEOUT)
            assert info.value.code() == status, (code, info.value.code(), info.value.details())
            assert info.value.details().startswith(code + ":"), info.value.details()
            assert not any(s in info.value.details() for s in sentinels)
        # well over gRPC's message limit: refused by gRPC itself, before the app
        with pytest.raises(grpc.RpcError) as info:
            stub.Embed(EmbedRequest(data=b"\x00" * (6 << 20)), metadata=meta, timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # the service keeps answering
        answer = stub.Embed(EmbedRequest(uri=uri), metadata=meta, timeout=TIMEOUT)
        assert len(answer.embeddings) == 1


def _instance_uri(stack, path: Path) -> str:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return (
        f"{stack['pacs'].url}/dicom-web/studies/{ds.StudyInstanceUID}"
        f"/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    )


def test_hai_def_requests_answer_in_their_schema_instance_by_instance(stack):
    """Google HAI-DEF's format on the route Vertex AI names: each instance answered on its own, embeddings
    equal to `medray embed`'s; DICOMweb instances fetched from the PACS with the server's credentials, or
    refused with a caller's wrong token for that instance only."""
    url, auth, ref, inputs = stack["url"], stack["auth"], stack["reference"], stack["inputs"]
    assert requests.get(url + "/vertex/health", timeout=TIMEOUT).status_code == 200
    assert (
        requests.post(url + "/predict", json={"instances": [{"text": "x"}]}, headers=auth, timeout=TIMEOUT).status_code
        == 404
    )
    photo, dx = "photos/derm_0000.png", next(p for p in stack["dicoms"] if p.name.endswith("_dx.dcm"))
    dx_rel = dx.relative_to(inputs).as_posix()
    dicomweb = _instance_uri(stack, dx)
    instances = [
        {"image": {"input_bytes": base64.b64encode((inputs / photo).read_bytes()).decode()}},
        {"image": {"dicomweb_uri": dicomweb}},
        {"image": {"dicomweb_uri": dicomweb, "access_credential": "not-the-pacs-token"}},
        {"image": {"s3_uri": f"s3://{stack['s3'].bucket}/serve/inputs/derm_0000.png"}},
        {"image": {"gcs_uri": "gs://elsewhere/x.png"}},
        {
            "image": {
                "input_bytes": base64.b64encode((inputs / photo).read_bytes()).decode(),
                "patch_coordinates_list": [{"x_origin": 0, "y_origin": 0, "width": 16, "height": 16}],
            }
        },
        {"text": "no effusion"},
        {"image": {"dicomweb_uri": dicomweb, "radiology_dicom_window_level": {"center": 100, "width": 50}}},
        {"video": {}},
        {  # Path Foundation's request: patches of one pyramid level of a slide in the PACS
            "image": {
                "dicomweb_uri": _instance_uri(stack, stack["wsi"]),
                "patch_coordinates_list": [
                    {"x_origin": 0, "y_origin": 0, "width": 32, "height": 32},
                    {"x_origin": 40, "y_origin": 24, "width": 32, "height": 32},
                ],
            }
        },
    ]
    assert requests.post(url + "/vertex/predict", json={"instances": instances}, timeout=TIMEOUT).status_code == 401
    r = requests.post(url + "/vertex/predict", json={"instances": instances}, headers=auth, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == len(instances)
    for p in preds:
        assert check_against(PREDICTION_SCHEMA, p) == [], p
    np.testing.assert_allclose(preds[0]["embedding"], ref[(photo, 0)], atol=1e-5, rtol=0)
    dx_mean = np.mean([e for (rel, _), e in ref.items() if rel == dx_rel], axis=0)  # one answer per instance
    np.testing.assert_allclose(preds[1]["embedding"], dx_mean, atol=1e-5, rtol=0)
    assert "401" in preds[2]["error"]["description"]  # the caller's token went to the PACS, and only for it
    np.testing.assert_allclose(preds[3]["embedding"], ref[(photo, 0)], atol=1e-5, rtol=0)
    assert preds[4]["error"]["description"].startswith("uri_not_allowed")
    assert len(preds[5]["patch_embeddings"]) == 1 and preds[5]["input_type"] == "image"
    assert preds[6]["error"]["description"].startswith("unsupported_media")  # no text encoder on this app
    assert not np.allclose(preds[7]["embedding"], preds[1]["embedding"], atol=1e-4)  # the window applied
    assert preds[8]["error"]["description"].startswith("invalid_request")
    from medray.encoders import create_encoder, get_spec
    from medray.platform.decoders.dicom_wsi import open_dicom_wsi

    level1 = open_dicom_wsi(str(stack["wsi"].with_name("wsi_level0.dcm")))
    crops = [level1.read_region((2 * x, 2 * y), 1, (32, 32), as_array=True) for x, y in ((0, 0), (40, 24))]
    encoder = create_encoder(get_spec("hf_image", checkpoint=stack["ckpt"]), device="cpu", dtype="float32")
    want = encoder.embed(encoder.preprocess(crops))
    assert "patch_embeddings" in preds[9], preds[9]
    got = preds[9]["patch_embeddings"]
    assert [p["patch_coordinate"]["x_origin"] for p in got] == [0, 40]
    np.testing.assert_allclose([p["embedding"] for p in got], want, atol=1e-5, rtol=0)
    # /v1/embeddings takes the same DICOMweb instance
    r = requests.post(url + "/v1/embeddings", json={"dicomweb_uri": dicomweb}, headers=auth, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(_embeddings(r.json())[0], ref[(dx_rel, 0)], atol=1e-5, rtol=0)
    outside = dicomweb.replace(stack["pacs"].url, "http://127.0.0.1:9")
    r = requests.post(url + "/v1/embeddings", json={"dicomweb_uri": outside}, headers=auth, timeout=TIMEOUT)
    assert r.status_code == 403 and r.json()["code"] == "uri_not_allowed"
    assert "not-the-pacs-token" not in Path(stack["log"]).read_text(errors="replace")


def test_concurrent_requests_are_batched(stack):
    data = (stack["inputs"] / "photos/derm_0000.png").read_bytes()

    def one(_):
        r = requests.post(
            stack["url"] + "/v1/embeddings", files={"file": ("a.png", data)}, headers=stack["auth"], timeout=TIMEOUT
        )
        assert r.status_code == 200, r.text
        return r.json()["batch_size"], r.headers.get("Server-Timing", "")

    with cf.ThreadPoolExecutor(16) as ex:
        answers = list(ex.map(one, range(48)))
    sizes = [size for size, _ in answers]
    assert max(sizes) > 1, sizes
    assert max(sizes) <= 8  # serve.encoder.max_batch_size
    # every answer carries its timeline: the ingress's stages, the replica's, and the total last
    for _, timing in answers:
        stages = dict(part.split(";dur=") for part in timing.split(", "))
        assert {"read", "parse", "handle", "hop", "decode", "batch", "forward", "serialize"} <= set(stages), timing
        assert list(stages)[-1] == "total" and float(stages["total"]) >= float(stages["forward"]) > 0


# ------------------------------------------------------------------------------ heads
def test_heads_multiplexed_on_one_replica_each_with_its_own_predictions(stack):
    rel = "dicom/p01/0004_dx.dcm"  # 3 frames
    ref = np.stack([stack["reference"][(rel, f)] for f in range(3)])
    replicas = set()
    for _ in range(2):  # 4 heads over max_loaded=3: the second round reloads evicted ones
        for head_id in ("probe0", "probe1", "probe2", "ft"):
            r = _upload(stack, rel, path=f"/v1/predict/{head_id}")
            assert r.status_code == 200, (head_id, r.text)
            body = r.json()
            assert body["head"] == head_id and body["model_card_id"] == head_id
            probs = np.array([[p["probabilities"][lab] for lab in body["labels"]] for p in body["predictions"]])
            if head_id == "ft":  # its own backbone (the same weights here) and its own head
                want = stack["ft_head"].predict(ref)
                assert body["labels"] == ["neg", "pos"]
            else:
                want = stack["heads"][head_id].predict(ref)
                assert body["weights_hash"] == stack["weights_hash"]
            np.testing.assert_allclose(probs, want, atol=1e-5)
            replicas.add(body["replica"])
    assert len(replicas) == 1  # serve.heads.autoscaling.max_replicas=1: all on one replica
    r = _upload(stack, rel, path="/v1/predict/other")
    assert r.status_code == 409 and r.json()["code"] == "head_mismatch"
    r = _upload(stack, rel, path="/v1/predict/nope")
    assert r.status_code == 404 and r.json()["code"] == "unknown_head"


# ------------------------------------------------------------------------------ bad input
def _raw_post(port: int, path: str, headers: dict) -> tuple[int, dict, float]:
    """Send only the request head on a raw socket; return status, JSON body and seconds to the answer."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}\r\n".encode())
        buf = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
            top, sep, body = buf.partition(b"\r\n\r\n")
            match = re.search(rb"(?i)content-length: *(\d+)", top)
            if sep and match and len(body) >= int(match.group(1)):
                break
    top, _, body = buf.partition(b"\r\n\r\n")
    return int(top.split(b" ", 2)[1]), json.loads(body or b"{}"), time.perf_counter() - t0


def _settle(app: str, deployment: str = "Encoder", timeout: float = 45) -> list[int]:
    """Wait until one replica has been running alone for 3 s (autoscaling is fast here); its PIDs."""
    deadline, since, last = time.time() + timeout, time.time(), None
    while time.time() < deadline:
        pids = replica_pids(app, deployment)
        if pids != last:
            since, last = time.time(), pids
        if len(pids) == 1 and time.time() - since > 3:
            return pids
        time.sleep(0.5)
    return replica_pids(app, deployment)


def test_bad_inputs_answer_with_their_codes_and_the_replica_stays_healthy(stack):
    url, auth = stack["url"], stack["auth"]
    pids = _settle(APP)
    before = _upload(stack, "photos/derm_0000.png").json()["replica"]
    samples = stack["info"]["out_dir"]
    hostile = {k: Path(samples) / v for k, v in stack["info"]["hostile"].items()}
    cases = [
        (
            requests.post(
                url + "/v1/embeddings",
                files={"file": ("b.dcm", hostile["bomb"].read_bytes())},
                headers=auth,
                timeout=TIMEOUT,
            ),
            413,
            "too_large",
        ),
        (
            requests.post(
                url + "/v1/embeddings",
                files={"file": ("t.dcm", hostile["truncated"].read_bytes())},
                headers=auth,
                timeout=TIMEOUT,
            ),
            422,
            "undecodable",
        ),
        (
            requests.post(
                url + "/v1/embeddings",
                files={"file": ("n.dcm", hostile["not_dicom"].read_bytes())},
                headers=auth,
                timeout=TIMEOUT,
            ),
            415,
            "unsupported_media",
        ),
        (
            requests.post(
                url + "/v1/embeddings", data=b"hello", headers={**auth, "Content-Type": "text/plain"}, timeout=TIMEOUT
            ),
            415,
            "unsupported_media",
        ),
        (
            requests.post(
                url + "/v1/embeddings",
                data=b"\x00" * 100,
                headers={**auth, "Content-Type": "image/png"},
                timeout=TIMEOUT,
            ),
            415,
            "unsupported_media",
        ),
        (
            requests.post(url + "/v1/embeddings", json={"bytes_b64": "***"}, headers=auth, timeout=TIMEOUT),
            422,
            "invalid_request",
        ),
        (
            requests.post(
                url + "/v1/embeddings",
                data=b"{not json",
                headers={**auth, "Content-Type": "application/json"},
                timeout=TIMEOUT,
            ),
            422,
            "invalid_request",
        ),
        (
            requests.post(url + "/v1/embeddings", json={"uri": "/etc/passwd"}, headers=auth, timeout=TIMEOUT),
            403,
            "uri_not_allowed",
        ),
        (
            requests.post(
                url + "/v1/embeddings",
                json={"uri": f"s3://{stack['s3'].bucket}/serve/heads/ft/x"},
                headers=auth,
                timeout=TIMEOUT,
            ),
            403,
            "uri_not_allowed",
        ),
        (
            requests.post(
                url + "/v1/embeddings",
                json={"uri": f"s3://{stack['s3'].bucket}/serve/inputs/../heads/x"},
                headers=auth,
                timeout=TIMEOUT,
            ),
            403,
            "uri_not_allowed",
        ),
        (
            requests.post(
                url + "/v1/embeddings",
                json={"uri": f"s3://{stack['s3'].bucket}/serve/inputs/missing.png"},
                headers=auth,
                timeout=TIMEOUT,
            ),
            422,
            "unreadable",
        ),
        (
            requests.post(
                url + "/v1/embeddings", files={"note": (None, "no file here")}, headers=auth, timeout=TIMEOUT
            ),
            422,
            "invalid_request",
        ),
        (
            requests.post(
                url + "/v1/embeddings",
                data=b"x" * (5 << 20),
                headers={**auth, "Content-Type": "application/octet-stream"},
                timeout=TIMEOUT,
            ),
            413,
            "too_large",
        ),
        (  # JSON nested 100,000 deep: refused before parsing (was a RecursionError, 500)
            requests.post(
                url + "/v1/embeddings",
                data=b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                headers={**auth, "Content-Type": "application/json"},
                timeout=TIMEOUT,
            ),
            422,
            "too_deep",
        ),
        (  # over serve.limits.max_header_bytes (16 KiB), within HAProxy's buffer (sized to 2x the limit)
            requests.get(url + "/v1/models", headers={**auth, "X-Padding": "a" * 24_000}, timeout=TIMEOUT),
            431,
            "headers_too_large",
        ),
        (
            requests.get(url + "/healthz", headers={"X-Padding": "a" * 20_000}, timeout=TIMEOUT),
            431,
            "headers_too_large",
        ),
    ]
    sentinels = stack["info"]["phi"]["sentinels"]
    for r, status, code in cases:
        assert (r.status_code, r.json().get("code")) == (status, code), r.text
        assert not any(s in r.text for s in sentinels)
        assert r.headers.get("x-request-id")
    # a 1 MiB header does not fit HAProxy's buffer (serve.proxy=haproxy): HAProxy refuses it itself
    r = requests.get(url + "/v1/models", headers={**auth, "X-Padding": "a" * (1 << 20)}, timeout=TIMEOUT)
    assert r.status_code == 400 and not any(s in r.text for s in sentinels), r.text[:300]
    port = int(url.rsplit(":", 1)[1])
    # Content-Length over the limit: 413 before a byte of the body is sent
    status, body, seconds = _raw_post(
        port, "/v1/embeddings", {**auth, "Content-Type": "image/png", "Content-Length": str(1 << 30)}
    )
    assert (status, body["code"]) == (413, "too_large") and seconds < 10

    # chunked without Content-Length: counted while it streams
    def chunks():
        for _ in range(80):
            yield b"\x00" * 65536

    r = requests.post(
        url + "/v1/embeddings", data=chunks(), headers={**auth, "Content-Type": "image/png"}, timeout=TIMEOUT
    )
    assert (r.status_code, r.json()["code"]) == (413, "too_large")
    # the same encoder replica (process) is alive and answers
    after = _upload(stack, "photos/derm_0000.png")
    assert after.status_code == 200
    assert set(pids) <= set(replica_pids(APP, "Encoder"))
    if len(replica_pids(APP, "Encoder")) == 1:
        assert after.json()["replica"] == before
    assert requests.get(url + "/readyz", timeout=TIMEOUT).status_code == 200


@pytest.fixture
def fused_app(stack) -> str:
    """The one-encoder application (serve.topology=auto: fused) deployed beside the open app, once ready."""
    _wait_http(stack["fused"] + "/readyz", 180)
    return stack["fused"]


def _timing(r: requests.Response) -> dict[str, float]:
    """The answer's Server-Timing header as {stage: ms}."""
    out = {}
    for part in r.headers["server-timing"].split(","):
        name, _, dur = part.strip().partition(";dur=")
        out[name] = float(dur)
    return out


def test_fused_app_answers_from_one_deployment_as_medray_embed_writes(stack, fused_app):
    """One encoder and no heads: the emitted app is one deployment (`Encoder`) whose replica answers HTTP and
    runs the encoder itself; its embeddings equal `medray embed`'s, its limits and errors are the split app's."""
    app = yaml.safe_load(stack["fused_config"].read_text())["applications"][0]
    assert app["args"]["serve"]["topology"] == "auto"
    assert replica_pids(FUSED_APP, "Encoder") and not replica_pids(FUSED_APP, "Ingress")
    ref = stack["reference"]
    for rel in ("dicom/p01/0004_dx.dcm", "photos/derm_0000.png"):
        r = _upload(stack, rel, base=fused_app, headers={})
        assert r.status_code == 200, r.text
        got, want = _embeddings(r.json()), {f: e for (p, f), e in ref.items() if p == rel}
        assert set(got) == set(want)
        for frame, emb in want.items():
            np.testing.assert_allclose(got[frame], emb, atol=1e-5, rtol=0, err_msg=rel)
        stages = _timing(r)
        # the encoder's stages come from this same call; no handle hop between ingress and encoder
        assert {"read", "decode", "forward", "replica", "handle", "hop"} <= set(stages), stages
        assert stages["hop"] < 5.0 and stages["handle"] >= stages["forward"], stages
    assert requests.get(fused_app + "/healthz", timeout=TIMEOUT).status_code == 200
    ready = requests.get(fused_app + "/readyz", timeout=TIMEOUT).json()
    assert ready["status"] == "ready" and ready["heads"] is False
    models = requests.get(fused_app + "/v1/models", timeout=TIMEOUT).json()
    assert models["encoder"]["weights_hash"] == stack["weights_hash"] and models["heads"] == []
    # concurrent requests share forward passes, up to the configured batch (user_config reached the
    # encoder inside the ingress's replica: serve.encoder.max_batch_size=4)
    data = (stack["inputs"] / "photos/derm_0000.png").read_bytes()

    def one(_):
        return requests.post(fused_app + "/v1/embeddings", files={"file": ("a.png", data)}, timeout=TIMEOUT).json()

    with cf.ThreadPoolExecutor(8) as ex:
        sizes = [b["batch_size"] for b in ex.map(one, range(16))]
    assert max(sizes) > 1 and max(sizes) <= 4, sizes
    # limits and errors answer as in the split app; the replica keeps serving
    r = requests.post(
        fused_app + "/v1/embeddings",
        data=b"\x00" * (2 << 20),
        headers={"Content-Type": "application/octet-stream"},
        timeout=TIMEOUT,
    )
    assert (r.status_code, r.json()["code"]) == (413, "too_large")
    hostile = {k: Path(stack["info"]["out_dir"]) / v for k, v in stack["info"]["hostile"].items()}
    for name, status, code in (("truncated", 422, "undecodable"), ("not_dicom", 415, "unsupported_media")):
        r = requests.post(
            fused_app + "/v1/embeddings", files={"file": (f"{name}.dcm", hostile[name].read_bytes())}, timeout=TIMEOUT
        )
        assert (r.status_code, r.json()["code"]) == (status, code), (name, r.text)
    r = requests.post(fused_app + "/v1/predict/probe0", files={"file": ("a.png", data)}, timeout=TIMEOUT)
    assert r.status_code == 404, r.text
    assert _upload(stack, "photos/derm_0000.png", base=fused_app, headers={}).status_code == 200


def test_emitted_config_app_has_auth_off_and_answers_overload_with_503(stack, open_app):
    # deployed from `medray serve ... emit_config=` through `serve run <file>` (the `serve deploy` path)
    app = yaml.safe_load(stack["config"].read_text())["applications"][0]
    assert app["import_path"] == "medray.serve.app:build_app" and app["args"]["serve"]["auth"]["enabled"] is False
    assert requests.get(open_app + "/v1/models", timeout=TIMEOUT).status_code == 200
    assert _upload(stack, "photos/derm_0000.png", base=open_app, headers={}).status_code == 200
    # encoder: max_batch_size=1, max_ongoing_requests=1, max_queued_requests=1
    data = (stack["inputs"] / "dicom/p01/0004_dx.dcm").read_bytes()

    def one(_):
        t0 = time.perf_counter()
        r = requests.post(open_app + "/v1/embeddings", files={"file": ("a.dcm", data)}, timeout=TIMEOUT)
        return r.status_code, r.json().get("code"), r.headers.get("Retry-After"), time.perf_counter() - t0

    with cf.ThreadPoolExecutor(24) as ex:
        results = list(ex.map(one, range(48)))
    codes = {(s, c) for s, c, _, _ in results}
    assert codes <= {(200, None), (503, "overloaded")}, codes
    shed = [r for r in results if r[0] == 503]
    assert shed and any(r[0] == 200 for r in results)
    assert all(r[2] == "1" for r in shed)
    assert np.median([r[3] for r in shed]) < 2.0  # refused at once, not after queueing


def _metrics_ports(stack) -> list[int]:
    """The Prometheus export port of each node of the stack's Ray (a second driver asks the cluster)."""
    gcs = stack["gcs"]
    code = (
        f"import json, ray; ray.init(address={gcs!r}, logging_level='ERROR'); "
        "print(json.dumps([n['MetricsExportPort'] for n in ray.nodes() if n['Alive']]))"
    )
    res = subprocess.run([sys.executable, "-c", code], env=stack["env"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_open_app_scores_each_image_out_of_distribution_and_exports_it(stack, open_app):
    """serve.ood.reference=<the embed output>: each answer carries the OOD score against it, and Ray's
    Prometheus export has the score histogram and the threshold."""
    scores = []
    for rel in ("dicom/p01/0004_dx.dcm", "photos/derm_0000.png"):
        r = _upload(stack, rel, base=open_app, headers={})
        assert r.status_code == 200, r.text
        ood = r.json()["ood"]
        assert set(ood) == {"score", "threshold", "alarm"}
        assert 0.0 <= ood["score"] <= 2.0 and ood["threshold"] > 0 and ood["alarm"] == (ood["score"] > ood["threshold"])
        scores.append(ood["score"])
    # the main app has no reference: no score
    assert "ood" not in _upload(stack, "photos/derm_0000.png").json()
    ports = _metrics_ports(stack)
    deadline, text = time.time() + 45, ""
    while time.time() < deadline:  # the metrics agent exports every few seconds
        text = ""
        for port in ports:
            try:
                text += requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            except requests.RequestException:
                pass
        if "medray_ood_score_bucket" in text and "medray_ood_threshold" in text:
            break
        time.sleep(1.0)
    lines = [ln for ln in text.splitlines() if ln.startswith("ray_medray_ood_score_count")]
    assert lines and sum(float(ln.rsplit(" ", 1)[1]) for ln in lines) >= 2, text[-3000:]
    assert any(ln.startswith("ray_medray_ood_threshold") for ln in text.splitlines())


def test_audio_and_text_inputs_are_routed_to_their_encoders(stack, open_app):
    """WAV uploads and text bodies reach the audio / text encoder deployments of the emitted app; each
    window / chunk embedding equals the encoder applied in this process to what `medray embed`'s decode
    stage makes (the unit tests prove that part equal), and the pooled row (frame -1) is their mean."""
    from medray.encoders import create_encoder, get_spec
    from medray.serve.encoder import DecodeSettings, decode_input
    from medray.testing.media import encode, tone

    wav = encode(tone(44100, 3.5, channels=2), 44100)
    report = "Findings: small left pleural effusion, no pneumothorax. " * 60
    cases = [
        ("audio", {"files": {"file": ("cough.wav", wav)}}, wav, {"window_s": 1.0}),
        ("audio", {"data": wav, "headers": {"Content-Type": "audio/wav"}}, wav, {"window_s": 1.0}),
        ("text", {"json": {"text": report}}, report.encode(), {}),
        ("text", {"data": report.encode(), "headers": {"Content-Type": "text/plain"}}, report.encode(), {}),
    ]
    # HAI-DEF's text instance goes to the text encoder: its pooled embedding (the mean of its chunks)
    haidef = requests.post(open_app + "/vertex/predict", json={"instances": [{"text": report}]}, timeout=TIMEOUT)
    assert haidef.status_code == 200, haidef.text
    (answer,) = haidef.json()["predictions"]
    assert answer["input_type"] == "text" and check_against(PREDICTION_SCHEMA, answer) == []
    refs = {}
    for modality, kwargs, data, opts in cases:
        resp = requests.post(open_app + "/v1/embeddings", timeout=TIMEOUT, **kwargs)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["modality"] == modality and body["encoder"] == f"hf_{modality}"
        items = [e for e in body["embeddings"] if e["frame"] >= 0]
        pooled = [e for e in body["embeddings"] if e["frame"] == -1]
        assert len(items) > 1 and len(pooled) == 1 and pooled[0]["segment"] == "pooled"
        if modality not in refs:
            family = f"hf_{modality}"
            enc = create_encoder(get_spec(family, checkpoint=stack["more"][family]), device="cpu")
            settings = DecodeSettings(audio=opts, max_frames=1000)
            decoded = decode_input({"data": data, "name": "x"}, settings, enc, modality=modality)
            refs[modality] = (enc.embed(decoded.pixels), decoded.segments)
        want, segments = refs[modality]
        got = np.asarray([e["embedding"] for e in items], "f4")
        np.testing.assert_allclose(got, want, atol=1e-5)
        np.testing.assert_allclose(pooled[0]["embedding"], want.mean(axis=0), atol=1e-5)
        if modality == "text":
            np.testing.assert_allclose(answer["embedding"], want.mean(axis=0), atol=1e-5)
        if modality == "audio":  # 3.5 s in 1 s windows, the last one padded
            assert [(e["start_s"], e["end_s"]) for e in items] == [(0.0, 1.0), (1.0, 2.0), (2.0, 3.0), (3.0, 3.5)]
        else:
            assert [(e["token_start"], e["token_end"]) for e in items] == [
                (sg["token_start"], sg["token_end"]) for sg in segments
            ]
            assert report[:40] not in resp.text  # the text never comes back
    # the audio probe: a prediction per window and one for the pooled recording (frame -1)
    resp = requests.post(
        open_app + "/v1/predict/cough", data=wav, headers={"Content-Type": "audio/wav"}, timeout=TIMEOUT
    )
    assert resp.status_code == 200, resp.text
    preds = {p["frame"]: p["probabilities"]["cough"] for p in resp.json()["predictions"]}
    want, _ = refs["audio"]
    expect = stack["audio_head"].predict(np.concatenate([want, want.mean(axis=0, keepdims=True)]))[:, 0]
    assert sorted(preds) == [-1, 0, 1, 2, 3]
    np.testing.assert_allclose([preds[f] for f in (0, 1, 2, 3, -1)], expect, atol=1e-5)
    models = requests.get(open_app + "/v1/models", timeout=TIMEOUT).json()
    assert set(models["encoders"]) == {"image", "audio", "text"} and models["heads"] == [{"id": "cough"}]
    ready = requests.get(open_app + "/readyz", timeout=TIMEOUT).json()
    assert ready["encoders"] == {"image": "hf_image", "audio": "hf_audio", "text": "hf_text"}
    # the image encoder still gets images; unknown content is a 415
    assert _upload(stack, "photos/derm_0000.png", base=open_app, headers={}).json()["modality"]
    bad = requests.post(
        open_app + "/v1/embeddings",
        data=b"\x00\x01" * 400,
        headers={"Content-Type": "application/octet-stream"},
        timeout=TIMEOUT,
    )
    assert bad.status_code == 415 and bad.json()["code"] == "unsupported_media"
    # the auth-on app serves images only: a WAV is refused with the reason
    only = requests.post(
        stack["url"] + "/v1/embeddings",
        data=wav,
        timeout=TIMEOUT,
        headers={"Content-Type": "audio/wav", **stack["auth"]},
    )
    assert only.status_code == 415 and "embeds image inputs; the input is audio" in only.json()["message"]


def test_search_by_image_and_record_id_finds_the_record_itself(stack, open_app):
    """/v1/search on the index `medray index` built from `medray embed`'s output: an uploaded image and a
    stored record id each find that record (distance ~0) with its provenance; filters, text on an image
    encoder (400), unknown ids (404) and a server without an index (404) answer what to do."""
    from medray.platform.records import record_id

    path = stack["inputs"] / "photos" / "derm_0000.png"
    rid = record_id(str(path))

    def check(body: dict) -> dict:
        hits = body["hits"]
        mine = next(h for h in hits if h["record_id"] == rid)
        assert mine["distance"] < 1e-3 and mine["distance"] <= hits[0]["distance"] + 1e-4
        assert mine["uri"] == str(path) and mine["frame"] == 0 and mine["member"] == ""
        assert body["weights_hash"] == stack["weights_hash"] and body["index"]["count"] >= len(hits)
        return mine

    r = _upload(stack, "photos/derm_0000.png", path="/v1/search?k=5", base=open_app, headers={})
    assert r.status_code == 200, r.text
    assert r.json()["query"]["kind"] == "image" and len(r.json()["hits"]) == 5
    mine = check(r.json())
    r = requests.post(open_app + "/v1/search", json={"record_id": rid, "k": 3}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    check(r.json())
    # filters: only records of the asked modality come back (this one only when it matches)
    r = requests.post(
        open_app + "/v1/search",
        json={"record_id": rid, "k": 50, "filters": {"modality": "CT"}},
        timeout=TIMEOUT,
    )
    assert r.status_code == 200, r.text
    assert r.json()["hits"] and all(h["modality"] == "CT" for h in r.json()["hits"])
    assert (rid in {h["record_id"] for h in r.json()["hits"]}) == (mine["modality"] == "CT")
    # text on an image-only encoder: 400 saying why; unknown record: 404; bad k: 400
    r = requests.post(open_app + "/v1/search", json={"text": "a rash"}, timeout=TIMEOUT)
    assert r.status_code == 400 and r.json()["code"] == "text_not_supported", r.text
    assert "image-text" in r.json()["message"]
    r = requests.post(open_app + "/v1/search", json={"record_id": "0" * 32}, timeout=TIMEOUT)
    assert r.status_code == 404 and r.json()["code"] == "unknown_record"
    r = requests.post(open_app + "/v1/search", json={"record_id": rid, "k": 0}, timeout=TIMEOUT)
    assert r.status_code == 400 and "k" in r.json()["message"]
    # the main app serves no index: 404 saying how to enable it
    r = requests.post(stack["url"] + "/v1/search", json={"record_id": rid}, headers=stack["auth"], timeout=TIMEOUT)
    assert r.status_code == 404 and r.json()["code"] == "search_disabled"
    assert "serve.search.index" in r.json()["message"] and "medray index" in r.json()["message"]


def test_redeploy_under_load_finishes_in_flight_requests(stack, open_app, tmp_path):
    """A config change that replaces the encoder replica, applied like `serve deploy`, drops no request."""
    config = yaml.safe_load(stack["config"].read_text())
    config["applications"][0]["args"]["serve"]["encoder"]["num_cpus"] = 0.9  # new actor options: new replica
    changed = tmp_path / "open-v2.yaml"
    changed.write_text(yaml.safe_dump(config))
    old = replica_pids(OPEN_APP, "Encoder")
    data = (stack["inputs"] / "photos/derm_0000.png").read_bytes()
    stop, results = threading.Event(), []

    def client():
        while not stop.is_set():
            t0 = time.perf_counter()
            r = requests.post(open_app + "/v1/embeddings", files={"file": ("a.png", data)}, timeout=TIMEOUT)
            results.append((time.time(), r.status_code, r.json().get("code"), time.perf_counter() - t0))

    thread = threading.Thread(target=client)
    thread.start()
    try:
        time.sleep(1.0)
        _run_ok(
            [str(BIN / "serve"), "run", "--non-blocking", "--address", stack["gcs"], str(changed)], stack["env"], 120
        )
        deadline = time.time() + 90
        while time.time() < deadline:
            now = replica_pids(OPEN_APP, "Encoder")
            if now and set(now).isdisjoint(old) and sum(r[1] == 200 for r in results[-3:]) == 3:
                break
            time.sleep(0.5)
    finally:
        stop.set()
        thread.join(timeout=TIMEOUT + 5)
    assert set(replica_pids(OPEN_APP, "Encoder")).isdisjoint(old), "the encoder replica was not replaced"
    assert {r[1] for r in results} == {200}, [r for r in results if r[1] != 200][:3]
    assert max(r[3] for r in results) < TIMEOUT


# ------------------------------------------------------------------------------ scaling and failures
def _load(stack, stop: threading.Event, results: list, rel: str = "photos/derm_0000.png") -> None:
    data = (stack["inputs"] / rel).read_bytes()
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            r = requests.post(
                stack["url"] + "/v1/embeddings", files={"file": ("a.png", data)}, headers=stack["auth"], timeout=TIMEOUT
            )
            results.append(
                (time.time(), r.status_code, r.json().get("replica") or r.json().get("code"), time.perf_counter() - t0)
            )
        except requests.RequestException as err:
            results.append((time.time(), type(err).__name__, None, time.perf_counter() - t0))


def test_autoscaling_burst_scales_up_then_back_down_finishing_requests(stack):
    assert len(_settle(APP)) == 1
    stop_burst, stop_trickle, results = threading.Event(), threading.Event(), []
    burst = [threading.Thread(target=_load, args=(stack, stop_burst, results)) for _ in range(11)]
    trickle = threading.Thread(target=_load, args=(stack, stop_trickle, results))  # runs through the scale-down
    for t in [*burst, trickle]:
        t.start()
    peak, deadline = 1, time.time() + 90
    try:
        while time.time() < deadline:
            peak = max(peak, len(replica_pids(APP, "Encoder")))
            served_by = {r[2] for r in results[-40:] if r[1] == 200}
            if peak >= 2 and len(served_by) >= 2:
                break
            time.sleep(0.5)
        stop_burst.set()
        for t in burst:
            t.join(timeout=TIMEOUT + 5)
        assert peak == 2, "the burst did not add a replica"
        deadline = time.time() + 60
        while len(replica_pids(APP, "Encoder")) > 1 and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(1.0)
    finally:
        stop_burst.set()
        stop_trickle.set()
        for t in [*burst, trickle]:
            t.join(timeout=TIMEOUT + 5)
    assert len(replica_pids(APP, "Encoder")) == 1, "replicas did not fall back after the burst"
    # requests in flight on the replica being removed finished (graceful shutdown): no errors at all
    assert {r[1] for r in results} == {200}, {r[1] for r in results}
    assert max(r[3] for r in results) < TIMEOUT


def test_killing_an_encoder_replica_under_load_recovers(stack):
    pids = replica_pids(APP, "Encoder")
    assert pids
    stop, results = threading.Event(), []
    threads = [threading.Thread(target=_load, args=(stack, stop, results)) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)
        killed_at = time.time()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 90
        while time.time() < deadline:  # until requests after the kill are served by a new replica
            if sum(1 for r in results if r[0] > killed_at + 0.5 and r[1] == 200) >= 10:
                break
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=TIMEOUT + 5)
    assert all(r[3] < TIMEOUT for r in results), "a request hung past its timeout"
    assert {r[1] for r in results} <= {200, 503}, {r[1] for r in results}
    late = [r for r in results if r[0] > killed_at + 0.5]
    assert late and sum(r[1] == 200 for r in late) >= 10
    for _ in range(3):
        assert _upload(stack, "photos/derm_0000.png").status_code == 200
    assert set(replica_pids(APP, "Encoder")).isdisjoint(pids)


def test_no_phi_in_server_logs_and_request_ids_in_log_lines(stack):
    text = Path(stack["log"]).read_text(errors="replace")
    leaked = [s for s in stack["info"]["phi"]["sentinels"] if s in text]
    assert not leaked, f"PHI in server logs: {leaked[:3]}"
    tagged = re.compile(APP + r"_Ingress \w+ [0-9a-f-]{36} -- POST /v1/embeddings")
    assert sum(1 for line in text.splitlines() if tagged.search(line)) > 5
