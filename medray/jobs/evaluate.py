"""``medray evaluate``: score an exported head on any labelled manifest, with intervals and subgroups.

The recipe, top to bottom:

1. load the artifact (``model=``: a ``medray finetune`` or ``medray probe``
   export) and its model card: the labels, the task, the encoder;
2. the embeddings: an existing ``medray embed`` output of that very encoder
   (``data.embeddings=``; no re-embedding; refused if its weights differ), or
   ``medray embed`` run on the manifest with the artifact's encoder into
   ``<output>/embeddings`` (the artifact's own backbone when it has one);
3. one embedding per record, joined to ``data.test`` by ``(uri, member)``;
   the head's probabilities;
4. optionally pooled per study or patient (``eval.aggregate``, ``eval.pool``);
5. AUROC, AUPRC, sensitivity/specificity at ``eval.threshold``, ECE per label
   with patient-bootstrap 95 % intervals, per subgroup with the gap
   (:func:`medray.platform.evaluation.evaluate`); ``evaluation.json``,
   ``predictions/`` (Parquet) and ``report/index.html`` under ``output``.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import MISSING

from medray.config import StorageConf
from medray.jobs import JobInfo
from medray.platform.runtime import connected_address

__all__ = ["JOB", "EvaluateConf", "main", "register", "run_evaluate"]

log = logging.getLogger("medray.evaluate")


@dataclass
class EvalDataConf:
    """What to score."""

    test: str = MISSING  # labelled manifest: uri (+ member) and the model card's label columns
    embeddings: Optional[str] = None  # an embed output of the artifact's encoder (no re-embedding)
    group_by: str = "patient_key"  # the bootstrap's unit: patient_key (salted, from DICOM) or a manifest column
    class_column: Optional[str] = None  # multiclass cards: the column holding the class


@dataclass
class EvalConf:
    """How to score."""

    aggregate: str = "frame"  # frame | study | patient: score records, or pool them per study / patient first
    pool: str = "max"  # max | mean: how records' probabilities pool (labels pool by max)
    study_column: Optional[str] = None  # eval.aggregate=study: the manifest column naming the study
    threshold: float = 0.5  # operating point of sensitivity and specificity
    bootstrap: int = 1000  # patient-level bootstrap draws
    subgroups: List[str] = field(default_factory=list)  # manifest columns (sex, site, ...)
    seed: int = 0


@dataclass
class EvaluateConf:
    """``medray evaluate``: the Hydra schema of ``conf/evaluate.yaml``."""

    model: str = MISSING
    data: EvalDataConf = field(default_factory=EvalDataConf)
    eval: EvalConf = field(default_factory=EvalConf)
    output: Optional[str] = None
    storage: StorageConf = field(default_factory=StorageConf)


def register() -> None:
    """Store the evaluate schema in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConf)


JOB = JobInfo(
    "evaluate",
    "score an exported head on a labelled manifest: AUROC/AUPRC/ECE with patient-bootstrap CIs, subgroups",
    config_name="evaluate",
    register=register,
    order=26,
    exit_fast=True,
)


def _check(c: Any) -> None:
    from medray.platform.errors import ConfigError
    from medray.platform.evaluation import AGGREGATES

    e = c.eval
    if e.aggregate not in AGGREGATES:
        raise ConfigError("eval.aggregate", f"must be one of {', '.join(AGGREGATES)}, got {e.aggregate!r}")
    if e.pool not in ("max", "mean"):
        raise ConfigError("eval.pool", f"must be max or mean, got {e.pool!r}")
    if e.aggregate == "study" and not e.study_column:
        raise ConfigError("eval.study_column", "eval.aggregate=study needs the manifest column naming the study")
    if not (0.0 < e.threshold < 1.0):
        raise ConfigError("eval.threshold", f"must be in (0, 1), got {e.threshold}")
    if e.bootstrap < 0:
        raise ConfigError("eval.bootstrap", f"must be >= 0, got {e.bootstrap}")


def _embed(c: Any, card: Any, output: str) -> str:
    """Run ``medray embed`` on the manifest with the artifact's encoder; returns its output."""
    from medray.platform.errors import ConfigError

    enc = card.encoder or {}
    name = enc.get("name") or enc.get("family")
    if not name:
        raise ConfigError("model", "the model card names no encoder; give data.embeddings= instead")
    checkpoint = c.model if card.backbone_included else enc.get("checkpoint")
    target = posixpath.join(output, "embeddings")
    exe = os.path.join(os.path.dirname(sys.executable), "medray")
    cmd = [exe if os.path.exists(exe) else "medray", "embed", f"input={c.data.test}", f"output={target}"]
    cmd += [f"encoder={name}", f"encoder.checkpoint={checkpoint}"]
    cmd += [f"storage.options={json.dumps(dict(c.storage.options))}"] if c.storage.options else []
    source = "the artifact's backbone" if card.backbone_included else checkpoint
    print(f"medray evaluate: embedding {c.data.test} with {name} ({source})", flush=True)
    # Called from a job that is on Ray already (finetune's test split): the child joins that Ray
    # rather than starting a second local one beside it.
    address = connected_address()
    env = dict(os.environ, RAY_ADDRESS=address) if address else None
    proc = subprocess.run(cmd, check=False, env=env)
    if proc.returncode != 0:
        raise ConfigError("data.test", f"`medray embed` of the manifest failed (exit {proc.returncode}); see above")
    return target


