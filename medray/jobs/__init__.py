"""Jobs: one module per job (``embed``, ``finetune``, ``serve``, ...).

A job module declares ``JOB = JobInfo(...)`` and a ``main(cfg) -> int``; the
CLI finds it here by name, so adding a job never touches ``cli.py``. Job
modules keep their top-level imports light (no torch, no ray): ``medray
--help`` imports all of them.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["JobInfo", "discover_jobs"]


@dataclass(frozen=True)
class JobInfo:
    """How the CLI runs a job.

    Attributes:
        name: the sub-command (``medray <name>``).
        description: one line for ``medray --help``.
        config_name: Hydra primary config in ``conf/`` (None: the job parses its own argv).
        register: registers the job's structured-config schemas with Hydra.
        order: position in ``medray --help``.
        exit_fast: a console run ends with ``os._exit`` once the job returned
            (its outputs are committed): skips Ray's and the interpreter's teardown.
    """

    name: str
    description: str
    config_name: str | None = None
    register: Callable[[], None] | None = field(default=None, compare=False)
    order: int = 50
    exit_fast: bool = False


def discover_jobs() -> dict[str, tuple[JobInfo, str]]:
    """Find every job module in this package: name -> (JobInfo, module path)."""
    jobs: dict[str, tuple[JobInfo, str]] = {}
    for mod in pkgutil.iter_modules(__path__):
        if mod.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{mod.name}")
        info = getattr(module, "JOB", None)
        if isinstance(info, JobInfo):
            jobs[info.name] = (info, module.__name__)
    return dict(sorted(jobs.items(), key=lambda kv: (kv[1][0].order, kv[0])))
