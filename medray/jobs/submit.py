"""``medray submit <job> [overrides] --address http://head:8265``: run a job on a Ray cluster.

Options (before or after the overrides)::

    --address URL     the cluster's dashboard (default RAY_ADDRESS or http://127.0.0.1:8265)
    --image IMAGE     a container image with medray installed (default: upload this checkout)
    --wait            follow until the job ends; exit 0 only if it SUCCEEDED
    --num-gpus N      GPUs for the driver (workers ask for their own through config)
    --auth MODE       auto (token when one is configured) | token | disabled
    --env K=V         an environment variable for the driver (repeatable; no secrets)

Hydra multirun (``-m a=1,2``) submits one job per point of the sweep.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence
from typing import Any

from medray.config import CONF_DIR, register_schemas
from medray.jobs import JobInfo, discover_jobs
from medray.platform.cluster import ClusterClient
from medray.platform.errors import ConfigError

__all__ = ["JOB", "main", "expand_sweep"]

JOB = JobInfo(
    "submit", "submit any job to a Ray cluster: medray submit embed input=... --address http://head:8265", order=40
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medray submit",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("job")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--address")
    p.add_argument("--image")
    p.add_argument("--wait", action="store_true")
    p.add_argument("--timeout", type=float, default=24 * 3600)
    p.add_argument("--num-gpus", type=float)
    p.add_argument("--num-cpus", type=float)
    p.add_argument("--auth", default="auto", choices=["auto", "token", "disabled"])
    p.add_argument("--env", action="append", default=[])
    p.add_argument("-m", "--multirun", action="store_true", help="one submitted job per sweep point")
    return p


def _group_options_loader() -> Any:
    """A Hydra config loader over ``conf/`` (``glob(...)`` sweeps list a group's options through it)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    gh = GlobalHydra.instance()
    if gh.is_initialized():
        return gh.config_loader()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return GlobalHydra.instance().config_loader()


def expand_sweep(overrides: Sequence[str]) -> list[list[str]]:
    """Expand Hydra multirun overrides into one override list per sweep point, as Hydra's basic sweeper does.

    Hydra's own parser reads the overrides: ``a=1,2`` and ``a=choice(1,2)`` sweep,
    ``a=range(1,3)`` sweeps 1 and 2, ``encoder=glob(*vit*)`` sweeps the matching
    options of ``conf/encoder/``, while ``a=[1,2]`` (a list), ``a={b: 1}``,
    ``a='x,y'`` and ``a=x\\,y`` (quoted or escaped commas) are single values.
    Points are the cartesian product in the order the keys first appear; a key
    given twice keeps its last value; a value that is not swept passes unchanged.

    Raises:
        ConfigError: an override does not parse, or asks for a sweep that cannot
            be enumerated (``interval(...)``, for optimizing sweepers).

    Example:
        >>> expand_sweep(["encoder=a,b", "train.lr=range(1,3)", "task.labels=[x,y]"])[1]
        ['encoder=a', 'train.lr=2', 'task.labels=[x,y]']
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    # Hydra's BasicSweeper.split_arguments, except that a value that is not swept
    # is passed on exactly as typed (Hydra re-serialises it, escaping ':' and '$').
    axes: dict[str, list[str]] = {}
    try:
        parser = OverridesParser.create(config_loader=_group_options_loader())
        for o in parser.parse_overrides(list(overrides)):
            key = o.get_key_element()
            if not o.is_sweep_override():
                axes[key] = [o.input_line or f"{key}={o.get_value_element_as_str()}"]
            elif o.is_discrete_sweep():
                axes[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
            else:
                assert o.value_type is not None  # is_sweep_override() checked it
                raise ConfigError(
                    "overrides",
                    f"'{o.input_line}': an {o.value_type.name.lower()} cannot be "
                    "enumerated; sweep a list: a=1,2 or a=range(1,3)",
                )
    except HydraException as err:
        text = str(err).strip().splitlines()
        raise ConfigError(
            "overrides",
            f"{text[0] if text else type(err).__name__} (Hydra override syntax: "
            "a=1,2 | a=range(1,3) | a=choice(x,y) | encoder=glob(*vit*))",
        ) from err
    return [list(p) for p in itertools.product(*axes.values())]


def _check_points(job: Any, points: Sequence[Sequence[str]]) -> None:
    """Compose every point's config here, so a typo stops before anything is submitted.

    Raises:
        ConfigError: naming the point and Hydra's message (the key, or the group and its options).
    """
    if job.config_name is None:
        return
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    register_schemas()
    if job.register is not None:
        job.register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        for point in points:
            try:
                compose(job.config_name, overrides=list(point))
            except HydraException as err:
                raise ConfigError("overrides", f"{' '.join(point)}: {str(err).strip()}") from err


def main(argv: Sequence[str]) -> int:
    """Submit; print the job id(s); with ``--wait`` follow to the end."""
    args, unknown = _parser().parse_known_args(list(argv))
    overrides = list(args.overrides) + [u for u in unknown if "=" in u and not u.startswith("-")]
    jobs = discover_jobs()
    if args.job not in jobs or args.job in ("submit", "jobs"):
        print(
            f"error: unknown job '{args.job}'; one of: {', '.join(j for j in jobs if j not in ('submit', 'jobs'))}",
            file=sys.stderr,
        )
        return 2
    env = dict(e.split("=", 1) for e in args.env if "=" in e)
    try:
        points = expand_sweep(overrides) if args.multirun else [overrides]
        group = None
        if len(points) > 1 and not any(o.lstrip("+").startswith("tracking.group=") for o in overrides):
            import uuid

            group = f"sweep-{uuid.uuid4().hex[:8]}"  # the points' W&B runs share one group
        extras = [[f"tracking.group={group}"] if group else [] for _ in points]
        if args.image is None:  # the cluster runs this checkout's conf/: check every point against it
            _check_points(jobs[args.job][0], [p + e for p, e in zip(points, extras)])
        client = ClusterClient(args.address, auth=args.auth)
        ids = []
        for point, extra in zip(points, extras):
            job_id = client.submit(
                args.job, point + extra, image=args.image, env_vars=env, num_gpus=args.num_gpus, num_cpus=args.num_cpus
            )
            ids.append(job_id)
            print(job_id, flush=True)
        if not args.wait:
            print(f"follow with: medray jobs status {ids[0]} --address {client.address}", file=sys.stderr)
            return 0
        worst = 0
        for job_id in ids:
            status = client.wait(job_id, timeout_s=args.timeout)
            print(f"{job_id} {status}", flush=True)
            if status != "SUCCEEDED":
                info = client.info(job_id)
                print(f"error: job {job_id} ended {status}: {info.get('message') or ''}".strip(), file=sys.stderr)
                worst = 1
        return worst
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
