"""``medray submit`` / ``medray jobs`` against a real head (``ray start --head``) with token auth."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from medray.platform.samples import generate_samples

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
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", MEDRAY_PATIENT_SALT="test-salt",
               MEDRAY_HOME=str(root / "home"), MEDRAY_CACHE_DIR=str(root / "cache"), MEDRAY_PROGRESS="0")
    ports = [_free_port() for _ in range(5)]
    cmd = [str(BIN / "ray"), "start", "--head", f"--port={ports[0]}", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={ports[1]}", f"--ray-client-server-port={ports[2]}",
           f"--dashboard-agent-listen-port={ports[3]}", f"--min-worker-port={ports[4]}",
           f"--max-worker-port={ports[4] + 200}", "--num-cpus=2", f"--temp-dir={root / 'ray'}",
           "--disable-usage-stats"]
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
    return subprocess.run([str(BIN / "medray"), *args], env=env or head["env"], capture_output=True, text=True,
                          timeout=timeout)


def test_submit_embed_to_cluster_and_wait(head, s3, tmp_path):
    samples = tmp_path / "s"
    generate_samples(str(samples), n=8, hostile=False)
    fs = s3.filesystem()
    fs.put(str(samples / "dicom"), f"{s3.bucket}/submit/in/", recursive=True)
    out = f"s3://{s3.bucket}/submit/out"
    proc = _medray(head, "submit", "embed", f"input=s3://{s3.bucket}/submit/in/", f"output={out}",
                   "encoder=demo_tiny_vit", "tracking.enabled=false", "--address", head["address"], "--wait")
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


def test_failing_job_reports_failed_with_its_error(head):
    proc = _medray(head, "submit", "embed", "input=/definitely/not/here", "output=/tmp/mr-nowhere",
                   "--address", head["address"], "--wait")
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
