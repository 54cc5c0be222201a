"""Start-up and exit helpers of the driver: identity key, background work, phases, fast exit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from medray.encoders import EncoderSpec, identity_key
from medray.platform.runtime import Background, Stopwatch, process_start


def _spec(**kw) -> EncoderSpec:
    return EncoderSpec(**{"name": "x", "family": "hf_image", "checkpoint": "/ckpt", **kw})


def test_identity_key_follows_specs_and_weights_not_credentials():
    base = identity_key({"image": _spec()}, {"image": "a" * 64})
    assert base == identity_key({"image": _spec()}, {"image": "a" * 64})
    assert base == identity_key({"image": _spec(storage_options={"key": "secret"})}, {"image": "a" * 64})
    assert base != identity_key({"image": _spec()}, {"image": "b" * 64})
    assert base != identity_key({"image": _spec(pooling="mean")}, {"image": "a" * 64})
    two = {"image": _spec(), "text": _spec(name="t", family="hf_text")}
    assert base != identity_key(two, {"image": "a" * 64, "text": "c" * 64})


def test_background_returns_value_and_reraises_on_the_caller():
    assert Background(lambda a, b: a + b, 2, 3).result() == 5

    def boom() -> None:
        raise ValueError("bad processor config")

    with pytest.raises(ValueError, match="bad processor config"):
        Background(boom).result()


def test_stopwatch_adds_repeated_phases():
    clock = Stopwatch()
    time.sleep(0.01)
    clock.lap("a")
    clock.lap("b")
    time.sleep(0.01)
    clock.lap("a")
    assert set(clock.phases) == {"a", "b"} and clock.phases["a"] >= 0.02 > clock.phases["b"]


def test_process_start_is_before_now():
    started = process_start()
    if started is None:
        pytest.skip("no /proc here")
    assert 0 <= time.time() - started < 24 * 3600


def test_fast_exit_kills_every_descendant_and_keeps_the_exit_code(tmp_path):
    """``medray``'s fast exit leaves no process behind (a local Ray's are children and grandchildren)."""
    script = textwrap.dedent(
        """
        import subprocess, sys
        from medray.cli import _exit_now
        child = subprocess.Popen(["sh", "-c", "sleep 300 & echo $! > {pids}; sleep 300"])
        import time
        while not open({pids!r}).read().strip():
            time.sleep(0.05)
        with open({pids!r}, "a") as f:
            f.write(f"\\n{{child.pid}}")
        _exit_now(3)
        """
    ).format(pids=str(tmp_path / "pids"))
    (tmp_path / "pids").write_text("")
    proc = subprocess.run([sys.executable, "-c", script], timeout=60)
    assert proc.returncode == 3
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
    assert len(pids) == 2
    deadline = time.time() + 5
    alive = pids
    while alive and time.time() < deadline:
        alive = [p for p in pids if _alive(p)]
        time.sleep(0.05)
    assert not alive, f"left behind: {alive}"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
