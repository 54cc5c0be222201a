"""``medray drift``: has the incoming data moved away from a reference? Per group and time window.

The recipe, top to bottom (no Ray, no re-embedding; seconds):

1. read both ``embed`` outputs back, one embedding per record
   (:func:`medray.pipeline.records.read_record_embeddings`); they must come
   from the same weights (``weights_hash``), else the comparison means nothing;
2. give every record its group values (``group_by``: ``modality``, a key of
   the allow-listed DICOM metadata such as ``manufacturer``, or a column of
   the joined ``manifest`` such as ``site``) and, for the current records,
   its time window (``date_column`` cut by ``window``: day, week, month, year);
3. per (group, window) of the current set, and once for everything, an MMD
   two-sample test against the reference records of the same group (the whole
   reference when the reference has too few of them: a new site is drift too)
   with a permutation p-value; ``alarm`` when ``p < alpha``
   (:func:`medray.platform.drift.mmd_test`);
4. per current record, the k-NN cosine OOD score against the whole reference
   and its alarm (above the threshold calibrated on the reference's own
   leave-one-out scores) (:class:`medray.platform.drift.OODReference`);
5. write ``<output>/drift.json`` (per-group statistic, p-value, alarm),
   ``<output>/ood.parquet`` (per-record scores), ``<output>/reference.npz``
   (the calibrated reference ``medray serve serve.ood.reference=...`` loads)
   and ``<output>/report/index.html`` (drift over windows, OOD score distributions).

A column in ``group_by`` or ``date_column`` that neither the current
embeddings nor the manifest has stops the job with a ConfigError naming the key
(set ``group_by=[]`` for one ``all`` group); a record without a value is in
group ``unknown``.
"""

from __future__ import annotations

import json
import logging
import posixpath
import sys
import time
from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import MISSING

from medray.config import StorageConf
from medray.jobs import JobInfo

__all__ = ["JOB", "DriftConf", "main", "register", "run_drift"]

log = logging.getLogger("medray.drift")

#: Columns of the embeddings themselves (the rest come from metadata or the manifest).
_RECORD_COLUMNS = ("modality",)
#: The name of "everything": no grouping column, no time window, or the whole reference.
_ALL = "all"
_SEP = "\x1f"  # the ASCII unit separator: joins a record's group values into one key


@dataclass
class DriftConf:
    """``medray drift``: the Hydra schema of ``conf/drift.yaml``."""

    reference: str = MISSING
    current: str = MISSING
    output: Optional[str] = None
    manifest: Optional[str] = None
    group_by: List[str] = field(default_factory=lambda: ["modality"])
    date_column: Optional[str] = None
    window: str = "month"
    alpha: float = 0.05
    permutations: int = 500
    max_per_side: int = 1000
    min_records: int = 10
    normalize: bool = True
    k: int = 5
    quantile: float = 0.99
    seed: int = 0
    fail_on_alarm: bool = False
    storage: StorageConf = field(default_factory=StorageConf)


