"""Run tracking with Weights & Biases: offline unless a key is set."""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional

__all__ = ["wandb_mode", "log_run", "default_group"]

log = logging.getLogger("medray")


def wandb_mode(mode: str = "auto") -> str:
    """Resolve ``auto`` to ``online`` when ``WANDB_API_KEY`` is set, else ``offline``."""
    if mode != "auto":
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def default_group() -> Optional[str]:
    """The W&B group shared by the runs of one Hydra multirun sweep (None outside a sweep)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return f"{hc.job.name}-{os.path.basename(str(hc.sweep.dir).rstrip('/'))}"
    except (ValueError, ImportError):
        pass
    return None


def log_run(*, job: str, config: Mapping[str, Any], summary: Mapping[str, Any], project: str = "medray",
            mode: str = "auto", group: Optional[str] = None, name: Optional[str] = None,
            directory: Optional[str] = None, metrics: Optional[Mapping[str, float]] = None) -> Optional[str]:
    """Log one finished run (config, summary, metrics) to W&B.

    Returns:
        The local run directory, or None when tracking is disabled or fails
        (tracking never fails a job; the reason is logged).
    """
    mode = wandb_mode(mode)
    if mode == "disabled":
        return None
    try:
        import wandb

        directory = directory or os.path.join(os.environ.get("MEDRAY_HOME", ".medray"))
        os.makedirs(directory, exist_ok=True)
        run = wandb.init(project=project, job_type=job, group=group, name=name, dir=directory,
                         mode=mode, config=dict(config), reinit="finish_previous",
                         settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
        if metrics:
            run.log(dict(metrics))
        for k, v in summary.items():
            if isinstance(v, (int, float, str, bool)):
                run.summary[k] = v
        run_dir = run.dir
        run.finish()
        return os.path.dirname(run_dir)
    except Exception as err:  # noqa: BLE001 - tracking must not lose a finished job
        log.warning("W&B logging skipped: %s: %s", type(err).__name__, err)
        return None
