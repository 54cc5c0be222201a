"""Write embeddings and quarantine rows as Parquet, atomically and resumably.

Layout under ``output=``::

    embeddings/part-<uuid>.parquet   one row per embedded frame / window / chunk (+ pooled rows)
    embeddings/<modality>/part-*.parquet   the same for each extra encoder (``encoders.<modality>``)
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
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from medray.pipeline.columns import INTERNAL_COLUMNS
from medray.pipeline.progress import counts_of
from medray.pipeline.resume import done_index
from medray.platform.records import CORE_COLUMNS, QUARANTINE_SCHEMA, SKIPPED_SCHEMA, embedding_schema, record_id
from medray.platform.storage import open_fs, retry_transient

__all__ = [
    "make_sink",
    "write_tables",
    "aggregate_stats",
    "embeddings_table",
    "existing_record_ids",
    "write_parquet_atomic",
    "pool_slides",
]

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
        retry_transient(fs.pipe_file, final, data, what="write part")  # one PUT: visible whole or not at all
    return name


def existing_record_ids(output: str, options: Mapping[str, Any] | None) -> frozenset[str]:
    """Record ids already written under ``output`` (embeddings and quarantine)."""
    return done_index(output, options).ids


def pool_slides(output: str, options: Mapping[str, Any] | None, subdir: str = "embeddings") -> dict[str, int]:
    """Write one pooled row (mean of its tile embeddings) per finished slide.

    Streams the parts directly under ``output/subdir`` one at a time, keeping a
    running sum per slide (memory: slides x embedding size, not tiles). A
    slide gets its pooled row, as one more atomic part, when every one of its
    tissue tiles (``n_frames``) is embedded and it has no pooled row yet, so
    the pass is idempotent and a resumed run finishes what a crashed one left.
    The pooled row's ``record_id`` is the slide's own ``(uri, member)`` id.

    Returns:
        ``{"slides": slides seen, "pooled": rows written now, "tiles": tile rows,
        "background_tiles": background tiles skipped over those slides, "damaged_tiles": tissue tiles
        dropped because their TIFF tiles are empty or past the end of the file}``.
    """
    import json

    import numpy as np

    fs, root = open_fs(output, options)
    d = posixpath.join(root, subdir)
    fs.invalidate_cache(d)  # s3fs caches listings: parts written since (or removed) must be seen as they are
    try:
        files = sorted(
            p for p in fs.ls(d, detail=False) if p.endswith(".parquet") and not posixpath.basename(p).startswith(".")
        )
    except FileNotFoundError:
        return {"slides": 0, "pooled": 0, "tiles": 0, "background_tiles": 0}
    sums: dict[tuple, np.ndarray] = {}
    counts: dict[tuple, int] = {}
    first: dict[tuple, dict] = {}
    pooled: set[tuple] = set()
    schema = None
    for p in files:
        try:
            with fs.open(p, "rb") as f:
                t = pq.read_table(f, filters=[("modality", "=", "slide")])
        except FileNotFoundError:  # gone since the listing (a concurrent run's cleanup): nothing to pool from it
            continue
        if not t.num_rows:
            continue
        segs = t.column("segment").to_pylist()
        keys = list(zip(t.column("uri").to_pylist(), t.column("member").to_pylist()))
        for k, seg in zip(keys, segs):
            if seg == "pooled":
                pooled.add(k)
        tile_idx = [j for j, seg in enumerate(segs) if seg == "tile"]
        if not tile_idx:
            continue
        emb = np.asarray(
            t.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False), np.float64
        ).reshape(t.num_rows, -1)
        for j in tile_idx:
            k = keys[j]
            if k not in first:
                first[k] = t.slice(j, 1).to_pylist()[0]
                sums[k] = np.zeros(emb.shape[1])
                counts[k] = 0
                schema = schema or t.schema
            sums[k] += emb[j]
            counts[k] += 1
    rows = []
    for k, row in first.items():
        if k in pooled or counts[k] != (row["n_frames"] or 0):
            continue
        row = dict(
            row,
            record_id=record_id(*k),
            frame=-1,
            segment="pooled",
            tile_x=None,
            tile_y=None,
            tissue_fraction=None,
            content_sha256=None,
            embedding=(sums[k] / counts[k]).astype(np.float32).tolist(),
        )
        rows.append(row)
    if rows:
        write_parquet_atomic(pa.Table.from_pylist(rows, schema=schema), output, subdir, options)
    metas = [json.loads(r["metadata"] or "{}") for r in first.values()]
    return {
        "slides": len(first),
        "pooled": len(rows),
        "tiles": sum(counts.values()),
        "background_tiles": sum(int(m.get("background_tiles") or 0) for m in metas),
        "damaged_tiles": sum(int(m.get("damaged_tiles") or 0) for m in metas),
    }


def embeddings_table(ok: pa.Table) -> pa.Table:
    """Select and type the output columns of successfully embedded rows.

    Core columns come first with their canonical types, then every carried
    manifest column in input order.
    """
    internal = set(INTERNAL_COLUMNS) | set(CORE_COLUMNS)
    # A carried column that is all-null in this part would be typed "null" and clash with
    # the other parts; store it as string (the usual type of sparse manifest columns).
    carried = [
        f.with_type(pa.string()) if pa.types.is_null(f.type) else f
        for f in (ok.schema.field(c) for c in ok.column_names if c not in internal)
    ]
    emb_type = ok.schema.field("embedding").type
    if pa.types.is_fixed_size_list(emb_type):
        dim = emb_type.list_size
    else:  # several encoders: variable lists, one encoder (one size) per table here
        dim = len(ok.column("embedding")[0].as_py()) if ok.num_rows else 0
    schema = embedding_schema(dim, pa.schema(carried))
    for name in schema.names:  # tables from before the provenance columns existed
        if name not in ok.column_names:
            ok = ok.append_column(name, pa.nulls(ok.num_rows, schema.field(name).type))
    return ok.select(schema.names).cast(schema)


def write_tables(
    tables: list[pa.Table],
    output: str,
    options: Mapping[str, Any] | None,
    version: str,
    subdirs: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Write one batch of encoder rows: embeddings parts (per ``route``), quarantine part; return counts.

    What the Ray Data sink does with each block, and what a fused
    read-decode-encode actor does with its own output (see :mod:`medray.pipeline.fused`).
    """
    subdirs = dict(subdirs or {})
    tables = [t for t in tables if t.num_rows]
    stats: dict[str, Any] = {
        "rows": 0,
        "records": 0,
        "quarantined": 0,
        "skipped": 0,
        "skipped_by_modality": [],
        "slide_rows": 0,
        "outcome_counts": [],  # [outcome, reason, detail, records]: the closing table (outcomes.run_outcomes)
        **{k: 0.0 for k in _TIMING},
    }
    if not tables:
        return stats
    table = pa.concat_tables(tables, promote_options="permissive")
    for k in _TIMING:
        if k in table.column_names:
            stats[k] = float(pc.sum(pc.fill_null(table.column(k).cast(pa.float64()), 0.0)).as_py() or 0.0)
    ok_mask = pc.equal(table.column("status"), "ok")
    skip_mask = pc.equal(table.column("status"), "skipped")
    noop_mask = pc.equal(table.column("status"), "noop")  # a slide whose tiles are all written
    ok = table.filter(ok_mask)
    bad = table.filter(pc.invert(pc.or_(pc.or_(ok_mask, skip_mask), noop_mask)))
    if "modality" in table.column_names:  # slide tiles written, or slides waiting for pooling
        slide = pc.equal(table.column("modality"), "slide")
        stats["slide_rows"] = int(pc.sum(pc.and_(slide, pc.or_(ok_mask, noop_mask)).cast(pa.int64())).as_py() or 0)
    skipped = table.filter(skip_mask)
    if skipped.num_rows:
        routes = skipped.column("route").to_pylist() if "route" in skipped.column_names else [None] * skipped.num_rows
        reasons = [r or "Skipped" for r in skipped.column("error_class").to_pylist()]
        stats["skipped"] = skipped.num_rows
        stats["skipped_by_modality"] = _pairs(str(r) for r in routes)
        stats["skipped_by_reason"] = _pairs(reasons)
        stats["outcome_counts"] += _triples("skipped", reasons, [str(r or "unknown") for r in routes])
        rows = {
            "record_id": skipped.column("record_id"),
            "uri": skipped.column("uri"),
            "member": skipped.column("member"),
            "modality": pa.array([None if r is None else str(r) for r in routes], pa.string()),
            "stage": skipped.column("stage"),
            "reason": pa.array(reasons, pa.string()),
            "message": skipped.column("message"),
            "medray_version": pa.array([version] * skipped.num_rows, pa.string()),
        }
        write_parquet_atomic(pa.table(rows).cast(SKIPPED_SCHEMA), output, "skipped", options)
    if ok.num_rows:
        routes = ok.column("route").to_pylist() if "route" in ok.column_names else [None] * ok.num_rows
        dirs = [subdirs.get(str(r), "embeddings") for r in routes]
        for sub in sorted(set(dirs)):
            part = ok.filter(pa.array([d == sub for d in dirs]))
            part = embeddings_table(part)
            write_parquet_atomic(part, output, sub, options)
        stats["rows"] = ok.num_rows
        ids = ok.column("record_id").to_pylist()
        stats["records"] = len(set(ids))
        mods = ok.column("modality").to_pylist() if "modality" in ok.column_names else routes
        first = dict(zip(ids, (str(m or "unknown") for m in mods)))  # one modality per record
        stats["outcome_counts"] += _triples("embedded", list(first.values()), [""] * len(first))
    if bad.num_rows:
        if "medray_version" not in bad.column_names:
            bad = bad.append_column("medray_version", pa.array([version] * bad.num_rows))
        bad = bad.select(QUARANTINE_SCHEMA.names).cast(QUARANTINE_SCHEMA)
        write_parquet_atomic(bad, output, "quarantine", options)
        stats["quarantined"] = bad.num_rows
        classes = [str(c or "Error") for c in bad.column("error_class").to_pylist()]
        stats["quarantined_by_class"] = _pairs(classes)
        stats["outcome_counts"] += _triples("quarantined", classes, [str(s) for s in bad.column("stage").to_pylist()])
    # (time the encoder finished a batch, records in it): steady-state throughput.
    if "t_done" in table.column_names:
        done = table.group_by("t_done").aggregate([("record_id", "count_distinct")])
        stats["parts"] = [
            [t, n]
            for t, n in zip(done.column("t_done").to_pylist(), done.column("record_id_count_distinct").to_pylist())
            if t is not None
        ]
    return stats


