"""The CPU stages of the embedding path: read and decode+preprocess.

``source ─► read ─► decode+preprocess ─► encode ─► sink``

Each stage is a plain function over ``pyarrow.Table`` batches so it can be
unit-tested without Ray; :func:`medray.pipeline.plan.plan_dataset` wires them
into a streaming Ray Data plan. Rows that fail at any stage carry
``status="error"`` plus ``stage``/``error_class``/``message`` and flow on to the
sink, which writes them to the quarantine table. Carried manifest columns ride
along by ``Table.take``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa

from medray.encoders import family_modality
from medray.pipeline.columns import STATUS_COLUMNS, assemble
from medray.pipeline.options import StageOptions, decode_options, preprocessors
from medray.pipeline.resume import DONE_IDS
from medray.pipeline.series import is_series_slice, series_options
from medray.platform.decoders import DICOM_EXTENSIONS, check_size
from medray.platform.decoders.base import DicomOptions
from medray.platform.decoders.dicom_wsi import (
    DicomWsiSlide,
    is_dicomweb_wsi,
    open_dicom_wsi,
    sniff_dicom_wsi,
    sniff_dicomweb_wsi,
)
from medray.platform.decoders.series import SeriesOptions
from medray.platform.decoders.slide import SlideOptions, SlideTile, open_slide, plan_slide, read_tile, sniff_slide
from medray.platform.decoders.text import MAX_BYTES_PER_CHAR, check_text_size
from medray.platform.dicomweb import fetch_instance, is_dicomweb
from medray.platform.errors import RecordError, SkipRecord, UnsupportedFormat
from medray.platform.formats import PrepareContext, TextOptions, build_options, detect, extensions, prepare_record
from medray.platform.formats.slide import slide_route
from medray.platform.records import quarantine_fields, record_id, tile_record_id
from medray.platform.sources import ARCHIVE_MEMBER_PENDING, iter_archive_members
from medray.platform.storage import open_fs, read_bytes, retry_transient

__all__ = ["read_batch", "decode_batch", "SERIES_MODE_READ_BATCH", "slide_wanted"]


def read_batch(table: pa.Table, opts: StageOptions, part: str = "all") -> pa.Table:
    """Fetch the bytes of each record; expand archives into member records.

    Records whose id is in ``opts.done`` are dropped (resume). A record that
    cannot be read becomes an error row; one bad archive member never hides
    its neighbours. A whole-slide image is not read here: it is opened lazily
    and expands into one record per tissue tile (``tile`` column, JSON; no
    ``data``), so its tiles spread over the decode tasks.

    ``part`` splits the work between the pipeline's two read branches:
    ``"main"`` leaves whole-slide images out, ``"slides"`` handles nothing
    else (see :func:`plan_dataset`); ``"all"`` does both in one call.
    """
    if part not in ("all", "main", "slides"):
        raise ValueError(f"part must be all, main or slides, not {part!r}")
    index: list[int] = []
    cols: dict[str, list] = {k: [] for k in ("uri", "member", "record_id", "data", "tile", "t_read", *STATUS_COLUMNS)}

    def emit(
        i: int,
        uri: str,
        member: str,
        data: bytes | None,
        err: BaseException | None,
        dt: float,
        tile: str | None = None,
        rid: str | None = None,
        status: dict | None = None,
    ) -> None:
        index.append(i)
        cols["uri"].append(uri)
        cols["member"].append(member)
        cols["record_id"].append(rid or record_id(uri, member))
        cols["data"].append(data)
        cols["tile"].append(tile)
        cols["t_read"].append(dt)
        q = quarantine_fields(err, "read") if err is not None else (status or {"status": "ok"})
        for c in STATUS_COLUMNS:
            cols[c].append(q.get(c))

    uris = table.column("uri").to_pylist()
    members = table.column("member").to_pylist() if "member" in table.column_names else [""] * len(uris)
    col = opts.text_column
    texts = table.column(col).to_pylist() if col and col in table.column_names else None
    row_done = table.column(DONE_IDS).to_pylist() if DONE_IDS in table.column_names else None
    fetched = _fetch_dicomweb(uris, members, opts) if part != "slides" else {}
    for i, (uri, member) in enumerate(zip(uris, members)):
        member = member or ""
        if i in fetched:  # a DICOMweb instance, fetched with the batch's others
            wado, wado_err, dt = fetched[i]
            emit(i, uri, member, wado, wado_err, dt)
            continue
        # finished ids: the row's own (archive members, slide tiles; see medray.pipeline.resume) or the job's
        done = opts.done.union(row_done[i]) if row_done is not None and row_done[i] else opts.done
        if part == "slides" and (member or (texts is not None and texts[i] is not None)):
            continue  # archive members and documents are never lazily read slides
        if texts is not None and texts[i] is not None:
            # The document is the manifest cell; it travels as bytes and the column is dropped below.
            if record_id(uri, member) not in done:
                emit(i, uri, member, str(texts[i]).encode("utf-8"), None, 0.0)
            continue
        if member == ARCHIVE_MEMBER_PENDING:
            t0 = time.perf_counter()
            try:
                for name, data in iter_archive_members(uri, opts.storage_options, opts.max_bytes):
                    if record_id(uri, name) in done:
                        continue
                    dt = time.perf_counter() - t0
                    if isinstance(data, RecordError):
                        emit(i, uri, name, None, data, dt)
                    else:
                        emit(i, uri, name, data, None, dt)
                    t0 = time.perf_counter()
            except RecordError as err:
                emit(i, uri, "", None, err, time.perf_counter() - t0)
            continue
        if record_id(uri, member) in done:
            continue
        t0 = time.perf_counter()
        try:
            if is_dicomweb(uri):  # not fetched above: a whole-slide instance (or the slide branch's pass)
                fs, path = None, ""
                slide = sniff_dicomweb_wsi(uri, decode_options(opts)[1])
                if slide is None:
                    continue  # the main part's record
            else:
                fs, path = open_fs(uri, opts.storage_options)
                slide = sniff_slide(uri, fs, path, opts.storage_options) or sniff_dicom_wsi(
                    uri, fs, path, opts.storage_options, decode_options(opts)[1]
                )
        except Exception as err:  # noqa: BLE001 - e.g. a bad URI in a manifest: reported once, by the main part
            if part != "slides":
                emit(i, uri, member, None, err, time.perf_counter() - t0)
            continue
        if (part == "main" and slide is not None) or (part == "slides" and slide is None):
            continue  # the other branch's record
        try:
            if slide is not None:
                _emit_tiles(i, uri, member, slide, opts, emit, t0, done)
                continue
            if _series_slice_object(fs, path, opts):
                # the series branch reads it with its series: only its header is fetched here
                emit(i, uri, member, None, None, time.perf_counter() - t0, status=_SERIES_NOOP)
                continue
            data = read_bytes(fs, path, opts.max_bytes, large=_large_text(opts))
            emit(i, uri, member, data, None, time.perf_counter() - t0)
        except RecordError as err:
            emit(i, uri, member, None, err, time.perf_counter() - t0)
        except Exception as err:  # noqa: BLE001 - e.g. a bad URI in a manifest
            emit(i, uri, member, None, err, time.perf_counter() - t0)
    drop = (DONE_IDS, col) if col is not None and texts is not None else (DONE_IDS,)
    return assemble(table, index, cols, drop=drop)


def _large_text(opts: StageOptions) -> tuple[int, Any]:
    """``read_bytes``'s check of large objects: a text far over ``text.max_chars`` is refused unread."""
    max_chars = int((opts.text or {}).get("max_chars") or TextOptions().max_chars)
    return MAX_BYTES_PER_CHAR * max_chars, functools.partial(check_text_size, max_chars=max_chars)


