"""The held-out test split of ``medray finetune``, scored once at the end with the exported artifact.

The patients ``data.test_fraction`` held out never reach training or
validation. After export, their manifest rows are written to
``<output>/splits/test.parquet`` and scored by ``medray evaluate``'s recipe
(:func:`medray.jobs.evaluate.run_evaluate`) with the artifact as ``embed`` and
``serve`` load it: ``<output>/test/evaluation.json`` (AUROC, AUPRC,
sensitivity/specificity, ECE with patient-bootstrap intervals, subgroups),
``<output>/test/predictions/`` and the report.

Which rows are test rows is read from what the split already wrote (the
per-record assignments of a cached run, or the header pass's split manifest),
or recomputed from the manifest with the same plan (a grouping or split
column): the same pure function of seed, salt and group.
"""

from __future__ import annotations

import logging
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from medray.jobs.finetune.data import keep_split, split_batch
from medray.platform.manifest import iter_manifest_batches, manifest_columns
from medray.platform.records import record_id
from medray.platform.storage import open_fs

__all__ = ["write_test_manifest", "score_test_split", "write_report"]

log = logging.getLogger("medray.finetune")


def _read_parquet(fs: Any, path: str) -> pa.Table | None:
    import pyarrow.dataset as pads
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    if not fs.exists(path):
        return None
    return pads.dataset(path, format="parquet", filesystem=PyFileSystem(FSSpecHandler(fs))).to_table()


def write_test_manifest(job: Any) -> tuple[str, int] | None:
    """The test split's manifest rows as ``<output>/splits/test.parquet``; ``None`` when there is no test split.

    Returns:
        ``(uri, rows)``.
    """
    c = job.cfg
    plan = job.plan
    if c.data.test_fraction <= 0 or plan.mode == "manifests":
        return None
    opts = c.storage.options
    fs, root = open_fs(c.output, opts)
    names = manifest_columns(c.data.train, opts)
    assignments = _read_parquet(fs, posixpath.join(root, "splits", "assignments"))
    split_manifest = _read_parquet(fs, posixpath.join(root, "splits", "manifest"))
    test_ids: set[str] | None = None
    if assignments is not None:
        test_ids = set(keep_split(assignments, "test").column("record_id").to_pylist())
    elif split_manifest is not None:
        rows = keep_split(split_manifest, "test")
        members = rows.column("member").to_pylist() if "member" in rows.column_names else [""] * rows.num_rows
        test_ids = {record_id(str(u), str(m or "")) for u, m in zip(rows.column("uri").to_pylist(), members)}
    parts = []
    for batch in iter_manifest_batches(c.data.train, names, opts):
        table = pa.Table.from_batches([batch])
        if test_ids is None:  # a grouping or split column: the plan decides from the row itself
            table = keep_split(split_batch(table, plan), "test").drop_columns(["split"])
        else:
            members = table.column("member").to_pylist() if "member" in names else [""] * table.num_rows
            ids = [record_id(str(u), str(m or "")) for u, m in zip(table.column("uri").to_pylist(), members)]
            table = table.filter(pc.is_in(pa.array(ids, pa.string()), pa.array(sorted(test_ids), pa.string())))
        parts.append(table)
    test = pa.concat_tables(parts) if parts else None
    if test is None or test.num_rows == 0:
        return None
    import pyarrow.parquet as pq

    uri = posixpath.join(c.output.rstrip("/"), "splits", "test.parquet")
    with fs.open(posixpath.join(root, "splits", "test.parquet"), "wb") as f:
        pq.write_table(test, f)
    return uri, test.num_rows


def score_test_split(job: Any, artifact: str) -> dict | None:
    """Score the test split with ``artifact``; the ``evaluation.json`` summary, or ``None`` (no test split).

    A failure is reported in the summary, never raised: training and export succeeded.
    """
    from medray.jobs.evaluate import EvalConf, EvalDataConf, EvaluateConf, run_evaluate

    c = job.cfg
    if c.data.text_column:
        return {"skipped": "test scoring of report-text manifests (data.text_column) is not supported yet"}
    try:
        written = write_test_manifest(job)
    except Exception as err:  # noqa: BLE001 - the artifact exists; say what failed
        log.warning("test split not written (%s)", type(err).__name__)
        return {"error": f"test split not written ({type(err).__name__})"}
    if written is None:
        return None
    test_uri, rows = written
    columns = set(manifest_columns(test_uri, c.storage.options, key="data.train"))
    group_by = job.plan.column if job.plan.mode == "group" and job.plan.column else "patient_key"
    conf = EvaluateConf(
        model=artifact,
        data=EvalDataConf(
            test=test_uri,
            embeddings=c.data.embeddings if job.features == "embeddings" else None,
            group_by=group_by,
            class_column=c.task.column if c.task.type == "multiclass" else None,
        ),
        eval=EvalConf(subgroups=[g for g in c.eval.subgroups if g in columns]),
        output=posixpath.join(c.output.rstrip("/"), "test"),
    )
    conf.storage.options = dict(c.storage.options)
    try:
        doc = run_evaluate(conf)
    except Exception as err:  # noqa: BLE001 - the artifact exists; say what failed
        log.warning("test split not scored (%s: %s)", type(err).__name__, err)
        return {"error": f"test split not scored ({type(err).__name__})", "rows": rows}
    return {
        "rows": rows,
        "records": doc["counts"]["records"],
        "patients": doc["counts"]["patients"],
        "auroc_macro": doc["macro"]["auroc"],
        "metrics": {k: {m: d[m] for m in ("auroc", "auprc", "ece")} for k, d in doc["metrics"].items()},
        "evaluation": posixpath.join(str(conf.output), "evaluation.json"),
        "report": doc.get("report"),
    }


def write_report(job: Any, history: list, test: dict | None) -> str | None:
    """``<output>/report/index.html``: loss and AUROC per epoch and, with a test split, its evaluation."""
    import json

    from medray.platform import report as reporting

    c = job.cfg
    try:
        doc: dict[str, Any] = {"labels": list(job.example_spec.labels)}
        if test and test.get("evaluation"):
            fs, path = open_fs(test["evaluation"], c.storage.options)
            with fs.open(path, "rb") as f:
                doc = json.loads(f.read())
        doc["history"] = history
        return str(reporting.evaluation_report(doc).write(c.output, storage_options=c.storage.options))
    except Exception as err:  # noqa: BLE001 - a report that cannot be drawn never fails the run
        log.warning("report not written (%s)", type(err).__name__)
        return None
