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
from typing import Sequence

from medray.jobs import JobInfo

__all__ = ["JOB", "main", "expand_sweep"]

JOB = JobInfo("submit", "submit any job to a Ray cluster: medray submit embed input=... --address http://head:8265",
              order=40)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medray submit", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
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


def expand_sweep(overrides: Sequence[str]) -> list[list[str]]:
    """Expand Hydra-style comma sweeps (``a=1,2 b=x,y``) into one override list per point.

    Values inside brackets/braces (lists, dicts) are not split.
    """
    axes: list[list[str]] = []
    for o in overrides:
        key, sep, value = o.partition("=")
        if sep and "," in value and not value.startswith(("[", "{", "'", '"')):
            axes.append([f"{key}={v}" for v in value.split(",")])
        else:
            axes.append([o])
    return [list(p) for p in itertools.product(*axes)]


def main(argv: Sequence[str]) -> int:
    """Submit; print the job id(s); with ``--wait`` follow to the end."""
    from medray.jobs import discover_jobs
    from medray.platform.cluster import ClusterClient
    from medray.platform.errors import ConfigError

    args, unknown = _parser().parse_known_args(list(argv))
    overrides = list(args.overrides) + [u for u in unknown if "=" in u and not u.startswith("-")]
    jobs = discover_jobs()
    if args.job not in jobs or args.job in ("submit", "jobs"):
        print(f"error: unknown job '{args.job}'; one of: {', '.join(j for j in jobs if j not in ('submit', 'jobs'))}",
              file=sys.stderr)
        return 2
    env = dict(e.split("=", 1) for e in args.env if "=" in e)
    try:
        client = ClusterClient(args.address, auth=args.auth)
        points = expand_sweep(overrides) if args.multirun else [overrides]
        group = None
        if len(points) > 1:
            import uuid

            group = f"sweep-{uuid.uuid4().hex[:8]}"
        ids = []
        for point in points:
            extra = [f"tracking.group={group}"] if group else []
            job_id = client.submit(args.job, point + extra, image=args.image, env_vars=env,
                                   num_gpus=args.num_gpus, num_cpus=args.num_cpus)
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
