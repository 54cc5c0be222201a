"""Record keys and the Arrow schemas of medray's outputs.

Every output row points back to exactly what it came from: ``uri`` (the
object), ``member`` (archive member, ``""`` otherwise) and ``frame`` (frame,
audio window or text chunk index; ``-1`` for a record's pooled row), with
the provenance columns each format declares (``segment``, ``start_s``/``end_s``
for audio windows, ``token_start``/``token_end`` for text chunks, ``tile_x``...
for slide tiles, ``series_key``... for CT/MR series and NIfTI volumes) saying
what the item covers.
``record_id`` is a stable digest of ``(uri, member)`` used for resume; a slide
tile's is :func:`tile_record_id` and the slide's pooled row has the slide's own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from medray.platform.errors import RecordError, SkipRecord
from medray.platform.formats import segment_columns

__all__ = [
    "record_id",
    "tile_record_id",
    "embedding_schema",
    "QUARANTINE_SCHEMA",
    "SKIPPED_SCHEMA",
    "quarantine_fields",
    "BASE_COLUMNS",
    "CORE_COLUMNS",
    "arrow_type",
    "RESERVED_COLUMNS",
]

#: Columns every embedding row has, before the per-row provenance columns of the formats.
BASE_COLUMNS = (
    "record_id",
    "uri",
    "member",
    "frame",
    "n_frames",
    "content_sha256",
    "modality",
    "patient_key",
    "metadata",
    "embedding",
    "encoder",
    "weights_hash",
    "preprocessing_hash",
    "medray_version",
    "untrained",
)
#: Columns every embedding row has before the carried manifest columns: the base ones, then what
#: each registered format says its rows cover (``segment``, ``start_s``... see
#: :func:`medray.platform.formats.segment_columns`; null where they do not apply).
CORE_COLUMNS = BASE_COLUMNS + tuple(name for name, _ in segment_columns())
#: Columns a manifest may not carry because medray writes them.
RESERVED_COLUMNS = frozenset(CORE_COLUMNS) | {
    "status",
    "stage",
    "error_class",
    "message",
    "pixel_values",
    "pixel_shape",
    "data",
    "frames",
    "t_read",
    "t_decode",
    "t_preprocess",
    "t_encode",
    "pixel_dtype",
    "segments",
    "pool",
    "route",
    "tile",
}

#: A skipped record (readable, deliberately not embedded): ``reason`` is a CamelCase code, ``modality``
#: the route it would have taken (a ``NoEncoder`` row is retried once that modality has an encoder).
SKIPPED_SCHEMA = pa.schema(
    [
        ("record_id", pa.string()),
        ("uri", pa.string()),
        ("member", pa.string()),
        ("modality", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("message", pa.string()),
        ("medray_version", pa.string()),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        ("record_id", pa.string()),
        ("uri", pa.string()),
        ("member", pa.string()),
        ("stage", pa.string()),
        ("error_class", pa.string()),
        ("message", pa.string()),
        ("medray_version", pa.string()),
    ]
)


def arrow_type(name: str) -> pa.DataType:
    """The Arrow type of a format's column type name (``string``, ``int32``, ``list<float64>``...)."""
    if name.startswith("list<") and name.endswith(">"):
        return pa.list_(arrow_type(name[5:-1]))
    return pa.type_for_alias(name)


def record_id(uri: str, member: str = "") -> str:
    """Stable id of a record: first 32 hex chars of sha256(uri NUL member)."""
    return hashlib.sha256(f"{uri}\x00{member}".encode()).hexdigest()[:32]


def tile_record_id(uri: str, member: str, tile_id: str) -> str:
    """Record id of one slide tile: the slide's ``(uri, member)`` plus ``tile/<level>/<x>/<y>``."""
    return record_id(uri, f"{member}\x00{tile_id}")


def embedding_schema(dim: int, carried: pa.Schema | None = None) -> pa.Schema:
    """Arrow schema of the embeddings table for an encoder of size ``dim``.

    Args:
        dim: embedding size; stored as ``fixed_size_list<float32>[dim]``.
        carried: manifest columns carried through, appended at the end.
    """
    fields = [
        ("record_id", pa.string()),
        ("uri", pa.string()),
        ("member", pa.string()),
        ("frame", pa.int32()),
        ("n_frames", pa.int32()),
        ("content_sha256", pa.string()),
        ("modality", pa.string()),
        ("patient_key", pa.string()),
        ("metadata", pa.string()),  # JSON of the allow-listed fields
        ("embedding", pa.list_(pa.float32(), dim)),
        ("encoder", pa.string()),
        ("weights_hash", pa.string()),
        ("preprocessing_hash", pa.string()),
        ("medray_version", pa.string()),
        ("untrained", pa.bool_()),
        # provenance of the row within its record, as the formats declare it
        *((name, arrow_type(typ)) for name, typ in segment_columns()),
    ]
    schema = pa.schema(fields)
    for field in carried or []:
        schema = schema.append(field)
    return schema


def quarantine_fields(err: BaseException, stage: str | None = None) -> dict[str, Any]:
    """Columns of a quarantine row for ``err`` (message is PHI-free by contract).

    Library exceptions that are not :class:`RecordError` contribute their
    class name only: their messages may quote header values.
    """
    if isinstance(err, SkipRecord):
        return {"status": "skipped", "stage": err.stage, "error_class": err.reason, "message": str(err)}
    if isinstance(err, RecordError):
        return {"status": "error", "stage": stage or err.stage, "error_class": type(err).__name__, "message": str(err)}
    return {
        "status": "error",
        "stage": stage or "unknown",
        "error_class": type(err).__name__,
        "message": f"unexpected {type(err).__name__}; message withheld (may contain PHI)",
    }


def row_key(row: Mapping[str, Any]) -> tuple[str, str]:
    """``(uri, member)`` of a row."""
    return str(row["uri"]), str(row.get("member") or "")
