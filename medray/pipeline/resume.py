"""Resume: what an output already holds, and the anti-join that leaves only new records to do.

A rerun reads the ``record_id``/``uri`` columns of the output's parts once, on
the driver, with Arrow (:func:`done_index`), and removes finished records from
the listing there (:func:`anti_join`), so the cost of a resume grows with the
new records, not with the output, and no task receives the whole set of
finished ids: a row carries only the finished ids under its own URI
(``done_ids``: an archive's members, a slide's tiles). Two cases still ship every finished id with the stage
options: a manifest (read by the cluster, not listed on the driver) and
``series.mode`` (a series record, embedded or quarantined, is keyed by its
series, not by a listed object). When nothing is left, the job writes its
summary without starting Ray.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from medray.platform.records import record_id
from medray.platform.storage import open_fs

__all__ = ["DoneIndex", "done_index", "anti_join", "anti_join_table", "listing_table", "DONE_IDS"]

#: The column of a source row listing its own finished member/tile ids (archives, slides).
DONE_IDS = "done_ids"

_EMPTY = pa.table({"record_id": pa.array([], pa.string()), "uri": pa.array([], pa.string())})


@dataclass(frozen=True)
class DoneIndex:
    """The finished records of an output: one row per record (``record_id``, ``uri``), plus series ids.

    Attributes:
        table: distinct ``record_id`` with the ``uri`` it came from.
        series: ids of finished CT/MR series records (their rows have a ``series_key``).
    """

    table: pa.Table
    series: frozenset[str]

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def ids(self) -> frozenset[str]:
        """Every finished id (for inputs listed in a distributed way, e.g. manifests)."""
        return frozenset(self.table.column("record_id").to_pylist())


def _parts(fs: Any, root: str, subs: tuple[str, ...] = ("embeddings", "quarantine")) -> list[str]:
    files: list[str] = []
    for sub in subs:
        d = posixpath.join(root, sub)
        fs.invalidate_cache(d)  # s3fs caches listings: a part written since must be seen, a gone one not
        try:
            found = fs.find(d)
        except FileNotFoundError:
            continue
        files += [p for p in found if p.endswith(".parquet") and not posixpath.basename(p).startswith(".")]
    return sorted(files)


def done_index(
    output: str,
    options: Mapping[str, Any] | None,
    skip_applies: Callable[[str, str | None], bool] | None = None,
) -> DoneIndex:
    """The records already written under ``output`` (embeddings and quarantine).

    Args:
        skip_applies: ``(reason, modality) -> bool``: whether a record skipped
            by an earlier run would be skipped again by this one (e.g. a
            ``NoEncoder`` row is not, once its modality has an encoder); those
            count as done. None: skipped records are all tried again.
    """
    fs, root = open_fs(output, options)
    tables, series = [], set()
    subs = ("embeddings", "quarantine", "skipped") if skip_applies is not None else ("embeddings", "quarantine")
    for path in _parts(fs, root, subs):
        try:
            with fs.open(path, "rb") as f:
                names = pq.read_schema(f).names
                f.seek(0)
                cols = [c for c in ("record_id", "uri", "series_key", "reason", "modality") if c in names]
                t = pq.read_table(f, columns=cols)
        except FileNotFoundError:  # removed between the listing and the read: nothing of it is done
            continue
        if "reason" in t.column_names and skip_applies is not None:  # a skipped part
            pairs = zip(t.column("reason").to_pylist(), t.column("modality").to_pylist())
            keep = [skip_applies(r, m) for r, m in pairs]
            t = t.filter(pa.array(keep, pa.bool_())).drop_columns(["reason", "modality"])
        if "series_key" in t.column_names:
            mask = pc.is_valid(t.column("series_key"))
            series.update(t.filter(mask).column("record_id").to_pylist())
        if "uri" not in t.column_names:
            t = t.append_column("uri", pa.nulls(t.num_rows, pa.string()))
        tables.append(t.select(["record_id", "uri"]).cast(_EMPTY.schema))
    table = pa.concat_tables(tables) if tables else _EMPTY
    if table.num_rows:
        table = table.group_by(["record_id"]).aggregate([("uri", "min")]).rename_columns(["record_id", "uri"])
    return DoneIndex(table, frozenset(series))


def listing_table(rows: Iterable[Mapping[str, Any]], chunk: int = 20_000) -> pa.Table:
    """Listed source rows (``{"uri", "member"}``...) as one Arrow table, built ``chunk`` rows at a time.

    A listing of millions of objects never exists as Python dicts all at once
    (200,000 of them took ~130 MB on the driver; the table takes ~7 MB).
    """
    parts, buf = [], []
    for row in rows:
        buf.append(row)
        if len(buf) >= chunk:
            parts.append(pa.Table.from_pylist(buf))
            buf = []
    if buf:
        parts.append(pa.Table.from_pylist(buf))
    if not parts:
        return pa.table({"uri": pa.array([], pa.string()), "member": pa.array([], pa.string())})
    return pa.concat_tables(parts, promote_options="default")


def _record_ids(table: pa.Table) -> pa.Array:
    out = []
    for batch in table.select(["uri", "member"]).to_batches(max_chunksize=20_000):
        uris, members = batch.column(0).to_pylist(), batch.column(1).to_pylist()
        out.append(pa.array([record_id(u, m or "") for u, m in zip(uris, members)], pa.string()))
    return pa.concat_arrays(out) if out else pa.array([], pa.string())


def anti_join_table(table: pa.Table, done: DoneIndex) -> pa.Table:
    """:func:`anti_join` on a listing table (:func:`listing_table`), in listing order."""
    if not len(done) or not table.num_rows:
        return table
    finished = pc.is_in(_record_ids(table), value_set=done.table.column("record_id"))
    keep = table.filter(pc.invert(finished))
    uris = pc.unique(keep.column("uri"))
    mine = done.table.filter(pc.is_in(done.table.column("uri"), value_set=uris))
    grouped = mine.group_by("uri").aggregate([("record_id", "list")]).rename_columns(["uri", DONE_IDS])
    at = pc.index_in(keep.column("uri"), value_set=grouped.column("uri"))
    ids = grouped.column(DONE_IDS).combine_chunks().take(at) if keep.num_rows else pa.array([], pa.list_(pa.string()))
    filled = pc.if_else(pc.is_null(ids), pa.scalar([], pa.list_(pa.string())), ids)
    return keep.append_column(DONE_IDS, filled)


def anti_join(rows: list[dict], done: DoneIndex) -> list[dict]:
    """The listed rows that are not finished, each with the finished ids written under its URI.

    An object is finished when its own ``(uri, member)`` id is in the output (an
    image, or a slide whose pooled row is written). A row that stays carries in
    ``done_ids`` the finished ids of its members or tiles (an archive, a slide
    whose run stopped part way), for the read stage to skip: never the whole set.
    """
    if not len(done) or not rows:
        return rows
    return anti_join_table(listing_table(rows), done).to_pylist()
