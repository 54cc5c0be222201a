"""``medray zeroshot``: classify stored image embeddings by class names written as text.

The recipe, top to bottom (no Ray, no re-embedding of images; seconds):

1. read the ``embed`` output back, one embedding per record
   (:func:`medray.pipeline.records.read_record_embeddings`); its marker names
   the encoder and its weights hash;
2. load that encoder (an image-text family: ``siglip``, ``open_clip``) and
   refuse it unless its weights hash is the one the embeddings were made with;
3. embed every prompt (``prompts`` x ``labels``) with its text tower; one
   class embedding per label (:func:`medray.platform.zeroshot.class_embeddings`);
4. score every image record: softmax over classes (CLIP) or sigmoid with the
   checkpoint's temperature and bias (SigLIP)
   (:func:`medray.platform.zeroshot.zero_shot_scores`); text records of the
   same output are not scored;
5. write ``<output>/predictions`` (``p_<label>``, and ``y_<label>`` from
   ``data.labels``), ``zeroshot.json`` and ``report/index.html``; with a
   labelled manifest (``data.labels=``), AUROC and friends with
   patient-bootstrap intervals and subgroups (``evaluation.json``), as
   ``medray evaluate`` reports them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from medray.config import StorageConf
from medray.jobs import JobInfo

__all__ = ["JOB", "ZeroShotConf", "main", "register", "run_zeroshot"]

log = logging.getLogger("medray.zeroshot")


@dataclass
class ZeroShotDataConf:
    """Optional ground truth."""

    labels: str | None = None  # labelled manifest: uri (+ member) and a 0/1 column named after each class
    group_by: str = "patient_key"  # the bootstrap's unit: patient_key (salted, from DICOM) or a manifest column
    subgroups: list[str] = field(default_factory=list)  # manifest columns: AUROC per value, with the gap


@dataclass
class ZeroShotEvalConf:
    """How the scores are evaluated when ``data.labels`` is given."""

    threshold: float = 0.5
    bootstrap: int = 1000
    seed: int = 0


@dataclass
class ZeroShotConf:
    """``medray zeroshot``: the Hydra schema of ``conf/zeroshot.yaml``."""

    embeddings: str = MISSING
    labels: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=lambda: ["{}"])
    output: str | None = None
    encoder: str | None = None  # preset or family; null: the encoder the embeddings name
    checkpoint: str | None = None  # where its weights are now; null: where the embeddings say
    data: ZeroShotDataConf = field(default_factory=ZeroShotDataConf)
    eval: ZeroShotEvalConf = field(default_factory=ZeroShotEvalConf)
    storage: StorageConf = field(default_factory=StorageConf)


def register() -> None:
    """Store the zeroshot schema in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="zeroshot_schema", node=ZeroShotConf)


JOB = JobInfo(
    "zeroshot",
    "zero-shot classes from text prompts on stored image-text embeddings (MedSigLIP, BiomedCLIP); AUROC with labels",
    config_name="zeroshot",
    register=register,
    order=27,
    exit_fast=True,
)


def _check(c: Any) -> None:
    from medray.platform.errors import ConfigError
    from medray.platform.zeroshot import expand_prompts

    expand_prompts(list(c.labels), list(c.prompts))  # names the key at fault
    if not (0.0 < c.eval.threshold < 1.0):
        raise ConfigError("eval.threshold", f"must be in (0, 1), got {c.eval.threshold}")
    if c.eval.bootstrap < 0:
        raise ConfigError("eval.bootstrap", f"must be >= 0, got {c.eval.bootstrap}")
    if c.data.subgroups and not c.data.labels:
        raise ConfigError("data.subgroups", "subgroups come from the labelled manifest: set data.labels=<manifest>")


def _encoder(c: Any, named: dict[str, Any], options: dict) -> Any:
    """The image-text encoder that wrote the embeddings, checked by weights hash."""
    from medray.encoders import ImageTextEncoder, create_encoder, family_modalities, get_spec, resolve_checkpoint
    from medray.platform.errors import ConfigError

    name = c.encoder or named.get("encoder")
    checkpoint = c.checkpoint or named.get("checkpoint")
    try:
        spec = get_spec(str(name), checkpoint=str(checkpoint))
    except ConfigError:
        raise ConfigError(
            "encoder",
            f"the embeddings were made by encoder '{name}', which is no preset or family here: set "
            "encoder=<its preset or family> (e.g. siglip, open_clip) and checkpoint=<its weights>",
        ) from None
    if "text" not in family_modalities(spec.family) or family_modalities(spec.family)[0] != "image":
        raise ConfigError(
            "embeddings",
            f"were made by {spec.name} (family {spec.family}), which has no text tower in the images' space; "
            "zero-shot needs an image-text encoder: embed with encoder=medsiglip_448, biomedclip, siglip or open_clip",
        )
    if spec.storage_options == {} and options:
        spec = dataclasses.replace(spec, storage_options=dict(options))
    _, sha = resolve_checkpoint(spec.checkpoint, storage_options=spec.storage_options, cache_dir=spec.cache_dir)
    want = named.get("weights_hash")
    if want and sha != want:
        raise ConfigError(
            "checkpoint",
            f"{spec.checkpoint} has weights {sha[:12]}..., the embeddings were made with {str(want)[:12]}...; "
            "give the checkpoint that made them (checkpoint=...), or embed again with this one",
        )
    encoder = create_encoder(spec)
    assert isinstance(encoder, ImageTextEncoder)  # its family embeds text in the images' space
    return encoder


