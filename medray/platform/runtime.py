"""Ray runtime setup shared by every job."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast

__all__ = [
    "Background",
    "Stopwatch",
    "cluster_gpus",
    "connected_address",
    "init_ray",
    "process_start",
    "progress_mode",
]

T = TypeVar("T")

log = logging.getLogger("medray")


def init_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    include_dashboard: bool = False,
    runtime_env: dict | None = None,
    max_errored_blocks: int = 0,
) -> Any:
    """Connect to Ray, or start a local one.

    ``address=None`` connects to the cluster a submitted job runs in
    (``RAY_ADDRESS`` is set by the Jobs API) and otherwise starts a fresh
    local Ray (``address="local"``), ignoring stale addresses that a killed
    head may have left behind.

    Returns:
        The ``ray`` module, initialised.
    """
    import ray

    if ray.is_initialized():
        ray.data.DataContext.get_current().max_errored_blocks = max_errored_blocks
        return ray
    if address is None:
        address = os.environ.get("RAY_ADDRESS") or "local"
    if not _isatty(sys.stderr):
        # a log (a file, a submitted job's log): Ray prints its workers' lines without colour codes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    kwargs: dict[str, Any] = {"address": address, "logging_level": logging.WARNING, "runtime_env": runtime_env}
    if address == "local":
        kwargs["num_cpus"] = num_cpus
        kwargs["include_dashboard"] = include_dashboard
    ray.init(**kwargs)
    ctx = ray.data.DataContext.get_current()
    # one bar on the terminal: medray's own (records, outcomes, time left) unless MEDRAY_PROGRESS=ray
    ctx.enable_progress_bars = progress_mode() == "ray"
    if not ctx.enable_progress_bars:
        from ray.util.debug import log_once

        # Ray Data would say once how to turn its bars back on; with medray, MEDRAY_PROGRESS=ray does
        log_once("ray_data_progress_manager_disabled")
    ctx.print_on_execution_start = False
    # Record-level failures never raise (they become quarantine rows); this only covers a
    # task that keeps crashing its worker process (e.g. a native decoder fault).
    ctx.max_errored_blocks = max_errored_blocks
    return ray


def connected_address() -> str | None:
    """The GCS address of the Ray this process is connected to; ``None`` when it is not (or via Ray Client).

    A job that runs another ``medray`` job as a child process passes it as
    ``RAY_ADDRESS``, so the child joins this Ray instead of starting a second
    local one beside it (:func:`init_ray` with ``address=None``).
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    try:
        from ray.util.client import ray as client

        if client.is_connected():  # a ray:// address: this machine is no node of that cluster
            return None
        address = ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - no address to pass on: the child starts its own, as before
        return None
    return str(address) if address else None


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress_mode() -> str:
    """What a job shows while it runs, from ``MEDRAY_PROGRESS``.

    Returns:
        ``"medray"`` (the default: medray's own progress, one bar on a terminal,
        a line every few seconds in logs), ``"ray"`` (Ray Data's operator bars
        instead) or ``"off"`` (``MEDRAY_PROGRESS=0``: neither).
    """
    value = os.environ.get("MEDRAY_PROGRESS", "1").strip().lower()
    if value in ("0", "off", "false", "no"):
        return "off"
    return "ray" if value == "ray" else "medray"


def cluster_gpus() -> float:
    """Total GPUs in the connected cluster (0 on a CPU-only machine)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


class Stopwatch:
    """Named phases of a driver, in seconds: ``lap(name)`` closes the phase that ran since the last lap."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        """Record the time since the previous lap (or construction) under ``name`` (added up if repeated)."""
        now = time.perf_counter()
        self.phases[name] = round(self.phases.get(name, 0.0) + now - self._t, 3)
        self._t = now


class Background(Generic[T]):
    """Run ``fn(*args)`` in a daemon thread now; :meth:`result` waits and returns it or raises its error.

    For driver work that waits on imports or I/O (building a preprocessor)
    while the main thread does other work (listing, starting Ray). Ray itself
    must start on the main thread: the processes it starts die with the thread
    that started them.
    """

    def __init__(self, fn: Callable[..., T], *args: Any) -> None:
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, *args), daemon=True, name="medray-background")
        self._thread.start()

    def _run(self, fn: Callable[..., T], *args: Any) -> None:
        try:
            self._value = fn(*args)
        except BaseException as err:  # noqa: BLE001 - re-raised on the caller's thread by result()
            self._error = err

    def result(self) -> T:
        """The function's return value (its exception is raised here)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return cast(T, self._value)


def process_start() -> float | None:
    """When this process started (epoch seconds), from ``/proc``; None where that is not readable."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None
