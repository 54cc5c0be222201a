"""``medray finetune``: adapt an encoder to labelled records with Ray Train + DeepSpeed.

Usage::

    medray finetune data.train=s3://b/labels.parquet encoder=rad_dino task=multilabel \\
        task.labels=[effusion,pneumothorax] train.strategy=lora deepspeed.stage=2 \\
        scaling.num_workers=8 scaling.use_gpu=true output=s3://b/runs/cxr-v1

Every check that can fail runs before a training worker starts: the config
(task, labels, ZeRO stage, strategy, precision, resources), the manifest
(label and subgroup columns exist, label values fit the task) and the split
(every label has positives in train and val). Then:

1. splits: patient-level, from a split column, a grouping column, or the
   salted DICOM patient key (one header-only pass writes ``splits/``);
2. Ray Train ``TorchTrainer`` runs :func:`medray.jobs.finetune.loop.train_loop`
   on ``scaling.num_workers`` workers: Ray Data shards decoded with the same
   ``read_batch``/``decode_batch`` as ``embed`` (``data.features=inputs``), or
   record-level examples holding the frozen encoder's pooled embedding of each
   audio recording, document or slide (``data.features=embeddings``, see
   :mod:`medray.jobs.finetune.features`), DeepSpeed ZeRO from config,
   per-epoch validation (overall and per subgroup), checkpoints under
   ``<output>/checkpoints`` (a dead worker restarts the run from the last one);
3. export: ZeRO shards consolidated (``zero_to_fp32``) into the artifact at
   ``<output>/model`` (``medray.encoders.heads`` format: model card, head,
   backbone in its family's layout), checked against the model's own
   predictions at the end of training.

Output::

    <output>/model/                 the artifact: embed with encoder.checkpoint=<output>/model
    <output>/predictions/val.parquet  end-of-training validation predictions
    <output>/checkpoints/train/     Ray Train checkpoints (DeepSpeed shards)
    <output>/splits/                the split manifest (data.group_by=patient_key)
    <output>/quarantine/            records that could not be used (embed's quarantine format)
    <output>/summary.json, runs/<run_id>.json
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import posixpath
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

import medray
from medray.config import patient_salt
from medray.encoders import (
    EncoderSpec,
    create_preprocessor,
    family_modality,
    get_spec,
    list_families,
    resolve_checkpoint,
    spec_to_dict,
)
from medray.encoders.heads import CARD_FILE
from medray.jobs import JobInfo
from medray.jobs.finetune.config import (
    PRECISIONS,
    SCHEDULES,
    STRATEGIES,
    TASK_TYPES,
    FinetuneConf,
    register,
)
from medray.jobs.finetune.data import (
    DERIVED_SUBGROUPS,
    ExampleSpec,
    QuarantineTarget,
    SplitPlan,
    count_examples,
    count_splits,
    decode_examples_batch,
    header_keys_batch,
    keep_split,
    manifest_columns,
    split_batch,
)
from medray.jobs.finetune.features import (
    EMBED_COLUMNS,
    FEATURES,
    embed_output_rows,
    embedding_examples_batch,
    join_examples,
    keyed_rows,
    pool_tiles,
    set_split,
    stage_options_kwargs,
)
from medray.jobs.finetune.testsplit import score_test_split, write_report
from medray.pipeline import StageOptions, plan_dataset, read_batch
from medray.platform.decoders.audio import AudioOptions
from medray.platform.decoders.dicom_wsi import sniff_dicom_wsi
from medray.platform.decoders.slide import SlideOptions, sniff_slide
from medray.platform.deid import ALLOWED_FIELDS
from medray.platform.errors import ConfigError
from medray.platform.formats import TextOptions, get_format
from medray.platform.manifest import iter_manifest_batches, manifest_sha256, read_manifest
from medray.platform.metrics import json_safe
from medray.platform.runtime import init_ray, progress_mode
from medray.platform.splits import SplitFractions
from medray.platform.storage import atomic_write_bytes, is_remote, open_fs, redact_options
from medray.platform.tracking import RunArtifact, artifact_name, log_run

__all__ = ["JOB", "FinetuneFailed", "FinetuneJob", "FinetuneResult", "main"]

log = logging.getLogger("medray.finetune")

JOB = JobInfo(
    "finetune",
    "fine-tune an encoder on labelled records with Ray Train + DeepSpeed; export an artifact",
    config_name="finetune",
    register=register,
    order=20,
)


# --------------------------------------------------------------------------
# result
# --------------------------------------------------------------------------
@dataclass
class FinetuneResult:
    """What a run did; also written as ``summary.json`` and ``runs/<run_id>.json``."""

    run_id: str
    output: str
    artifact: str
    artifact_sha256: str
    encoder: str
    task: str
    labels: list
    strategy: str
    zero_stage: int
    num_workers: int
    epochs: int
    global_step: int
    splits: dict
    metrics: dict
    baseline: dict
    history: list
    attempts: list
    n_parameters: int
    n_trainable: int
    trainable_parameters: list
    export_max_abs_diff: float | None
    export_records_checked: int
    wall_s: float
    train_s: float
    phase_s: dict
    cached: bool
    config: dict
    features: str = "inputs"  # inputs | embeddings (data.features, resolved)
    quarantined: int = 0  # labelled records that could not be used (<output>/quarantine)
    quarantine_by_class: dict = field(default_factory=dict)  # error class or skip reason -> records
    test: dict | None = None  # the held-out test split scored with the artifact (data.test_fraction > 0)
    report: str | None = None  # <output>/report/index.html

    def one_line(self) -> str:
        """The closing one-line summary."""
        val = self.metrics.get("val", {})
        main = (
            f"AUROC macro {val.get('auroc_macro'):.3f}"
            if isinstance(val.get("auroc_macro"), float)
            else f"MSE {val.get('mse')}"
        )
        restarts = max(0, len(self.attempts) - 1)
        return (
            f"medray finetune: {self.strategy} {self.encoder} ({self.task}: {', '.join(self.labels)}), "
            f"ZeRO-{self.zero_stage} x{self.num_workers}, {self.epochs} epochs / {self.global_step} steps "
            f"in {self.wall_s:.1f}s ({restarts} restarts); val {main}{self._test_part()}; "
            f"{self.quarantined} records quarantined; "
            f"artifact {self.artifact} "
            f"(sha256 {self.artifact_sha256[:12]}...: pin it with encoder.sha256 in embed/serve)"
        )

    def _test_part(self) -> str:
        auroc = (self.test or {}).get("auroc_macro") or {}
        if not isinstance(auroc.get("value"), float):
            return ""
        ci = f" [{auroc['lo']:.3f}, {auroc['hi']:.3f}]" if auroc.get("lo") is not None else ""
        return f"; test AUROC macro {auroc['value']:.3f}{ci} ({self.test['patients']} patients)"  # type: ignore[index]


# --------------------------------------------------------------------------
# the recipe
# --------------------------------------------------------------------------
def _lists_whole_records(manifest: str, storage_options: Any, sample: int = 8) -> str | None:
    """What the manifest's first ``sample`` objects hold when a record is many items: slides or volumes.

    Whole-slide images (tiles) and NIfTI volumes (slices) are labelled as a whole,
    so ``data.features=auto`` trains on their pooled record embeddings. Judged by
    content, as the read stage does: a slide is sniffed lazily
    (:func:`~medray.platform.decoders.slide.sniff_slide`, a DICOM WSI by
    :func:`~medray.platform.decoders.dicom_wsi.sniff_dicom_wsi`), a NIfTI from its first
    bytes by its format's own sniff. A manifest that cannot be read yet answers
    ``None`` (the data checks report it with its key).
    """
    try:
        batch = next(iter_manifest_batches(manifest, ["uri"], storage_options), None)
    except Exception:  # noqa: BLE001 - no manifest / no uri column: _check_data names the key
        return None
    uris = [u for u in (batch.column(0).to_pylist() if batch is not None else []) if u][:sample]
    nifti = get_format("nifti")
    for uri in uris:
        try:
            fs, path = open_fs(uri, storage_options)
            if sniff_slide(uri, fs, path, storage_options) or sniff_dicom_wsi(uri, fs, path, storage_options):
                return "whole-slide images"
            with fs.open(path, "rb") as f:
                head = f.read(1 << 16)
        except Exception:  # noqa: BLE001 - a bad URI is quarantined later, with its reason
            continue
        if nifti.sniff(head, path) is not None:
            return "NIfTI volumes"
    return None


class FinetuneJob:
    """The fine-tuning recipe: validate on construction, then :meth:`run`.

    Args:
        cfg: the composed config (a DictConfig from Hydra, or a FinetuneConf).

    Raises:
        ConfigError: naming the key at fault, before any work starts.
    """

    def __init__(self, cfg: Any) -> None:
        if isinstance(cfg, DictConfig):
            for key in ("data.train", "output"):
                if OmegaConf.is_missing(cfg, key):
                    raise ConfigError(
                        key,
                        "is required, e.g. `medray finetune data.train=s3://b/labels.parquet "
                        "task.labels=[label] output=s3://b/runs/v1`",
                    )
            try:
                self.cfg: FinetuneConf = OmegaConf.to_object(cfg)  # type: ignore[assignment]
            except MissingMandatoryValue as err:  # a `???` left in a preset, e.g. encoder=hf_image
                raise ConfigError(
                    str(err.full_key), f"is required by this preset and was not given; set it, e.g. {err.full_key}=..."
                ) from None
            self.resolved: dict[str, Any] = cast("dict[str, Any]", OmegaConf.to_container(cfg, resolve=True))
        else:
            self.cfg = cfg
            self.resolved = asdict(cfg)
        self.salt = patient_salt(self.cfg.patient_salt)
        self._validate()
        self._check_output()
        self._check_data()

    # ------------------------------------------------------------ config checks
    def _validate(self) -> None:
        c = self.cfg
        t, tr, ds, sc = c.task, c.train, c.deepspeed, c.scaling
        if t.type not in TASK_TYPES:
            raise ConfigError("task.type", f"unknown task '{t.type}'; expected one of {list(TASK_TYPES)}")
        labels = [str(v) for v in (t.labels or [])]
        if not labels:
            raise ConfigError("task.labels", "at least one label is required, e.g. task.labels=[effusion]")
        if len(set(labels)) != len(labels):
            raise ConfigError("task.labels", f"labels repeat: {labels}")
        if t.type == "binary" and len(labels) != 1:
            raise ConfigError(
                "task.labels", f"a binary task has one label column, got {labels}; use task=multilabel for several"
            )
        if t.type == "multiclass":
            if not t.column:
                raise ConfigError(
                    "task.column", "a multiclass task needs the column holding the class, e.g. task.column=finding"
                )
            if len(labels) < 2:
                raise ConfigError("task.labels", "a multiclass task needs at least two classes")
        elif t.column:
            raise ConfigError(
                "task.column",
                f"only multiclass tasks read a class column; for {t.type} the label columns are task.labels",
            )
        if tr.strategy not in STRATEGIES:
            raise ConfigError("train.strategy", f"unknown strategy '{tr.strategy}'; expected one of {list(STRATEGIES)}")
        if not isinstance(ds.stage, int) or not (0 <= ds.stage <= 3):
            raise ConfigError("deepspeed.stage", f"ZeRO stage must be 0, 1, 2 or 3, got {ds.stage}")
        if ds.offload_params and ds.stage != 3:
            raise ConfigError("deepspeed.offload_params", "parameter offload needs deepspeed.stage=3")
        if ds.offload_optimizer and ds.stage == 0:
            raise ConfigError("deepspeed.offload_optimizer", "optimizer offload needs deepspeed.stage >= 1")
        if tr.precision not in PRECISIONS:
            raise ConfigError("train.precision", f"expected one of {list(PRECISIONS)}, got '{tr.precision}'")
        if tr.precision in ("bf16", "fp16") and not sc.use_gpu:
            raise ConfigError(
                "train.precision", f"{tr.precision} needs a GPU that has it; on CPU use train.precision=auto (fp32)"
            )
        if tr.schedule not in SCHEDULES:
            raise ConfigError("train.schedule", f"expected one of {list(SCHEDULES)}, got '{tr.schedule}'")
        for key in ("epochs", "batch_size", "eval_batch_size", "grad_accum"):
            if getattr(tr, key) < 1:
                raise ConfigError(f"train.{key}", f"must be >= 1, got {getattr(tr, key)}")
        if not tr.lr > 0:
            raise ConfigError("train.lr", f"must be > 0, got {tr.lr}")
        if not (0.0 <= tr.warmup_fraction < 1.0):
            raise ConfigError("train.warmup_fraction", f"must be within [0, 1), got {tr.warmup_fraction}")
        if tr.clip_grad_norm is not None and tr.clip_grad_norm < 0:
            raise ConfigError("train.clip_grad_norm", "must be >= 0 or null")
        if tr.max_failures < 0:
            raise ConfigError("train.max_failures", f"must be >= 0, got {tr.max_failures}")
        if tr.checkpoints_to_keep < 1:
            raise ConfigError("train.checkpoints_to_keep", "must be >= 1")
        if tr.strategy == "lora" and tr.lora.r < 1:
            raise ConfigError("train.lora.r", f"must be >= 1, got {tr.lora.r}")
        from medray.jobs.finetune.model import AUGMENT_KEYS  # lazy: imports torch

        for modality, aug in (tr.augment or {}).items():
            for key, value in (aug or {}).items():
                if key not in AUGMENT_KEYS:
                    raise ConfigError(
                        f"train.augment.{modality}.{key}", f"unknown augmentation; known: {list(AUGMENT_KEYS)}"
                    )
                if float(value) < 0:
                    raise ConfigError(f"train.augment.{modality}.{key}", "must be >= 0")
        if sc.num_workers < 1:
            raise ConfigError("scaling.num_workers", f"must be >= 1, got {sc.num_workers}")
        if sc.cpus_per_worker <= 0:
            raise ConfigError("scaling.cpus_per_worker", "must be > 0")
        if sc.use_gpu and c.ray.address is None:
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(
                    "scaling.use_gpu",
                    "this machine has no CUDA GPU; set scaling.use_gpu=false "
                    "or run on a GPU cluster (ray.address=auto)",
                )
        d = c.data
        for key in ("read_batch_size", "decode_batch_size"):
            if getattr(d, key) < 1:
                raise ConfigError(f"data.{key}", "must be >= 1")
        if d.decode_num_cpus <= 0:
            raise ConfigError("data.decode_num_cpus", "must be > 0")
        if str(d.cache).lower() not in ("auto", "true", "false"):
            raise ConfigError("data.cache", f"expected auto, true or false, got {d.cache!r}")
        if (
            not (0.0 <= d.val_fraction < 1.0)
            or not (0.0 <= d.test_fraction < 1.0)
            or d.val_fraction + d.test_fraction >= 1.0
        ):
            raise ConfigError(
                "data.val_fraction", "val_fraction and test_fraction must be within [0, 1) and sum to less than 1"
            )
        if d.val is None and d.split_column is None and d.val_fraction <= 0:
            raise ConfigError(
                "data.val_fraction", "must be > 0 (or give data.val or data.split_column): validation needs data"
            )
        if c.eval.ece_bins < 1:
            raise ConfigError("eval.ece_bins", "must be >= 1")
        if c.eval.verify_records < 0:
            raise ConfigError("eval.verify_records", "must be >= 0")
        enc = c.encoder
        if enc.family not in list_families():
            raise ConfigError("encoder.family", f"unknown family '{enc.family}'; known: {', '.join(list_families())}")
        if not enc.checkpoint or enc.checkpoint == "???":
            raise ConfigError(
                "encoder.checkpoint",
                "is required for this encoder: a hub id, a local directory or an object-storage URI (s3://...)",
            )
        self.spec: EncoderSpec = get_spec(EncoderSpec(**asdict(enc)))
        self.features = self._features()
        out = c.output.rstrip("/")
        for key in ("train", "val"):
            src = getattr(d, key)
            if src and (src.rstrip("/") == out or src.startswith(out + "/")):
                raise ConfigError("output", f"must not contain data.{key}; choose another output location")
        label_columns = labels
        if t.type == "multiclass":
            assert t.column is not None  # _validate: a multiclass task names its class column
            label_columns = [t.column]
        self.example_spec = ExampleSpec(
            task=t.type,
            labels=tuple(labels),
            label_columns=tuple(label_columns),
            subgroups=tuple(str(g) for g in c.eval.subgroups),
            age_bands=tuple(int(b) for b in c.eval.age_bands),
        )

    def _features(self) -> str:
        """``data.features`` resolved: ``inputs`` (the encoder trains on decoded images) or ``embeddings``."""
        c = self.cfg
        d, tr = c.data, c.train
        self.embedding_dim: int | None = None  # data.features=embeddings: known once the records are embedded
        self.embedding_stats: dict | None = None  # and the train split's per-feature mean / std
        if d.features not in FEATURES:
            raise ConfigError("data.features", f"expected one of {list(FEATURES)}, got '{d.features}'")
        modality = family_modality(self.spec.family)
        features = d.features
        if features == "auto":
            features = "embeddings" if (modality != "image" or d.embeddings or d.text_column) else "inputs"
            whole = _lists_whole_records(d.train, c.storage.options) if features == "inputs" else None
            if whole is not None:
                # record-level labels: one example per slide / volume, the mean of its tiles' / slices' embeddings
                log.info(
                    "data.features=auto: data.train lists %s; training a head on each record's pooled "
                    "embedding (data.features=embeddings)",
                    whole,
                )
                features = "embeddings"
        if d.text_column and modality != "text":
            raise ConfigError(
                "data.text_column",
                f"documents need a text encoder; '{self.spec.name}' is a "
                f"{modality} encoder (e.g. encoder=hf_text encoder.checkpoint=...)",
            )
        if features == "inputs":
            if modality != "image":
                raise ConfigError(
                    "data.features",
                    f"'{self.spec.name}' is a {modality} encoder: only image encoders "
                    "are fine-tuned end to end here; train a head on its pooled record embeddings "
                    "with data.features=embeddings train=linear_probe",
                )
            for key in ("embeddings", "text_column"):
                if getattr(d, key):
                    raise ConfigError(f"data.{key}", "needs data.features=embeddings (or auto)")
            return features
        if tr.strategy != "linear_probe":
            raise ConfigError(
                "train.strategy",
                f"data.features=embeddings trains a head on the frozen encoder's "
                f"pooled record embeddings: use train=linear_probe ('{tr.strategy}' end to end "
                f"is supported for image encoders on decoded images, data.features=inputs)",
            )
        if tr.augment:
            raise ConfigError(
                "train.augment",
                "augmentations apply to decoded images; with data.features=embeddings set train.augment={}",
            )
        if d.embeddings and d.text_column:
            raise ConfigError(
                "data.text_column",
                "data.embeddings already holds the documents' embeddings: "
                "drop data.text_column (the join is by the manifest's uri)",
            )
        for key, value in (("audio.pool", c.audio.pool), ("text.pool", c.text.pool)):
            if value != "mean":
                raise ConfigError(key, "record embeddings are the mean of windows/chunks: must be mean")
        if c.audio.mixdown == "all":
            raise ConfigError("audio.mixdown", "one example per recording: use mean or first")
        for key in ("encode_batch_size", "encode_actors"):
            if getattr(d, key) < 1:
                raise ConfigError(f"data.{key}", "must be >= 1")
        if modality != "image" and d.group_by == "patient_key" and not (d.val or d.split_column):
            log.warning(
                "data.group_by=patient_key: only DICOM records (e.g. SR reports) carry a patient; every "
                "other %s record is its own group. Set data.group_by=<patient column> so no patient's "
                "records end up in two splits",
                modality,
            )
        AudioOptions(**asdict(c.audio))  # each raises a ConfigError naming its key
        TextOptions(**asdict(c.text))
        SlideOptions(**asdict(c.slide))
        return features

    def _quarantine_counts(self) -> dict:
        """``quarantined`` (distinct records) and ``quarantine_by_class`` from ``<output>/quarantine``."""
        import pyarrow.parquet as pq

        fs, root = open_fs(self.cfg.output, self.cfg.storage.options)
        by_record: dict[str, str] = {}
        try:
            files = [
                p
                for p in fs.find(posixpath.join(root, "quarantine"))
                if p.endswith(".parquet") and not posixpath.basename(p).startswith(".")
            ]
        except FileNotFoundError:
            files = []
        for path in files:
            with fs.open(path, "rb") as f:
                t = pq.read_table(f, columns=["record_id", "error_class"])
            by_record.update(zip(t.column("record_id").to_pylist(), t.column("error_class").to_pylist()))
        by_class: dict[str, int] = {}
        for cls in by_record.values():
            by_class[str(cls)] = by_class.get(str(cls), 0) + 1
        return {"quarantined": len(by_record), "quarantine_by_class": by_class}

    def _check_output(self) -> None:
        """A run already in ``output`` continues only with ``resume=true``."""
        fs, root = open_fs(self.cfg.output, self.cfg.storage.options)
        runs = posixpath.join(root, "checkpoints", "train")
        # Ray Train's run snapshot (written with each checkpoint), not the prefix: object stores
        # and SeaweedFS' filer may keep empty directory entries after a delete.
        started = fs.exists(posixpath.join(runs, "checkpoint_manager_snapshot.json"))
        if started and not self.cfg.resume:
            raise ConfigError(
                "resume",
                f"output '{self.cfg.output}' already holds a run; pass resume=true to "
                "continue it, or choose a new output",
            )

    def _check_data(self) -> None:
        """Manifest columns, label values and split positives, streamed on the driver."""
        c, spec = self.cfg, self.example_spec
        opts = c.storage.options
        self.columns = {"train": manifest_columns(c.data.train, opts)}
        if c.data.val:
            try:
                self.columns["val"] = manifest_columns(c.data.val, opts)
            except ConfigError:
                raise ConfigError("data.val", f"manifest '{c.data.val}' does not exist") from None
        for which, names in self.columns.items():
            if c.data.text_column and c.data.text_column not in names:
                raise ConfigError(
                    "data.text_column",
                    f"no column '{c.data.text_column}' in data.{which} (columns: {', '.join(names)})",
                )
            if "uri" not in names and not c.data.text_column:
                raise ConfigError(f"data.{which}", f"manifest has no 'uri' column (columns: {', '.join(names)})")
            for col in spec.label_columns:
                if col not in names:
                    key = "task.column" if c.task.type == "multiclass" else "task.labels"
                    raise ConfigError(
                        key,
                        f"unknown label column '{col}' in data.{which}; the manifest has: "
                        f"{', '.join(n for n in names if n not in ('uri', 'member'))}",
                    )
            for g in spec.subgroups:
                need = DERIVED_SUBGROUPS.get(g)
                if need is not None:
                    if need not in names:
                        raise ConfigError("eval.subgroups", f"'{g}' needs a '{need}' column in data.{which}")
                elif g not in names and g not in ALLOWED_FIELDS:
                    raise ConfigError(
                        "eval.subgroups",
                        f"unknown subgroup '{g}': not a column of data.{which} "
                        f"nor DICOM metadata ({', '.join(ALLOWED_FIELDS)}) nor age_band",
                    )
        d = c.data
        if d.embeddings:
            efs, eroot = open_fs(d.embeddings, opts)
            if not efs.exists(posixpath.join(eroot, "_medray.json")):
                raise ConfigError(
                    "data.embeddings",
                    f"'{d.embeddings}' is not a `medray embed` output (no "
                    "_medray.json); give the output= of an embed run with this encoder",
                )
        fractions = SplitFractions(val=0.0 if d.val else d.val_fraction, test=0.0 if d.val else d.test_fraction)
        if d.val:
            self.plan = SplitPlan("manifests", seed=d.seed, fractions=fractions, salt=self.salt)
        elif d.split_column:
            if d.split_column not in self.columns["train"]:
                raise ConfigError("data.split_column", f"no column '{d.split_column}' in data.train")
            self.plan = SplitPlan("column", d.split_column, d.seed, fractions, self.salt)
        elif d.group_by == "patient_key":
            self.plan = SplitPlan("patient_key", None, d.seed, fractions, self.salt)
        else:
            if d.group_by not in self.columns["train"]:
                raise ConfigError(
                    "data.group_by",
                    f"no column '{d.group_by}' in data.train; use patient_key "
                    "(the salted DICOM patient) or a grouping column of the manifest",
                )
            self.plan = SplitPlan("group", d.group_by, d.seed, fractions, self.salt)
        self.counts: dict | None = None
        if self.plan.mode == "patient_key":
            # the split needs each DICOM's patient (a header pass on Ray, counted again in run());
            # what the manifest alone can answer is checked now, before Ray starts
            self._check_totals(
                count_splits(
                    iter_manifest_batches(d.train, list(spec.label_columns), opts),
                    self.plan,
                    spec,
                    fixed_split="train",
                )["train"]
            )
            return
        cols = list(spec.label_columns) + [x for x in (self.plan.column, "uri") if x and x in self.columns["train"]]
        if self.plan.mode == "manifests":
            assert d.val is not None  # the "manifests" plan is chosen when data.val is set
            counts = count_splits(
                iter_manifest_batches(d.train, list(spec.label_columns), opts), self.plan, spec, fixed_split="train"
            )
            val = count_splits(
                iter_manifest_batches(d.val, list(spec.label_columns), opts), self.plan, spec, fixed_split="val"
            )
            counts["val"] = val["val"]
        else:
            counts = count_splits(iter_manifest_batches(d.train, sorted(set(cols)), opts), self.plan, spec)
        self._check_counts(counts)

    def _check_totals(self, total: dict) -> None:
        """Before any split: labels valid, and enough positives for train and val to each hold one."""
        spec = self.example_spec
        if total["usable"] < 2:
            raise ConfigError(
                "data.train",
                f"{total['usable']} labelled rows of {total['rows']}: train and val need at least one each",
            )
        if spec.task == "regression":
            return
        for label in spec.labels:
            n = total["positives"][label]
            if n < 2:
                raise ConfigError(
                    "task.labels",
                    f"label '{label}' has {n} positive example(s) in data.train (of {total['usable']} labelled "
                    "rows); the train and val splits each need one: add positives or drop the label",
                )
            if total["negatives"][label] == 0:
                raise ConfigError(
                    "task.labels",
                    f"label '{label}' has no negative examples in data.train, so AUROC is undefined; drop the label",
                )

    def _check_counts(self, counts: dict) -> None:
        """Every label needs positives (and val negatives) in train and val."""
        spec = self.example_spec
        where = {
            "manifests": "data.val",
            "column": "data.split_column",
            "group": "data.group_by",
            "patient_key": "data.group_by",
        }[self.plan.mode]
        for split in ("train", "val"):
            if counts[split]["usable"] == 0:
                raise ConfigError(
                    "data.val_fraction" if split == "val" and self.plan.mode in ("group", "patient_key") else where,
                    f"the {split} split has no labelled rows "
                    f"({counts[split]['rows']} rows); check the split settings and the label columns",
                )
        if spec.task != "regression":
            for split in ("train", "val"):
                for label in spec.labels:
                    if counts[split]["positives"][label] == 0:
                        raise ConfigError(
                            "task.labels",
                            f"label '{label}' has no positive examples in the {split} "
                            f"split (0 of {counts[split]['usable']}); every label needs positives in "
                            f"train and val: change {where}/data.seed or drop the label",
                        )
                    if split == "val" and counts[split]["negatives"][label] == 0:
                        raise ConfigError(
                            "task.labels",
                            f"label '{label}' has no negative examples in the val "
                            "split, so AUROC is undefined; change the split or drop the label",
                        )
        self.counts = counts

    # ------------------------------------------------------------------ run
    def _storage(self) -> tuple[str, Any]:
        """Ray Train storage path and filesystem for ``<output>/checkpoints``."""
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        fs, root = open_fs(self.cfg.output, self.cfg.storage.options)
        path = posixpath.join(root, "checkpoints")
        if not is_remote(self.cfg.output):
            os.makedirs(path, exist_ok=True)
            return os.path.abspath(path), None
        return path, PyFileSystem(FSSpecHandler(fs))

    def _stage_options(self, pre: Any) -> Any:
        c = self.cfg
        return StageOptions(
            storage_options=dict(c.storage.options),
            max_bytes=c.decode.max_bytes,
            max_pixels=c.decode.max_pixels,
            frames=c.decode.frames,
            windows={k: list(v) for k, v in c.decode.windows.items()},
            prefer_file_voi=c.decode.prefer_file_voi,
            allow_burned_in=c.decode.allow_burned_in,
            salt=self.salt,
            encoder_spec=self.spec,
            **stage_options_kwargs(c),
        )

    def _quarantine(self) -> Any:
        """Where the stages write the records they could not use (``<output>/quarantine``)."""
        return QuarantineTarget(self.cfg.output, dict(self.cfg.storage.options), medray.__version__)

    def _write_split_manifest(self, ray: Any, opts: Any) -> str:
        """Header-only pass: salted patient key + split per record, written to ``<output>/splits/``."""
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        c = self.cfg
        fs, root = open_fs(c.output, c.storage.options)
        target = posixpath.join(root, "splits", "manifest")
        marker = posixpath.join(root, "splits", "_SUCCESS.json")
        ident = {
            "manifest": c.data.train,
            "seed": c.data.seed,
            "val_fraction": c.data.val_fraction,
            "test_fraction": c.data.test_fraction,
            "salt_sha256": hashlib.sha256(self.salt.encode()).hexdigest()[:16],
        }
        if fs.exists(marker) and json.loads(fs.cat_file(marker)) == ident:
            return target
        if fs.exists(target):
            fs.rm(target, recursive=True)
        ds = read_manifest(ray, c.data.train, c.storage.options)
        ds = ds.map_batches(
            read_batch,
            fn_kwargs={"opts": opts},
            batch_format="pyarrow",
            batch_size=c.data.read_batch_size,
            num_cpus=c.data.decode_num_cpus,
        )
        ds = ds.map_batches(
            header_keys_batch,
            fn_kwargs={"salt": self.salt, "plan": self.plan},
            batch_format="pyarrow",
            batch_size=c.data.read_batch_size,
            num_cpus=c.data.decode_num_cpus,
        )
        ds.write_parquet(target, filesystem=PyFileSystem(FSSpecHandler(fs)))
        atomic_write_bytes(fs, marker, json.dumps(ident).encode())
        return target

    def _split_dataset(self, ray: Any, split: str, opts: Any, split_manifest: str | None) -> Any:
        """Ray Dataset of training examples of one split (streamed; nothing collected)."""
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        c = self.cfg
        d = c.data
        if self.plan.mode == "manifests":
            assert d.val is not None  # the "manifests" plan is chosen when data.val is set
            ds = read_manifest(ray, d.train if split == "train" else d.val, c.storage.options)
        elif self.plan.mode == "patient_key":
            fs, _ = open_fs(c.output, c.storage.options)
            ds = ray.data.read_parquet(split_manifest, filesystem=PyFileSystem(FSSpecHandler(fs)))
            ds = ds.map_batches(keep_split, fn_kwargs={"split": split}, batch_format="pyarrow")
        else:
            ds = read_manifest(ray, d.train, c.storage.options)
            ds = ds.map_batches(split_batch, fn_kwargs={"plan": self.plan}, batch_format="pyarrow")
            ds = ds.map_batches(keep_split, fn_kwargs={"split": split}, batch_format="pyarrow")
        kw: dict[str, Any] = {"batch_format": "pyarrow", "num_cpus": d.decode_num_cpus}
        if d.decode_concurrency:
            kw["concurrency"] = d.decode_concurrency
        return ds.map_batches(
            decode_examples_batch,
            fn_kwargs={"opts": opts, "spec": self.example_spec, "quarantine": self._quarantine()},
            batch_size=d.decode_batch_size,
            **kw,
        )

    def input_shape(self, pre: Any) -> list[int]:
        """Shape of one example's ``x``: the preprocessed image, or ``[dim]`` (data.features=embeddings)."""
        if self.features == "embeddings":
            assert self.embedding_dim is not None  # set by _datasets() before training and export
            return [int(self.embedding_dim)]
        return [int(v) for v in pre.input_shape]

    def _use_cache(self, ray: Any, rows: int, input_shape: Any) -> bool:
        """``data.cache``: ``auto`` caches when the decoded examples fit in a quarter of the object store."""
        mode = str(self.cfg.data.cache).lower()
        if mode in ("true", "false"):
            return mode == "true"
        need = rows * int(np.prod(list(input_shape))) * 4
        store = float(ray.cluster_resources().get("object_store_memory", 0.0))
        log.info("decoded examples ~%.1f MB, object store %.1f MB", need / 1e6, store / 1e6)
        return need <= 0.25 * store

    def _embed_output(self, ray: Any) -> Any:
        """``data.embeddings``: the record rows of this encoder in an ``embed`` output (a Ray Dataset)."""
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        c = self.cfg
        assert c.data.embeddings is not None  # only called when data.embeddings is set
        fs, root = open_fs(c.data.embeddings, c.storage.options)
        ident = json.loads(fs.cat_file(posixpath.join(root, "_medray.json")))
        subdir = None
        if ident.get("weights_hash") == self.weights_hash:
            subdir = "embeddings"
        for modality, extra in (ident.get("encoders") or {}).items():
            if subdir is None and extra.get("weights_hash") == self.weights_hash:
                subdir = f"embeddings/{modality}"
        if subdir is None:
            names = [ident.get("encoder")] + [e.get("encoder") for e in (ident.get("encoders") or {}).values()]
            raise ConfigError(
                "data.embeddings",
                f"'{c.data.embeddings}' holds embeddings of {names}, none with "
                f"the weights of encoder '{self.spec.name}'; embed with this encoder first, or set "
                "encoder= to the one that made them",
            )
        base = posixpath.join(root, subdir)
        files = sorted(
            p for p in fs.ls(base, detail=False) if p.endswith(".parquet") and not posixpath.basename(p).startswith(".")
        )
        if not files:
            raise ConfigError("data.embeddings", f"no embeddings under '{c.data.embeddings}/{subdir}'")
        rows = ray.data.read_parquet(files, filesystem=PyFileSystem(FSSpecHandler(fs)), columns=list(EMBED_COLUMNS))
        return rows.map_batches(
            embed_output_rows, fn_kwargs={"weights_hash": self.weights_hash}, batch_format="pyarrow"
        )

    def _embedding_datasets(self, ray: Any, opts: Any) -> tuple[dict, dict, int]:
        """``data.features=embeddings``: record-level examples of the frozen encoder (cached).

        Manifest rows (with their split, unless it comes from decoded patient keys) go
        through ``embed``'s stages (:func:`~medray.pipeline.stages.plan_dataset`), or are
        joined to an ``embed`` output (``data.embeddings``); each record becomes one
        example, its pooled embedding (slides: the mean of their tile embeddings).
        Records that fail are quarantine rows. Returns the datasets, the checked
        counts and the embedding size.
        """
        from medray.jobs.finetune.model import feature_stats  # lazy: imports torch

        c, d, plan = self.cfg, self.cfg.data, self.plan

        def labelled(which: str) -> Any:
            src = d.train if which == "train" else d.val
            assert src is not None  # "val" is read only under the "manifests" plan, i.e. with data.val set
            ds = read_manifest(ray, src, c.storage.options, text_column=d.text_column)
            if plan.mode == "manifests":
                return ds.map_batches(set_split, fn_kwargs={"split": which}, batch_format="pyarrow")
            if plan.mode in ("column", "group"):
                return ds.map_batches(split_batch, fn_kwargs={"plan": plan}, batch_format="pyarrow")
            return ds  # patient_key: from the decoded (salted) key, in embedding_examples_batch

        sources = [labelled("train")] + ([labelled("val")] if plan.mode == "manifests" else [])
        example_kw = {
            "spec": self.example_spec,
            "plan": plan if plan.mode == "patient_key" else None,
            "quarantine": self._quarantine(),
        }
        gpus = 1.0 if c.scaling.use_gpu else 0.0
        parts = []
        for ds in sources:
            if d.embeddings:  # join the embed output's record rows to the labelled rows, by record id
                rows = self._embed_output(ray).map_batches(keyed_rows, fn_kwargs={"side": "e"}, batch_format="pyarrow")
                ds = ds.map_batches(keyed_rows, fn_kwargs={"side": "m"}, batch_format="pyarrow")
                parts.append(
                    rows.union(ds)
                    .groupby("key")
                    .map_groups(join_examples, fn_kwargs=example_kw, batch_format="pyarrow")
                )
                continue
            ds = plan_dataset(
                ds,
                opts,
                encoder_spec=spec_to_dict(self.spec),
                provenance={},
                decode_concurrency=d.decode_concurrency,
                read_batch_size=d.read_batch_size,
                decode_batch_size=d.decode_batch_size,
                encode_batch_size=d.encode_batch_size,
                actors=(1, d.encode_actors),
                num_gpus=gpus,
                device="cuda" if gpus else "cpu",
                dtype="float32",
                decode_num_cpus=d.decode_num_cpus,
            )
            parts.append(ds.map_batches(embedding_examples_batch, fn_kwargs=example_kw, batch_format="pyarrow"))
        ds = parts[0] if len(parts) == 1 else parts[0].union(parts[1])
        if family_modality(self.spec.family) == "image" and not d.embeddings:
            # whole slides: one example per slide, the mean of its tissue tiles' embeddings
            ds = ds.groupby("record_id").map_groups(pool_tiles, batch_format="pyarrow")
        everything = ds.materialize()
        counts = count_examples(
            everything.select_columns(["y", "split"]).iter_batches(batch_size=4096, batch_format="numpy"),
            self.example_spec,
        )
        self._check_counts(counts)
        datasets = {
            s: everything.map_batches(keep_split, fn_kwargs={"split": s}, batch_format="pyarrow").materialize()
            for s in ("train", "val")
        }
        mean, std = feature_stats(
            datasets["train"].select_columns(["x"]).iter_batches(batch_size=4096, batch_format="numpy")
        )
        self.embedding_stats = {"mean": mean, "std": std}  # the head standardises with the train split's
        return datasets, counts, len(mean)

    def _datasets(self, ray: Any, pre: Any) -> tuple[dict, dict, bool]:
        """The ``train`` and ``val`` datasets, the split counts (checked), and whether they are cached.

        Cached (decoded once into the object store): with ``group_by=patient_key`` every record
        is decoded once and the split comes from its decoded patient key; the assignments are
        written to ``<output>/splits/assignments``. Streamed (decoded every epoch): with
        ``group_by=patient_key`` a header-only pass writes the split manifest first.
        Either way the counts are checked before any training worker starts.
        """
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        c = self.cfg
        opts = self._stage_options(pre)
        if self.features == "embeddings":
            datasets, counts, self.embedding_dim = self._embedding_datasets(ray, opts)
            return datasets, counts, True
        if self.plan.mode != "patient_key":
            rows = sum(self.counts[s]["usable"] for s in ("train", "val"))  # type: ignore[index]
            cached = self._use_cache(ray, rows, pre.input_shape)
            datasets = {s: self._split_dataset(ray, s, opts, None) for s in ("train", "val")}
            if cached:
                # Decoded once, kept as blocks in the object store (never on the driver); each
                # epoch streams the cached blocks to the workers instead of decoding again.
                datasets = {s: ds.materialize() for s, ds in datasets.items()}
            return datasets, self.counts or {}, cached
        rows = sum(b.num_rows for b in iter_manifest_batches(c.data.train, ["uri"], c.storage.options))
        cached = self._use_cache(ray, rows, pre.input_shape)
        fs, root = open_fs(c.output, c.storage.options)
        pafs = PyFileSystem(FSSpecHandler(fs))
        if not cached:
            split_manifest = self._write_split_manifest(ray, opts)
            plan = SplitPlan("patient_key", None, self.plan.seed, self.plan.fractions, self.plan.salt)
            cols = sorted(set(self.example_spec.label_columns) | {"split"})
            uri = c.output.rstrip("/") + "/splits/manifest"
            self._check_counts(
                count_splits(iter_manifest_batches(uri, cols, c.storage.options), plan, self.example_spec)
            )
            datasets = {s: self._split_dataset(ray, s, opts, split_manifest) for s in ("train", "val")}
            return datasets, self.counts or {}, False
        d = c.data
        kw: dict[str, Any] = {"batch_format": "pyarrow", "num_cpus": d.decode_num_cpus}
        if d.decode_concurrency:
            kw["concurrency"] = d.decode_concurrency
        everything = (
            read_manifest(ray, d.train, c.storage.options)
            .map_batches(
                decode_examples_batch,
                fn_kwargs={
                    "opts": opts,
                    "spec": self.example_spec,
                    "plan": self.plan,
                    "quarantine": self._quarantine(),
                },
                batch_size=d.decode_batch_size,
                **kw,
            )
            .materialize()
        )
        self._check_counts(
            count_examples(
                everything.select_columns(["y", "split"]).iter_batches(batch_size=4096, batch_format="numpy"),
                self.example_spec,
            )
        )
        target = posixpath.join(root, "splits", "assignments")
        if fs.exists(target):
            fs.rm(target, recursive=True)
        everything.select_columns(["record_id", "frame", "patient_key", "split"]).write_parquet(target, filesystem=pafs)
        datasets = {
            s: everything.map_batches(keep_split, fn_kwargs={"split": s}, batch_format="pyarrow").materialize()
            for s in ("train", "val")
        }
        return datasets, self.counts or {}, True

    def run(self) -> FinetuneResult:
        """Split, train on Ray, export the artifact; return what happened.

        The recipe: check the checkpoint and its preprocessing on the driver,
        start Ray, build the split datasets (decoded inputs or pooled record
        embeddings), train with Ray Train + DeepSpeed, export and check the
        artifact, write the summary.
        """
        c = self.cfg
        t_start = time.perf_counter()
        run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        run_name = c.run_name or posixpath.basename(c.output.rstrip("/")) or "finetune"
        pre, weights_hash = self._resolve_encoder()
        data_sha = manifest_sha256(c.data.train, c.storage.options)
        ray = self._start_ray()
        phases: dict[str, float] = {"prepare": time.perf_counter() - t_start}

        t_phase = time.perf_counter()
        datasets, counts, cached = self._datasets(ray, pre)
        phases["data"] = time.perf_counter() - t_phase

        config = self._recorded_config()
        loop_config = self._loop_config(pre, counts, run_name, config)
        t_phase = time.perf_counter()
        checkpoint = self._fit(loop_config, datasets)
        phases["train"] = time.perf_counter() - t_phase

        from medray.jobs.finetune.export import export_run  # lazy: imports torch

        t_phase = time.perf_counter()
        export = export_run(
            self,
            ray,
            checkpoint,
            weights_hash=weights_hash,
            pre=pre,
            data_sha=data_sha,
            run_name=run_name,
            config=config,
            counts=counts,
            datasets=datasets,
        )
        phases["export"] = time.perf_counter() - t_phase
        t_phase = time.perf_counter()
        test = score_test_split(self, export["artifact"])  # once, with the artifact as embed/serve load it
        if test is not None:
            phases["test"] = time.perf_counter() - t_phase
        res = self._result(run_id, export, counts, phases, cached, config, wall=time.perf_counter() - t_start)
        res.test = test
        res.report = write_report(self, list(export["metrics"].get("history") or []), test)
        self._write_summary(res)
        _track_model(c, res, loop_config["run_id"], run_name)
        return res

    def _resolve_encoder(self) -> tuple[Any, str]:
        """Fetch (once, hashed) and check the checkpoint and its preprocessing on the driver."""
        _, weights_hash = resolve_checkpoint(
            self.spec.checkpoint,
            storage_options=self.spec.storage_options,
            cache_dir=self.spec.cache_dir,
            expected_sha256=self.spec.sha256,
        )
        self.weights_hash = weights_hash
        return create_preprocessor(self.spec), weights_hash

    def _start_ray(self) -> Any:
        """Connect to the cluster, or start a local Ray sized for the workers plus decoding."""
        c = self.cfg
        num_cpus = c.ray.num_cpus
        if c.ray.address is None and num_cpus is None:
            # Training workers hold their CPUs for the whole run; Ray Data needs some left to decode.
            need = c.scaling.num_workers * c.scaling.cpus_per_worker + c.data.decode_num_cpus
            num_cpus = max(os.cpu_count() or 1, int(math.ceil(need)))
        return init_ray(c.ray.address, num_cpus=num_cpus, include_dashboard=c.ray.include_dashboard)

    def _recorded_config(self) -> dict[str, Any]:
        """The resolved config as recorded in the model card and the summary: no secrets."""
        config = dict(self.resolved)
        config["storage"] = {"options": redact_options(self.cfg.storage.options)}
        config.get("encoder", {}).pop("storage_options", None)
        if config.get("patient_salt"):
            config["patient_salt"] = "***"
        return config

    def _loop_config(self, pre: Any, counts: dict, run_name: str, config: dict[str, Any]) -> dict[str, Any]:
        """What every training worker's loop needs (:func:`medray.jobs.finetune.loop.train_loop`)."""
        c = self.cfg
        world = c.scaling.num_workers
        rows_per_worker = counts["train"]["usable"] // world
        steps_per_epoch = max(1, rows_per_worker // c.train.batch_size // c.train.grad_accum)
        total_steps = steps_per_epoch * c.train.epochs
        return {
            "encoder": spec_to_dict(self.spec),
            "input_shape": self.input_shape(pre),
            "embedding_dim": self.embedding_dim if self.features == "embeddings" else None,
            "embedding_stats": self.embedding_stats if self.features == "embeddings" else None,
            "task": c.task.type,
            "labels": list(self.example_spec.labels),
            "n_outputs": self.example_spec.n_outputs,
            "target_width": self.example_spec.target_width,
            "subgroups": list(self.example_spec.subgroups),
            "strategy": c.train.strategy,
            "lora": asdict(c.train.lora),
            "seed": c.train.seed,
            "epochs": c.train.epochs,
            "batch_size": c.train.batch_size,
            "eval_batch_size": c.train.eval_batch_size,
            "grad_accum": c.train.grad_accum,
            "lr": c.train.lr,
            "weight_decay": c.train.weight_decay,
            "total_steps": total_steps,
            "warmup_steps": int(round(c.train.warmup_fraction * total_steps)),
            "schedule": c.train.schedule,
            "clip_grad_norm": c.train.clip_grad_norm,
            "precision": c.train.precision,
            "augment": {k: dict(v) for k, v in (c.train.augment or {}).items()},
            "shuffle_buffer": c.data.shuffle_buffer,
            "stage": c.deepspeed.stage,
            "offload_optimizer": c.deepspeed.offload_optimizer,
            "offload_params": c.deepspeed.offload_params,
            "deepspeed_extra": dict(c.deepspeed.config),
            "use_gpu": c.scaling.use_gpu,
            "threads": c.scaling.cpus_per_worker,
            "ece_bins": c.eval.ece_bins,
            "min_subgroup_size": c.eval.min_subgroup_size,
            "tracking": asdict(c.tracking),
            "run_name": run_name,
            "run_id": "ft-" + hashlib.sha256(c.output.encode()).hexdigest()[:12],
            "resolved": config,
            "progress": progress_mode() != "off",  # rank 0's line per epoch
        }

    def _fit(self, loop_config: dict[str, Any], datasets: dict) -> Any:
        """Train with Ray Train's ``TorchTrainer``; the last checkpoint, or :class:`FinetuneFailed`."""
        from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
        from ray.train.torch import TorchConfig, TorchTrainer

        from medray.jobs.finetune.loop import train_loop  # lazy: imports torch

        c = self.cfg
        storage_path, storage_fs = self._storage()
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(
                num_workers=c.scaling.num_workers,
                use_gpu=c.scaling.use_gpu,
                resources_per_worker={"CPU": c.scaling.cpus_per_worker},
            ),
            torch_config=TorchConfig(backend="nccl" if c.scaling.use_gpu else "gloo"),
            datasets=datasets,
            dataset_config=DataConfig(datasets_to_split=["train"]),
            run_config=RunConfig(
                name="train",
                storage_path=storage_path,
                storage_filesystem=storage_fs,
                failure_config=FailureConfig(max_failures=c.train.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=c.train.checkpoints_to_keep),
            ),
        )
        try:
            result = trainer.fit()
        except TrainingFailedError as err:
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            raise FinetuneFailed(
                f"training failed after {c.train.max_failures} restart(s): {first}; the last "
                f"checkpoint is under {c.output.rstrip('/')}/checkpoints: fix the cause and "
                "rerun the same command with resume=true"
            ) from err
        if result.checkpoint is None:
            raise RuntimeError("training finished without a checkpoint")
        return result.checkpoint

    def _result(
        self,
        run_id: str,
        export: dict[str, Any],
        counts: dict,
        phases: dict[str, float],
        cached: bool,
        config: dict[str, Any],
        *,
        wall: float,
    ) -> FinetuneResult:
        """What the run did, from the exported artifact's state."""
        c = self.cfg
        state = export["state"]
        world = c.scaling.num_workers
        train_s = phases["train"]
        return FinetuneResult(
            run_id=run_id,
            output=c.output,
            artifact=export["artifact"],
            artifact_sha256=export["artifact_sha256"],
            encoder=self.spec.name,
            task=c.task.type,
            labels=list(self.example_spec.labels),
            strategy=c.train.strategy,
            zero_stage=c.deepspeed.stage,
            num_workers=world,
            epochs=int(state["epoch"]) + 1,
            global_step=int(state["global_step"]),
            splits=counts,
            metrics=export["metrics"],
            baseline=state.get("baseline", {}),
            history=state.get("history", []),
            attempts=state.get("attempts", []),
            n_parameters=int(state.get("n_parameters", 0)),
            n_trainable=int(state.get("n_trainable", 0)),
            trainable_parameters=list(state.get("trainable_parameters", [])),
            export_max_abs_diff=export["max_abs_diff"],
            export_records_checked=export["checked"],
            wall_s=wall,
            train_s=train_s,
            phase_s={k: round(v, 2) for k, v in phases.items()},
            cached=cached,
            config=config,
            features=self.features,
            **self._quarantine_counts(),
        )

    def _write_summary(self, res: FinetuneResult) -> None:
        """``runs/<run_id>.json`` and ``summary.json`` beside the artifact."""
        summary = json.dumps(json_safe(asdict(res)), indent=2, default=str).encode()
        fs, root = open_fs(self.cfg.output, self.cfg.storage.options)
        atomic_write_bytes(fs, posixpath.join(root, "runs", f"{res.run_id}.json"), summary)
        atomic_write_bytes(fs, posixpath.join(root, "summary.json"), summary)


