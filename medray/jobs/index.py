"""``medray index``: an approximate nearest-neighbour index of an ``embed`` output, and its near-duplicates.

The recipe, top to bottom (no Ray, no model; seconds to minutes):

1. read the ``embed`` output back, one embedding per record
   (:func:`medray.pipeline.records.read_record_embeddings`), with the columns a
   hit reports: frame, modality, series (salted ``series_key``), the year and
   body part of the allow-listed DICOM metadata, and the carried manifest
   columns that name the study and the site;
2. build the HNSW index (:func:`medray.platform.vectorindex.build_index`) and
   save it beside the embeddings (``<embeddings>/index/``: the index file,
   ``records.parquet``, ``manifest.json`` with the encoder's weights hash);
3. list the near-duplicate pairs (cosine >= ``duplicates.threshold``: the same
   image sent twice) in ``<output>/near_duplicates.csv``;
4. write ``<output>/report/index.html``: the index's figures, the duplicates
   and a few example queries with their top hits (by record id: no URI or
   metadata reaches the report).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import posixpath
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from medray.config import StorageConf
from medray.jobs import JobInfo

__all__ = ["JOB", "IndexConf", "DuplicatesConf", "main", "register", "run_index"]

log = logging.getLogger("medray.index")


@dataclass
class DuplicatesConf:
    """The near-duplicate report."""

    threshold: float = 0.995  # cosine similarity at or above which two records are listed
    neighbours: int = 5  # nearest records looked at per record


@dataclass
class IndexConf:
    """``medray index``: the Hydra schema of ``conf/index.yaml``."""

    embeddings: str = MISSING
    output: Optional[str] = None
    dtype: str = "f16"
    connectivity: int = 16
    expansion_add: int = 128
    expansion_search: int = 128
    threads: int = 0
    study_column: Optional[str] = "study"
    site_column: Optional[str] = "site"
    duplicates: DuplicatesConf = field(default_factory=DuplicatesConf)
    examples: int = 5
    storage: StorageConf = field(default_factory=StorageConf)


def register() -> None:
    """Store the index schema in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="index_schema", node=IndexConf)


JOB = JobInfo(
    "index",
    "a nearest-neighbour search index beside stored embeddings (for /v1/search) and a near-duplicate report",
    config_name="index",
    register=register,
    order=27,
    exit_fast=True,
)


def _check(c: Any) -> None:
    from medray.platform.errors import ConfigError

    if not (0.0 < c.duplicates.threshold <= 1.0):
        raise ConfigError("duplicates.threshold", f"a cosine similarity in (0, 1], got {c.duplicates.threshold}")
    if c.duplicates.neighbours < 1:
        raise ConfigError("duplicates.neighbours", f"must be >= 1, got {c.duplicates.neighbours}")
    if c.examples < 0:
        raise ConfigError("examples", f"must be >= 0, got {c.examples}")
    if c.threads < 0:
        raise ConfigError("threads", f"must be >= 0 (0: every core), got {c.threads}")


def _metadata(values: Any, key: str) -> list[Any]:
    out = []
    for v in values:
        try:
            out.append((json.loads(v) if v else {}).get(key))
        except (TypeError, ValueError):
            out.append(None)
    return out


