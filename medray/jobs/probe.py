"""``medray probe``: data-efficiency curves of heads on an encoder's stored embeddings.

The recipe, top to bottom (no Ray, no re-embedding; seconds to a minute):

1. read the ``embed`` output back, one embedding per record
   (:func:`medray.pipeline.records.read_record_embeddings`);
2. join the labelled manifest by ``(uri, member)``; patients from ``group_by``;
3. hold out ``test_fraction`` of the patients, draw nested training sets of 8,
   16, ... patients ``repeats`` times, fit logistic-regression and MLP heads,
   score AUROC on the held-out patients (:func:`medray.platform.probing.learning_curves`);
4. write ``<output>/probe.json`` and ``<output>/curves/<encoder>-<hash>.json``
   (a sweep over encoders fills ``curves/``);
5. refit the linear head on the whole training pool, score it on the held-out
   patients with patient-bootstrap intervals and subgroups (``evaluation.json``,
   ``predictions.parquet``) and export it as the artifact ``medray serve`` loads;
6. write ``<output>/report/index.html`` comparing every encoder in ``curves/``.
"""

from __future__ import annotations

import json
import logging
import posixpath
import sys
import time
from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import MISSING

from medray.config import StorageConf
from medray.jobs import JobInfo

__all__ = ["JOB", "ProbeConf", "main", "register", "run_probe"]

log = logging.getLogger("medray.probe")


@dataclass
class ProbeTaskConf:
    """What the heads predict."""

    type: str = "binary"  # binary | multilabel | multiclass
    labels: List[str] = field(default_factory=list)
    column: Optional[str] = None  # multiclass: the column holding the class


@dataclass
class ProbeConf:
    """``medray probe``: the Hydra schema of ``conf/probe.yaml``."""

    embeddings: str = MISSING
    labels: str = MISSING
    output: Optional[str] = None
    task: ProbeTaskConf = field(default_factory=ProbeTaskConf)
    group_by: str = "patient_key"
    heads: List[str] = field(default_factory=lambda: ["logreg", "mlp"])
    sizes: Optional[List[int]] = None
    repeats: int = 5
    test_fraction: float = 0.3
    seed: int = 0
    subgroups: List[str] = field(default_factory=list)
    bootstrap: int = 1000
    export: bool = True
    storage: StorageConf = field(default_factory=StorageConf)


