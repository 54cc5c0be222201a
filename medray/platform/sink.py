"""Write embeddings and quarantine rows as Parquet, atomically and resumably.

Layout under ``output=``::

    embeddings/part-<uuid>.parquet   one row per embedded frame
    quarantine/part-<uuid>.parquet   one row per record that could not be used
    _medray.json                     what this output holds (encoder, hashes)
    runs/<run_id>.json               one summary per run; summary.json = latest

Each part is written whole to a temporary name and then moved into place, so
a reader (or a resumed run) never sees a partial file. A record's frames are
always in one part, which makes "record id present" the resume criterion.
"""

from __future__ import annotations

import io
import posixpath
import time
import uuid
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from medray.platform.pipeline import INTERNAL_COLUMNS
from medray.platform.records import CORE_COLUMNS, QUARANTINE_SCHEMA, embedding_schema
from medray.platform.storage import open_fs

__all__ = ["make_sink", "embeddings_table", "existing_record_ids", "write_parquet_atomic"]

_TIMING = ("t_read", "t_decode", "t_preprocess", "t_encode")


def write_parquet_atomic(table: pa.Table, output: str, subdir: str, options: Mapping[str, Any] | None) -> str:
    """Write ``table`` as one Parquet object under ``output/subdir``; return its name."""
    fs, root = open_fs(output, options)
    name = f"part-{uuid.uuid4().hex}.parquet"
    final = posixpath.join(root, subdir, name)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    data = buf.getvalue()
    if "file" in fs.protocol or "local" in fs.protocol:
        import os

        os.makedirs(posixpath.dirname(final), exist_ok=True)
        tmp = posixpath.join(posixpath.dirname(final), f".{name}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    else:
        fs.pipe_file(final, data)  # one PUT: visible whole or not at all
    return name


def existing_record_ids(output: str, options: Mapping[str, Any] | None) -> frozenset[str]:
    """Record ids already written under ``output`` (embeddings and quarantine)."""
    fs, root = open_fs(output, options)
    done: set[str] = set()
    for sub in ("embeddings", "quarantine"):
        d = posixpath.join(root, sub)
        try:
            files = [p for p in fs.ls(d, detail=False) if p.endswith(".parquet")]
        except FileNotFoundError:
            continue
        for p in files:
            with fs.open(p, "rb") as f:
                col = pq.read_table(f, columns=["record_id"]).column("record_id")
            done.update(col.to_pylist())
    return frozenset(done)


def embeddings_table(ok: pa.Table) -> pa.Table:
    """Select and type the output columns of successfully embedded rows.

    Core columns come first with their canonical types, then every carried
    manifest column in input order.
    """
    internal = set(INTERNAL_COLUMNS) | set(CORE_COLUMNS)
    # A carried column that is all-null in this part would be typed "null" and clash with
    # the other parts; store it as string (the usual type of sparse manifest columns).
    carried = [f.with_type(pa.string()) if pa.types.is_null(f.type) else f
               for f in (ok.schema.field(c) for c in ok.column_names if c not in internal)]
    dim = ok.schema.field("embedding").type.list_size
    schema = embedding_schema(dim, pa.schema(carried))
    return ok.select(schema.names).cast(schema)


def make_sink(output: str, options: Mapping[str, Any] | None, version: str) -> Any:
    """Create the Ray Data datasink writing embeddings and quarantine under ``output``.

    Built lazily so this module imports without Ray.
    """
    from ray.data import Datasink
    from ray.data.block import BlockAccessor

    class _Sink(Datasink):
        def __init__(self) -> None:
            self.output = output
            self.options = dict(options or {})
            self.version = version
            self.result: dict[str, Any] = {}

        def get_name(self) -> str:
            return "MedrayEmbeddings"

        def write(self, blocks: Iterable[Any], ctx: Any) -> dict[str, Any]:
            tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
            tables = [t for t in tables if t.num_rows]
            stats = {"rows": 0, "records": 0, "quarantined": 0, **{k: 0.0 for k in _TIMING}}
            if not tables:
                return stats
            table = pa.concat_tables(tables, promote_options="permissive")
            for k in _TIMING:
                if k in table.column_names:
                    stats[k] = float(pc.sum(pc.fill_null(table.column(k).cast(pa.float64()), 0.0)).as_py() or 0.0)
            ok_mask = pc.equal(table.column("status"), "ok")
            ok = table.filter(ok_mask)
            bad = table.filter(pc.invert(ok_mask))
            if ok.num_rows:
                ok = embeddings_table(ok)
                write_parquet_atomic(ok, self.output, "embeddings", self.options)
                stats["rows"] = ok.num_rows
                stats["records"] = len(set(ok.column("record_id").to_pylist()))
            if bad.num_rows:
                if "medray_version" not in bad.column_names:
                    bad = bad.append_column("medray_version", pa.array([self.version] * bad.num_rows))
                bad = bad.select(QUARANTINE_SCHEMA.names).cast(QUARANTINE_SCHEMA)
                write_parquet_atomic(bad, self.output, "quarantine", self.options)
                stats["quarantined"] = bad.num_rows
            # (commit time, records) per part: lets the summary report steady-state throughput.
            stats["parts"] = [[time.time(), stats["records"] + stats["quarantined"]]]
            return stats

        def on_write_complete(self, write_result: Any) -> None:
            agg: dict[str, Any] = {"parts": []}
            for r in write_result.write_returns:
                for k, v in (r or {}).items():
                    agg[k] = agg.get(k, 0) + v if not isinstance(v, list) else agg.get(k, []) + v
            agg["parts"] = sorted(agg["parts"])
            self.result = agg

    return _Sink()