def run_zeroshot(c: Any) -> dict[str, Any]:
    """Run the zero-shot job described by ``c`` (a :class:`ZeroShotConf`); returns ``zeroshot.json``."""
    import numpy as np

    from medray.pipeline.records import join_labels, read_record_embeddings, write_predictions
    from medray.platform.errors import ConfigError
    from medray.platform.evaluation import evaluate
    from medray.platform.storage import atomic_write_bytes, open_fs
    from medray.platform.zeroshot import class_embeddings, expand_prompts, zero_shot_scores

    _check(c)
    t0 = time.perf_counter()
    options = dict(c.storage.options)
    labels = [str(v) for v in c.labels]
    prompts = expand_prompts(labels, list(c.prompts))
    records = read_record_embeddings(c.embeddings, options)
    images = ~records.text  # reports and SR text an image-text encoder wrote beside the images are not scored
    if not images.any():
        raise ConfigError("embeddings", f"'{c.embeddings}' holds no image embeddings to classify")
    records = dataclasses.replace(
        records,
        **{
            k: getattr(records, k)[images]
            for k in ("record_id", "uri", "member", "patient_key", "modality", "x", "text")
        },
    )
    encoder = _encoder(c, records.encoder, options)
    if encoder.dim != records.x.shape[1]:
        raise ConfigError("embeddings", f"hold {records.x.shape[1]}-d vectors, the encoder makes {encoder.dim}-d")
    classes = class_embeddings(encoder.embed_text([p for row in prompts for p in row]), len(labels))
    scores = zero_shot_scores(
        records.x, classes, scale=encoder.logit_scale, bias=encoder.logit_bias, score=encoder.score
    )
    output = c.output or posixpath.join(c.embeddings.rstrip("/"), "zeroshot")
    described = encoder.describe()
    doc: dict[str, Any] = {
        "kind": "zeroshot",
        "labels": labels,
        "prompts": {label: row for label, row in zip(labels, prompts)},
        "encoder": {
            k: described.get(k)
            for k in ("name", "family", "checkpoint", "weights_hash", "score", "model_temperature", "model_bias")
        },
        "embeddings": c.embeddings,
        "counts": {"images": int(len(records.x)), "text_records_not_scored": int((~images).sum())},
        "mean_scores": {label: float(scores[:, j].mean()) for j, label in enumerate(labels)},
        "evaluation": None,
    }
    y = np.full(scores.shape, np.nan)
    groups = np.asarray([str(g or f"record:{r}") for g, r in zip(records.patient_key, records.record_id)], object)
    if c.data.labels:
        data = join_labels(
            records,
            c.data.labels,
            labels=labels,
            task="multilabel",
            group_by=c.data.group_by,
            extra_columns=list(c.data.subgroups),
            storage_options=options,
            key="data.labels",
        )
        position = {rid: i for i, rid in enumerate(records.record_id)}
        rows = np.asarray([position[r] for r in data.record_id], dtype=int)
        y[rows] = data.y
        groups[rows] = data.groups
        evaluation = evaluate(
            data.y,
            scores[rows],
            labels,
            groups=data.groups,
            subgroups={k: data.columns[k] for k in c.data.subgroups},
            threshold=c.eval.threshold,
            n_boot=c.eval.bootstrap,
            seed=c.eval.seed,
        )
        evaluation["model"] = {"zeroshot": True, "encoder": described.get("name"), "prompts": list(c.prompts)}
        evaluation["data"] = {
            "test": c.data.labels,
            "embeddings": c.embeddings,
            "manifest_rows_not_embedded": data.unmatched,
        }
        doc["evaluation"] = evaluation
    doc["seconds"] = round(time.perf_counter() - t0, 3)
    fs, root = open_fs(output, options)
    fs.makedirs(root, exist_ok=True)
    write_predictions(records.record_id, records.uri, groups, y, scores, labels, output, options)
    if doc["evaluation"] is not None:
        atomic_write_bytes(
            fs, posixpath.join(root, "evaluation.json"), json.dumps(doc["evaluation"], indent=2).encode()
        )
    doc["report"] = _write_report(doc, output, options)
    doc["output"] = output
    atomic_write_bytes(fs, posixpath.join(root, "zeroshot.json"), json.dumps(doc, indent=2).encode())
    return doc


def _write_report(doc: dict, output: str, options: dict) -> str | None:
    from medray.platform import report as reporting

    try:
        return str(reporting.zeroshot_report(doc).write(output, storage_options=options))
    except Exception as err:  # noqa: BLE001 - a report that cannot be drawn never fails the job
        log.warning("report not written (%s)", type(err).__name__)
        return None


def _one_line(doc: dict) -> str:
    line = f"zeroshot: {doc['counts']['images']} images x {len(doc['labels'])} classes"
    ev = doc.get("evaluation")
    if ev:
        macro = ev["macro"]["auroc"]
        value = f"{macro['value']:.3f}" if macro.get("value") is not None else "n/a"
        ci = f" [{macro['lo']:.3f}, {macro['hi']:.3f}]" if macro.get("lo") is not None else ""
        line += f", macro AUROC {value}{ci}"
    return line + f" -> {doc['output']}" + (f"; report {doc['report']}" if doc.get("report") else "")


def main(cfg: Any) -> int:
    """Hydra entry point body; returns the process exit code."""
    from omegaconf import OmegaConf

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    doc = run_zeroshot(OmegaConf.to_object(cfg))
    print(_one_line(doc), flush=True)
    return 0
