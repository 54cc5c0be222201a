"""The CT/MR series branch of the embed pipeline (``series.mode=slicewise|volume``).

``source ─► header pass ─► groupby(series_key) ─► one row per series ─► assemble+preprocess ─┐
                                                                                             ├─► encode ─► sink
source ─► read (series slices: header only, "noop" rows) ─► decode ─────────────────────────┘``

The header pass reads only headers (pydicom ``stop_before_pixels`` over an
fsspec file; archive members are streamed) and emits one small row per series
slice: no pixel data travels through the shuffle. The group-by (sort-based
exchange) only lists each series' header rows (:func:`collect_group`); a
streaming repartition gives each series its own block, and one task per
series (:func:`assemble_batch`) re-reads its instances by ``uri``/``member``,
checks the series (:func:`~medray.platform.decoders.series.plan_series`),
assembles the volume and applies the encoder's preprocessing, emitting one
record per series with the same columns
:func:`~medray.pipeline.stages.decode_batch` emits, plus the manifest
columns its slices agree on. A broken series becomes one quarantine row with
the reason; the others go on.

The per-instance path and the header pass use the same test
(:func:`~medray.platform.decoders.series.read_slice_header`), so every
instance is embedded exactly once: alone or as part of its series.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from typing import Any

import pyarrow as pa

from medray.pipeline.options import preprocessors
from medray.pipeline.resume import DONE_IDS
from medray.platform.decoders import DecodeLimits
from medray.platform.decoders.series import SeriesOptions, SliceHeader, assemble_series, plan_series, read_slice_header
from medray.platform.dicomweb import fetch_instances, is_dicomweb
from medray.platform.errors import ReadError, RecordError
from medray.platform.formats.registry import PrepareContext
from medray.platform.formats.volume import prepare_volume
from medray.platform.records import quarantine_fields, record_id
from medray.platform.sources import ARCHIVE_MEMBER_PENDING, is_archive, iter_archive_members
from medray.platform.storage import open_fs, read_bytes

__all__ = [
    "series_options",
    "is_series_slice",
    "series_header_batch",
    "collect_group",
    "assemble_batch",
    "carried_columns",
    "assemble_group",
    "plan_series_branch",
    "series_record_id",
    "HEADER_SCHEMA",
]

#: Objects per header-pass task (at least; ``compute.read_batch_size`` when larger).
HEADER_BATCH_SIZE = 256

#: Key of a header row's JSON holding the slice's manifest columns (carried onto the series row).
_CARRIED = "_carried"


def carried_columns(per_slice: list[dict]) -> dict[str, Any]:
    """Manifest columns for a series row: each column's value where all its slices agree, else null.

    A manifest usually labels a study or series on every one of its files; a
    column whose slices disagree (e.g. a per-file path or note) has no single
    value for the series and is written as null.
    """
    out: dict[str, Any] = {}
    for name in dict.fromkeys(k for d in per_slice for k in d):
        values = {json.dumps(d.get(name), sort_keys=True, default=str) for d in per_slice}
        out[name] = per_slice[0].get(name) if len(values) == 1 else None
    return out


#: Rows of the header pass: one per series slice.
HEADER_SCHEMA = pa.schema(
    [("series_key", pa.string()), ("uri", pa.string()), ("member", pa.string()), ("header", pa.string())]
)


@functools.lru_cache(maxsize=8)
def _options(text: str) -> Any:

    fields = json.loads(text)
    for key in ("spacing", "modalities", "channels"):
        if fields.get(key) is not None:
            fields[key] = tuple(fields[key])
    return SeriesOptions(**fields)


def series_options(opts: Any) -> Any:
    """The job's :class:`~medray.platform.decoders.series.SeriesOptions`, or ``None`` when the mode is off."""
    fields = getattr(opts, "series", None) or {}
    if not fields or fields.get("mode", "off") == "off":
        return None
    # no sort_keys: the order of series.windows is the order of the channels
    return _options(json.dumps(fields, default=list))


