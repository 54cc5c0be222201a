"""Shared pytest configuration and fixtures for medray.

Layout (add new fixtures in their own section):

* markers: ``slow``, ``integration``, ``gpu``;
* Ray Train's poll interval: ``ray_train_poll`` (autouse, session);
* DeepSpeed: ``deepspeed_warm`` (its CPU comm op built once per session, before any timed run);
* object storage: ``s3`` (one SeaweedFS S3 server per session, AWS_* env set).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from medray.testing import SeaweedError, SeaweedS3, find_weed_binary

# --------------------------------------------------------------------------
# markers
# --------------------------------------------------------------------------
MARKERS = {
    "slow": "takes more than a few seconds (deselect with -m 'not slow')",
    "integration": "needs real services started by fixtures (S3 server, Ray)",
    "gpu": "needs a CUDA GPU; skipped when none is available",
}


def pytest_configure(config: pytest.Config) -> None:
    for name, doc in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {doc}")


# --------------------------------------------------------------------------
# Ray Train's poll interval
# --------------------------------------------------------------------------
RAY_TRAIN_POLL_S = "0.5"


@pytest.fixture(scope="session", autouse=True)
def ray_train_poll() -> Iterator[None]:
    """``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.5`` for the session (and the CLIs it starts).

    Ray Train's controller polls its workers every 2 s by default, and a worker's
    ``ray.train.report`` waits until the previous report was collected (a queue of
    one): every epoch of the tests' tiny fine-tunes, which train in well under a
    second, took 2 s, and the end of training and a dead worker were noticed up to
    2 s late. Only the cadence changes; what Ray Train does is the same.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", RAY_TRAIN_POLL_S)
        yield


# --------------------------------------------------------------------------
# DeepSpeed
# --------------------------------------------------------------------------
WARM_DEEPSPEED = """
import os
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29613", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import torch, torch.distributed as dist
dist.init_process_group("gloo", rank=0, world_size=1)
import deepspeed
m = torch.nn.Linear(4, 2)
cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2},
       "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30}
engine, *_ = deepspeed.initialize(model=m, optimizer=torch.optim.AdamW(m.parameters()), config=cfg,
                                  dist_init_required=False)
"""


@pytest.fixture(scope="session")
def deepspeed_warm() -> None:
    """Build DeepSpeed's CPU comm op once (about 40-100 s the first time on a machine, then cached).

    Session-scoped: every module that fine-tunes asks for it, and it runs once.
    """
    proc = subprocess.run([sys.executable, "-c", WARM_DEEPSPEED], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


# --------------------------------------------------------------------------
# object storage (SeaweedFS S3)
# --------------------------------------------------------------------------
S3_BUCKET = "medray-test"

# AWS settings that would leak the developer's real config into tests.
_AWS_VARS_TO_CLEAR = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


@pytest.fixture(scope="session")
def s3() -> Iterator[SeaweedS3]:
    """A started SeaweedFS S3 server with bucket ``S3_BUCKET`` (``s3.bucket``).

    For the whole session, ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION`` and
    ``AWS_EC2_METADATA_DISABLED`` point at it (restored afterwards), so s3fs
    and botocore in this process and in child processes started later (Ray
    workers) find it without extra arguments. Start ~4 s; stop ~15 s
    (SeaweedFS' graceful shutdown).
    """
    try:
        find_weed_binary()
    except SeaweedError as exc:
        pytest.fail(f"SeaweedFS is required for the S3 tests: {exc}")

    server = SeaweedS3(bucket=S3_BUCKET)
    server.start()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for name in _AWS_VARS_TO_CLEAR:
                mp.delenv(name, raising=False)
            for name, value in server.env().items():
                mp.setenv(name, value)
            yield server
    finally:
        server.stop(timeout=2)  # its data dir is discarded: no need for the 15 s graceful exit