def register() -> None:
    """Store the probe schema in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="probe_schema", node=ProbeConf)


JOB = JobInfo(
    "probe",
    "data-efficiency curves: heads on stored embeddings with 8, 16, ... labelled patients; a report",
    config_name="probe",
    register=register,
    order=25,
    exit_fast=True,
)


def _check(c: Any) -> None:
    from medray.platform.errors import ConfigError
    from medray.platform.probing import HEADS

    unknown = [h for h in c.heads if h not in HEADS]
    if not c.heads or unknown:
        raise ConfigError("heads", f"choose from {', '.join(HEADS)}, got {list(c.heads)}")
    if not (0.0 < c.test_fraction < 1.0):
        raise ConfigError("test_fraction", f"must be in (0, 1), got {c.test_fraction}")
    if c.repeats < 1:
        raise ConfigError("repeats", f"must be >= 1, got {c.repeats}")
    if c.sizes is not None and (not c.sizes or min(c.sizes) < 1):
        raise ConfigError("sizes", f"must be null or patient counts >= 1, got {list(c.sizes)}")
    if c.bootstrap < 0:
        raise ConfigError("bootstrap", f"must be >= 0, got {c.bootstrap}")


def run_probe(c: Any) -> dict[str, Any]:
    """Run the probe described by ``c`` (a :class:`ProbeConf`); returns the ``probe.json`` document."""
    import numpy as np

    from medray.encoders.heads import LinearHead, ModelCard, save_artifact
    from medray.pipeline.records import join_labels, read_record_embeddings, write_predictions
    from medray.platform.evaluation import evaluate
    from medray.platform.manifest import manifest_sha256
    from medray.platform.probing import ProbeData, fit_head, learning_curves, split_patients
    from medray.platform.storage import atomic_write_bytes, open_fs

    _check(c)
    t0 = time.perf_counter()
    options = dict(c.storage.options)
    output = c.output or posixpath.join(str(c.embeddings).rstrip("/"), "probe")
    records = read_record_embeddings(c.embeddings, options)
    data = join_labels(
        records,
        c.labels,
        labels=list(c.task.labels),
        task=c.task.type,
        class_column=c.task.column,
        group_by=c.group_by,
        extra_columns=list(c.subgroups),
        storage_options=options,
    )
    probe = ProbeData(data.x, data.y, data.groups, data.labels)
    curves = learning_curves(
        probe,
        heads=list(c.heads),
        sizes=list(c.sizes) if c.sizes else None,
        repeats=c.repeats,
        test_fraction=c.test_fraction,
        seed=c.seed,
    )
    enc = records.encoder
    tag = f"{enc.get('encoder') or 'encoder'}-{str(enc.get('weights_hash') or '')[:8]}"
    best_head, best_auroc = None, float("-inf")
    for kind, curve in curves["curves"].items():
        last = curve["auroc_mean"][-1]
        if last is not None and last > best_auroc:
            best_head, best_auroc = kind, last
    doc: dict[str, Any] = {
        "kind": "probe",
        "encoder": {"name": enc.get("encoder"), "weights_hash": enc.get("weights_hash"), "dim": enc.get("dim")},
        "embeddings": c.embeddings,
        "labels": data.labels,
        "task": c.task.type,
        "group_by": c.group_by,
        "heads": list(c.heads),
        "counts": {
            "records": int(len(data.x)),
            "patients": int(len(np.unique(data.groups))),
            "manifest_rows_not_embedded": data.unmatched,
            "records_without_patient": data.ungrouped,
        },
        **curves,
        "best": {"head": best_head, "size": curves["sizes"][-1], "auroc": best_auroc if best_head else None},
        "labels_sha256": manifest_sha256(c.labels, options),
    }
    # the linear head on the whole pool: scored on the held-out patients, exported
    test = split_patients(data.groups, test_fraction=c.test_fraction, seed=c.seed)
    head = fit_head("logreg", data.x[~test], data.y[~test], seed=c.seed)
    probs = head.predict_proba(data.x[test])
    evaluation = evaluate(
        data.y[test],
        np.nan_to_num(probs, nan=0.5),
        data.labels,
        groups=data.groups[test],
        subgroups={k: v[test] for k, v in data.columns.items()},
        n_boot=c.bootstrap,
        seed=c.seed,
    )
    evaluation["model"] = {"head": "logreg", "trained_on_patients": curves["train_pool"], "encoder": doc["encoder"]}
    fs, root = open_fs(output, options)
    write_predictions(
        data.record_id[test],
        data.uri[test],
        data.groups[test],
        data.y[test],
        probs,
        data.labels,
        output,
        options,
        id_column="record_id",
    )
    if c.export:
        if any(m is None for m in head.models):
            doc["export"] = {"skipped": "a label has a single class in the training pool; no head exported"}
        else:
            weight, bias = head.linear()
            task = "binary" if c.task.type == "binary" else "multilabel"  # one-vs-rest for multiclass
            card = ModelCard(
                id=f"probe-{tag}",
                task=task,
                labels=data.labels,
                encoder={**enc, "name": enc.get("encoder")},
                strategy="linear_probe",
                metrics={"test": {lab: evaluation["metrics"][lab]["auroc"] for lab in data.labels}},
                data_manifest_sha256=doc["labels_sha256"],
                config={"probe": {"test_fraction": c.test_fraction, "seed": c.seed, "group_by": c.group_by}},
            )
            uri = posixpath.join(output, "heads", tag)
            save_artifact(uri, head=LinearHead(weight, bias, card.task), card=card, storage_options=options)
            doc["export"] = {"uri": uri, "head": "logreg", "id": card.id}
    doc["seconds"] = round(time.perf_counter() - t0, 3)
    body = json.dumps(doc, indent=2).encode()
    fs.makedirs(posixpath.join(root, "curves"), exist_ok=True)
    atomic_write_bytes(fs, posixpath.join(root, "curves", f"{tag}.json"), body)
    atomic_write_bytes(fs, posixpath.join(root, "probe.json"), body)
    atomic_write_bytes(fs, posixpath.join(root, "evaluation.json"), json.dumps(evaluation, indent=2).encode())
    doc["report"] = _write_report(fs, root, output, options, evaluation)
    doc["output"] = output
    return doc


def _write_report(fs: Any, root: str, output: str, options: dict, evaluation: dict) -> str | None:
    """The report over every encoder's curves in ``curves/`` (a sweep compares them); None if it failed."""
    from medray.platform import report as reporting

    try:
        docs = []
        for path in sorted(fs.glob(posixpath.join(root, "curves", "*.json"))):
            with fs.open(path, "rb") as f:
                docs.append(json.loads(f.read()))
        rep = reporting.probe_report(docs)
        rep.extend(reporting.evaluation_report(evaluation))
        return str(rep.write(output, storage_options=options))
    except Exception as err:  # noqa: BLE001 - a report that cannot be drawn never fails the probe
        log.warning("report not written (%s)", type(err).__name__)
        return None


def _one_line(doc: dict) -> str:
    best = doc.get("best") or {}
    auroc = best.get("auroc")
    parts = [
        f"probe: {doc['counts']['records']} records of {doc['counts']['patients']} patients",
        f"{doc['test']['patients']} held out",
        f"sizes {doc['sizes'][0]}..{doc['sizes'][-1]} x {doc['repeats']}",
        f"best {best.get('head')} AUROC {auroc:.3f}" if isinstance(auroc, float) else "no AUROC (a class is missing)",
        f"{doc['seconds']:.1f}s",
    ]
    tail = f"; head {doc['export']['uri']}" if "uri" in (doc.get("export") or {}) else ""
    report = f"; report {doc['report']}" if doc.get("report") else ""
    return ", ".join(parts) + f" -> {doc['output']}{tail}{report}"


def main(cfg: Any) -> int:
    """Hydra entry point body; returns the process exit code."""
    from omegaconf import OmegaConf

    c = OmegaConf.to_object(cfg)
    doc = run_probe(c)
    print(_one_line(doc), file=sys.stdout, flush=True)
    return 0
