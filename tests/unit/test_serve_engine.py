"""The encoder replica's model runners: the child-process engine answers as the in-thread one."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from medray.encoders import build_tiny_checkpoint
from medray.platform.errors import ConfigError, EncodeError
from medray.serve.engine import ThreadRunner, choose_engine, create_runner, usable_cpus


@pytest.fixture(scope="module")
def siglip_spec(tmp_path_factory: pytest.TempPathFactory) -> dict:
    ckpt = build_tiny_checkpoint("siglip", str(tmp_path_factory.mktemp("siglip")))
    return {"name": "tiny_siglip", "family": "siglip", "checkpoint": ckpt, "untrained": True}


def test_choose_engine_takes_a_process_only_where_a_threads_team_would_be_throttled() -> None:
    cpus = usable_cpus()
    assert choose_engine("auto", "cpu", cpus) == ("process" if cpus > 1 else "thread")
    assert choose_engine("auto", "cpu", 1) == "thread"  # one thread: no OpenMP team at all
    assert choose_engine("auto", "cuda", max(2, cpus)) == "thread"  # the GPU does the work
    if cpus > 2:
        assert choose_engine("auto", "cpu", cpus - 1) == "thread"
    assert choose_engine("process", "cuda", 1) == "process"  # an explicit choice stands
    assert choose_engine("thread", "cpu", cpus) == "thread"


@pytest.mark.slow  # spawns a model process (torch import, ~5 s)
def test_process_runner_equals_the_thread_runner_for_images_and_texts(siglip_spec: dict) -> None:
    proc, pre = create_runner(siglip_spec, engine="process", device="cpu", dtype="auto", threads=2)
    thread, encoder = create_runner(siglip_spec, engine="thread", device="cpu", dtype="auto", threads=2)
    try:
        assert isinstance(thread, ThreadRunner)
        # the replica keeps only the preprocessing; it preprocesses as the encoder does
        assert pre.preprocessing_hash == encoder.preprocessing_hash
        assert pre.weights_hash == encoder.weights_hash
        assert proc.describe() == thread.describe() and proc.dim == thread.dim
        rng = np.random.default_rng(0)
        batch = pre.preprocess([rng.integers(0, 255, (40 + 7 * i, 50, 3), dtype=np.uint8) for i in range(3)])
        a, b = proc.embed(batch), thread.embed(batch)
        assert a.dtype == np.float32 and a.shape == (3, proc.dim) and a.flags.writeable
        assert np.abs(a - b).max() == 0.0
        texts = ["a chest x-ray", "no finding"]
        assert np.abs(proc.embed_text(texts) - thread.embed_text(texts)).max() == 0.0
        assert proc.embed(batch[:0]).shape == (0, proc.dim)
        # a bad batch is the call's error, and the process keeps serving
        with pytest.raises(EncodeError, match="expected"):
            proc.embed(np.zeros((2, 3, 5), np.float32))
        assert np.abs(proc.embed(batch[:1]) - thread.embed(batch[:1])).max() == 0.0
    finally:
        proc.close()
    assert not proc.alive()


@pytest.mark.slow  # spawns a model process (torch import, ~5 s)
def test_a_dead_model_process_fails_its_calls_and_the_health_check_sees_it(siglip_spec: dict) -> None:
    runner, _ = create_runner(siglip_spec, engine="process", device="cpu", dtype="auto", threads=1)
    try:
        assert runner.alive()
        pid = runner.pid  # type: ignore[attr-defined]
        os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 10
        while runner.alive() and time.time() < deadline:
            time.sleep(0.05)
        assert not runner.alive()
        with pytest.raises(RuntimeError, match="model process exited"):
            runner.embed(np.zeros((1, 3, 32, 32), np.float32))
    finally:
        runner.close()


@pytest.mark.slow  # spawns a model process (torch import, ~5 s)
def test_weights_the_model_process_cannot_load_are_its_named_error(siglip_spec: dict, tmp_path) -> None:
    """The replica's preprocessing loads, the child's weights do not: the child's error class comes back."""
    import shutil
    from pathlib import Path

    ckpt = Path(shutil.copytree(siglip_spec["checkpoint"], tmp_path / "ckpt"))
    weights = [p for p in ckpt.rglob("*") if p.suffix in (".safetensors", ".bin")]
    assert weights
    for p in weights:
        p.write_bytes(b"not a weights file")
    with pytest.raises(RuntimeError, match=r"the model process could not load the encoder: \w+Error"):
        create_runner({**siglip_spec, "checkpoint": str(ckpt)}, engine="process", device="cpu", dtype="auto", threads=1)


@pytest.mark.slow  # spawns a model process (torch import, ~5 s)
def test_a_checkpoint_without_preprocessing_is_refused_in_the_replica_and_the_child_is_stopped(tmp_path) -> None:
    import subprocess

    bad = {"name": "broken", "family": "hf_image", "checkpoint": str(tmp_path), "untrained": True}
    before = subprocess.run(["pgrep", "-f", "medray.serve.engine"], capture_output=True, text=True).stdout.split()
    with pytest.raises(ConfigError) as info:
        create_runner(bad, engine="process", device="cpu", dtype="auto", threads=1)
    assert info.value.key == "encoder.checkpoint" and "preprocessor_config.json" in str(info.value)
    after = subprocess.run(["pgrep", "-f", "medray.serve.engine"], capture_output=True, text=True).stdout.split()
    assert set(after) <= set(before)  # no model process left behind