class FinetuneFailed(RuntimeError):
    """Training failed more often than ``train.max_failures`` allows; the checkpoints are kept."""


def _track_model(c: Any, res: FinetuneResult, wandb_run_id: str, run_name: str) -> None:
    """Log the model card and metrics as a W&B ``model`` artifact on the run training logged to.

    The weights go in only with ``tracking.log_model=true``. Tracking never fails
    the job (W&B errors are warnings).
    """
    if not c.tracking.enabled:
        return

    artifact = RunArtifact(
        artifact_name("model", run_name, c.output),
        "model",
        files={"metrics.json": json.dumps(json_safe(res.metrics), indent=2, default=str).encode()},
        metadata={
            "artifact": res.artifact,
            "artifact_sha256": res.artifact_sha256,
            "encoder": res.encoder,
            "task": res.task,
            "labels": res.labels,
            "strategy": res.strategy,
            "run_id": res.run_id,
            "weights_included": bool(c.tracking.log_model),
        },
        source=res.artifact,
        storage_options=dict(c.storage.options),
        include=None if c.tracking.log_model else [CARD_FILE],
    )
    log_run(
        job="finetune",
        config=res.config,
        summary=asdict(res),
        project=c.tracking.project,
        mode=c.tracking.mode,
        group=c.tracking.group,
        name=c.tracking.name or run_name,
        directory=c.tracking.dir or os.environ.get("WANDB_DIR"),
        artifact=artifact,
        run_id=wandb_run_id,
    )