def register() -> None:
    """Store the drift schema in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="drift_schema", node=DriftConf)


JOB = JobInfo(
    "drift",
    "drift and out-of-distribution: current vs reference embeddings per site, modality and time window; a report",
    config_name="drift",
    register=register,
    order=27,
    exit_fast=True,
)


def _check(c: Any) -> None:
    from medray.platform.drift import WINDOWS
    from medray.platform.errors import ConfigError

    if c.window not in WINDOWS:
        raise ConfigError("window", f"choose one of {', '.join(WINDOWS)}, got {c.window!r}")
    if not 0.0 < c.alpha < 1.0:
        raise ConfigError("alpha", f"must be in (0, 1), got {c.alpha}")
    if c.permutations < 1:
        raise ConfigError("permutations", f"must be >= 1, got {c.permutations}")
    if c.permutations < 1 / c.alpha - 1:
        raise ConfigError("permutations", f"{c.permutations} permutations cannot reach p < {c.alpha}; use more")
    if c.max_per_side < 2:
        raise ConfigError("max_per_side", f"must be >= 2, got {c.max_per_side}")
    if c.min_records < 2:
        raise ConfigError("min_records", f"must be >= 2, got {c.min_records}")
    if c.k < 1:
        raise ConfigError("k", f"must be >= 1, got {c.k}")
    if not 0.0 < c.quantile <= 1.0:
        raise ConfigError("quantile", f"must be in (0, 1], got {c.quantile}")
    if len(set(c.group_by)) != len(c.group_by):
        raise ConfigError("group_by", f"names a column twice: {list(c.group_by)}")


def _manifest_values(manifest: str, wanted: list[str], options: dict) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """record_id -> {column: value} for the ``wanted`` columns the manifest has; and all its columns."""
    from medray.platform.errors import ConfigError
    from medray.platform.manifest import iter_manifest_batches, manifest_columns
    from medray.platform.records import record_id

    names = manifest_columns(manifest, options, key="manifest")
    if "uri" not in names:
        raise ConfigError("manifest", f"'{manifest}' has no uri column; it has {', '.join(names)}")
    have = [c for c in wanted if c in names]
    cols = ["uri", *(["member"] if "member" in names else []), *have]
    out: dict[str, dict[str, Any]] = {}
    for batch in iter_manifest_batches(manifest, cols, options, key="manifest"):
        data = batch.to_pydict()
        members = data.get("member") or [""] * batch.num_rows
        for i in range(batch.num_rows):
            out[record_id(str(data["uri"][i]), str(members[i] or ""))] = {c: data[c][i] for c in have}
    return out, names


def _record_values(records: Any, column: str, joined: dict[str, dict[str, Any]]) -> list[Any] | None:
    """Per record, the value of ``column`` (manifest first, then the embeddings); None if nobody has it."""
    n = len(records.record_id)
    if joined and any(column in v for v in joined.values()):
        return [joined.get(rid, {}).get(column) for rid in records.record_id]
    if column in _RECORD_COLUMNS:
        return list(getattr(records, column))
    meta = [json.loads(m) if isinstance(m, str) and m else {} for m in records.metadata]
    if len(meta) == n and any(isinstance(m, dict) and column in m for m in meta):
        return [m.get(column) if isinstance(m, dict) else None for m in meta]
    return None


def _labels(values: list[Any] | None, n: int) -> list[str]:
    if values is None:
        return [_ALL] * n
    return ["unknown" if v is None or (isinstance(v, float) and v != v) or v == "" else str(v) for v in values]


def run_drift(c: Any) -> dict[str, Any]:
    """Run the drift check described by ``c`` (a :class:`DriftConf`); returns the ``drift.json`` document.

    Raises:
        ConfigError: a bad value, outputs of different weights, or a grouping column nobody has.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from medray.pipeline.records import read_record_embeddings
    from medray.platform.drift import OODReference, mmd_test, time_window
    from medray.platform.errors import ConfigError
    from medray.platform.storage import atomic_write_bytes, open_fs

    _check(c)
    t0 = time.perf_counter()
    options = dict(c.storage.options)
    output = c.output or posixpath.join(str(c.current).rstrip("/"), "drift")
    ref = _by_record_id(_read(read_record_embeddings, c.reference, options, "reference"))
    cur = _by_record_id(_read(read_record_embeddings, c.current, options, "current"))
    wh_ref, wh_cur = ref.encoder.get("weights_hash"), cur.encoder.get("weights_hash")
    if wh_ref != wh_cur:
        raise ConfigError(
            "current",
            f"'{c.current}' was embedded with other weights (weights_hash {str(wh_cur)[:12]}) than the reference "
            f"(weights_hash {str(wh_ref)[:12]}); embed both with the same encoder and checkpoint",
        )
    if ref.x.shape[0] < 2:
        raise ConfigError("reference", f"'{c.reference}' holds {ref.x.shape[0]} embedded record(s); at least 2 needed")
    if cur.x.shape[0] < 1:
        raise ConfigError("current", f"'{c.current}' holds no embedded record")

    # 2. group values and windows
    wanted = [*c.group_by, *([c.date_column] if c.date_column else [])]
    joined_ref: dict[str, dict[str, Any]] = {}
    joined_cur: dict[str, dict[str, Any]] = {}
    manifest_names: list[str] = []
    if c.manifest:
        table, manifest_names = _manifest_values(c.manifest, wanted, options)
        joined_ref = {rid: table[rid] for rid in ref.record_id if rid in table}
        joined_cur = {rid: table[rid] for rid in cur.record_id if rid in table}
    n_ref, n_cur = len(ref.record_id), len(cur.record_id)
    ref_groups: dict[str, list[str]] = {}
    cur_groups: dict[str, list[str]] = {}
    for key, column in [("group_by", col) for col in c.group_by] + (
        [("date_column", c.date_column)] if c.date_column else []
    ):
        values = _record_values(cur, column, joined_cur)
        if values is None:
            where = f"the manifest's columns ({', '.join(manifest_names)})" if c.manifest else "no manifest (manifest=)"
            raise ConfigError(
                key,
                f"no current record has a '{column}': not an embeddings column ({', '.join(_RECORD_COLUMNS)}), "
                f"not in their DICOM metadata, and {where}; join a manifest that has it, or drop it "
                "(group_by=[] compares everything as one group)",
            )
        if key == "group_by":
            cur_groups[column] = _labels(values, n_cur)
            ref_groups[column] = _labels(_record_values(ref, column, joined_ref), n_ref)
    windows = time_window(_record_values(cur, c.date_column, joined_cur) or [], c.window) if c.date_column else None
    cur_window = windows if windows is not None else [_ALL] * n_cur

    # 3. the two-sample tests
    groups: list[dict[str, Any]] = []

    def test(name: dict[str, str], window: str, cur_idx: np.ndarray, ref_idx: np.ndarray, seed: int) -> None:
        row: dict[str, Any] = {"group": name, "window": window, "n_current": int(len(cur_idx))}
        matched = len(ref_idx) >= c.min_records
        if not matched:
            ref_idx = np.arange(n_ref)
        row.update(reference=("matched" if matched else _ALL) if name else _ALL, n_reference=int(len(ref_idx)))
        if len(cur_idx) < c.min_records:
            row.update(statistic=None, p_value=None, alarm=None)
            row["skipped"] = f"{len(cur_idx)} current records < min_records={c.min_records}"
        else:
            r = mmd_test(
                ref.x[ref_idx],
                cur.x[cur_idx],
                permutations=c.permutations,
                max_per_side=c.max_per_side,
                normalize=c.normalize,
                seed=seed,
            )
            row.update(statistic=r.statistic, p_value=r.p_value, bandwidth=r.bandwidth, alarm=bool(r.p_value < c.alpha))
        groups.append(row)

    keys = list(c.group_by)
    # one string per record names its group (values joined by a separator no value holds)
    cur_key = np.asarray([_SEP.join(t) for t in zip(*(cur_groups[k] for k in keys))] if keys else [""] * n_cur, object)
    ref_key = np.asarray([_SEP.join(t) for t in zip(*(ref_groups[k] for k in keys))] if keys else [""] * n_ref, object)
    cur_win = np.asarray(cur_window, dtype=object)
    test({}, _ALL, np.arange(n_cur), np.arange(n_ref), c.seed)
    members: dict[str, np.ndarray] = {}  # group -> its current records (every window), for the report
    if keys or windows is not None:
        for j, (gkey, window) in enumerate(sorted(set(zip(cur_key.tolist(), cur_window)))):
            in_group = cur_key == gkey
            members.setdefault(gkey, np.flatnonzero(in_group))
            cur_idx = np.flatnonzero(in_group & (cur_win == window))
            ref_idx = np.flatnonzero(ref_key == gkey)
            test(dict(zip(keys, gkey.split(_SEP))) if keys else {}, window, cur_idx, ref_idx, c.seed + 1 + j)

    # 4. per-record OOD scores against the whole reference
    provenance = {**ref.encoder, "source": c.reference}
    ood = OODReference.fit(ref.x, k=c.k, quantile=c.quantile, seed=c.seed, provenance=provenance)
    scores = ood.score(cur.x)
    alarms = scores > ood.threshold
    for row in groups:
        mask = np.ones(n_cur, bool)
        if row["group"]:
            mask &= cur_key == _SEP.join(row["group"][k] for k in keys)
        if row["window"] != _ALL:
            mask &= cur_win == row["window"]
        row["ood_mean"] = float(scores[mask].mean()) if mask.any() else None
        row["ood_alarm_rate"] = float(alarms[mask].mean()) if mask.any() else None

    # 5. outputs
    fs, root = open_fs(output, options)
    fs.makedirs(root, exist_ok=True)
    columns: dict[str, Any] = {
        "record_id": pa.array(list(cur.record_id), pa.string()),
        "uri": pa.array([str(u) for u in cur.uri], pa.string()),
        "member": pa.array([str(m) for m in cur.member], pa.string()),
    }
    for k in keys:
        columns[k] = pa.array(cur_groups[k], pa.string())
    if windows is not None:
        columns["window"] = pa.array(windows, pa.string())
    columns["ood_score"] = pa.array(scores.astype(np.float32), pa.float32())
    columns["ood_alarm"] = pa.array(alarms.tolist(), pa.bool_())
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink)
    atomic_write_bytes(fs, posixpath.join(root, "ood.parquet"), sink.getvalue().to_pybytes())
    reference_uri = ood.save(posixpath.join(output, "reference.npz"), options)
    overall = groups[0]
    doc: dict[str, Any] = {
        "kind": "drift",
        "encoder": {k: ref.encoder.get(k) for k in ("encoder", "weights_hash", "dim")},
        "reference": c.reference,
        "current": c.current,
        "group_by": keys,
        "date_column": c.date_column,
        "window": c.window if windows is not None else None,
        "alpha": c.alpha,
        "permutations": c.permutations,
        "test": "mmd-rbf-median-heuristic" + ("-unit" if c.normalize else ""),
        "counts": {"reference": n_ref, "current": n_cur, "groups": len(groups) - 1},
        "overall": overall,
        "groups": groups[1:],
        "alarms": sum(1 for g in groups if g.get("alarm")),
        "ood": {
            "k": ood.k,
            "quantile": ood.quantile,
            "threshold": ood.threshold,
            "alarms": int(alarms.sum()),
            "alarm_rate": float(alarms.mean()),
            "reference": reference_uri,
        },
    }
    doc["seconds"] = round(time.perf_counter() - t0, 3)
    atomic_write_bytes(fs, posixpath.join(root, "drift.json"), json.dumps(doc, indent=2).encode())
    by_group = {gkey.replace(_SEP, " / "): scores[idx] for gkey, idx in members.items() if keys}
    doc["report"] = _write_report(output, options, doc, ood.reference_scores, scores, by_group)
    doc["output"] = output
    return doc


