"""Ray runtime setup shared by every job."""

from __future__ import annotations

import logging
import os
from typing import Any

__all__ = ["init_ray", "cluster_gpus"]

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
    kwargs: dict[str, Any] = {"address": address, "logging_level": logging.WARNING, "runtime_env": runtime_env}
    if address == "local":
        kwargs["num_cpus"] = num_cpus
        kwargs["include_dashboard"] = include_dashboard
    ray.init(**kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = os.environ.get("MEDRAY_PROGRESS", "1") != "0"
    ctx.print_on_execution_start = False
    # Record-level failures never raise (they become quarantine rows); this only covers a
    # task that keeps crashing its worker process (e.g. a native decoder fault).
    ctx.max_errored_blocks = max_errored_blocks
    return ray


def cluster_gpus() -> float:
    """Total GPUs in the connected cluster (0 on a CPU-only machine)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))
