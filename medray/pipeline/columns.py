"""The columns rows carry through the embedding stages, and how a stage adds them.

Each stage returns its input rows (by index) plus new columns; :func:`assemble`
does that with ``Table.take`` so carried manifest columns ride along untouched.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pyarrow as pa

from medray.platform.formats import segment_columns
from medray.platform.records import arrow_type

__all__ = ["INTERNAL_COLUMNS", "STATUS_COLUMNS", "COLUMN_TYPES", "assemble", "empty_status"]

#: Columns that live only inside the pipeline; the sink drops them.
INTERNAL_COLUMNS = (
    "data",
    "pixel_values",
    "pixel_shape",
    "pixel_dtype",
    "frames",
    "segments",
    "pool",
    "route",
    "tile",
    "status",
    "stage",
    "error_class",
    "message",
    "t_read",
    "t_decode",
    "t_preprocess",
    "t_encode",
    "t_done",
    "done_ids",
)

#: A row's outcome: ``status`` (ok, error, skipped, noop) and, unless ok, where and why.
STATUS_COLUMNS = ("status", "stage", "error_class", "message")

#: Arrow types of the columns the stages add (others are inferred).
COLUMN_TYPES: dict[str, pa.DataType] = {
    "uri": pa.string(),
    "member": pa.string(),
    "data": pa.large_binary(),
    "status": pa.string(),
    "stage": pa.string(),
    "error_class": pa.string(),
    "message": pa.string(),
    "record_id": pa.string(),
    "content_sha256": pa.string(),
    "modality": pa.string(),
    "patient_key": pa.string(),
    "metadata": pa.string(),
    "pixel_values": pa.large_binary(),
    "pixel_shape": pa.list_(pa.int64()),
    "frames": pa.list_(pa.int32()),
    "n_frames": pa.int32(),
    "frame": pa.int32(),
    "t_read": pa.float64(),
    "t_decode": pa.float64(),
    "t_preprocess": pa.float64(),
    "t_encode": pa.float64(),
    "pixel_dtype": pa.string(),
    "segments": pa.string(),
    "pool": pa.string(),
    "route": pa.string(),
    "tile": pa.string(),
}
# ... and the provenance columns the formats declare
COLUMN_TYPES.update({name: arrow_type(typ) for name, typ in segment_columns()})


def empty_status(n: int) -> dict[str, list]:
    """Status columns of ``n`` rows, all null."""
    return {c: [None] * n for c in STATUS_COLUMNS}


def assemble(table: pa.Table, index: list[int], new: Mapping[str, list], drop: Iterable[str] = ()) -> pa.Table:
    """Rows ``index`` of ``table`` (minus ``drop`` and replaced columns) plus ``new`` columns."""
    dropped = set(drop) | set(new)
    keep = [c for c in table.column_names if c not in dropped]
    arrays = {name: pa.array(values, type=COLUMN_TYPES.get(name)) for name, values in new.items()}
    if not keep:
        return pa.table(arrays)
    out = table.select(keep).take(pa.array(index, type=pa.int64()))
    for name, arr in arrays.items():
        out = out.append_column(name, arr)
    return out
