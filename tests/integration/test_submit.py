"""``medray submit`` / ``medray jobs`` against a real head (``ray start --head``) with token auth."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from medray.testing.samples import generate_samples

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = Path(sys.executable).parent


def _free_port() -> int:
    # Ray's worker ports default to 10002-19999: stay above them.
    for port in range(40000 + secrets.randbelow(4000), 45000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


@pytest.fixture(scope="module")
def head(tmp_path_factory, s3):
    """A one-node cluster on loopback with token auth, isolated in its own temp dir."""
    root = Path(f"/tmp/mr-head-{secrets.token_hex(4)}")  # short: Ray's socket paths have a length limit
    root.mkdir()
    token = root / "token"
    token.write_text(secrets.token_hex(32))
    env = dict(
        os.environ,
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        MEDRAY_PATIENT_SALT="test-salt",
        MEDRAY_HOME=str(root / "home"),
        MEDRAY_CACHE_DIR=str(root / "cache"),
        MEDRAY_PROGRESS="0",
    )
    ports: list[int] = []
    while len(ports) < 5:  # distinct, and none inside the worker port range (ports[4] .. +200)
        port = _free_port()
        if (
            port not in ports
            and not (ports[4:] and ports[4] <= port <= ports[4] + 200)
            and not (len(ports) == 4 and any(port <= p <= port + 200 for p in ports))
        ):
            ports.append(port)
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        f"--port={ports[0]}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={ports[1]}",
        f"--ray-client-server-port={ports[2]}",
        f"--dashboard-agent-listen-port={ports[3]}",
        f"--min-worker-port={ports[4]}",
        f"--max-worker-port={ports[4] + 200}",
        "--num-cpus=2",
        f"--temp-dir={root / 'ray'}",
        "--disable-usage-stats",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    address = f"http://127.0.0.1:{ports[1]}"
    try:
        yield {"address": address, "env": env, "root": root}
    finally:
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(str(root) in part for part in (p.info["cmdline"] or [])):
                    p.send_signal(signal.SIGKILL)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass


def _medray(head, *args, env=None, timeout=600):
    return subprocess.run(
        [str(BIN / "medray"), *args], env=env or head["env"], capture_output=True, text=True, timeout=timeout
    )


def test_submit_embed_to_cluster_and_wait(head, s3, tmp_path):
    samples = tmp_path / "s"
    generate_samples(str(samples), n=8, hostile=False)
    fs = s3.filesystem()
    fs.put(str(samples / "dicom"), f"{s3.bucket}/submit/in/", recursive=True)
    out = f"s3://{s3.bucket}/submit/out"
    proc = _medray(
        head,
        "submit",
        "embed",
        f"input=s3://{s3.bucket}/submit/in/",
        f"output={out}",
        "encoder=demo_tiny_vit",
        "tracking.enabled=false",
        "--address",
        head["address"],
        "--wait",
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    job_id = proc.stdout.split()[0]
    assert job_id.startswith("raysubmit_") and f"{job_id} SUCCEEDED" in proc.stdout
    summary = json.loads(fs.cat(f"{s3.bucket}/submit/out/summary.json"))
    assert summary["records_embedded"] == 8
    # the token is never printed
    assert Path(head["env"]["RAY_AUTH_TOKEN_PATH"]).read_text() not in proc.stdout + proc.stderr
    status = _medray(head, "jobs", "status", job_id, "--address", head["address"])
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "SUCCEEDED"
    logs = _medray(head, "jobs", "logs", job_id, "--address", head["address"])
    assert "medray embed: 8 records embedded" in logs.stdout
    # the cluster's submitted jobs, as a table; following a finished job's log prints it and ends
    listed = _medray(head, "jobs", "list", "--address", head["address"])
    assert listed.returncode == 0, listed.stderr[-2000:]
    row = next(ln.split() for ln in listed.stdout.splitlines() if ln.startswith(job_id))
    assert row[1:3] == ["SUCCEEDED", "embed"] and "medray embed" in listed.stdout
    follow = _medray(head, "jobs", "logs", job_id, "--follow", "--address", head["address"], timeout=120)
    assert follow.returncode == 0, follow.stderr[-2000:]
    assert "medray embed: 8 records embedded" in follow.stdout and "outcomes of this run: 8 records" in follow.stdout


def test_failing_job_reports_failed_with_its_error(head):
    proc = _medray(
        head,
        "submit",
        "embed",
        "input=/definitely/not/here",
        "output=/tmp/mr-nowhere",
        "--address",
        head["address"],
        "--wait",
    )
    assert proc.returncode == 1
    assert "FAILED" in proc.stdout
    job_id = proc.stdout.split()[0]
    logs = _medray(head, "jobs", "logs", job_id, "--address", head["address"])
    assert "config key 'input'" in logs.stdout and "Traceback" not in logs.stdout


def test_without_token_the_cluster_refuses(head):
    env = {k: v for k, v in head["env"].items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(head["root"])  # no ~/.ray/auth_token there
    proc = _medray(head, "jobs", "status", "raysubmit_none", "--address", head["address"], env=env, timeout=120)
    assert proc.returncode == 2 and "cannot reach the Ray Jobs API" in proc.stderr


def test_submit_multirun_submits_one_job_per_point_each_into_its_own_output(head, s3, tmp_path):
    samples = tmp_path / "s"
    generate_samples(str(samples), n=4, hostile=False)
    from medray.encoders import build_tiny_checkpoint

    ckpt = build_tiny_checkpoint("hf_image", str(tmp_path / "tiny-vit"), arch="vit")
    fs = s3.filesystem()
    fs.put(str(samples / "dicom"), f"{s3.bucket}/sweep/in/", recursive=True)
    fs.put(ckpt, f"{s3.bucket}/sweep/tiny-vit", recursive=True)
    base = f"s3://{s3.bucket}/sweep/out"
    t0 = time.perf_counter()
    proc = _medray(
        head,
        "submit",
        "-m",
        "embed",
        "encoder=demo_tiny_vit,hf_image",
        f"encoder.checkpoint=s3://{s3.bucket}/sweep/tiny-vit",
        f"input=s3://{s3.bucket}/sweep/in/",
        f"output={base}/${{encoder.name}}",
        "tracking.mode=offline",
        "compute.batch_size=4",
        "cluster=remote",  # ray.address=auto: the cluster the job runs in (RAY_ADDRESS)
        # both jobs run at once on the 2-CPU head: each must fit in half of it, or each job's
        # encoder actor holds a CPU the other job's decode tasks wait for (Ray Data plans per job)
        "compute.actor_num_cpus=0.5",
        "compute.decode_num_cpus=0.5",
        "--address",
        head["address"],
        "--wait",
        timeout=900,
    )
    print(f"submit -m with 2 points: {time.perf_counter() - t0:.1f}s")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ids = [w for w in proc.stdout.split() if w.startswith("raysubmit_")]
    assert len(set(ids)) == 2, proc.stdout
    assert all(f"{i} SUCCEEDED" in proc.stdout for i in set(ids))
    for name in ("demo_tiny_vit", "hf_image"):
        summary = json.loads(fs.cat(f"{s3.bucket}/sweep/out/{name}/summary.json"))
        assert summary["encoder"] == name and summary["records_embedded"] == summary["records_total_in_output"] > 0
        assert summary["output"] == f"{base}/{name}"
        assert fs.find(f"{s3.bucket}/sweep/out/{name}/embeddings")
    # each point logged its W&B run offline with the summary as an `embeddings` artifact, in one group
    manifests = sorted(Path(head["env"]["MEDRAY_HOME"]).glob("wandb/offline-run-*/artifacts/*.manifest.json"))
    by_output = {json.loads(m.read_text())["metadata"]["output"]: json.loads(m.read_text()) for m in manifests}
    assert set(by_output) >= {f"{base}/demo_tiny_vit", f"{base}/hf_image"}
    for m in by_output.values():
        assert m["type"] == "embeddings" and set(m["manifest"]["contents"]) == {"summary.json"}
    logs = [p.read_bytes() for p in Path(head["env"]["MEDRAY_HOME"]).glob("wandb/offline-run-*/run-*.wandb")]
    groups = {g for g in (re.search(rb"sweep-[0-9a-f]{8}", b) for b in logs) if g}
    assert len({g.group() for g in groups}) == 1