def is_series_slice(data: bytes | Any, opts: Any) -> bool:
    """True when the series branch owns this instance (the per-instance path then skips it).

    ``data``: the instance's bytes, or a binary file positioned at its start (only the header is read).
    """

    sopts = series_options(opts)
    return sopts is not None and read_slice_header(data, salt=opts.salt, options=sopts) is not None


def series_record_id(key: str) -> str:
    """Record id of a series (all its rows share it, as a multi-frame record's frames do)."""
    return record_id(f"medray-series:{key}", "series")


def series_header_batch(table: pa.Table, opts: Any) -> pa.Table:
    """Header pass: one row per series slice (``series_key``, ``uri``, ``member``, header JSON).

    Anything that is not a series slice, or cannot be read, is left to the
    per-instance path, which reads, embeds or quarantines it as before.
    """

    sopts = series_options(opts)
    cols: dict[str, list] = {name: [] for name in HEADER_SCHEMA.names}

    def emit(uri: str, member: str, header: Any, carried: dict) -> None:
        if header is None:
            return
        header.uri, header.member = uri, member
        cols["series_key"].append(header.series_key)
        cols["uri"].append(uri)
        cols["member"].append(member)
        cols["header"].append(json.dumps({**header.to_dict(), _CARRIED: carried}, default=str))

    uris = table.column("uri").to_pylist()
    members = table.column("member").to_pylist() if "member" in table.column_names else [""] * len(uris)
    texts = (
        table.column(opts.text_column).to_pylist()
        if opts.text_column and opts.text_column in table.column_names
        else [None] * len(uris)
    )
    # manifest columns travel with each slice's header; the series row keeps those its slices agree on
    extra = [c for c in table.column_names if c not in ("uri", "member", opts.text_column, DONE_IDS)]
    rows = table.select(extra).to_pylist() if extra else [{}] * len(uris)
    # DICOMweb instances: WADO-RS has no ranged read, so each is fetched whole (in flight together)
    web = [i for i, u in enumerate(uris) if sopts is not None and texts[i] is None and is_dicomweb(u)]
    fetched = dict(zip(web, fetch_instances([uris[i] for i in web], opts.max_bytes, opts.dicomweb_in_flight)))
    for i, (uri, member, text, carried) in enumerate(zip(uris, members, texts, rows)):
        member = member or ""
        if sopts is None or text is not None:
            continue
        if i in fetched:
            data = fetched[i]
            if not isinstance(data, BaseException):  # unreadable: the per-instance path quarantines it
                emit(uri, member, read_slice_header(data, salt=opts.salt, options=sopts), carried)
            continue
        try:
            if member == ARCHIVE_MEMBER_PENDING:
                for name, data in iter_archive_members(uri, opts.storage_options, opts.max_bytes):
                    if not isinstance(data, RecordError):
                        emit(uri, name, read_slice_header(data, salt=opts.salt, options=sopts), carried)
                continue
            fs, path = open_fs(uri, opts.storage_options)
            with fs.open(path, "rb", block_size=1 << 16) as f:
                emit(uri, member, read_slice_header(f, salt=opts.salt, options=sopts), carried)
        except Exception:  # noqa: BLE001 - unreadable: the per-instance path quarantines it with its reason
            continue
    return pa.table(cols, schema=HEADER_SCHEMA)


def _read_instances(headers: list[Any], opts: Any) -> list[bytes]:
    """The bytes of each instance, in ``headers`` order; an archive is streamed once per group."""

    out: list[bytes | None] = [None] * len(headers)
    wanted: dict[str, dict[str, list[int]]] = {}
    web = [k for k, h in enumerate(headers) if is_dicomweb(h.uri)]
    fetched_k = set(web)
    for k, data in zip(web, fetch_instances([headers[k].uri for k in web], opts.max_bytes, opts.dicomweb_in_flight)):
        if isinstance(data, RecordError):
            raise data
        if isinstance(data, BaseException):
            raise ReadError(f"a slice of the series could not be fetched again ({type(data).__name__})")
        out[k] = data
    for k, h in enumerate(headers):
        if k in fetched_k:
            continue
        if h.member and is_archive(h.uri):
            wanted.setdefault(h.uri, {}).setdefault(h.member, []).append(k)
        else:
            fs, path = open_fs(h.uri, opts.storage_options)
            out[k] = read_bytes(fs, path, opts.max_bytes)
    for uri, names in wanted.items():
        for name, data in iter_archive_members(uri, opts.storage_options, opts.max_bytes):
            if name in names and not isinstance(data, RecordError):
                for k in names[name]:
                    out[k] = data
    if any(d is None for d in out):
        raise ReadError(f"{sum(d is None for d in out)} slice(s) of the series could not be read again")
    return out  # type: ignore[return-value]