def _fetch_dicomweb(
    uris: list[str], members: list[str | None], opts: StageOptions
) -> dict[int, tuple[bytes | None, BaseException | None, float]]:
    """WADO-RS retrieves of a batch's DICOMweb instances, ``opts.dicomweb_in_flight`` requests at a time."""
    todo = [
        i
        for i, u in enumerate(uris)
        if is_dicomweb(u) and record_id(u, members[i] or "") not in opts.done and not is_dicomweb_wsi(u)
    ]  # whole-slide instances are not fetched whole: read_batch tiles them over WADO-RS frames
    if not todo:
        return {}

    def one(i: int) -> tuple[bytes | None, BaseException | None, float]:
        t0 = time.perf_counter()
        try:
            data = retry_transient(fetch_instance, uris[i], opts.max_bytes, what="WADO-RS")
            return data, None, time.perf_counter() - t0
        except Exception as err:  # noqa: BLE001 - a quarantine row with its (PHI-free) reason
            return None, err, time.perf_counter() - t0

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, opts.dicomweb_in_flight)) as pool:
        return dict(zip(todo, pool.map(one, todo)))


_SERIES_NOOP = {"status": "noop", "stage": "series"}
#: Objects per main-branch read task (at least) when ``series.mode`` is on.
SERIES_MODE_READ_BATCH = 64


