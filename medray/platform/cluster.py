"""Submitting medray jobs to a Ray cluster through the Ray Jobs API.

The driver of a submitted job runs ``python -m medray.cli <job> [overrides]``
on the cluster. Its runtime environment either carries the local working
directory (the medray source with ``conf/``, for clusters whose image has the
dependencies) or names a container image that has medray installed.

Token authentication (Ray 2.60 turns it on for new clusters): when a token is
available in the standard places (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``
or ``~/.ray/auth_token``) the client is switched to token mode so Ray's own
client reads and sends it. medray never reads, logs or prints the token.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from medray.platform.errors import ConfigError

__all__ = ["ClusterClient", "token_available", "DEFAULT_EXCLUDES", "source_root"]

#: Paths never uploaded with the working directory.
DEFAULT_EXCLUDES = [
    ".venv",
    ".git",
    ".medray",
    "outputs",
    "multirun",
    "wandb",
    "*.egg-info",
    "__pycache__",
    "benchmarks/results",
    "build",
    "dist",
]

_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def token_available() -> bool:
    """True when a Ray auth token is configured in one of the standard places."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    return os.path.isfile(path)


def source_root() -> str:
    """The directory that holds the ``medray`` package (a checkout or site-packages)."""
    return str(Path(__file__).resolve().parents[2])


class ClusterClient:
    """A thin, typed wrapper over ``ray.job_submission.JobSubmissionClient``.

    Args:
        address: the dashboard address, e.g. ``http://head:8265`` (default
            ``RAY_ADDRESS`` or ``http://127.0.0.1:8265``).
        auth: ``auto`` (token mode when a token is available), ``token`` or ``disabled``.
    """

    def __init__(self, address: str | None = None, *, auth: str = "auto") -> None:
        from ray.job_submission import JobSubmissionClient

        if auth not in ("auto", "token", "disabled"):
            raise ConfigError("auth", f"must be auto, token or disabled, got '{auth}'")
        if auth == "token" or (auth == "auto" and token_available() and not os.environ.get("RAY_AUTH_MODE")):
            os.environ["RAY_AUTH_MODE"] = "token"
        elif auth == "disabled":
            os.environ["RAY_AUTH_MODE"] = "disabled"
        self.address = address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
        if self.address.startswith("ray://") or "://" not in self.address:
            raise ConfigError(
                "address", f"expected the dashboard's http(s):// address (port 8265), got '{self.address}'"
            )
        try:
            self._client = JobSubmissionClient(self.address)
        except Exception as err:  # noqa: BLE001 - connection/auth errors: say what to check
            raise ConfigError(
                "address",
                f"cannot reach the Ray Jobs API at {self.address} "
                f"({type(err).__name__}); is the head up, and is RAY_AUTH_MODE/token set "
                "when the cluster uses token auth?",
            ) from None

    def submit(
        self,
        job: str,
        overrides: Sequence[str],
        *,
        image: str | None = None,
        working_dir: str | None = None,
        excludes: Iterable[str] = DEFAULT_EXCLUDES,
        env_vars: Mapping[str, str] | None = None,
        pip: Sequence[str] | None = None,
        num_cpus: float | None = None,
        num_gpus: float | None = None,
        submission_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> str:
        """Submit ``medray <job> <overrides>``; return the submission id.

        Args:
            job: a medray job name (``embed``, ``finetune``, ...).
            overrides: Hydra overrides, passed through unchanged.
            image: a container image with medray installed (``runtime_env.image_uri``);
                otherwise the working directory is uploaded.
            working_dir: directory to upload (default: the medray source root).
            env_vars: environment for the driver (no secrets: use cluster Secrets).
        """
        entrypoint = " ".join(shlex.quote(a) for a in ["python", "-m", "medray.cli", job, *overrides])
        runtime_env: dict[str, Any] = {}
        if image:
            runtime_env["image_uri"] = image
        else:
            runtime_env["working_dir"] = working_dir or source_root()
            runtime_env["excludes"] = list(excludes)
        if env_vars:
            runtime_env["env_vars"] = dict(env_vars)
        if pip:
            runtime_env["pip"] = list(pip)
        return self._client.submit_job(
            entrypoint=entrypoint,
            runtime_env=runtime_env,
            submission_id=submission_id,
            entrypoint_num_cpus=num_cpus,
            entrypoint_num_gpus=num_gpus,
            metadata={"medray_job": job, **(metadata or {})},
        )

    def status(self, job_id: str) -> str:
        """``PENDING``, ``RUNNING``, ``SUCCEEDED``, ``FAILED`` or ``STOPPED``."""
        return str(self._client.get_job_status(job_id).value)

    def info(self, job_id: str) -> dict[str, Any]:
        """Status, message, entrypoint, start/end times of a job."""
        info = self._client.get_job_info(job_id)
        return {
            "job_id": job_id,
            "status": str(info.status.value),
            "message": info.message,
            "entrypoint": info.entrypoint,
            "start_time": info.start_time,
            "end_time": info.end_time,
        }

    def logs(self, job_id: str) -> str:
        """The driver's log so far."""
        return self._client.get_job_logs(job_id)

    def list_jobs(self) -> list[dict[str, Any]]:
        """The submitted jobs the cluster knows (newest first): id, status, medray job, times, entrypoint.

        Drivers started by hand (``ray.init`` on the head) are left out: they have no submission id.
        """
        jobs = []
        for d in self._client.list_jobs():
            if not d.submission_id:
                continue
            jobs.append(
                {
                    "job_id": d.submission_id,
                    "status": str(getattr(d.status, "value", d.status)),
                    "job": (d.metadata or {}).get("medray_job"),
                    "start_time": d.start_time,
                    "end_time": d.end_time,
                    "entrypoint": d.entrypoint,
                    "message": d.message,
                }
            )
        return sorted(jobs, key=lambda j: j["start_time"] or 0, reverse=True)

    def follow_logs(self, job_id: str, write: Callable[[str], Any]) -> str:
        """Stream the driver's log to ``write`` as it grows, until the job ends; return its final status.

        Starts from the beginning of the log (what ``logs`` shows), then follows it,
        like ``ray job logs --follow``.
        """

        async def _tail() -> None:
            async for chunk in self._client.tail_job_logs(job_id):
                write(chunk)

        self.status(job_id)  # an unknown id fails here, before streaming
        asyncio.run(_tail())
        return self.status(job_id)

    def stop(self, job_id: str) -> bool:
        """Ask the job to stop; True if a stop was requested."""
        return bool(self._client.stop_job(job_id))

    def wait(self, job_id: str, timeout_s: float = 3600, poll_s: float = 2.0) -> str:
        """Block until the job ends (or ``timeout_s``); return its final status."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status(job_id)
            if status in _TERMINAL or time.monotonic() > deadline:
                return status
            time.sleep(poll_s)