_OUT_TYPES = {
    "uri": pa.string(),
    "member": pa.string(),
    "record_id": pa.string(),
    "t_read": pa.float64(),
    "content_sha256": pa.string(),
    "modality": pa.string(),
    "patient_key": pa.string(),
    "metadata": pa.string(),
    "pixel_values": pa.large_binary(),
    "pixel_shape": pa.list_(pa.int64()),
    "pixel_dtype": pa.string(),
    "frames": pa.list_(pa.int32()),
    "segments": pa.string(),
    "pool": pa.string(),
    "route": pa.string(),
    "t_decode": pa.float64(),
    "t_preprocess": pa.float64(),
    "status": pa.string(),
    "stage": pa.string(),
    "error_class": pa.string(),
    "message": pa.string(),
}
_OUT_SCHEMA = pa.schema(list(_OUT_TYPES.items()))


#: Rows between the group-by and the assembly: one per series, its slices' header JSON.
GROUP_SCHEMA = pa.schema([("series_key", pa.string()), ("headers", pa.list_(pa.string()))])


def collect_group(group: pa.Table) -> pa.Table:
    """``map_groups`` body: one series' header rows -> one row listing them (no pixels, no decoding).

    The group-by stays this light so its reduce tasks never wait on volume
    assembly; the heavy work runs as ordinary tasks, one series each
    (:func:`assemble_batch`), in parallel with the rest of the pipeline.
    """
    if group.num_rows == 0:
        return GROUP_SCHEMA.empty_table()
    key = group.column("series_key")[0].as_py()
    return pa.table({"series_key": [key], "headers": [group.column("header").to_pylist()]}, schema=GROUP_SCHEMA)


def assemble_batch(batch: pa.Table, opts: Any) -> pa.Table:
    """One record (or quarantine row) per series row of ``batch`` (see :func:`assemble_group`)."""
    outs = [_assemble(headers, opts) for headers in batch.column("headers").to_pylist()]
    return pa.concat_tables(outs, promote_options="permissive") if outs else _OUT_SCHEMA.empty_table()


def assemble_group(group: pa.Table, opts: Any) -> pa.Table:
    """One series' header rows (the :data:`HEADER_SCHEMA` rows of one ``series_key``) -> its record."""
    return _assemble(group.column("header").to_pylist(), opts)