def run_evaluate(c: Any) -> dict[str, Any]:
    """Run the evaluation described by ``c`` (an :class:`EvaluateConf`); returns ``evaluation.json``."""
    import numpy as np

    from medray.encoders.heads import load_artifact
    from medray.pipeline.records import join_labels, read_record_embeddings, write_predictions
    from medray.platform.errors import ConfigError
    from medray.platform.evaluation import aggregate, evaluate
    from medray.platform.storage import atomic_write_bytes, open_fs

    _check(c)
    t0 = time.perf_counter()
    options = dict(c.storage.options)
    head, card, _, artifact_sha = load_artifact(c.model, storage_options=options)
    if card.task not in ("binary", "multilabel", "multiclass"):
        raise ConfigError("model", f"evaluate scores classification heads; this one is {card.task}")
    output = c.output or os.path.join(os.environ.get("MEDRAY_HOME", ".medray"), "evaluate", card.id)
    embeddings = c.data.embeddings or _embed(c, card, output)
    records = read_record_embeddings(embeddings, options)
    want = (card.encoder or {}).get("weights_hash")
    have = records.encoder.get("weights_hash")
    if c.data.embeddings and not card.backbone_included and want != have:
        raise ConfigError(
            "data.embeddings",
            f"holds embeddings of weights {str(have)[:12]}..., the head was trained on {str(want)[:12]}...; "
            "give an embed output of the head's encoder (or leave data.embeddings out to embed the manifest)",
        )
    if c.data.embeddings and card.backbone_included and records.encoder.get("checkpoint") != c.model:
        raise ConfigError(
            "data.embeddings",
            "the head comes with its own fine-tuned backbone: give an embed output made with "
            f"encoder.checkpoint={c.model} (or leave data.embeddings out)",
        )
    extra = list(dict.fromkeys([*c.eval.subgroups, *([c.eval.study_column] if c.eval.study_column else [])]))
    data = join_labels(
        records,
        c.data.test,
        labels=list(card.labels),
        task="multilabel" if card.task == "multilabel" else card.task,
        class_column=c.data.class_column,
        group_by=c.data.group_by,
        extra_columns=extra,
        storage_options=options,
        key="data.test",
    )
    probs = head.predict(data.x).astype(np.float64)
    y, groups, subgroups = data.y, data.groups, {k: data.columns[k] for k in c.eval.subgroups}
    ids, uris = data.record_id, data.uri
    if c.eval.aggregate != "frame":
        keys = data.columns[c.eval.study_column] if c.eval.aggregate == "study" else groups
        y, probs, first = aggregate(y, probs, keys, c.eval.pool)
        groups, ids, uris = groups[first], np.asarray(keys)[first], uris[first]
        subgroups = {k: v[first] for k, v in subgroups.items()}
    doc = evaluate(
        y,
        probs,
        list(card.labels),
        groups=groups,
        subgroups=subgroups,
        threshold=c.eval.threshold,
        n_boot=c.eval.bootstrap,
        seed=c.eval.seed,
        aggregate_level=c.eval.aggregate,
    )
    doc["model"] = {"uri": c.model, "id": card.id, "sha256": artifact_sha, "encoder": card.encoder.get("name")}
    doc["data"] = {"test": c.data.test, "embeddings": embeddings, "manifest_rows_not_embedded": data.unmatched}
    doc["seconds"] = round(time.perf_counter() - t0, 3)
    fs, root = open_fs(output, options)
    fs.makedirs(root, exist_ok=True)
    atomic_write_bytes(fs, posixpath.join(root, "evaluation.json"), json.dumps(doc, indent=2).encode())
    write_predictions(ids, uris, groups, y, probs, list(card.labels), output, options)
    doc["report"] = _write_report(doc, output, options)
    doc["output"] = output
    return doc


def _write_report(doc: dict, output: str, options: dict) -> str | None:
    from medray.platform import report as reporting

    try:
        return str(reporting.evaluation_report(doc).write(output, storage_options=options))
    except Exception as err:  # noqa: BLE001 - a report that cannot be drawn never fails the evaluation
        log.warning("report not written (%s)", type(err).__name__)
        return None


def _one_line(doc: dict) -> str:
    macro = doc["macro"]["auroc"]
    ci = f" [{macro['lo']:.3f}, {macro['hi']:.3f}]" if macro.get("lo") is not None else ""
    value = f"{macro['value']:.3f}" if macro.get("value") is not None else "n/a"
    return (
        f"evaluate: {doc['counts']['records']} {doc['aggregate'] if doc['aggregate'] != 'frame' else 'record'}s "
        f"of {doc['counts']['patients']} patients, macro AUROC {value}{ci} -> {doc['output']}"
        + (f"; report {doc['report']}" if doc.get("report") else "")
    )


def main(cfg: Any) -> int:
    """Hydra entry point body; returns the process exit code."""
    from omegaconf import OmegaConf

    doc = run_evaluate(OmegaConf.to_object(cfg))
    print(_one_line(doc), flush=True)
    return 0
