"""Run tracking with Weights & Biases: offline unless a key is set."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from medray.platform.storage import open_fs

__all__ = ["wandb_mode", "log_run", "default_group", "RunArtifact", "artifact_name"]

log = logging.getLogger("medray")


def wandb_mode(mode: str = "auto") -> str:
    """Resolve ``auto`` to ``online`` when ``WANDB_API_KEY`` is set, else ``offline``."""
    if mode != "auto":
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def default_group() -> str | None:
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


@dataclass
class RunArtifact:
    """A W&B artifact logged with a run (``run.log_artifact``).

    Its files are copied into the run's own directory first
    (``<run dir>/artifacts/<name>/``, beside ``<name>.manifest.json``), so an offline run
    carries them and ``wandb sync`` uploads them later; nothing refers back to
    object storage.

    Args:
        name: the artifact name (one name per output: reruns add versions), see
            :func:`artifact_name`.
        type: ``embeddings``, ``model``, ...
        files: name inside the artifact -> content (small JSON documents).
        metadata: JSON-safe facts shown with the artifact (e.g. the output URI).
        source: a directory URI whose files are copied in too (e.g. model weights).
        storage_options: fsspec options for ``source``.
        include: the names (relative to ``source``) to copy; None: every file.
    """

    name: str
    type: str
    files: dict[str, bytes] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    include: list[str] | None = None


def artifact_name(prefix: str, *parts: str) -> str:
    """A valid, stable W&B artifact name: ``<prefix>-<parts>``, the last part shortened to a hash.

    Example:
        >>> artifact_name("embeddings", "demo_tiny_vit", "s3://b/emb/run")
        'embeddings-demo_tiny_vit-09b174319635'
    """
    *words, key = parts or ("",)
    digest = hashlib.sha256(str(key).encode()).hexdigest()[:12]
    text = "-".join([prefix, *map(str, words), digest])
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:128]


def _stage_artifact(run: Any, spec: RunArtifact) -> str:
    """Copy ``spec``'s files into the run directory and log them as one artifact; return its folder."""
    import wandb

    root = os.path.join(os.path.dirname(os.path.abspath(run.dir)), "artifacts", spec.name)
    os.makedirs(root, exist_ok=True)
    staged: dict[str, str] = {}
    if spec.source:
        fs, base = open_fs(spec.source, spec.storage_options)
        base = base.rstrip("/")
        paths = sorted(fs.find(base)) if spec.include is None else [f"{base}/{rel}" for rel in spec.include]
        for path in paths:
            rel = path[len(base) :].lstrip("/")
            local = os.path.join(root, *rel.split("/"))
            os.makedirs(os.path.dirname(local), exist_ok=True)
            fs.get_file(path, local)
            staged[rel] = local
    for rel, data in spec.files.items():
        local = os.path.join(root, *rel.split("/"))
        os.makedirs(os.path.dirname(local), exist_ok=True)
        with open(local, "wb") as f:
            f.write(data)
        staged[rel] = local
    art = wandb.Artifact(spec.name, type=spec.type, metadata=json.loads(json.dumps(spec.metadata, default=str)))
    for rel, local in staged.items():
        # immutable: referenced where it lies (inside the run directory), not copied to W&B's staging cache
        art.add_file(local, name=rel, policy="immutable")
    run.log_artifact(art)
    with open(os.path.join(os.path.dirname(root), f"{spec.name}.manifest.json"), "w") as f:
        json.dump(
            {
                "name": spec.name,
                "type": spec.type,
                "metadata": art.metadata,
                "manifest": art.manifest.to_manifest_json(),
            },
            f,
            indent=2,
            default=str,
        )
    return root


def log_run(
    *,
    job: str,
    config: Mapping[str, Any],
    summary: Mapping[str, Any],
    project: str = "medray",
    mode: str = "auto",
    group: str | None = None,
    name: str | None = None,
    directory: str | None = None,
    metrics: Mapping[str, float] | None = None,
    artifact: RunArtifact | None = None,
    run_id: str | None = None,
    report: Any | None = None,
) -> str | None:
    """Log one finished run (config, summary, metrics, optionally an artifact) to W&B.

    Args:
        artifact: logged with the run; its files are staged in the run directory
            (see :class:`RunArtifact`), so this works offline.
        run_id: resume (or create) the W&B run with this id, e.g. the one
            training logged its epochs to.
        report: a :class:`medray.platform.report.Report` (anything with
            ``log_wandb(run)``): its figures and tables are logged too.

    Returns:
        The local run directory, or None when tracking is disabled or fails
        (tracking never fails a job; the reason is logged).
    """
    mode = wandb_mode(mode)
    if mode == "disabled":
        return None
    run = None
    try:
        import wandb

        directory = os.path.abspath(directory or os.path.join(os.environ.get("MEDRAY_HOME", ".medray")))
        os.makedirs(directory, exist_ok=True)
        run = wandb.init(
            project=project,
            job_type=job,
            group=group,
            name=name,
            dir=directory,
            mode=mode,  # type: ignore[arg-type]  # tracking.mode as configured; wandb.init checks it
            config=dict(config),
            reinit="finish_previous",
            id=run_id,
            resume="allow" if run_id else None,
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )
        if metrics:
            run.log(dict(metrics))
        for k, v in summary.items():
            if isinstance(v, (int, float, str, bool)):
                run.summary[k] = v
        if report is not None:
            try:
                report.log_wandb(run)
            except Exception as err:  # noqa: BLE001 - the run itself is still worth keeping
                log.warning("W&B report figures skipped: %s: %s", type(err).__name__, err)
        if artifact is not None:
            try:
                _stage_artifact(run, artifact)
            except Exception as err:  # noqa: BLE001 - the run itself is still worth keeping
                log.warning("W&B artifact '%s' skipped: %s: %s", artifact.name, type(err).__name__, err)
        run_dir = run.dir
        run.finish()
        return os.path.dirname(run_dir)
    except Exception as err:  # noqa: BLE001 - tracking must not lose a finished job
        log.warning("W&B logging skipped: %s: %s", type(err).__name__, err)
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001
                pass
        return None
