"""Read an ``embed`` output back as one embedding per record, joined to a labelled manifest.

A record's embedding is its pooled row where it has one (audio, text, slides,
series: ``segment == "pooled"``), else the mean of its image frames; windows,
chunks and tiles are represented by their record's pooled row. This is what
``medray probe`` and ``medray evaluate`` score, and what ``medray finetune
data.features=embeddings`` trains on.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from medray.platform.errors import ConfigError
from medray.platform.manifest import iter_manifest_batches, manifest_columns
from medray.platform.records import record_id
from medray.platform.storage import open_fs

__all__ = ["RecordEmbeddings", "LabelledRecords", "read_record_embeddings", "join_labels", "write_predictions"]

_READ_COLUMNS = (
    "record_id", "uri", "member", "frame", "segment", "embedding", "patient_key", "modality", "metadata", "token_end",
)  # fmt: skip


@dataclass
class RecordEmbeddings:
    """One row per record of an ``embed`` output.

    Attributes:
        record_id, uri, member, patient_key, modality: per record.
        x: ``(n, dim)`` float32 embeddings.
        encoder: what the output's ``_medray.json`` says of its encoder (name,
            checkpoint, weights_hash, preprocessing_hash), plus ``dim``.
        text: per record, whether it is a document (token chunks: reports, SR
            text) rather than pixels; an image-text encoder writes both.
        metadata: per record, the allow-listed metadata JSON its rows carry (or None).
    """

    record_id: np.ndarray
    uri: np.ndarray
    member: np.ndarray
    patient_key: np.ndarray
    modality: np.ndarray
    x: np.ndarray
    encoder: dict[str, Any] = field(default_factory=dict)
    text: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    metadata: np.ndarray = field(default_factory=lambda: np.asarray([], dtype=object))


def read_record_embeddings(output: str, storage_options: Mapping[str, Any] | None = None) -> RecordEmbeddings:
    """The records of ``output`` (a ``medray embed`` output), one embedding each.

    Raises:
        ConfigError: (key ``embeddings``) not an embed output, or no embeddings in it.
    """
    import pyarrow.dataset as pads
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, root = open_fs(output, storage_options)
    marker = posixpath.join(root, "_medray.json")
    if not fs.exists(marker):
        raise ConfigError("embeddings", f"'{output}' is not the output of `medray embed` (no _medray.json)")
    with fs.open(marker, "rb") as f:
        ident = json.loads(f.read())
    parts = [p for p in fs.glob(posixpath.join(root, "embeddings", "*.parquet"))]
    if not parts:
        raise ConfigError("embeddings", f"'{output}' holds no embeddings yet; run `medray embed` first")
    dataset = pads.dataset(parts, format="parquet", filesystem=PyFileSystem(FSSpecHandler(fs)))
    have = set(dataset.schema.names)
    table = dataset.to_table(columns=[c for c in _READ_COLUMNS if c in have])
    n = table.num_rows
    col = {c: (table.column(c).to_pylist() if c in have else [None] * n) for c in _READ_COLUMNS if c != "embedding"}
    segments = col["segment"]
    keep = np.asarray([s not in ("window", "chunk", "tile") for s in segments], dtype=bool)
    emb = table.column("embedding").combine_chunks()
    flat = np.asarray(emb.flatten() if isinstance(emb, pa.ListArray) else emb.values, dtype=np.float32)
    x_rows = flat.reshape(n, -1) if n else np.zeros((0, 0), np.float32)
    ids = np.asarray(col["record_id"], dtype=object)
    pooled = np.asarray([s == "pooled" for s in segments], dtype=bool)
    order: dict[str, int] = {}
    sums: list[np.ndarray] = []
    counts: list[int] = []
    has_pooled: list[bool] = []
    first: list[int] = []
    for i in np.flatnonzero(keep):
        rid = ids[i]
        k = order.get(rid)
        if k is None:
            order[rid] = k = len(sums)
            sums.append(np.zeros(x_rows.shape[1], np.float64))
            counts.append(0)
            has_pooled.append(False)
            first.append(int(i))
        if pooled[i]:  # the pooled row stands for the record
            sums[k], counts[k], has_pooled[k] = x_rows[i].astype(np.float64), 1, True
        elif not has_pooled[k]:
            sums[k] += x_rows[i]
            counts[k] += 1
    x = (np.stack(sums) / np.asarray(counts)[:, None]).astype(np.float32) if sums else np.zeros((0, 0), np.float32)
    pick = np.asarray(first, dtype=int)

    def take(name: str) -> np.ndarray:
        values = np.asarray(col[name], dtype=object)
        return values[pick] if len(pick) else np.asarray([], dtype=object)

    encoder = {k: ident.get(k) for k in ("encoder", "checkpoint", "weights_hash", "preprocessing_hash")}
    encoder["dim"] = int(x.shape[1]) if x.size else 0
    return RecordEmbeddings(
        record_id=np.asarray(list(order), dtype=object),
        uri=take("uri"),
        member=np.asarray([m or "" for m in take("member")], dtype=object),
        patient_key=take("patient_key"),
        modality=take("modality"),
        x=x,
        encoder=encoder,
        text=np.asarray([t is not None for t in take("token_end")], dtype=bool),
        metadata=take("metadata"),
    )


@dataclass
class LabelledRecords:
    """Records of an embed output that a manifest labels.

    Attributes:
        x: ``(n, dim)`` embeddings; ``y``: ``(n, L)`` 0/1 labels (``nan``: unlabelled).
        groups: patient of each record (``group_by``; a record without one is its own group).
        columns: the manifest's other requested columns (subgroups, study), per record.
        record_id, uri: per record.
        unmatched: manifest rows with no embedding (not embedded, quarantined or skipped).
        ungrouped: records whose patient was unknown (each counted as its own patient).
    """

    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    labels: list[str]
    record_id: np.ndarray
    uri: np.ndarray
    columns: dict[str, np.ndarray]
    unmatched: int = 0
    ungrouped: int = 0


def _label_values(value: Any, column: str) -> float:
    if value is None:
        return float("nan")
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("", "nan", "none", "null"):
            return float("nan")
        if v in ("1", "true", "yes", "positive"):
            return 1.0
        if v in ("0", "false", "no", "negative"):
            return 0.0
        try:
            value = float(v)  # "1.0", "0.0"
        except ValueError:
            raise ConfigError(f"labels.{column}", f"label values must be 0/1 (or true/false), got {value!r}") from None
    f = float(value)
    if f not in (0.0, 1.0) and not np.isnan(f):
        raise ConfigError(f"labels.{column}", f"label values must be 0/1, got {value!r}")
    return f


def join_labels(
    records: RecordEmbeddings,
    manifest: str,
    *,
    labels: Sequence[str],
    task: str = "binary",
    class_column: str | None = None,
    group_by: str = "patient_key",
    extra_columns: Sequence[str] = (),
    storage_options: Mapping[str, Any] | None = None,
    key: str = "labels",
) -> LabelledRecords:
    """The embedded records a manifest labels, by ``(uri, member)``.

    Args:
        records: from :func:`read_record_embeddings`.
        manifest: CSV/JSONL/Parquet with ``uri`` (optional ``member``) and the label columns.
        labels: label columns (binary, multilabel), or the classes (multiclass, one-vs-rest
            columns made from ``class_column``).
        task: ``binary``, ``multilabel`` or ``multiclass``.
        group_by: ``patient_key`` (from the DICOM headers, salted) or a manifest column.
        extra_columns: manifest columns to carry (subgroups, study).
        key: config key named in errors.

    Raises:
        ConfigError: a missing column, a non-binary label, or no labelled record embedded.
    """
    if task not in ("binary", "multilabel", "multiclass"):
        raise ConfigError("task.type", f"probe and evaluate take binary, multilabel or multiclass tasks, not {task!r}")
    if not labels:
        raise ConfigError("task.labels", "name the label columns (or the classes), e.g. task.labels=[effusion]")
    names = manifest_columns(manifest, storage_options, key=key)
    label_cols = [class_column] if task == "multiclass" else list(labels)
    if task == "multiclass" and not class_column:
        raise ConfigError("task.column", "a multiclass task names the column holding the class")
    wanted = ["uri", *label_cols, *extra_columns] + ([group_by] if group_by != "patient_key" else [])
    missing = [c for c in wanted if c not in names]
    if missing:
        have = ", ".join(names)
        raise ConfigError(key, f"manifest '{manifest}' has no column(s) {', '.join(missing)}; it has {have}")
    cols = list(dict.fromkeys(wanted + (["member"] if "member" in names else [])))
    position = {rid: i for i, rid in enumerate(records.record_id)}
    rows: list[int] = []
    ys: list[list[float]] = []
    groups: list[Any] = []
    carried: dict[str, list[Any]] = {c: [] for c in extra_columns}
    unmatched = 0
    for batch in iter_manifest_batches(manifest, cols, storage_options, key=key):
        data = batch.to_pydict()
        members = data.get("member") or [""] * batch.num_rows
        for i in range(batch.num_rows):
            k = position.get(record_id(str(data["uri"][i]), str(members[i] or "")))
            if k is None:
                unmatched += 1
                continue
            if task == "multiclass":
                value = data[class_column][i]
                ys.append([float("nan") if value is None else float(str(value) == str(c)) for c in labels])
            else:
                ys.append([_label_values(data[c][i], c) for c in labels])
            rows.append(k)
            groups.append(data[group_by][i] if group_by != "patient_key" else None)
            for c in extra_columns:
                carried[c].append(data[c][i])
    if not rows:
        raise ConfigError(
            key,
            f"no record of manifest '{manifest}' is in the embeddings ({unmatched} rows unmatched): its uri "
            "column must hold the URIs `medray embed` read",
        )
    idx = np.asarray(rows, dtype=int)
    group_values = [records.patient_key[k] if group_by == "patient_key" else g for k, g in zip(idx, groups)]
    ungrouped = sum(1 for g in group_values if g is None or g == "")
    group_values = [
        str(g) if g not in (None, "") else f"record:{records.record_id[k]}" for k, g in zip(idx, group_values)
    ]
    return LabelledRecords(
        x=records.x[idx],
        y=np.asarray(ys, dtype=np.float64),
        groups=np.asarray(group_values, dtype=object),
        labels=list(labels),
        record_id=records.record_id[idx],
        uri=records.uri[idx],
        columns={c: np.asarray(v, dtype=object) for c, v in carried.items()},
        unmatched=unmatched,
        ungrouped=ungrouped,
    )


def write_predictions(
    ids: Any,
    uris: Any,
    patients: Any,
    y: np.ndarray,
    p: np.ndarray,
    labels: Sequence[str],
    output: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    id_column: str = "id",
) -> None:
    """One Parquet part under ``<output>/predictions``: id, uri, patient, ``y_<label>`` and ``p_<label>``."""
    from medray.pipeline.sink import write_parquet_atomic

    cols: dict[str, Any] = {
        id_column: pa.array([str(v) for v in ids], pa.string()),
        "uri": pa.array([str(v) for v in uris], pa.string()),
        "patient": pa.array([str(v) for v in patients], pa.string()),
    }
    for j, label in enumerate(labels):
        cols[f"y_{label}"] = pa.array(y[:, j], pa.float64())
        cols[f"p_{label}"] = pa.array(p[:, j], pa.float64())
    write_parquet_atomic(pa.table(cols), output, "predictions", storage_options)