def _by_record_id(records: Any) -> Any:
    """The records in record-id order: parts are written in any order, the p-values must not depend on it."""
    import dataclasses

    import numpy as np

    order = np.argsort(records.record_id.astype(str), kind="stable")
    arrays = {
        f.name: getattr(records, f.name)[order]
        for f in dataclasses.fields(records)
        if isinstance(getattr(records, f.name), np.ndarray) and len(getattr(records, f.name)) == len(order)
    }
    return dataclasses.replace(records, **arrays)


def _read(reader: Any, uri: str, options: dict, key: str) -> Any:
    """``reader(uri)``, its ConfigError re-keyed to ``key`` (reference or current)."""
    from medray.platform.errors import ConfigError

    try:
        return reader(uri, options)
    except ConfigError as err:
        raise ConfigError(key, str(err).split(": ", 1)[-1]) from None


def _write_report(output: str, options: dict, doc: dict, ref_scores: Any, scores: Any, by_group: dict) -> str | None:
    """The drift report (over windows, OOD distributions); None if it could not be drawn."""
    from medray.platform import report as reporting

    try:
        rep = reporting.drift_report(doc, ref_scores, scores, by_group)
        return str(rep.write(output, storage_options=options))
    except Exception as err:  # noqa: BLE001 - a report that cannot be drawn never fails the check
        log.warning("report not written (%s)", type(err).__name__)
        return None


def _one_line(doc: dict) -> str:
    o = doc["overall"]
    p = o.get("p_value")
    alarmed = [g for g in doc["groups"] if g.get("alarm")]
    parts = [
        f"drift: {doc['counts']['current']} current vs {doc['counts']['reference']} reference records",
        f"overall MMD p={p:.4f}{' ALARM' if o.get('alarm') else ''}" if p is not None else "overall: too few records",
        f"{len(alarmed)}/{len(doc['groups'])} groups alarmed",
        f"OOD alarms {doc['ood']['alarms']}/{doc['counts']['current']} (threshold {doc['ood']['threshold']:.4f})",
        f"{doc['seconds']:.1f}s",
    ]
    report = f"; report {doc['report']}" if doc.get("report") else ""
    return ", ".join(parts) + f" -> {doc['output']}{report}"


def main(cfg: Any) -> int:
    """Hydra entry point body; returns the process exit code (1 on an alarm with ``fail_on_alarm``)."""
    from omegaconf import OmegaConf

    c: Any = OmegaConf.to_object(cfg)
    doc = run_drift(c)
    print(_one_line(doc), file=sys.stdout, flush=True)
    return 1 if c.fail_on_alarm and doc["alarms"] else 0