def _series_slice_object(fs: Any, path: str, opts: StageOptions) -> bool:
    """``series.mode`` on and the object is a CT/MR series slice, judged from its header alone.

    A ranged read of the header (``stop_before_pixels``) instead of the whole
    object: a series slice's pixels are read once, by its series' assembly task.
    """
    if series_options(opts) is None or path.rsplit("/", 1)[-1].lower().endswith(_NOT_DICOM):
        return False
    try:
        with fs.open(path, "rb", block_size=1 << 16) as f:
            return is_series_slice(f, opts)
    except Exception:  # noqa: BLE001 - unreadable: read_bytes reports it with its reason
        return False


# Extensions that are never DICOM Part-10 (others, .dcm or none, may be).
_NOT_DICOM = tuple(e for e in extensions() if e not in DICOM_EXTENSIONS) + (
    ".json",
    ".xml",
    ".csv",
    ".zip",
    ".tar",
    ".gz",
    ".tgz",
)


def slide_wanted(opts: StageOptions) -> bool:
    """True unless the job has an encoder list without a slide or image encoder."""
    if opts.encoder_specs:
        return bool({"slide", "image"} & set(opts.encoder_specs))
    if opts.encoder_spec is None:
        return True
    return family_modality(opts.encoder_spec.family) == "image"


def _emit_tiles(
    i: int, uri: str, member: str, slide: Any, opts: StageOptions, emit: Any, t0: float, done: frozenset[str]
) -> None:
    """One record per tissue tile not yet done; the slide's own id is its pooled row (or its error)."""
    if not slide_wanted(opts):  # skipped and counted in the decode stage, never tiled
        emit(i, uri, member, None, None, time.perf_counter() - t0, tile="{}")
        return
    try:
        plan = plan_slide(slide, SlideOptions(**(opts.slide or {})))
    except RecordError as err:
        emit(i, uri, member, None, err, time.perf_counter() - t0)
        return
    if not plan.tiles:  # a blank slide: its own row says so (no tile, so no pooled row, would name it)
        reason = SkipRecord(
            "NoTissue",
            f"none of the slide's {plan.tiles_total} grid tiles holds slide.min_tissue_fraction of tissue",
        )
        emit(i, uri, member, None, reason, time.perf_counter() - t0)
        return
    dt = (time.perf_counter() - t0) / max(1, len(plan.tiles))
    emitted = 0
    for tile in plan.tiles:
        rid = tile_record_id(uri, member, tile.tile_id)
        if rid in done:
            continue
        info = dict(asdict(tile), n_tiles=len(plan.tiles), slide=plan.metadata, reader=getattr(slide, "reader", "tiff"))
        emit(i, uri, member, None, None, dt, tile=json.dumps(info), rid=rid)
        emitted += 1
    if plan.tiles and not emitted:
        # Every tile is written but the pooled row is not (a run stopped in between): a marker row
        # ("noop", never written) tells the job to run its pooling pass.
        emit(i, uri, member, None, None, dt, tile='{"pending_pool": true}')


