"""Faults a real cluster has, injected while ``medray embed`` runs; nothing may be lost.

* a worker node of a two-node Ray cluster (``ray start --head`` and a second
  ``ray start --address=...`` on this machine, each with its own CPU) is
  killed mid-run: the job finishes, or the same command run again finishes,
  with exactly one row per input;
* the S3 server goes away mid-run and comes back on the same port with the
  same data: reads and writes wait for it (``retry_transient``) instead of
  quarantining good records; exactly one row per input.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medray.encoders import build_tiny_checkpoint
from medray.testing import SeaweedS3
from medray.testing.samples import generate_samples

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = Path(sys.executable).parent
MEDRAY = str(BIN / "medray")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    info = generate_samples(str(root / "samples"))
    files = sorted((root / "samples" / "dicom").rglob("*.dcm"))
    ckpt = build_tiny_checkpoint("hf_image", str(root / "ckpt"), arch="vit", image_size=32)
    return {"root": root, "dicoms": files, "ckpt": ckpt, "info": info}


def _env(root: Path, **extra: str) -> dict:
    env = dict(os.environ, MEDRAY_HOME=str(root / "home"), MEDRAY_PATIENT_SALT="s", MEDRAY_PROGRESS="0")
    env.update(extra)
    return env


def _rows(out: Path | pa.Table) -> pa.Table:
    if isinstance(out, pa.Table):
        return out
    d = out / "embeddings"
    return pq.read_table(d) if d.exists() else pa.table({"record_id": pa.array([], pa.string())})


def _one_row_per_input(emb: pa.Table, expected: int) -> None:
    keys = list(zip(emb.column("record_id").to_pylist(), emb.column("frame").to_pylist()))
    assert len(keys) == len(set(keys)), "duplicated rows"
    assert len({k for k, _ in keys}) == expected, f"{len({k for k, _ in keys})} records of {expected}"


# ------------------------------------------------------------------ two nodes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ray_processes(tag: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(tag in part for part in p.info["cmdline"] or []):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.fixture
def two_nodes():
    """A head (1 CPU) and a worker node (1 CPU) on this machine, each under its own temp dir; torn down after."""
    tag = f"/tmp/mr-{uuid.uuid4().hex[:6]}"
    head_dir, worker_dir = f"{tag}h", f"{tag}w"
    port = _free_port()
    ray = str(BIN / "ray")
    # `ray start --head` turns token authentication on; the second node and the driver present the token
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")
    subprocess.run(
        [
            ray,
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=1",
            "--include-dashboard=false",
            f"--temp-dir={head_dir}",
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=120,
    )
    address = f"127.0.0.1:{port}"
    subprocess.run(
        [ray, "start", f"--address={address}", "--num-cpus=1", f"--temp-dir={worker_dir}"],
        check=True,
        env=env,
        capture_output=True,
        timeout=120,
    )
    try:
        yield {"address": address, "worker_tag": worker_dir, "tag": tag, "env": {"RAY_AUTH_MODE": "token"}}
    finally:
        for p in _ray_processes(tag):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        for d in (head_dir, worker_dir):
            shutil.rmtree(d, ignore_errors=True)


def test_killing_a_worker_node_mid_embed_loses_nothing(inputs, two_nodes, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for f in inputs["dicoms"]:
        shutil.copy(f, src / f.name)
    out = tmp_path / "out"
    args = [
        MEDRAY,
        "embed",
        f"input={src}",
        f"output={out}",
        "encoder=hf_image",
        f"encoder.checkpoint={inputs['ckpt']}",
        f"ray.address={two_nodes['address']}",
        "compute.read_batch_size=1",
        "compute.batch_size=1",
        "compute.actor_num_cpus=0.5",
        "tracking.enabled=false",
        "max_error_fraction=1.0",
    ]
    env = _env(inputs["root"], **two_nodes["env"])
    log = open(tmp_path / "run1.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    killed = False
    while time.time() < deadline and proc.poll() is None:
        parts = out / "embeddings"
        if parts.exists() and sum(1 for p in parts.iterdir() if p.suffix == ".parquet") >= 2:
            raylets = [p for p in _ray_processes(two_nodes["worker_tag"]) if "raylet" in " ".join(p.cmdline())]
            assert raylets, "the worker node's raylet was not found"
            for p in _ray_processes(two_nodes["worker_tag"]):  # the node and everything on it
                try:
                    p.send_signal(signal.SIGKILL)
                except psutil.NoSuchProcess:
                    pass
            killed = True
            break
        time.sleep(0.1)
    rc = proc.wait(timeout=600)
    log.close()
    first_log = (tmp_path / "run1.log").read_text(errors="replace")
    assert killed, f"the run ended before the kill: {first_log[-2000:]}"
    if rc != 0:  # the job did not survive the node: the same command finishes it
        again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr[-3000:]
    emb = _rows(out)
    quarantined = pq.read_table(out / "quarantine").num_rows if (out / "quarantine").exists() else 0
    _one_row_per_input_or_quarantined(emb, quarantined, len(inputs["dicoms"]))


def _one_row_per_input_or_quarantined(emb: pa.Table, quarantined: int, expected: int) -> None:
    keys = list(zip(emb.column("record_id").to_pylist(), emb.column("frame").to_pylist()))
    assert len(keys) == len(set(keys)), "duplicated rows"
    records = len({k for k, _ in keys})
    assert records + quarantined == expected and quarantined == 0, (records, quarantined, expected)


# ------------------------------------------------------------------ S3 outage
def test_s3_restart_mid_embed_is_waited_for(inputs, tmp_path):
    bucket = "faults"
    with SeaweedS3(bucket=bucket) as s3:
        fs = s3.filesystem()
        for f in inputs["dicoms"]:
            fs.put(str(f), f"{bucket}/in/{f.name}")
        ckpt = f"s3://{bucket}/models/tiny"
        fs.put(inputs["ckpt"], ckpt.split("://")[1], recursive=True)
        out = f"s3://{bucket}/out"
        args = [
            MEDRAY,
            "embed",
            f"input=s3://{bucket}/in/",
            f"output={out}",
            "encoder=hf_image",
            f"encoder.checkpoint={ckpt}",
            "compute.read_batch_size=1",
            "compute.batch_size=1",
            "ray.num_cpus=2",
            "tracking.enabled=false",
        ]
        env = _env(inputs["root"], **s3.env(), MEDRAY_STORAGE_RETRY_S="120")
        log = open(tmp_path / "run.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        restarted = False
        while time.time() < deadline and proc.poll() is None:
            fs.invalidate_cache()
            if fs.exists(f"{bucket}/out/embeddings") and fs.find(f"{bucket}/out/embeddings"):
                s3.restart(down_s=10)  # refused connections for 10 s, then the server's start-up
                restarted = True
                break
            time.sleep(0.2)
        rc = proc.wait(timeout=600)
        log.close()
        text = (tmp_path / "run.log").read_text(errors="replace")
        assert restarted, f"the run ended before the outage: {text[-2000:]}"
        assert rc == 0, text[-3000:]
        fs = s3.filesystem()
        emb = pa.concat_tables(
            [pq.read_table(fs.open(p, "rb")) for p in fs.find(f"{bucket}/out/embeddings") if p.endswith(".parquet")]
        )
        assert not fs.exists(f"{bucket}/out/quarantine"), "good records quarantined during the outage"
        _one_row_per_input(emb, len(inputs["dicoms"]))