def _assemble(header_json: list[str], opts: Any) -> pa.Table:
    """One series' headers -> one record (or one quarantine row).

    Slicewise: ``pixel_values`` holds every (multi-window) slice preprocessed
    for the image encoder, one row per slice plus a pooled row (``series.pool``).
    Volume: one ``(1, C, D, H, W)`` input for the 3D encoder, one row.
    A series already in the output (resume) yields nothing.
    """

    t0 = time.perf_counter()
    sopts = series_options(opts)
    raw = [json.loads(h) for h in header_json]
    carried = carried_columns([r.pop(_CARRIED, None) or {} for r in raw])
    headers = sorted((SliceHeader.from_dict(r) for r in raw), key=lambda h: (h.uri, h.member))
    key = headers[0].series_key
    rid = series_record_id(key)
    if rid in opts.done or sopts is None:
        return _OUT_SCHEMA.empty_table()
    row: dict[str, Any] = {name: None for name in _OUT_TYPES}
    first = headers[0]
    row.update(
        uri=first.uri,
        member=first.member,
        record_id=rid,
        status="ok",
        t_read=0.0,
        modality=first.modality,
        patient_key=first.patient_key,
    )
    try:
        plan = plan_series(headers, sopts)  # geometry and limits before any pixel is read
        first = headers[plan.order[0]]
        row.update(uri=first.uri, member=first.member)
        t_read = time.perf_counter()
        datas = _read_instances(headers, opts)
        row["t_read"] = time.perf_counter() - t_read
        limits = DecodeLimits(max_bytes=opts.max_bytes, max_pixels=opts.max_pixels)
        volume = assemble_series(datas, sopts, salt=opts.salt, limits=limits, headers=headers)
        digest = hashlib.sha256()
        for k in plan.order:
            digest.update(hashlib.sha256(datas[k]).digest())
        row["content_sha256"] = digest.hexdigest()
        t1 = time.perf_counter()
        row["t_decode"] = t1 - t0 - row["t_read"]
        ctx = PrepareContext(preprocessors=preprocessors(opts), salt=opts.salt)
        prepared = prepare_volume(volume, sopts, ctx, mode=sopts.mode)
        pixels, meta = prepared.inputs, prepared.metadata
        segments, pool, route = prepared.segments, prepared.pool, prepared.route
        frames = [0] if route == "volume" else list(range(pixels.shape[0]))
        row.update(
            metadata=json.dumps(meta, sort_keys=True, default=str),
            pixel_values=pixels.tobytes(),
            pixel_shape=list(pixels.shape),
            pixel_dtype="float32",
            frames=frames,
            segments=json.dumps(segments),
            pool=pool,
            route=route,
            modality=volume.modality,
            patient_key=volume.patient_key,
            t_preprocess=time.perf_counter() - t1,
        )
    except Exception as err:  # noqa: BLE001 - a broken series is one quarantine row; its neighbours go on
        q = quarantine_fields(err, "decode" if not isinstance(err, RecordError) else None)
        if isinstance(err, RecordError):
            q["message"] = f"series of {len(headers)} instance(s): {q['message']}"
        row.update(q, pixel_values=None, metadata=None)
        row["route"] = "image" if sopts.mode == "slicewise" else "volume"
    out = pa.Table.from_pylist([row], schema=_OUT_SCHEMA)
    for name, value in carried.items():
        if name not in out.column_names:
            out = out.append_column(name, pa.array([value]))
    return out


def plan_series_branch(
    ds: Any, opts: Any, *, batch_size: int = 16, num_cpus: float = 1.0, task_retries: int = 2
) -> Any:
    """Header pass, ``groupby("series_key")`` collecting each series' headers, then assembly per series.

    The group-by moves only header rows (a few hundred bytes per slice) and its
    ``map_groups`` only lists them, so the shuffle's reduce tasks stay short;
    a streaming repartition then gives each series a block of its own, so
    volumes are assembled by as many parallel tasks as the cluster has room for.
    """
    from ray.data.context import ShuffleStrategy

    # A header is a few kB and ~1 ms to parse: large header tasks, or Ray's per-task cost dominates.
    hdr = ds.map_batches(
        series_header_batch,
        fn_kwargs={"opts": opts},
        batch_format="pyarrow",
        batch_size=max(batch_size, HEADER_BATCH_SIZE),
        num_cpus=num_cpus,
        max_retries=task_retries,
    )
    # Group with the sort-based exchange, not the hash-shuffle operator: its map/reduce tasks run
    # as one short all-to-all step over the header rows. The hash shuffle's reduce tasks each ask
    # Ray Data's resource budget for a whole CPU, which the encoder pool holds on a small cluster,
    # so they ran one at a time, seconds apart (8 CT series: 44 s -> 20 s end to end on 2 cores).
    # The context is the plan's own (shared by every dataset of this plan, not process-wide), and
    # this group-by is the embed plan's only all-to-all operation.
    hdr.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    grouped = hdr.groupby("series_key").map_groups(
        collect_group, batch_format="pyarrow", num_cpus=min(num_cpus, 0.25), max_retries=task_retries
    )
    one_each = grouped.repartition(target_num_rows_per_block=1)
    return one_each.map_batches(
        assemble_batch,
        fn_kwargs={"opts": opts},
        batch_format="pyarrow",
        batch_size=1,
        num_cpus=num_cpus,
        max_retries=task_retries,
    )
