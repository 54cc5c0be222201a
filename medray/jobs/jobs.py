"""``medray jobs list|status|logs|stop|wait [<id>] [--follow] [--address URL]``: follow submitted jobs."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from medray.jobs import JobInfo
from medray.pipeline.progress import format_duration
from medray.platform.cluster import ClusterClient
from medray.platform.errors import ConfigError

__all__ = ["JOB", "format_jobs", "main"]

JOB = JobInfo("jobs", "follow submitted jobs: medray jobs list | status|logs [--follow]|stop|wait <id>", order=41)


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) if ms else "-"


def format_jobs(jobs: Sequence[Mapping[str, Any]], now_ms: float | None = None) -> str:
    """Submitted jobs as an aligned table: id, status, medray job, start (UTC), duration, entrypoint.

    Args:
        jobs: rows of :meth:`~medray.platform.cluster.ClusterClient.list_jobs`.
        now_ms: the time a running job's duration is measured to (default: now).
    """
    if not jobs:
        return "no submitted jobs on this cluster"
    now_ms = time.time() * 1000 if now_ms is None else now_ms
    rows = [["job id", "status", "job", "started (UTC)", "took", "entrypoint"]]
    for j in jobs:
        start, end = j.get("start_time"), j.get("end_time")
        took = format_duration(((end or now_ms) - start) / 1000) if start else "-"
        entry = str(j.get("entrypoint") or "").replace("python -m medray.cli ", "medray ")
        rows.append([str(j["job_id"]), str(j["status"]), str(j.get("job") or "-"), _when(start), took, entry[:80]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def main(argv: Sequence[str]) -> int:
    """Run one sub-command against the cluster; exit 0 on success."""
    p = argparse.ArgumentParser(prog="medray jobs", description=__doc__.split("\n")[0])
    p.add_argument("action", choices=["list", "status", "logs", "stop", "wait"])
    p.add_argument("job_id", nargs="?", help="a submission id (raysubmit_...); not for list")
    p.add_argument("--address", help="the dashboard address (default RAY_ADDRESS or http://127.0.0.1:8265)")
    p.add_argument("--auth", default="auto", choices=["auto", "token", "disabled"])
    p.add_argument("--timeout", type=float, default=24 * 3600)
    p.add_argument("-f", "--follow", action="store_true", help="logs: keep printing until the job ends")
    p.add_argument("--json", action="store_true", help="list: JSON instead of a table")
    args = p.parse_args(list(argv))
    if args.action != "list" and not args.job_id:
        p.error(f"{args.action} needs a job id: medray jobs {args.action} <raysubmit_...> (see medray jobs list)")
    try:
        client = ClusterClient(args.address, auth=args.auth)
        if args.action == "list":
            jobs = client.list_jobs()
            print(json.dumps(jobs, indent=2, default=str) if args.json else format_jobs(jobs))
        elif args.action == "status":
            print(json.dumps(client.info(args.job_id), indent=2, default=str))
        elif args.action == "logs" and args.follow:

            def write(chunk: str) -> None:
                sys.stdout.write(chunk)
                sys.stdout.flush()

            status = client.follow_logs(args.job_id, write)
            return 0 if status == "SUCCEEDED" else 1
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
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # noqa: BLE001 - e.g. unknown job id from the API
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