def main(cfg: DictConfig) -> int:
    """Hydra entry point body; returns the process exit code."""
    import sys

    job = FinetuneJob(cfg)  # ConfigError names the key and the fix
    try:
        result = job.run()  # first line that touches Ray
    except FinetuneFailed as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    print(result.one_line(), flush=True)
    print(inputs_table(result, job.cfg.storage.options), file=sys.stderr, flush=True)
    return 0


def _is_error_class(name: str) -> bool:
    """A quarantine row's class names an error (DecodeError, LimitExceeded, ...), not a skip reason (NoEncoder)."""
    known = {"Error", "LimitExceeded", "UnsupportedFormat"}
    return name in known or name.endswith(("Error", "Exception"))


def inputs_table(res: FinetuneResult, storage_options: Any = None) -> str:
    """The closing table of a fine-tune: its manifest rows by outcome and reason.

    Labelled rows per split (from the split counts), rows without a usable
    label, and the records that could not be used (``<output>/quarantine``;
    finetune keeps a skipped record there with its reason as its class).
    """
    from collections import Counter

    from medray.pipeline.outcomes import Outcomes, format_outcomes, output_outcomes

    out = Outcomes(embedded=Counter())
    rows = usable = 0
    for split in ("train", "val", "test"):
        counts = (res.splits or {}).get(split) or {}
        rows += int(counts.get("rows", 0))
        usable += int(counts.get("usable", 0))
        if counts.get("usable"):
            out.embedded[split] = int(counts["usable"])
    if rows > usable:
        out.skipped[("Unlabelled", "manifest")] = rows - usable
    for (stage, cls), n in output_outcomes(res.output, storage_options).quarantined.items():
        if _is_error_class(cls):
            out.quarantined[(stage, cls)] += n
        else:
            out.skipped[(cls, stage)] += n
    return format_outcomes(
        out,
        res.output,
        title=f"inputs of this fine-tune: {rows} manifest rows, {usable} labelled",
        first="labelled",
        notes=["quarantined and skipped records (other than Unlabelled) are labelled rows that were not trained on"],
    )
