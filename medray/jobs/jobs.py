"""``medray jobs status|logs|stop|wait <id> [--address URL]``: follow submitted jobs."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from medray.jobs import JobInfo
from medray.platform.cluster import ClusterClient
from medray.platform.errors import ConfigError

__all__ = ["JOB", "main"]

JOB = JobInfo("jobs", "follow submitted jobs: medray jobs status|logs|stop|wait <id> --address URL", order=41)


def main(argv: Sequence[str]) -> int:
    """Run one sub-command against the cluster; exit 0 on success."""
    p = argparse.ArgumentParser(prog="medray jobs", description=__doc__.split("\n")[0])
    p.add_argument("action", choices=["status", "logs", "stop", "wait"])
    p.add_argument("job_id")
    p.add_argument("--address")
    p.add_argument("--auth", default="auto", choices=["auto", "token", "disabled"])
    p.add_argument("--timeout", type=float, default=24 * 3600)
    args = p.parse_args(list(argv))
    try:
        client = ClusterClient(args.address, auth=args.auth)
        if args.action == "status":
            print(json.dumps(client.info(args.job_id), indent=2, default=str))
        elif args.action == "logs":
            sys.stdout.write(client.logs(args.job_id))
        elif args.action == "stop":
            print("stop requested" if client.stop(args.job_id) else "job already ended")
        else:
            status = client.wait(args.job_id, timeout_s=args.timeout)
            print(status)
            return 0 if status == "SUCCEEDED" else 1
        return 0
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - e.g. unknown job id from the API
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