def decode_batch(table: pa.Table, opts: StageOptions) -> pa.Table:
    """Route each record by content, decode it and apply its encoder's own preprocessing.

    Output: one row per record with the model input (``pixel_values`` as
    bytes plus ``pixel_shape`` and ``pixel_dtype``: images ``(F, C, H, W)``
    float32, audio windows ``(W, ...)`` float32, text chunks ``(K, 2, L)``
    int64), ``frames`` (item indices), ``segments`` (JSON provenance per item,
    null for images), ``pool`` and ``route`` (the modality whose encoder
    embeds it), the allow-listed ``metadata`` as JSON, ``patient_key`` and
    ``content_sha256``. A record whose modality has no encoder gets
    ``status="skipped"``. The raw bytes are dropped here.
    """
    dicom_opts, limits = decode_options(opts)
    pres = preprocessors(opts)
    options = format_options(opts, dicom_opts)
    n = table.num_rows
    new: dict[str, list] = {
        k: [None] * n
        for k in (
            "content_sha256",
            "modality",
            "patient_key",
            "metadata",
            "pixel_values",
            "pixel_shape",
            "pixel_dtype",
            "frames",
            "segments",
            "pool",
            "route",
            "t_decode",
            "t_preprocess",
            *STATUS_COLUMNS,
        )
    }
    datas = table.column("data").to_pylist()
    tiles = table.column("tile").to_pylist() if "tile" in table.column_names else [None] * n
    status = table.column("status").to_pylist()
    members = table.column("member").to_pylist()
    uris = table.column("uri").to_pylist()
    frames: dict[str, list[tuple[int, list[np.ndarray]]]] = {}  # route -> (row, frames) to preprocess together
    for i in range(n):
        new["status"][i] = status[i]
        if status[i] != "ok":
            for c in STATUS_COLUMNS[1:]:
                new[c][i] = table.column(c)[i].as_py()
            continue
        t0 = time.perf_counter()
        tile = tiles[i]
        if tile is not None:
            _decode_tile(i, uris[i], tile, pres, opts, new, t0)
            continue
        data = datas[i] or b""
        new["content_sha256"][i] = hashlib.sha256(data).hexdigest()
        name = (members[i] or uris[i]).rsplit("/", 1)[-1]
        try:
            check_size(data, limits)
            fmt, route = detect(data, name)
            if fmt.name == "dicom" and is_series_slice(data, opts):
                # a CT/MR series slice: the series branch embeds it with its series (not written here)
                new["status"][i], new["stage"][i], new["route"][i] = "noop", "series", route
                continue
            ctx = PrepareContext(
                name=name, route=route, preprocessors=pres, options=options, limits=limits, salt=opts.salt
            )
            route = fmt.resolve_route(route, ctx)
            new["route"][i] = route
            if pres.get(route) is None:
                raise no_encoder(route, fmt.name)
            if fmt.prepare is None:
                raise UnsupportedFormat(
                    "whole-slide image inside an archive (or with a non-TIFF name): "
                    "list the slide itself as an input object so its tiles are read lazily"
                    if fmt.name == "slide"
                    else "DICOM whole-slide image level met as bytes (inside an archive, or posted): list the "
                    "slide's level files (their folder, prefix or DICOMweb series) as input objects so its "
                    "tiles are read lazily"
                    if fmt.name == "dicom_wsi"
                    else f"{fmt.name} records are not embedded from bytes"
                )
            if fmt.decode is not None and route == "image":
                # frames through the image preprocessing: decoded here, preprocessed with the batch's others
                decoded = fmt.decode(data, dataclasses.replace(ctx, route=route))
                if not decoded.frames:
                    raise RecordError("no frames selected", stage="decode")
                new["t_decode"][i] = time.perf_counter() - t0
                new["modality"][i] = decoded.modality
                new["patient_key"][i] = decoded.patient_key
                new["metadata"][i] = json.dumps(decoded.metadata, sort_keys=True, default=str)
                new["frames"][i] = [int(f.frame) for f in decoded.frames]
                frames.setdefault(route, []).append((i, [f.image for f in decoded.frames]))
                continue
            _, prepared = prepare_record(data, dataclasses.replace(ctx, route=route), fmt)
            total = time.perf_counter() - t0
            values = np.ascontiguousarray(prepared.inputs)
            decode_s = total if prepared.decode_s is None else prepared.decode_s
            new["t_decode"][i], new["t_preprocess"][i] = decode_s, max(0.0, total - decode_s)
            new["route"][i] = prepared.route or route
            new["modality"][i] = prepared.modality
            new["patient_key"][i] = prepared.patient_key
            new["metadata"][i] = json.dumps(prepared.metadata, sort_keys=True, default=str)
            new["pixel_values"][i] = values.tobytes()
            new["pixel_shape"][i] = list(values.shape)
            new["pixel_dtype"][i] = values.dtype.name
            new["frames"][i] = prepared.items if prepared.items is not None else list(range(len(values)))
            new["segments"][i] = None if prepared.segments is None else json.dumps(prepared.segments)
            new["pool"][i] = prepared.pool if prepared.segments is not None else None
        except Exception as err:  # noqa: BLE001 - every failure becomes a quarantine row
            q = quarantine_fields(err, "decode")
            for c in STATUS_COLUMNS:
                new[c][i] = q[c]
            new["pixel_values"][i] = None
    for route, items in frames.items():
        _preprocess_frames(items, pres[route], new)
    return assemble(table, list(range(n)), new, drop=("data",))


