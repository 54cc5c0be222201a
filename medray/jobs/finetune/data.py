"""Labelled records for ``medray finetune``: manifest -> split -> read -> decode -> examples.

The same stages as ``medray embed`` (:func:`~medray.pipeline.stages.read_batch`,
:func:`~medray.pipeline.stages.decode_batch`, the encoder's own preprocessing)
plus three small ones:

* :func:`split_batch` gives each row its split from its patient group (see
  :mod:`medray.platform.splits`), or reads it from a split column;
* :func:`header_keys_batch` computes the salted patient key from the DICOM
  header alone, for the one pass that writes the split manifest when the
  split groups by the DICOM patient (``data.group_by=patient_key``);
* :func:`examples_batch` turns decoded records into training examples, one
  per frame: ``x`` (float32 ``C*H*W`` bytes), ``y`` (targets), ``record_id``,
  ``frame``, ``modality`` and one ``sg_<name>`` column per subgroup;
* :func:`write_quarantine` writes the records a stage could not use as
  quarantine rows (``medray embed``'s format, PHI-free reasons) under the
  run's output, so no labelled record disappears silently.

Driver-side helpers stream manifest columns in batches (no global list) to
count rows and positives per split, so a split without positives stops the
job before any training worker starts.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from medray.pipeline import decode_batch, read_batch
from medray.platform.deid import patient_key
from medray.platform.errors import ConfigError
from medray.platform.manifest import iter_manifest_batches, manifest_columns, manifest_sha256
from medray.platform.metrics import age_band
from medray.platform.records import QUARANTINE_SCHEMA
from medray.platform.splits import SPLITS, SplitFractions, assign_splits
from medray.platform.storage import atomic_write_bytes, open_fs

__all__ = [
    "ExampleSpec",
    "QuarantineTarget",
    "SplitPlan",
    "count_examples",
    "count_splits",
    "decode_examples_batch",
    "examples_batch",
    "header_keys_batch",
    "iter_manifest_batches",
    "keep_split",
    "manifest_columns",
    "manifest_sha256",
    "parse_target",
    "split_batch",
    "write_quarantine",
]

#: Subgroups computed rather than read: name -> column it needs.
DERIVED_SUBGROUPS = {"age_band": "age"}
_TRUE = {"1", "1.0", "true", "yes", "y", "t", "positive", "pos"}
_FALSE = {"0", "0.0", "false", "no", "n", "f", "negative", "neg"}


@dataclass(frozen=True)
class SplitPlan:
    """How rows get their split.

    Attributes:
        mode: ``column`` (read ``column``), ``group`` (hash the manifest
            column ``column``), ``patient_key`` (hash the DICOM patient key;
            needs the header pass) or ``manifests`` (train and val come from
            two manifests; every row of each is in that split).
        column: the split or grouping column.
        seed: split seed.
        fractions: val/test shares.
        salt: the patient salt, mixed into the hash.
    """

    mode: str
    column: str | None = None
    seed: int = 0
    fractions: SplitFractions = field(default_factory=SplitFractions)
    salt: str = ""


@dataclass(frozen=True)
class ExampleSpec:
    """What :func:`examples_batch` needs to build targets and subgroup columns."""

    task: str
    labels: tuple[str, ...]
    label_columns: tuple[str, ...]
    subgroups: tuple[str, ...] = ()
    age_bands: tuple[int, ...] = (40, 60, 80)

    @property
    def n_outputs(self) -> int:
        """Width of the head: one per label (multi-class: one per class)."""
        return len(self.labels)

    @property
    def target_width(self) -> int:
        """Width of ``y``: the class index for multi-class, else one per label."""
        return 1 if self.task == "multiclass" else len(self.labels)


@dataclass(frozen=True)
class QuarantineTarget:
    """Where the stages write rows they could not use: ``<output>/quarantine/`` (picklable)."""

    output: str
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    version: str = ""


def write_quarantine(table: pa.Table, target: QuarantineTarget | None) -> int:
    """Write the failed (``status="error"``) and skipped rows of a stage's table as quarantine rows.

    The format is ``medray embed``'s (:data:`~medray.platform.records.QUARANTINE_SCHEMA`:
    record id, uri, member, stage, error class, PHI-free message). A skipped row
    (no encoder for its modality, no pixel data, burned-in text) gets its skip reason as its
    class (``NoEncoder``, ``NonImageObject``, ``BurnedInAnnotation``). The part is
    named after the record ids it holds, so a stage that runs again over the same
    records (every epoch when decoded examples are streamed, a restarted task)
    rewrites the same object instead of adding a copy.

    Returns:
        Rows written.
    """
    if target is None or "status" not in table.column_names or not table.num_rows:
        return 0
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    status = table.column("status")
    bad = table.filter(pc.fill_null(pc.is_in(status, pa.array(["error", "skipped"])), False))
    if not bad.num_rows:
        return 0
    n = bad.num_rows
    classes = bad.column("error_class").to_pylist() if "error_class" in bad.column_names else [None] * n
    skipped = bad.column("status").to_pylist()
    cols = {
        "record_id": bad.column("record_id").to_pylist(),
        "uri": bad.column("uri").to_pylist(),
        "member": bad.column("member").to_pylist() if "member" in bad.column_names else [""] * n,
        "stage": bad.column("stage").to_pylist() if "stage" in bad.column_names else [None] * n,
        # a skipped record keeps its reason (NoEncoder, NonImageObject, BurnedInAnnotation) as its class
        "error_class": [(c or "Skipped") if st == "skipped" else (c or "Error") for st, c in zip(skipped, classes)],
        "message": bad.column("message").to_pylist() if "message" in bad.column_names else [None] * n,
        "medray_version": [target.version] * n,
    }
    out = pa.table({k: pa.array(v, QUARANTINE_SCHEMA.field(k).type) for k, v in cols.items()}, schema=QUARANTINE_SCHEMA)
    digest = hashlib.sha256("\n".join(sorted(str(r) for r in cols["record_id"])).encode()).hexdigest()[:32]
    fs, root = open_fs(target.output, dict(target.storage_options))
    buf = io.BytesIO()
    pq.write_table(out, buf, compression="zstd")
    atomic_write_bytes(fs, f"{root.rstrip('/')}/quarantine/part-{digest}.parquet", buf.getvalue())
    return n


# --------------------------------------------------------------------------
# targets
# --------------------------------------------------------------------------
def _binary(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        if isinstance(value, float) and math.isnan(value):
            return None
        if float(value) in (0.0, 1.0):
            return float(value)
        raise ValueError(value)
    text = str(value).strip().lower()
    if text == "":
        return None
    if text in _TRUE:
        return 1.0
    if text in _FALSE:
        return 0.0
    raise ValueError(value)


def parse_target(values: Sequence[Any], spec: ExampleSpec) -> list[float] | None:
    """Targets of one row from its label-column values; ``None`` when a label is missing.

    Raises:
        ValueError: a value that is not valid for the task (the caller names the key).
    """
    if spec.task in ("binary", "multilabel"):
        out = [_binary(v) for v in values]
        return None if any(v is None for v in out) else out  # type: ignore[return-value]
    if spec.task == "multiclass":
        v = values[0]
        if v is None or (isinstance(v, float) and math.isnan(v)) or str(v) == "":
            return None
        text = str(int(v)) if isinstance(v, (float, np.floating)) and float(v).is_integer() else str(v)
        if text not in spec.labels:
            raise ValueError(v)
        return [float(spec.labels.index(text))]
    out_r = []
    for v in values:
        if v is None or str(v).strip() == "":
            return None
        f = float(v)
        if math.isnan(f):
            return None
        out_r.append(f)
    return out_r


# --------------------------------------------------------------------------
# driver side: schema, hashing, streaming counts
# --------------------------------------------------------------------------
def count_splits(
    batches: Iterator[pa.RecordBatch], plan: SplitPlan, spec: ExampleSpec, *, fixed_split: str | None = None
) -> dict[str, dict[str, Any]]:
    """Rows, usable rows and positives per label, per split, from streamed batches.

    Args:
        batches: record batches holding the label columns, plus the split or
            grouping column the plan reads (and ``uri`` for rows without a group).
        plan: the split plan (mode ``patient_key`` reads the ``split`` column
            written by the header pass).
        spec: task, labels and label columns.
        fixed_split: every row belongs to this split (``manifests`` mode).

    Returns:
        ``{split: {"rows", "usable", "positives": {label: n}, "negatives": {label: n}}}``.

    Raises:
        ConfigError: a label value is not valid for the task (key ``task.labels``).
    """
    counts: dict[str, dict[str, Any]] = {
        s: {
            "rows": 0,
            "usable": 0,
            "positives": {lb: 0 for lb in spec.labels},
            "negatives": {lb: 0 for lb in spec.labels},
        }
        for s in SPLITS
    }
    for batch in batches:
        table = pa.Table.from_batches([batch])
        if fixed_split is not None:
            splits = [fixed_split] * table.num_rows
        else:
            splits = split_batch(table, plan).column("split").to_pylist()
        cols = [table.column(c).to_pylist() for c in spec.label_columns]
        for i, s in enumerate(splits):
            if s not in counts:
                continue
            counts[s]["rows"] += 1
            values = [col[i] for col in cols]
            try:
                y = parse_target(values, spec)
            except ValueError as err:
                col = spec.label_columns[0] if spec.task == "multiclass" else "one of " + ", ".join(spec.label_columns)
                want = (
                    f"one of {list(spec.labels)}"
                    if spec.task == "multiclass"
                    else ("a number" if spec.task == "regression" else "0/1 (or true/false)")
                )
                raise ConfigError(
                    "task.labels",
                    f"column {col} holds {err.args[0]!r} where {want} was expected; fix the manifest or the task",
                ) from None
            if y is None:
                continue
            counts[s]["usable"] += 1
            if spec.task in ("binary", "multilabel"):
                for lb, v in zip(spec.labels, y):
                    counts[s]["positives" if v >= 0.5 else "negatives"][lb] += 1
            elif spec.task == "multiclass":
                for k, lb in enumerate(spec.labels):
                    counts[s]["positives" if int(y[0]) == k else "negatives"][lb] += 1
    return counts


def count_examples(batches: Iterator[Mapping[str, Any]], spec: ExampleSpec) -> dict[str, dict[str, Any]]:
    """:func:`count_splits` over decoded examples (``y`` and ``split`` columns, numpy batches)."""
    counts: dict[str, dict[str, Any]] = {
        s: {
            "rows": 0,
            "usable": 0,
            "positives": {lb: 0 for lb in spec.labels},
            "negatives": {lb: 0 for lb in spec.labels},
        }
        for s in SPLITS
    }
    for batch in batches:
        for y, s in zip(batch["y"], batch["split"]):
            c = counts[str(s)]
            c["rows"] += 1
            c["usable"] += 1
            y = np.asarray(y, dtype=np.float64)
            if spec.task in ("binary", "multilabel"):
                for lb, v in zip(spec.labels, y):
                    c["positives" if v >= 0.5 else "negatives"][lb] += 1
            elif spec.task == "multiclass":
                for k, lb in enumerate(spec.labels):
                    c["positives" if int(y[0]) == k else "negatives"][lb] += 1
    return counts


# --------------------------------------------------------------------------
# Ray Data stages (plain functions over pyarrow tables)
# --------------------------------------------------------------------------
def target_or_none(values: Sequence[Any], spec: ExampleSpec) -> list[float] | None:
    """:func:`parse_target`, with an unparseable label meaning "no target" (the row is not an example)."""
    try:
        return parse_target(values, spec)
    except ValueError:
        return None


def split_batch(table: pa.Table, plan: SplitPlan) -> pa.Table:
    """Add (or normalise) the ``split`` column of each row."""
    n = table.num_rows
    if plan.mode == "column" or plan.mode == "patient_key":
        column = plan.column if plan.mode == "column" else "split"
        raw = table.column(column).to_pylist()
        splits = [_normalise_split(v) for v in raw]
    elif plan.mode == "group":
        groups = table.column(plan.column).to_pylist()
        fallbacks = table.column("uri").to_pylist() if "uri" in table.column_names else list(range(n))
        splits = assign_splits(groups, seed=plan.seed, fractions=plan.fractions, salt=plan.salt, fallbacks=fallbacks)
    else:
        raise ValueError(f"split_batch has nothing to do in mode {plan.mode!r}")
    arr = pa.array(splits, pa.string())
    if "split" in table.column_names:
        return table.set_column(table.column_names.index("split"), "split", arr)
    return table.append_column("split", arr)


def _normalise_split(value: Any) -> str:
    text = "" if value is None else str(value).strip().lower()
    return {"validation": "val", "valid": "val", "dev": "val", "training": "train", "testing": "test"}.get(text, text)


def keep_split(table: pa.Table, split: str) -> pa.Table:
    """Rows of ``table`` whose ``split`` is ``split``."""
    import pyarrow.compute as pc

    return table.filter(pc.equal(table.column("split"), split))


def header_keys_batch(table: pa.Table, salt: str, plan: SplitPlan) -> pa.Table:
    """Salted patient key (DICOM header only, pixels untouched) and split of each read record.

    Drops the record bytes and the pipeline's status columns; records whose
    bytes are unreadable or not DICOM get their own group (the record id).
    """
    import pydicom

    datas = table.column("data").to_pylist()
    keys: list[str | None] = []
    for data in datas:
        key = None
        if data:
            try:
                ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=False)
                key = patient_key(ds, salt)
            except Exception:  # noqa: BLE001 - photos and damaged files group by record
                key = None
        keys.append(key)
    fallbacks = table.column("record_id").to_pylist()
    splits = assign_splits(keys, seed=plan.seed, fractions=plan.fractions, salt=plan.salt, fallbacks=fallbacks)
    drop = {"data", "t_read", "status", "stage", "error_class", "message", "record_id", "split", "patient_key"}
    out = table.select([c for c in table.column_names if c not in drop])
    out = out.append_column("patient_key", pa.array(keys, pa.string()))
    return out.append_column("split", pa.array(splits, pa.string()))


def subgroup_values(table: pa.Table, name: str, bands: Sequence[int], metas: list[dict]) -> list[str | None]:
    if name == "age_band":
        return [age_band(v, bands) for v in table.column("age").to_pylist()]
    for column in (name, f"manifest_{name}"):
        if column in table.column_names:
            return [None if v is None else str(v) for v in table.column(column).to_pylist()]
    return [None if m.get(name) is None else str(m.get(name)) for m in metas]


def examples_batch(
    table: pa.Table, spec: ExampleSpec, plan: SplitPlan | None = None, quarantine: QuarantineTarget | None = None
) -> pa.Table:
    """Decoded records -> training examples, one row per frame.

    Rows that failed to read or decode are written to ``quarantine`` (when
    given; see :func:`write_quarantine`) and dropped; rows whose labels are
    missing are dropped. With a ``patient_key`` plan, each example also gets
    its ``patient_key`` and its ``split`` from the decoded (salted) patient key.
    """
    write_quarantine(table, quarantine)
    status = table.column("status").to_pylist()
    pixels = table.column("pixel_values").to_pylist()
    shapes = table.column("pixel_shape").to_pylist()
    frames = table.column("frames").to_pylist()
    ids = table.column("record_id").to_pylist()
    modality = table.column("modality").to_pylist()
    metas = [json.loads(m) if m else {} for m in table.column("metadata").to_pylist()]
    label_cols = [table.column(c).to_pylist() for c in spec.label_columns]
    groups = {g: subgroup_values(table, g, spec.age_bands, metas) for g in spec.subgroups}
    with_split = plan is not None and plan.mode == "patient_key"
    if with_split:
        assert plan is not None  # with_split implies a plan
        keys = table.column("patient_key").to_pylist()
        splits = assign_splits(keys, seed=plan.seed, fractions=plan.fractions, salt=plan.salt, fallbacks=ids)
    out: dict[str, list] = {"x": [], "y": [], "record_id": [], "frame": [], "modality": []}
    if with_split:
        out["patient_key"], out["split"] = [], []
    for g in spec.subgroups:
        out[f"sg_{g}"] = []
    for i in range(table.num_rows):
        if status[i] != "ok" or pixels[i] is None:
            continue
        y = target_or_none([col[i] for col in label_cols], spec)
        if y is None:
            continue
        shape = shapes[i]
        per_frame = int(np.prod(shape[1:])) * 4
        for j, f in enumerate(frames[i]):
            out["x"].append(pixels[i][j * per_frame : (j + 1) * per_frame])
            out["y"].append(y)
            out["record_id"].append(ids[i])
            out["frame"].append(int(f))
            out["modality"].append(modality[i] or "")
            if with_split:
                out["patient_key"].append(keys[i])
                out["split"].append(splits[i])
            for g in spec.subgroups:
                out[f"sg_{g}"].append(groups[g][i])
    types = {
        "x": pa.large_binary(),
        "y": pa.list_(pa.float32()),
        "record_id": pa.string(),
        "frame": pa.int32(),
        "modality": pa.string(),
    }
    return pa.table({k: pa.array(v, type=types.get(k, pa.string())) for k, v in out.items()})


def decode_examples_batch(
    table: pa.Table,
    opts: Any,
    spec: ExampleSpec,
    plan: SplitPlan | None = None,
    quarantine: QuarantineTarget | None = None,
) -> pa.Table:
    """``read_batch`` -> ``decode_batch`` -> :func:`examples_batch` in one task.

    The same functions ``embed`` chains as separate stages; fused here so one
    task per batch goes from URIs to tensors without materialising the raw
    bytes or the decoded records as blocks between stages.
    """
    return examples_batch(decode_batch(read_batch(table, opts), opts), spec, plan, quarantine)
