"""``medray <job> [hydra overrides]``: the one console entry point.

Jobs are found by name in :mod:`medray.jobs` (each module declares ``JOB``).
A job with a Hydra config is a Hydra app: ``medray <job> --help`` and
``--cfg job`` show the composed config and any key can be overridden as
``key=value``; a misspelt key or a wrong value stops before any work starts
and names the key.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from medray.config import CONF_DIR, register_schemas
from medray.jobs import discover_jobs
from medray.platform.errors import ConfigError

__all__ = ["main", "run_hydra"]

_USAGE = """usage: medray <job> [key=value ...] [--help] [--cfg job]

medray: a distributed platform for healthcare foundation models on Ray.

jobs:
{jobs}

examples:
  medray embed input=s3://bucket/cxr/ output=s3://bucket/emb/rad-dino encoder=rad_dino
  medray embed input=/data/manifest.parquet output=/data/emb encoder=hf_image encoder.checkpoint=s3://models/my-vit
  medray embed --cfg job          # show the composed config
  medray demo                     # the embedded default: local Ray, local files, generated samples
"""


def _usage(jobs: dict) -> str:
    width = max(len(j) for j in jobs)
    return _USAGE.format(jobs="\n".join(f"  {n.ljust(width)}  {info.description}" for n, (info, _) in jobs.items()))


def run_hydra(
    job: str,
    config_name: str,
    body: Callable[[Any], int],
    argv: Sequence[str],
    register: Callable[[], None] | None = None,
) -> None:
    """Run ``body(cfg)`` as a Hydra app on ``conf/<config_name>.yaml`` with ``argv`` overrides.

    A :class:`~medray.platform.errors.ConfigError` raised by ``body`` prints one
    line naming the key and exits with status 2 (no stack trace).
    """
    import hydra
    from omegaconf import DictConfig

    register_schemas()
    if register is not None:
        register()

    @hydra.main(config_path=CONF_DIR, config_name=config_name, version_base=None)
    def _app(cfg: DictConfig) -> None:
        try:
            code = body(cfg)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted: rerun the same command to resume; finished parts are kept", file=sys.stderr)
            sys.exit(130)
        if code:
            sys.exit(code)

    sys.argv = [f"medray {job}", *argv]
    _app()


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: dispatch to a job."""
    from_console = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    jobs = discover_jobs()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage(jobs))
        return
    name, rest = argv[0], argv[1:]
    if name not in jobs:
        print(f"error: unknown job '{name}'\n\n{_usage(jobs)}", file=sys.stderr)
        sys.exit(2)
    info, module_name = jobs[name]
    module = importlib.import_module(module_name)
    if info.config_name is None:
        code = module.main(rest)
        if code:
            sys.exit(code)
        return
    if hasattr(module, "prepare_argv"):
        rest = module.prepare_argv(rest)
    if not (info.exit_fast and from_console):
        run_hydra(name, info.config_name, module.main, rest, info.register)
        return
    try:
        run_hydra(name, info.config_name, module.main, rest, info.register)
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
    _exit_now(code)


def _exit_now(code: int) -> None:
    """End a finished console run without the interpreter's and Ray's slow teardown.

    Everything the job writes is committed before it returns (atomic parts,
    summary, the W&B run is finished); what is left is tearing down a local Ray
    (seconds), whose processes share the driver's fate, and freeing the
    interpreter. ``MEDRAY_FAST_EXIT=0`` keeps the ordinary exit.
    """
    if os.environ.get("MEDRAY_FAST_EXIT", "1") == "0":
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    _kill_descendants()  # a local Ray's GCS, raylet, workers and agents; nothing else is started
    os._exit(code)


def _kill_descendants() -> None:
    """SIGKILL every process this one started, and theirs (from ``/proc``; nothing where it is not readable)."""
    import signal

    children: dict[int, list[int]] = {}
    try:
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                children.setdefault(ppid, []).append(int(entry))
    except OSError:
        return
    todo, found = [os.getpid()], []
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


if __name__ == "__main__":
    main()