def no_encoder(route: str, format_name: str) -> SkipRecord:
    """The skip of a record whose modality has no encoder in this run (non-image DICOM objects by name)."""
    if route == "other" and format_name == "dicom":
        return SkipRecord(
            "NonImageObject",
            "a DICOM object without pixel data (structure set, presentation state, document...): nothing to embed",
            stage="route",
        )
    return SkipRecord(
        "NoEncoder", f"no encoder configured for modality '{route}' (set encoders.{route}=...)", stage="route"
    )


def _preprocess_frames(items: list[tuple[int, list[np.ndarray]]], pre: Any, new: dict[str, list]) -> None:
    """The frames of many records through one preprocessing call; a failure is found record by record.

    One call per batch instead of one per record: image processors cost far
    more per call than per image on small inputs. The outputs are the same
    (each image is processed on its own inside the call).
    """
    t0 = time.perf_counter()
    try:
        pixels = np.ascontiguousarray(pre.preprocess([img for _, imgs in items for img in imgs]), dtype=np.float32)
        chunks = np.split(pixels, np.cumsum([len(imgs) for _, imgs in items])[:-1])
        share = (time.perf_counter() - t0) / max(1, len(items))
        results: list[np.ndarray | BaseException] = list(chunks)
        seconds = [share] * len(items)
    except Exception:  # noqa: BLE001 - find the poison record(s): the others keep their input
        results, seconds = [], []
        for _, imgs in items:
            t1 = time.perf_counter()
            try:
                results.append(np.ascontiguousarray(pre.preprocess(imgs), dtype=np.float32))
            except RecordError as err:
                results.append(err)
            except Exception as err:  # noqa: BLE001 - processors raise anything; the class name is the message
                results.append(RecordError(f"preprocessing failed ({type(err).__name__})", stage="preprocess"))
            seconds.append(time.perf_counter() - t1)
    for (i, _), result, spent in zip(items, results, seconds):
        if isinstance(result, BaseException):
            q = quarantine_fields(result, "preprocess")
            for c in STATUS_COLUMNS:
                new[c][i] = q[c]
            continue
        new["t_preprocess"][i] = spent
        new["pixel_values"][i] = result.tobytes()
        new["pixel_shape"][i] = list(result.shape)
        new["pixel_dtype"][i] = "float32"


