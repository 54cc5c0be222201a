"""Manifests: CSV, JSONL or Parquet tables of records (a ``uri`` column plus labels and notes).

One module reads them for every job: the driver streams columns
(:func:`iter_manifest_batches`, never the whole table), hashes them
(:func:`manifest_sha256`), and :func:`read_manifest` turns one into a Ray
Dataset of source records whose extra columns ride along to the output.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa

from medray.platform.errors import ConfigError
from medray.platform.records import RESERVED_COLUMNS
from medray.platform.sources import ARCHIVE_MEMBER_PENDING, is_archive, resolve_member_uri
from medray.platform.storage import open_fs

__all__ = ["manifest_format", "manifest_columns", "iter_manifest_batches", "manifest_sha256", "read_manifest"]


def manifest_format(path: str) -> str:
    """``csv``, ``json`` (JSON lines) or ``parquet``, by the name's extension."""
    lower = path.lower()
    if lower.endswith(".csv"):
        return "csv"
    if lower.endswith((".jsonl", ".json")):
        return "json"
    return "parquet"


def _dataset(uri: str, storage_options: Mapping[str, Any] | None, key: str) -> Any:
    import pyarrow.dataset as pads
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = open_fs(uri, storage_options)
    if not fs.exists(path):
        raise ConfigError(key, f"manifest '{uri}' does not exist")
    return pads.dataset(path, format=manifest_format(path), filesystem=PyFileSystem(FSSpecHandler(fs)))


def manifest_columns(
    uri: str, storage_options: Mapping[str, Any] | None = None, *, key: str = "data.train"
) -> list[str]:
    """Column names of a CSV/JSONL/Parquet manifest (reads the schema only).

    Raises:
        ConfigError: the manifest does not exist (reported under ``key``).
    """
    return list(_dataset(uri, storage_options, key).schema.names)


def iter_manifest_batches(
    uri: str, columns: Sequence[str], storage_options: Mapping[str, Any] | None = None, *, key: str = "data.train"
) -> Iterator[pa.RecordBatch]:
    """Stream the given manifest columns in record batches (never the whole manifest)."""
    yield from _dataset(uri, storage_options, key).to_batches(columns=list(columns), batch_size=65536)


def manifest_sha256(uri: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """SHA-256 of the manifest's bytes (all files, in sorted order, for a directory)."""
    fs, path = open_fs(uri, storage_options)
    files = sorted(fs.find(path)) if fs.isdir(path) else [path]
    digest = hashlib.sha256()
    for p in files:
        with fs.open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def read_manifest(ray: Any, uri: str, options: Any, text_column: str | None = None) -> Any:
    """Read a CSV/JSONL/Parquet manifest as a Ray Dataset with ``uri``/``member`` columns.

    Relative URIs resolve against the manifest's own location; archives get the
    pending-member marker so the read stage expands them. Manifest columns named
    like medray's own (e.g. ``modality``) are kept as ``manifest_<name>``. With
    ``text_column`` a row's document is that cell; a manifest without a ``uri``
    column keys each document as ``<manifest>#sha256=<text digest>``.

    Args:
        ray: the ``ray`` module (this module itself never imports Ray).
        uri: the manifest's URI.
        options: fsspec storage options.
        text_column: the column holding documents, if any.

    Raises:
        ConfigError: no ``uri`` column (and no ``text_column``), or no such ``text_column``.
    """
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = open_fs(uri, options)
    pafs = PyFileSystem(FSSpecHandler(fs))
    fmt = manifest_format(path)
    if fmt == "csv":
        ds = ray.data.read_csv(path, filesystem=pafs)
    elif fmt == "json":
        ds = ray.data.read_json(path, filesystem=pafs, lines=path.lower().endswith(".jsonl"))
    else:
        ds = ray.data.read_parquet(path, filesystem=pafs)
    names = ds.schema().names
    if text_column is not None and text_column not in names:
        raise ConfigError("text_column", f"manifest has no column '{text_column}' (columns: {', '.join(names)})")
    synth = text_column is not None and "uri" not in names
    if "uri" not in names and not synth:
        raise ConfigError("input", f"manifest has no 'uri' column (columns: {', '.join(names)})")
    renames = {c: f"manifest_{c}" for c in names if c in RESERVED_COLUMNS and c not in ("uri", "member")}

    def resolve(batch: pa.Table) -> pa.Table:
        if synth:
            keys = [
                f"{uri}#sha256=" + hashlib.sha256(str(t or "").encode()).hexdigest()[:32]
                for t in batch.column(text_column).to_pylist()
            ]
            batch = batch.append_column("uri", pa.array(keys, pa.string()))
            batch = batch.append_column("member", pa.array([""] * len(keys), pa.string()))
        if renames:
            batch = batch.rename_columns([renames.get(c, c) for c in batch.column_names])
        uris = [u if synth else resolve_member_uri(str(u), uri) for u in batch.column("uri").to_pylist()]
        batch = batch.set_column(batch.column_names.index("uri"), "uri", pa.array(uris, pa.string()))
        if "member" not in batch.column_names:
            members = [ARCHIVE_MEMBER_PENDING if is_archive(u) else "" for u in uris]
            batch = batch.append_column("member", pa.array(members, pa.string()))
        return batch

    return ds.map_batches(resolve, batch_format="pyarrow")
