"""Checkpoints on a real S3 endpoint (SeaweedFS): one copy per node, verified.

Marked ``integration`` and ``slow`` (the session's S3 server takes ~25 s to
start and stop); the fast checks of ``resolve_checkpoint`` live in
``test_encoders.py`` on fsspec's ``memory://`` filesystem.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medray.encoders import (
    build_tiny_checkpoint,
    create_encoder,
    get_spec,
    hash_directory,
    resolve_checkpoint,
)
from medray.platform.errors import ConfigError
from medray.testing import SeaweedS3

pytestmark = [pytest.mark.integration, pytest.mark.slow]

_RESOLVE = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
from medray.encoders import resolve_checkpoint
print(json.dumps(resolve_checkpoint(sys.argv[1], cache_dir=sys.argv[2])))
"""


@pytest.fixture(scope="module")
def s3_checkpoint(s3: SeaweedS3, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A tiny timm checkpoint uploaded to the test bucket: (uri, sha256)."""
    local = build_tiny_checkpoint("timm_image", str(tmp_path_factory.mktemp("s3ckpt") / "vit"))
    fs = s3.filesystem()
    prefix = f"{s3.bucket}/models/tiny-timm-vit"
    for path in Path(local).iterdir():
        fs.pipe_file(f"{prefix}/{path.name}", path.read_bytes())
    return f"s3://{prefix}", hash_directory(local)


def test_s3_checkpoint_loads_and_is_pinned(s3: SeaweedS3, s3_checkpoint: tuple[str, str], tmp_path: Path) -> None:
    uri, sha = s3_checkpoint
    spec = get_spec(
        "timm_image", checkpoint=uri, sha256=sha, cache_dir=str(tmp_path), storage_options={"s3": s3.storage_options()}
    )  # keyed by protocol, like storage.options
    encoder = create_encoder(spec)
    info = encoder.describe()
    assert info["checkpoint"] == uri and info["weights_hash"] == sha and info["untrained"] is True
    assert str(tmp_path) not in json.dumps(info)
    with pytest.raises(ConfigError, match=r"encoder\.sha256"):
        resolve_checkpoint(uri, cache_dir=str(tmp_path), expected_sha256="f" * 64)


def test_concurrent_processes_download_once(s3_checkpoint: tuple[str, str], tmp_path: Path) -> None:
    uri, sha = s3_checkpoint
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RESOLVE, uri, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ),
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    results = {tuple(json.loads(out)) for out, _ in outs}
    assert len(results) == 1 and next(iter(results))[1] == sha
    copies = sum(err.count("cached checkpoint") for _, err in outs)
    assert copies == 1, "exactly one process should have copied the checkpoint"
