"""An approximate nearest-neighbour index over stored embeddings (usearch HNSW), with metadata filters.

An index lives beside the embeddings it was built from, as three objects::

    <embeddings>/index/vectors.usearch   the HNSW graph and the vectors (f16 by default), one key per record
    <embeddings>/index/records.parquet   key -> record_id, uri, member, frame, modality, study, series,
                                         site, year, body_part, manufacturer, content_sha256 (no PHI:
                                         only what the embeddings already carry)
    <embeddings>/index/manifest.json     encoder (name, weights_hash, preprocessing_hash), dim, metric,
                                         dtype, count, build parameters and seconds; written last

Why usearch (not FAISS): one ``pip`` wheel with no BLAS to pick, HNSW that
builds on every core with f16 or i8 storage chosen per index, a file that is
opened memory-mapped (``view=True``: a replica starts without reading a
million vectors) and that is a single object to put in S3, and vectors that
can be read back by key (a query by record id). Metadata filters are applied
here, over the small records table: HNSW is over-fetched and post-filtered
when the filter keeps much of the index, and a selective filter is answered
by exact search over the rows it keeps.

Example::

    >>> import numpy as np
    >>> x = np.eye(3, 8, dtype=np.float32)
    >>> idx = build_index(x, {"record_id": ["a", "b", "c"], "modality": ["CT", "DX", "CT"]},
    ...                   encoder={"weights_hash": "w"})
    >>> [h["record_id"] for h in idx.search(x[2], k=2, filters={"modality": "CT"})]
    ['c', 'a']
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from medray.platform.errors import ConfigError, MedrayError
from medray.platform.storage import atomic_write_bytes, is_remote, open_fs

__all__ = [
    "INDEX_FILE",
    "RECORDS_FILE",
    "MANIFEST_FILE",
    "METADATA_COLUMNS",
    "FILTER_COLUMNS",
    "IndexMismatch",
    "VectorIndex",
    "build_index",
    "load_index",
    "read_index_manifest",
    "normalise",
]

INDEX_FILE = "vectors.usearch"
RECORDS_FILE = "records.parquet"
MANIFEST_FILE = "manifest.json"
FORMAT = "medray-index/1"

#: Columns of ``records.parquet`` and their Arrow types (every one may be null but ``record_id``).
METADATA_COLUMNS: dict[str, pa.DataType] = {
    "record_id": pa.string(),
    "uri": pa.string(),
    "member": pa.string(),
    "frame": pa.int32(),
    "modality": pa.string(),
    "study": pa.string(),
    "series": pa.string(),
    "site": pa.string(),
    "year": pa.int32(),
    "body_part": pa.string(),
    "manufacturer": pa.string(),
    "content_sha256": pa.string(),
}
#: Columns a query may filter on (a value or a list of values each).
FILTER_COLUMNS = ("modality", "study", "series", "site", "year", "body_part", "manufacturer")
#: What a hit reports of its record.
_HIT_COLUMNS = ("record_id", "uri", "member", "frame", "modality", "study", "series", "site", "year")
_DTYPES = ("f32", "f16", "i8")
_METRICS = ("cos",)
#: A filter keeping at most this many records is answered by exact search over them.
_EXACT_LIMIT = 20000


class IndexMismatch(MedrayError):
    """The index was built from another encoder's embeddings (weights hash or size differ)."""


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` scaled to unit length as float32 (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def _column(records: Mapping[str, Sequence[Any]], name: str, n: int) -> pa.Array:
    values = records.get(name)
    typ = METADATA_COLUMNS[name]
    if values is None:
        return pa.nulls(n, typ)
    out: list[Any] = []
    for v in values:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out.append(None)
        elif pa.types.is_integer(typ):
            out.append(int(v))
        else:
            out.append(str(v))
    return pa.array(out, typ)


class VectorIndex:
    """An HNSW index of record embeddings with their PHI-free metadata (see the module docstring).

    Build one with :func:`build_index`, open one with :func:`load_index`.
    """

    def __init__(self, index: Any, records: pa.Table, manifest: Mapping[str, Any]) -> None:
        self._index = index
        self.records = records
        self.manifest = dict(manifest)
        # lookups that stay cheap at millions of records: sorted ids (no dict of Python strings) and
        # dictionary codes per filter column (a filter is one vectorised comparison, not a Python loop)
        ids = np.asarray(records.column("record_id").to_numpy(zero_copy_only=False), dtype="S")
        self._id_order = np.argsort(ids, kind="stable")
        self._ids_sorted = ids[self._id_order]
        self._codes: dict[str, tuple[np.ndarray, dict[str, int]]] = {}
        for name in FILTER_COLUMNS:
            if name not in records.schema.names:
                continue
            encoded = records.column(name).cast(pa.string()).combine_chunks().dictionary_encode()
            codes = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32)
            self._codes[name] = (codes, {str(v): i for i, v in enumerate(encoded.dictionary.to_pylist())})

    def __len__(self) -> int:
        return int(self.records.num_rows)

    @property
    def dim(self) -> int:
        """Size of the vectors."""
        return int(self.manifest["dim"])

    @property
    def expansion_search(self) -> int:
        """HNSW ``ef`` of queries: more finds more of the true neighbours, slower."""
        return int(self._index.expansion_search)

    @expansion_search.setter
    def expansion_search(self, ef: int) -> None:
        self._index._compiled.expansion_search = int(ef)  # usearch's property has a setter its stubs omit

    @property
    def nbytes(self) -> int:
        """Size of the saved index file (graph and vectors)."""
        return int(self._index.serialized_length)

    @property
    def weights_hash(self) -> str | None:
        """The weights hash of the encoder whose embeddings this index holds."""
        return (self.manifest.get("encoder") or {}).get("weights_hash")

    def check_encoder(self, served: Mapping[str, Any]) -> None:
        """Refuse an encoder other than the one the index was built from.

        Args:
            served: the encoder's description (``weights_hash``, ``dim``, ``name``).

        Raises:
            IndexMismatch: different weights hash or embedding size.
        """
        want = self.weights_hash
        if not want or want != served.get("weights_hash"):
            raise IndexMismatch(
                f"the search index holds embeddings of weights {str(want)[:12]}..., the encoder is "
                f"'{served.get('name')}' with weights {str(served.get('weights_hash'))[:12]}...; rebuild it with "
                "`medray index embeddings=<output of medray embed with this encoder>`"
            )
        if served.get("dim") not in (None, self.dim):
            raise IndexMismatch(f"the search index holds {self.dim}-d vectors, the encoder gives {served.get('dim')}")

    def key_of(self, record_id: str) -> int:
        """The key (row) of ``record_id``.

        Raises:
            KeyError: no such record in the index.
        """
        rid = str(record_id).encode()
        pos = int(np.searchsorted(self._ids_sorted, rid))
        if pos >= len(self._ids_sorted) or self._ids_sorted[pos] != rid:
            raise KeyError(record_id)
        return int(self._id_order[pos])

    def vector(self, record_id: str) -> np.ndarray:
        """The stored (unit-length) vector of ``record_id``.

        Raises:
            KeyError: no such record in the index.
        """
        key = self.key_of(record_id)
        return np.asarray(self._index.get(key, dtype=np.float32), dtype=np.float32)

    def _mask(self, filters: Mapping[str, Any] | None) -> np.ndarray | None:
        if not filters:
            return None
        mask = np.ones(len(self), dtype=bool)
        for name, wanted in filters.items():
            if name not in FILTER_COLUMNS:
                raise ConfigError(f"filters.{name}", f"filter on one of {', '.join(FILTER_COLUMNS)}")
            values = wanted if isinstance(wanted, (list, tuple, set)) else [wanted]
            codes, lookup = self._codes[name]
            allowed = [lookup[str(v)] for v in values if str(v) in lookup]
            mask &= np.isin(codes, np.asarray(allowed, np.int32))
        return mask

    def _exact(self, q: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if not len(keys):
            return keys, np.zeros(0, np.float32)
        vectors = np.stack(self._index.get(keys, dtype=np.float32)) if len(keys) > 1 else self._one(keys[0])
        dist = 1.0 - normalise(vectors) @ q
        top = np.argsort(dist, kind="stable")[:k]
        return keys[top], dist[top]

    def _one(self, key: int) -> np.ndarray:
        return np.asarray(self._index.get(int(key), dtype=np.float32), np.float32)[None, :]

    def search_keys(
        self, query: np.ndarray, k: int, filters: Mapping[str, Any] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Keys (row positions) and cosine distances of the ``k`` nearest records that pass ``filters``."""
        q = normalise(np.asarray(query, np.float32).reshape(-1))
        if q.shape[0] != self.dim:
            raise ValueError(f"query has {q.shape[0]} dimensions, the index {self.dim}")
        k = max(0, min(int(k), len(self)))
        mask = self._mask(filters)
        if k == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        if mask is None:
            m = self._index.search(q, k)
            return np.asarray(m.keys, np.int64), np.asarray(m.distances, np.float32)
        kept = np.flatnonzero(mask)
        if len(kept) <= max(_EXACT_LIMIT, 0) or len(kept) <= k:
            return self._exact(q, kept.astype(np.int64), k)
        # over-fetch in proportion to what the filter drops, then post-filter
        count = min(len(self), int(math.ceil(k * len(self) / len(kept) * 2)) + k)
        m = self._index.search(q, count)
        keys, dist = np.asarray(m.keys, np.int64), np.asarray(m.distances, np.float32)
        ok = mask[keys]
        if int(ok.sum()) >= k:
            return keys[ok][:k], dist[ok][:k]
        return self._exact(q, kept.astype(np.int64), k)

    def search(self, query: np.ndarray, k: int = 10, filters: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """The ``k`` nearest records to ``query`` that pass ``filters``, nearest first.

        Args:
            query: a vector of the index's size (any length: it is normalised).
            k: how many hits.
            filters: ``{column: value or [values]}`` over :data:`FILTER_COLUMNS`; all must hold.

        Returns:
            One dict per hit: record_id, uri, member, frame, modality, study, series, site, year,
            ``distance`` (cosine distance, 0 = same direction) and ``similarity`` (cosine).

        Raises:
            ConfigError: a filter on an unknown column.
            ValueError: the query's size is not the index's.
        """
        keys, dist = self.search_keys(query, k, filters)
        return [self.hit(int(key), float(d)) for key, d in zip(keys, dist)]

    def hit(self, key: int, distance: float) -> dict[str, Any]:
        """The provenance of row ``key`` with its distance."""
        out: dict[str, Any] = {c: self.records.column(c)[key].as_py() for c in _HIT_COLUMNS}
        out["distance"] = round(max(0.0, distance), 6)
        out["similarity"] = round(1.0 - distance, 6)
        return out

    def near_duplicates(self, threshold: float = 0.995, neighbours: int = 5, threads: int = 0) -> list[dict[str, Any]]:
        """Pairs of records whose cosine similarity is at least ``threshold`` ("the same image sent twice").

        Each record's ``neighbours`` nearest are searched (all records at once, on ``threads``
        threads; 0: every core); a pair is listed once, with whether the stored bytes are equal.
        """
        n = len(self)
        if n < 2:
            return []
        count = min(n, neighbours + 1)
        keys = np.arange(n, dtype=np.int64)
        pairs: dict[tuple[int, int], float] = {}
        for start in range(0, n, 65536):
            chunk = keys[start : start + 65536]
            vectors = np.stack(self._index.get(chunk, dtype=np.float32)) if len(chunk) > 1 else self._one(chunk[0])
            m = self._index.search(normalise(vectors), count, threads=threads)
            found = np.asarray(m.keys, np.int64).reshape(len(chunk), -1)
            sims = 1.0 - np.asarray(m.distances, np.float32).reshape(len(chunk), -1)
            near = (found != chunk[:, None]) & (found >= 0) & (found < n) & (sims >= threshold)
            for r, c in zip(*np.nonzero(near)):  # few: only the pairs over the threshold
                i, j = int(chunk[r]), int(found[r, c])
                pair = (min(i, j), max(i, j))
                pairs[pair] = max(pairs.get(pair, -1.0), float(sims[r, c]))
        col = {c: self.records.column(c) for c in ("record_id", "uri", "member", "content_sha256")}
        out = []
        for (a, b), sim in sorted(pairs.items(), key=lambda kv: -kv[1]):
            row_a = {c: v[a].as_py() for c, v in col.items()}
            row_b = {c: v[b].as_py() for c, v in col.items()}
            out.append(
                {
                    "a_record_id": row_a["record_id"],
                    "a_uri": row_a["uri"],
                    "a_member": row_a["member"],
                    "b_record_id": row_b["record_id"],
                    "b_uri": row_b["uri"],
                    "b_member": row_b["member"],
                    "similarity": round(min(sim, 1.0), 6),
                    "same_bytes": bool(
                        row_a["content_sha256"] is not None and row_a["content_sha256"] == row_b["content_sha256"]
                    ),
                }
            )
        return out

    def save(self, uri: str, storage_options: Mapping[str, Any] | None = None) -> str:
        """Write the index under ``uri`` (a local directory or an object-store prefix); the manifest last.

        Returns:
            ``uri``.
        """
        import io

        import pyarrow.parquet as pq

        fs, root = open_fs(uri, storage_options)
        fs.makedirs(root, exist_ok=True)
        atomic_write_bytes(fs, posixpath.join(root, INDEX_FILE), bytes(self._index.save()))
        buf = io.BytesIO()
        pq.write_table(self.records, buf, compression="zstd")
        atomic_write_bytes(fs, posixpath.join(root, RECORDS_FILE), buf.getvalue())
        atomic_write_bytes(fs, posixpath.join(root, MANIFEST_FILE), json.dumps(self.manifest, indent=2).encode())
        return uri


def build_index(
    x: np.ndarray,
    records: Mapping[str, Sequence[Any]],
    *,
    encoder: Mapping[str, Any],
    dtype: str = "f16",
    connectivity: int = 16,
    expansion_add: int = 128,
    expansion_search: int = 128,
    threads: int = 0,
) -> VectorIndex:
    """Build an HNSW index of ``x`` (one row per record) with its metadata.

    Args:
        x: ``(n, dim)`` embeddings (normalised here; the metric is cosine).
        records: columns of :data:`METADATA_COLUMNS` (``record_id`` required), ``n`` values each.
        encoder: the embeddings' encoder (``encoder``/``name``, ``weights_hash``, ``preprocessing_hash``).
        dtype: how vectors are stored: ``f32``, ``f16`` (half the memory, no loss of recall that matters)
            or ``i8`` (a quarter).
        connectivity: HNSW ``M`` (edges per node).
        expansion_add: HNSW ``efConstruction``.
        expansion_search: HNSW ``ef`` at query time (recall vs latency).
        threads: build threads (0: every core).

    Raises:
        ConfigError: a bad parameter or a records column of the wrong length.
    """
    from usearch.index import Index

    if dtype not in _DTYPES:
        raise ConfigError("dtype", f"choose from {', '.join(_DTYPES)}, got {dtype!r}")
    for key, value in (
        ("connectivity", connectivity),
        ("expansion_add", expansion_add),
        ("expansion_search", expansion_search),
    ):
        if int(value) < 2:
            raise ConfigError(key, f"must be >= 2, got {value}")
    x = normalise(x)
    if x.ndim != 2 or not x.shape[0]:
        raise ConfigError("embeddings", "no embeddings to index; run `medray embed` first")
    n, dim = x.shape
    if "record_id" not in records:
        raise ConfigError("records", "the records need a record_id column")
    bad = [c for c, v in records.items() if c in METADATA_COLUMNS and len(v) != n]
    if bad:
        raise ConfigError("records", f"columns {', '.join(bad)} do not have one value per vector ({n})")
    table = pa.table({name: _column(records, name, n) for name in METADATA_COLUMNS})
    t0 = time.perf_counter()
    index = Index(
        ndim=dim,
        metric="cos",
        dtype=dtype,
        connectivity=int(connectivity),
        expansion_add=int(expansion_add),
        expansion_search=int(expansion_search),
    )
    index.add(np.arange(n, dtype=np.int64), x, threads=int(threads))
    seconds = time.perf_counter() - t0
    import usearch

    manifest = {
        "format": FORMAT,
        "library": "usearch",
        "library_version": usearch.__version__,
        "encoder": {
            "name": encoder.get("encoder") or encoder.get("name"),
            "checkpoint": encoder.get("checkpoint"),
            "weights_hash": encoder.get("weights_hash"),
            "preprocessing_hash": encoder.get("preprocessing_hash"),
        },
        "dim": int(dim),
        "metric": "cos",
        "dtype": dtype,
        "count": int(n),
        "build": {
            "algorithm": "hnsw",
            "connectivity": int(connectivity),
            "expansion_add": int(expansion_add),
            "expansion_search": int(expansion_search),
            "threads": int(threads) or (os.cpu_count() or 1),
            "seconds": round(seconds, 3),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return VectorIndex(index, table, manifest)


def read_index_manifest(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``manifest.json`` of the index at ``uri``.

    Raises:
        ConfigError: (key ``serve.search.index``) no index there.
    """
    fs, root = open_fs(uri, storage_options)
    path = posixpath.join(root, MANIFEST_FILE)
    if not fs.exists(path):
        raise ConfigError(
            "serve.search.index", f"no search index at '{uri}' (no {MANIFEST_FILE}); build one with `medray index`"
        )
    with fs.open(path, "rb") as f:
        doc: dict[str, Any] = json.loads(f.read())
    if doc.get("format") != FORMAT:
        raise ConfigError("serve.search.index", f"'{uri}' holds an index of format {doc.get('format')!r}, not {FORMAT}")
    return doc


def load_index(
    uri: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    weights_hash: str | None = None,
    cache_dir: str | None = None,
    expansion_search: int | None = None,
) -> VectorIndex:
    """Open the index at ``uri`` memory-mapped (an object-store index is downloaded to ``cache_dir`` first).

    Args:
        uri: the index directory (``<embeddings>/index``).
        weights_hash: the encoder's; a different one is refused.
        cache_dir: where remote indexes are kept (default: a temporary directory).
        expansion_search: HNSW ``ef`` for queries (default: the build's).

    Raises:
        ConfigError: no index at ``uri``.
        IndexMismatch: ``weights_hash`` given and not the index's.
    """
    import pyarrow.parquet as pq
    from usearch.index import Index

    manifest = read_index_manifest(uri, storage_options)
    have = (manifest.get("encoder") or {}).get("weights_hash")
    if weights_hash is not None and weights_hash != have:
        raise IndexMismatch(
            f"the search index at '{uri}' holds embeddings of weights {str(have)[:12]}..., the encoder's weights "
            f"are {weights_hash[:12]}...; rebuild it with `medray index` on embeddings of this encoder"
        )
    fs, root = open_fs(uri, storage_options)
    if is_remote(uri):
        tag = f"{str(have)[:16]}-{manifest.get('count')}-{manifest.get('created', '').replace(':', '')}"
        local = os.path.join(cache_dir or tempfile.gettempdir(), "medray-index", tag)
        os.makedirs(local, exist_ok=True)
        for name in (INDEX_FILE, RECORDS_FILE):
            target = os.path.join(local, name)
            if not os.path.exists(target):
                tmp = target + f".{os.getpid()}.tmp"
                fs.get(posixpath.join(root, name), tmp)
                os.replace(tmp, target)
        base = local
    else:
        base = root
    ef = int(expansion_search or manifest["build"]["expansion_search"])
    index = Index.restore(os.path.join(base, INDEX_FILE), view=True, expansion_search=ef)
    if index is None:
        raise ConfigError("serve.search.index", f"'{uri}/{INDEX_FILE}' is not a usearch index; rebuild it")
    records = pq.read_table(os.path.join(base, RECORDS_FILE))
    return VectorIndex(index, records, manifest)