def _pairs(values: Iterable[str]) -> list[list[Any]]:
    """``[[value, count], ...]``: a JSON-friendly counter that :func:`aggregate_stats` concatenates."""
    return [[k, n] for k, n in sorted(Counter(values).items())]


def _triples(outcome: str, reasons: list[str], details: list[str]) -> list[list[Any]]:
    """``[[outcome, reason, detail, count], ...]``: records per reason (and stage or modality)."""
    return [[outcome, r, d, n] for (r, d), n in sorted(Counter(zip(reasons, details)).items())]


def aggregate_stats(results: Iterable[Mapping[str, Any] | None]) -> dict[str, Any]:
    """Sum the counts of :func:`write_tables` calls (lists are concatenated; ``parts`` sorted)."""
    agg: dict[str, Any] = {"parts": []}
    for r in results:
        for k, v in (r or {}).items():
            agg[k] = agg.get(k, 0) + v if not isinstance(v, list) else agg.get(k, []) + v
    agg["parts"] = sorted(agg["parts"])
    return agg


def make_sink(
    output: str,
    options: Mapping[str, Any] | None,
    version: str,
    subdirs: Mapping[str, str] | None = None,
    progress: Any = None,
) -> Any:
    """Create the Ray Data datasink writing embeddings and quarantine under ``output``.

    Built lazily so this module imports without Ray.

    Args:
        subdirs: modality (row ``route``) -> directory for its embeddings;
            modalities not listed go to ``embeddings``.
        progress: a counter actor (:func:`medray.pipeline.progress.start_counter`)
            that each written block reports its counts to; None: no reports.
    """
    from ray.data import Datasink
    from ray.data.block import BlockAccessor

    class _Sink(Datasink):
        def __init__(self) -> None:
            self.output = output
            self.options = dict(options or {})
            self.version = version
            self.subdirs = dict(subdirs or {})
            self.progress = progress
            self.result: dict[str, Any] = {}

        def get_name(self) -> str:
            return "MedrayEmbeddings"

        def write(self, blocks: Iterable[Any], ctx: Any) -> dict[str, Any]:
            tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
            stats = write_tables(tables, self.output, self.options, self.version, self.subdirs)
            if self.progress is not None:
                self.progress.add.remote(counts_of(stats))  # fire and forget: a few integers per block
            return stats

        def on_write_complete(self, write_result: Any) -> None:
            self.result = aggregate_stats(write_result.write_returns)

    return _Sink()
