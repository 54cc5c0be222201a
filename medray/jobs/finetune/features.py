"""Record-level examples for ``medray finetune data.features=embeddings``.

A head is trained on the frozen encoder's *pooled record embeddings*, the rows
``medray embed`` writes: the mean of an audio recording's windows, of a
document's chunks, of a slide's tissue tiles (attention-free mean pooling); an
image frame is its own example, as in the end-to-end path. The embeddings come
from the same stages as ``embed`` (:func:`medray.pipeline.stages.plan_dataset`:
read, decode + preprocess as CPU tasks, the encoder in an actor pool), once,
before training, or from an existing ``embed`` output (``data.embeddings``)
joined to the manifest's labels by ``(uri, member)``. The examples then go
through the same Ray Train loop, metrics, checkpoints and export as decoded
images, with ``x`` holding an embedding instead of pixels.

Stages (plain functions over pyarrow tables, testable without Ray):

* :func:`embedding_examples_batch`: encoder rows -> examples (pooled rows,
  image frames, slide tiles to pool), quarantine rows for failures;
* :func:`pool_tiles`: ``groupby(record_id).map_groups``: a slide's tile
  examples -> one example (the mean); other groups pass through;
* :func:`embed_output_rows`: rows of an ``embed`` output that are records
  (pooled rows and image frames) of one encoder, with the columns the join needs;
* :func:`keyed_rows` + :func:`join_examples`: the join of those rows with the
  manifest's labelled rows by record id, as ``union`` + ``groupby(key).map_groups``
  (a streamed hash shuffle; Ray Data's own ``join`` needs polars).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from medray.config import format_options
from medray.jobs.finetune.data import (
    ExampleSpec,
    QuarantineTarget,
    SplitPlan,
    subgroup_values,
    target_or_none,
    write_quarantine,
)
from medray.platform.records import record_id as _record_id
from medray.platform.splits import assign_splits

__all__ = [
    "FEATURES",
    "embed_output_rows",
    "embedding_examples_batch",
    "join_examples",
    "keyed_rows",
    "pool_tiles",
    "set_split",
]

#: ``data.features`` values.
FEATURES = ("auto", "inputs", "embeddings")
#: Columns of an ``embed`` output read for a join (its carried manifest columns are not).
EMBED_COLUMNS = (
    "uri",
    "member",
    "frame",
    "segment",
    "modality",
    "patient_key",
    "metadata",
    "embedding",
    "weights_hash",
)


def set_split(table: pa.Table, split: str) -> pa.Table:
    """Every row of ``table`` in ``split`` (``data.val`` given: two manifests)."""
    arr = pa.array([split] * table.num_rows, pa.string())
    if "split" in table.column_names:
        return table.set_column(table.column_names.index("split"), "split", arr)
    return table.append_column("split", arr)


def _col(table: pa.Table, name: str, default: Any = None) -> list:
    return table.column(name).to_pylist() if name in table.column_names else [default] * table.num_rows


def embedding_examples_batch(
    table: pa.Table, spec: ExampleSpec, plan: SplitPlan | None = None, quarantine: QuarantineTarget | None = None
) -> pa.Table:
    """Encoder output rows -> record-level training examples.

    Kept: a record's pooled row (``segment="pooled"``: audio, text; ``frame=-1``),
    each image frame (``segment`` ``frame`` or null), each slide tile
    (``segment="tile"``, marked ``pool="tile"`` for :func:`pool_tiles`; its
    ``record_id`` is the slide's own), a volume's row from a 3D encoder. Dropped:
    windows, chunks and volume slices (their mean is the pooled row), rows with
    missing labels. Failed and skipped rows are written to ``quarantine`` first.

    Returns:
        Examples: ``x`` (float32 embedding bytes), ``y``, ``record_id``, ``frame``,
        ``modality``, ``pool``, ``uri``, ``member``, ``sg_<name>`` per subgroup and,
        with a ``patient_key`` plan, ``patient_key`` and ``split`` (the record
        id is the fallback group, so a slide's tiles share a split); other plans
        keep the ``split`` column the rows carry.
    """
    write_quarantine(table, quarantine)
    n = table.num_rows
    status = _col(table, "status", "ok")
    segs = _col(table, "segment")
    embs = _col(table, "embedding")
    uris = [str(u) for u in _col(table, "uri", "")]
    members = [str(m or "") for m in _col(table, "member", "")]
    frames = _col(table, "frame", 0)
    modality = _col(table, "modality", "")
    metas = [json.loads(m) if m else {} for m in _col(table, "metadata")]
    label_cols = [_col(table, c) for c in spec.label_columns]
    groups = {g: subgroup_values(table, g, spec.age_bands, metas) for g in spec.subgroups}
    ids = [_record_id(u, m) for u, m in zip(uris, members)]
    with_key = plan is not None and plan.mode == "patient_key"
    if with_key:
        assert plan is not None  # with_key implies a plan
        keys = _col(table, "patient_key")
        splits = assign_splits(keys, seed=plan.seed, fractions=plan.fractions, salt=plan.salt, fallbacks=ids)
    else:
        splits = _col(table, "split")
    carry_split = with_key or "split" in table.column_names
    out: dict[str, list] = {k: [] for k in ("x", "y", "record_id", "frame", "modality", "pool", "uri", "member")}
    if with_key:
        out["patient_key"] = []
    if carry_split:
        out["split"] = []
    for g in spec.subgroups:
        out[f"sg_{g}"] = []
    for i in range(n):
        if status[i] != "ok" or embs[i] is None:
            continue
        seg = segs[i]
        if seg in ("window", "chunk", "slice"):  # items of a recording, document, volume: the pooled row is the example
            continue
        y = target_or_none([col[i] for col in label_cols], spec)
        if y is None:
            continue
        out["x"].append(np.asarray(embs[i], dtype=np.float32).tobytes())
        out["y"].append(y)
        out["record_id"].append(ids[i])
        out["frame"].append(-1 if seg in ("pooled", "tile") else int(frames[i] if frames[i] is not None else 0))
        out["modality"].append(modality[i] or "")
        out["pool"].append("tile" if seg == "tile" else "")
        out["uri"].append(uris[i])
        out["member"].append(members[i])
        if with_key:
            out["patient_key"].append(keys[i])
        if carry_split:
            out["split"].append(splits[i])
        for g in spec.subgroups:
            out[f"sg_{g}"].append(groups[g][i])
    types = {"x": pa.large_binary(), "y": pa.list_(pa.float32()), "frame": pa.int32()}
    return pa.table({k: pa.array(v, type=types.get(k, pa.string())) for k, v in out.items()})


def pool_tiles(group: pa.Table) -> pa.Table:
    """One record's examples: a slide's tiles become one example, the mean tile embedding.

    Used as ``groupby("record_id").map_groups(pool_tiles)``; a group without
    tiles (an image's frames, an audio or text record) is returned as it is.
    """
    pool = group.column("pool")
    is_tile = pc.fill_null(pc.equal(pool, "tile"), False)
    if not pc.any(is_tile).as_py():
        return group
    tiles = group.filter(is_tile)
    rest = group.filter(pc.invert(is_tile))
    x = np.stack([np.frombuffer(b, dtype=np.float32) for b in tiles.column("x").to_pylist()])
    row = tiles.slice(0, 1)
    row = row.set_column(
        row.column_names.index("x"), "x", pa.array([x.mean(axis=0).astype(np.float32).tobytes()], pa.large_binary())
    )
    row = row.set_column(row.column_names.index("pool"), "pool", pa.array(["slide"], pa.string()))
    return pa.concat_tables([rest, row]) if rest.num_rows else row


def embed_output_rows(table: pa.Table, weights_hash: str) -> pa.Table:
    """Record rows of an ``embed`` output part for a join with the manifest.

    Keeps rows of the encoder with ``weights_hash`` that are records: pooled
    rows (audio, text, slides) and image frames (``segment`` ``frame`` or null);
    drops windows, chunks and tiles (their record's pooled row stands for them).
    Returns the columns in :data:`EMBED_COLUMNS` (the embed run's carried
    manifest columns are left out so the manifest's labels win), plus
    ``status="ok"``.
    """
    n = table.num_rows
    segs = _col(table, "segment")
    hashes = _col(table, "weights_hash")
    keep = [h == weights_hash and s not in ("window", "chunk", "tile") for s, h in zip(segs, hashes)]
    t = table.filter(pa.array(keep, pa.bool_())) if n else table
    cols: dict[str, Any] = {}
    for name in EMBED_COLUMNS:
        if name == "embedding":
            values = [None if e is None else list(e) for e in _col(t, name)]
            cols[name] = pa.array(values, pa.list_(pa.float32()))
        elif name == "frame":
            cols[name] = pa.array(_col(t, name, 0), pa.int32())
        elif name == "member":
            cols[name] = pa.array([m or "" for m in _col(t, name, "")], pa.string())
        else:
            cols[name] = pa.array([None if v is None else str(v) for v in _col(t, name)], pa.string())
    cols["status"] = pa.array(["ok"] * t.num_rows, pa.string())
    return pa.table(cols)


def keyed_rows(table: pa.Table, side: str) -> pa.Table:
    """``(key, side, row)`` per row: the record id of ``(uri, member)``, ``e`` (embedding) or ``m``
    (manifest), and the row itself pickled, so both sides share one schema for ``union``."""
    import pickle

    rows = table.to_pylist()
    keys = [_record_id(str(r["uri"]), str(r.get("member") or "")) for r in rows]
    return pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "side": pa.array([side] * len(rows), pa.string()),
            "row": pa.array([pickle.dumps(r, protocol=5) for r in rows], pa.large_binary()),
        }
    )


def join_examples(
    group: pa.Table, spec: ExampleSpec, plan: SplitPlan | None = None, quarantine: QuarantineTarget | None = None
) -> pa.Table:
    """One record's keyed rows (``groupby("key")``) -> its examples (:func:`embedding_examples_batch`).

    Each embedding row is joined with the record's manifest row(s); the manifest's
    columns (labels, split, subgroups) win. A manifest row without an embedding is
    a quarantine row (``MissingEmbedding``); embeddings without a manifest row are
    not part of this task and are ignored.
    """
    import pickle

    sides = group.column("side").to_pylist()
    rows = [pickle.loads(b) for b in group.column("row").to_pylist()]
    manifest = [r for r, s in zip(rows, sides) if s == "m"]
    embedded = [r for r, s in zip(rows, sides) if s == "e"]
    joined = [{**e, **m} for e in embedded for m in manifest]
    if manifest and not embedded:
        missing = pa.table(
            {
                "uri": [str(m["uri"]) for m in manifest],
                "member": [str(m.get("member") or "") for m in manifest],
                "record_id": [_record_id(str(m["uri"]), str(m.get("member") or "")) for m in manifest],
                "status": ["error"] * len(manifest),
                "stage": ["join"] * len(manifest),
                "error_class": ["MissingEmbedding"] * len(manifest),
                "message": ["data.embeddings has no row of this record for this encoder"] * len(manifest),
            }
        )
        write_quarantine(missing, quarantine)
    table = pa.Table.from_pylist(joined) if joined else pa.table({"uri": pa.array([], pa.string())})
    if plan is None and "split" not in table.column_names:
        table = table.append_column("split", pa.array([None] * table.num_rows, pa.string()))
    return embedding_examples_batch(table, spec, plan, None)


def stage_options_kwargs(cfg: Any) -> Mapping[str, Any]:
    """``StageOptions`` fields for the modalities (``audio``, ``text``, ``slide``, ``text_column``).

    Record embeddings are means, so ``pool`` is ``mean`` for audio and text.
    """
    from dataclasses import asdict

    audio = dict(asdict(cfg.audio), pool="mean")
    text = dict(asdict(cfg.text), pool="mean")
    return {
        "audio": audio,
        "text": text,
        "slide": asdict(cfg.slide),
        "text_column": cfg.data.text_column,
        "format_options": format_options(cfg),
    }
