"""The test S3 server is real: data round-trips and credentials are checked."""

from __future__ import annotations

import os
import uuid

import pytest
import s3fs

from medray.testing import SeaweedS3

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _env_only_fs() -> s3fs.S3FileSystem:
    """An s3fs filesystem configured by AWS_* environment variables alone."""
    return s3fs.S3FileSystem(skip_instance_cache=True)


def test_env_points_at_server(s3: SeaweedS3) -> None:
    assert os.environ["AWS_ENDPOINT_URL"] == s3.endpoint_url
    assert os.environ["AWS_ACCESS_KEY_ID"] == s3.access_key
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == s3.secret_key
    assert os.environ["AWS_EC2_METADATA_DISABLED"] == "true"
    assert s3.endpoint_url.startswith("http://127.0.0.1:")
    # every port (and gRPC = port + 10000) stays below 45000
    assert all(p + 10000 < 45000 for p in s3.ports.values())


def test_put_get_ls_with_env_credentials(s3: SeaweedS3) -> None:
    fs = _env_only_fs()
    prefix = f"{s3.bucket}/roundtrip-{uuid.uuid4().hex[:8]}"
    payload = bytes(range(256)) * 64
    fs.pipe(f"{prefix}/a/one.bin", payload)
    fs.pipe(f"{prefix}/a/two.txt", b"two")
    with fs.open(f"{prefix}/b/three.txt", "wb") as f:
        f.write(b"three")

    assert fs.cat(f"{prefix}/a/one.bin") == payload
    assert fs.cat_ranges([f"{prefix}/a/one.bin"], [10], [20]) == [payload[10:20]]
    assert sorted(fs.ls(f"{prefix}/a", detail=False)) == [
        f"{prefix}/a/one.bin",
        f"{prefix}/a/two.txt",
    ]
    assert fs.info(f"{prefix}/a/one.bin")["size"] == len(payload)
    assert len(fs.find(prefix)) == 3

    fs.rm(prefix, recursive=True)
    fs.invalidate_cache()
    assert not fs.exists(f"{prefix}/a/one.bin")


def test_make_bucket_and_filesystem_helper(s3: SeaweedS3) -> None:
    name = s3.make_bucket(f"extra-{uuid.uuid4().hex[:8]}")
    fs = s3.filesystem()
    fs.pipe(f"{name}/k", b"v")
    assert fs.cat(f"{name}/k") == b"v"
    assert name in fs.ls("", detail=False)


def test_wrong_secret_is_refused(s3: SeaweedS3) -> None:
    _env_only_fs().pipe(f"{s3.bucket}/auth/secret.txt", b"secret")
    bad = s3fs.S3FileSystem(
        key=s3.access_key,
        secret=s3.secret_key + "-wrong",
        endpoint_url=s3.endpoint_url,
        skip_instance_cache=True,
    )
    with pytest.raises(PermissionError):
        bad.cat(f"{s3.bucket}/auth/secret.txt")
    with pytest.raises(PermissionError):
        bad.pipe(f"{s3.bucket}/auth/evil.txt", b"x")


def test_unknown_key_and_anonymous_are_refused(s3: SeaweedS3) -> None:
    _env_only_fs().pipe(f"{s3.bucket}/auth/private.txt", b"private")
    unknown = s3fs.S3FileSystem(
        key="AKIANOTAKEY", secret="nope", endpoint_url=s3.endpoint_url, skip_instance_cache=True
    )
    with pytest.raises(PermissionError):
        unknown.ls(s3.bucket)
    anon = s3fs.S3FileSystem(anon=True, endpoint_url=s3.endpoint_url, skip_instance_cache=True)
    with pytest.raises(PermissionError):
        anon.pipe(f"{s3.bucket}/anon.txt", b"x")
    with pytest.raises(PermissionError):
        anon.cat(f"{s3.bucket}/auth/private.txt")
    with pytest.raises(PermissionError):
        anon.ls(s3.bucket)
