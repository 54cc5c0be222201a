"""Shared pytest configuration and fixtures for medray.

Layout (add new fixtures in their own section):

* markers: ``slow``, ``integration``, ``gpu``;
* object storage: ``s3`` (one SeaweedFS S3 server per session, AWS_* env set).
"""

from __future__ import annotations

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
