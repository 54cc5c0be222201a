"""``medray <job> [hydra overrides]``: the one console entry point.

Jobs are found by name in :mod:`medray.jobs` (each module declares ``JOB``).
A job with a Hydra config is a Hydra app: ``--cfg job`` shows the composed
config and any key can be overridden as ``key=value``; a misspelt key or a
wrong value stops before any work starts and names the key. ``medray <job>
--help`` lists that job's config groups and settings only (read from its
primary config, before Hydra starts); ``--hydra-help`` is Hydra's own help.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import textwrap
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import medray
from medray.config import CONF_DIR, register_schemas
from medray.jobs import discover_jobs
from medray.platform.errors import ConfigError

__all__ = ["job_help", "main", "run_hydra", "version_line"]

_USAGE = """usage: medray <job> [key=value ...] [--help] [--cfg job]
       medray --version

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


def version_line() -> str:
    """``medray X.Y.Z (ray A, torch B, python C)``: what ``medray --version`` prints (nothing is imported)."""
    parts = []
    for dist in ("ray", "torch"):
        try:
            parts.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{dist} not installed")
    parts.append("python " + ".".join(str(v) for v in sys.version_info[:3]))
    return f"medray {medray.__version__} ({', '.join(parts)})"


_DEFAULT_LINE = re.compile(r"^\s*-\s*(?:optional\s+)?([A-Za-z_][\w/]*)\s*:\s*([^#\s]+)\s*(?:#\s*(.*))?$")
_KEY_LINE = re.compile(r"^([A-Za-z_]\w*)\s*:\s*([^#]*?)\s*(?:#\s*(.*))?$")


def job_help(job: str, config_name: str, description: str) -> str:
    """The ``--help`` of a Hydra job: its usage, its config groups with their options, its settings.

    Read from the job's primary config (``conf/<config_name>.yaml``): the
    groups are the ones its ``defaults:`` list names, so ``medray embed
    --help`` never lists a group only ``finetune`` uses.

    Args:
        job: the sub-command.
        config_name: the job's primary config in ``conf/``.
        description: the job's one line (:class:`~medray.jobs.JobInfo`).
    """
    conf = Path(CONF_DIR)
    lines_in = (conf / f"{config_name}.yaml").read_text().splitlines()
    header = [ln.lstrip("# ").rstrip() for ln in lines_in if ln.startswith("#")]
    header = header[: next((i for i, ln in enumerate(lines_in) if not ln.startswith("#")), len(header))]
    groups: list[tuple[str, str, str]] = []
    keys: list[tuple[str, str, str]] = []
    in_defaults = False
    for ln in lines_in:
        if ln.startswith("defaults:"):
            in_defaults = True
            continue
        if in_defaults:
            m = _DEFAULT_LINE.match(ln)
            if m and (conf / m.group(1)).is_dir():
                groups.append((m.group(1), m.group(2), (m.group(3) or "").strip()))
            if ln and not ln.startswith((" ", "-", "#")):
                in_defaults = False
        if not in_defaults:
            m = _KEY_LINE.match(ln)
            if m and m.group(1) != "hydra":
                value = m.group(2) or "(section)"
                keys.append((m.group(1), value, (m.group(3) or "").strip()))
    out = [f"usage: medray {job} [key=value ...] [--cfg job] [--hydra-help]", "", description, ""]
    out += [f"  {ln}" for ln in header]
    out += ["", "config groups (group=option; the default first):"]
    width = max((len(g) for g, _, _ in groups), default=0)
    for group, default, comment in groups:
        options = sorted(p.stem for p in (conf / group).glob("*.yaml"))
        shown = [default] + [o for o in options if o != default] if default in options else options
        listed = ", ".join(shown) + (f" (default: {default})" if default == "null" else "")
        indent = " " * (width + 4)
        out += textwrap.wrap(listed, 100, initial_indent=f"  {group.ljust(width)}  ", subsequent_indent=indent)
        note = re.sub(r"^conf/[\w/]+/[^:]*:\s*", "", comment)
        if note and not set(re.findall(r"\w+", note)) <= set(options) | {"e", "g"}:
            out.append(f"{indent}{note}")
    out += ["", "settings (key=value; `--cfg job` shows the whole composed config):"]
    kwidth = max((len(k) for k, _, _ in keys), default=0)
    for key, value, comment in keys:
        out.append(f"  {key.ljust(kwidth)}  {value}" + (f"  # {comment}" if comment else ""))
    return "\n".join(out)


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

    if any(a in ("--help", "-h") for a in argv):
        from medray.jobs import discover_jobs as _jobs

        jobs = _jobs()
        description = jobs[job][0].description if job in jobs else ""
        print(job_help(job, config_name, description))
        return
    argv = ["--help" if a == "--hydra-help" else a for a in argv]
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
    try:
        _dispatch(argv)
    except BrokenPipeError:  # `medray encoders | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)


def _dispatch(argv: Sequence[str] | None) -> None:
    from_console = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    jobs = discover_jobs()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage(jobs))
        return
    if argv[0] in ("-V", "--version"):
        print(version_line())
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
    if "wandb" in sys.modules:  # its service (a child) may still be writing the finished run's log
        try:
            sys.modules["wandb"].teardown()
        except Exception:  # noqa: BLE001 - the run is finished; a failed teardown loses nothing of the job's
            pass
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    _kill_descendants()  # a local Ray's GCS, raylet, workers and agents
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