def run_index(c: Any) -> dict[str, Any]:
    """Build the index described by ``c`` (an :class:`IndexConf`); returns the job's summary."""
    from medray.pipeline.records import read_record_embeddings
    from medray.platform.storage import atomic_write_bytes, open_fs
    from medray.platform.vectorindex import build_index

    _check(c)
    t0 = time.perf_counter()
    options = dict(c.storage.options)
    output = c.output or posixpath.join(str(c.embeddings).rstrip("/"), "index")
    carried = [col for col in (c.study_column, c.site_column) if col]
    records = read_record_embeddings(
        c.embeddings, options, columns=["metadata", "series_key", "content_sha256", *carried]
    )
    meta = records.columns["metadata"]
    n = len(records.record_id)
    columns = {
        "record_id": list(records.record_id),
        "uri": list(records.uri),
        "member": list(records.member),
        "frame": list(records.frame),
        "modality": list(records.modality),
        "study": list(records.columns[c.study_column]) if c.study_column else [None] * n,
        "series": list(records.columns["series_key"]),
        "site": list(records.columns[c.site_column]) if c.site_column else [None] * n,
        "year": _metadata(meta, "study_year"),
        "body_part": _metadata(meta, "body_part"),
        "manufacturer": _metadata(meta, "manufacturer"),
        "content_sha256": list(records.columns["content_sha256"]),
    }
    index = build_index(
        records.x,
        columns,
        encoder=records.encoder,
        dtype=c.dtype,
        connectivity=c.connectivity,
        expansion_add=c.expansion_add,
        expansion_search=c.expansion_search,
        threads=c.threads,
    )
    index.manifest["embeddings"] = str(c.embeddings)
    index.save(output, options)
    t_dup = time.perf_counter()
    pairs = index.near_duplicates(c.duplicates.threshold, c.duplicates.neighbours, threads=c.threads)
    dup_seconds = time.perf_counter() - t_dup
    fs, root = open_fs(output, options)
    buf = io.StringIO()
    fields = ["a_record_id", "a_uri", "a_member", "b_record_id", "b_uri", "b_member", "similarity", "same_bytes"]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(pairs)
    atomic_write_bytes(fs, posixpath.join(root, "near_duplicates.csv"), buf.getvalue().encode())
    examples = []
    for i in range(min(c.examples, n)):
        rid = str(records.record_id[(i * max(1, n // max(1, c.examples))) % n])
        hits = index.search(index.vector(rid), k=5)
        examples.append({"query": rid, "hits": hits})
    doc: dict[str, Any] = {
        "kind": "index",
        "output": output,
        "manifest": index.manifest,
        "duplicates": {
            "threshold": c.duplicates.threshold,
            "pairs": len(pairs),
            "same_bytes": sum(1 for p in pairs if p["same_bytes"]),
            "seconds": round(dup_seconds, 3),
        },
        "seconds": round(time.perf_counter() - t0, 3),
    }
    atomic_write_bytes(fs, posixpath.join(root, "index.json"), json.dumps(doc, indent=2).encode())
    doc["report"] = _write_report(doc, pairs, examples, output, options)
    return doc


def _write_report(doc: dict, pairs: list[dict], examples: list[dict], output: str, options: dict) -> str | None:
    """The index's report (record ids, counts and distances only); None if it failed."""
    from medray.platform.report import Report, Section, Table

    try:
        m = doc["manifest"]
        enc = m.get("encoder") or {}
        b = m["build"]
        summary = Table(
            "index",
            "The index",
            ["setting", "value"],
            [
                ["records", str(m["count"])],
                ["dimensions", str(m["dim"])],
                ["metric / storage", f"{m['metric']} / {m['dtype']}"],
                ["encoder", f"{enc.get('name')} ({str(enc.get('weights_hash'))[:12]}...)"],
                [
                    "HNSW M / ef_construction / ef",
                    f"{b['connectivity']} / {b['expansion_add']} / {b['expansion_search']}",
                ],
                ["build seconds", f"{b['seconds']:.2f}"],
            ],
        )
        dup = doc["duplicates"]
        dup_table = Table(
            "near-duplicates",
            f"Near-duplicate pairs (cosine >= {dup['threshold']})",
            ["record a", "record b", "cosine", "same bytes"],
            [
                [p["a_record_id"], p["b_record_id"], f"{p['similarity']:.5f}", "yes" if p["same_bytes"] else "no"]
                for p in pairs[:50]
            ],
            caption=f"{dup['pairs']} pairs ({dup['same_bytes']} byte-identical); the first 50 shown. "
            "near_duplicates.csv lists every pair with its URIs.",
        )
        rows = [
            [ex["query"], str(rank), h["record_id"], str(h["modality"]), str(h["frame"]), f"{h['distance']:.4f}"]
            for ex in examples
            for rank, h in enumerate(ex["hits"], 1)
        ]
        example_table = Table(
            "examples",
            "Example queries (by record id) and their top hits",
            ["query", "rank", "hit", "modality", "frame", "cosine distance"],
            rows,
            caption="Each query is a stored record; its first hit is itself at distance ~0.",
        )
        rep = Report(
            "Search index",
            f"{m['count']} records of {enc.get('name')}",
            [
                Section("Index", [summary]),
                Section("Near-duplicates", [dup_table], note="The same image sent twice shows as a pair near 1.0."),
                Section("Search examples", [example_table]),
            ],
        )
        return str(rep.write(output, storage_options=options))
    except Exception as err:  # noqa: BLE001 - a report that cannot be drawn never fails the job
        log.warning("report not written (%s)", type(err).__name__)
        return None


def _one_line(doc: dict) -> str:
    m, dup = doc["manifest"], doc["duplicates"]
    report = f"; report {doc['report']}" if doc.get("report") else ""
    return (
        f"index: {m['count']} records x {m['dim']} ({m['dtype']}, built in {m['build']['seconds']:.1f}s), "
        f"{dup['pairs']} near-duplicate pairs (cosine >= {dup['threshold']}), {doc['seconds']:.1f}s "
        f"-> {doc['output']}{report}"
    )


def main(cfg: Any) -> int:
    """Hydra entry point body; returns the process exit code."""
    from omegaconf import OmegaConf

    c = OmegaConf.to_object(cfg)
    doc = run_index(c)
    print(_one_line(doc), file=sys.stdout, flush=True)
    return 0