@functools.lru_cache(maxsize=8)
def _format_options(key: str) -> dict[str, Any]:
    raw = json.loads(key)
    sections = {k: v for k, v in raw.items() if k != "series"}
    out = build_options(sections)
    out["series"] = SeriesOptions(**raw["series"]) if raw.get("series") else SeriesOptions()
    return out


def format_options(opts: StageOptions, dicom: DicomOptions | None = None) -> dict[str, Any]:
    """Options key -> options object for every format (``dicom`` from the decode settings)."""
    sections = {**opts.format_options, "audio": opts.audio or {}, "text": opts.text or {}, "slide": opts.slide or {}}
    # no sort_keys: the order of series.windows is the order of the channels
    key = json.dumps(dict(sections, series=opts.series or {}), default=list)
    out = dict(_format_options(key))
    out["dicom"] = dicom if dicom is not None else decode_options(opts)[0]
    return out


def _decode_tile(
    i: int, uri: str, tile_json: str, pres: Mapping[str, Any], opts: StageOptions, new: dict[str, list], t0: float
) -> None:
    """Read one slide tile (a ranged read) and preprocess it with the slide's encoder."""
    route = slide_route("slide", PrepareContext(preprocessors=pres))
    new["route"][i] = route
    pre = pres.get(route)
    info = json.loads(tile_json)
    if info.get("pending_pool"):
        new["status"][i], new["stage"][i], new["modality"][i] = "noop", "pool", "slide"
        return
    if pre is None or not info:
        new["route"][i] = "slide"
        new["status"][i], new["stage"][i], new["error_class"][i] = "skipped", "route", "NoEncoder"
        new["message"][i] = "no encoder configured for modality 'slide' (set encoders.slide or an image encoder)"
        return
    try:
        tile = SlideTile(**{k: info[k] for k in SlideTile.__dataclass_fields__})
        if info.get("reader") == DicomWsiSlide.reader:
            rgb = read_tile(open_dicom_wsi(uri, opts.storage_options, decode_options(opts)[1]), tile)
        else:
            rgb = read_tile(open_slide(uri, opts.storage_options), tile)
        t1 = time.perf_counter()
        try:
            pixels = np.ascontiguousarray(pre.preprocess([rgb]), dtype=np.float32)
        except Exception as err:  # noqa: BLE001
            raise RecordError(f"preprocessing failed ({type(err).__name__})", stage="preprocess") from None
        new["t_decode"][i], new["t_preprocess"][i] = t1 - t0, time.perf_counter() - t1
        new["content_sha256"][i] = hashlib.sha256(rgb.tobytes()).hexdigest()  # of the tile's pixels
        new["modality"][i] = "slide"
        new["metadata"][i] = json.dumps(info.get("slide") or {}, sort_keys=True, default=str)
        new["pixel_values"][i] = pixels.tobytes()
        new["pixel_shape"][i] = list(pixels.shape)
        new["pixel_dtype"][i] = "float32"
        new["frames"][i] = [tile.index]
        new["segments"][i] = json.dumps(
            [
                {
                    "segment": "tile",
                    "tile_x": tile.x,
                    "tile_y": tile.y,
                    "level": tile.level,
                    "mpp": tile.mpp,
                    "tissue_fraction": tile.tissue_fraction,
                    "n_items": info.get("n_tiles"),
                }
            ]
        )
        new["pool"][i] = "none"  # the slide's pooled row is written after all its tiles (embed job)
    except Exception as err:  # noqa: BLE001 - every failure becomes a quarantine row
        q = quarantine_fields(err, "decode")
        for c in STATUS_COLUMNS:
            new[c][i] = q[c]
        new["pixel_values"][i] = None
