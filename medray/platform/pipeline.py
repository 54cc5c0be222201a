"""The embedding data path as Ray Data stages.

``source ─► read ─► decode+preprocess ─► encode ─► sink``

Each stage is a plain function or class over ``pyarrow.Table`` batches so it
can be unit-tested without Ray; :func:`build_dataset` wires them into a
streaming Ray Data plan. Rows that fail at any stage carry ``status="error"``
plus ``stage``/``error_class``/``message`` and flow on to the sink, which
writes them to the quarantine table. Carried manifest columns ride along by
``Table.take``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
import pyarrow as pa

from medray.platform.errors import EncodeError, RecordError
from medray.platform.records import quarantine_fields, record_id
from medray.platform.sources import ARCHIVE_MEMBER_PENDING, iter_archive_members
from medray.platform.storage import open_fs, read_bytes

__all__ = ["StageOptions", "read_batch", "decode_batch", "EncoderActor", "INTERNAL_COLUMNS", "encoder_routes"]

#: Columns that live only inside the pipeline; the sink drops them.
INTERNAL_COLUMNS = ("data", "pixel_values", "pixel_shape", "pixel_dtype", "frames", "segments", "pool", "route", "tile",
                    "status", "stage", "error_class", "message", "t_read", "t_decode", "t_preprocess",
                    "t_encode", "t_done")


@dataclass
class StageOptions:
    """Everything the CPU stages need; picklable, shipped to every task."""

    storage_options: dict = field(default_factory=dict)
    max_bytes: int = 1 << 30
    max_pixels: int = 1_000_000_000
    frames: Any = "all"
    windows: dict = field(default_factory=dict)
    prefer_file_voi: bool = True
    salt: str = ""
    encoder_spec: Any = None          # medray.encoders.EncoderSpec
    done: frozenset = frozenset()     # record ids already in the output (resume)
    encoder_specs: dict = field(default_factory=dict)  # modality -> EncoderSpec; {} = encoder_spec only
    audio: dict = field(default_factory=dict)          # AudioOptions fields
    text: dict = field(default_factory=dict)           # TextOptions fields
    text_column: str | None = None                     # manifest column holding the document
    slide: dict = field(default_factory=dict)          # SlideOptions fields
    series: dict = field(default_factory=dict)         # SeriesOptions fields; {} or mode off: per instance


def encoder_routes(opts: StageOptions) -> dict[str, Any]:
    """Modality -> encoder spec: ``encoder_specs``, or ``encoder_spec`` under its family's modality."""
    if opts.encoder_specs:
        return dict(opts.encoder_specs)
    from medray.encoders import family_modality

    spec = opts.encoder_spec
    return {family_modality(spec.family): spec}


_STATUS_COLS = ("status", "stage", "error_class", "message")


def _error_cols(n: int) -> dict[str, list]:
    return {c: [None] * n for c in _STATUS_COLS}


def _assemble(table: pa.Table, index: list[int], new: Mapping[str, list], drop: Iterable[str] = ()) -> pa.Table:
    """Rows ``index`` of ``table`` (minus ``drop`` and replaced columns) plus ``new`` columns."""
    drop = set(drop) | set(new)
    keep = [c for c in table.column_names if c not in drop]
    arrays = {name: pa.array(values, type=_COLUMN_TYPES.get(name)) for name, values in new.items()}
    if not keep:
        return pa.table(arrays)
    out = table.select(keep).take(pa.array(index, type=pa.int64()))
    for name, arr in arrays.items():
        out = out.append_column(name, arr)
    return out


_COLUMN_TYPES: dict[str, pa.DataType] = {
    "uri": pa.string(), "member": pa.string(), "data": pa.large_binary(), "status": pa.string(),
    "stage": pa.string(), "error_class": pa.string(), "message": pa.string(),
    "record_id": pa.string(), "content_sha256": pa.string(), "modality": pa.string(),
    "patient_key": pa.string(), "metadata": pa.string(), "pixel_values": pa.large_binary(),
    "pixel_shape": pa.list_(pa.int64()), "frames": pa.list_(pa.int32()), "n_frames": pa.int32(),
    "frame": pa.int32(), "t_read": pa.float64(), "t_decode": pa.float64(), "t_preprocess": pa.float64(),
    "t_encode": pa.float64(), "pixel_dtype": pa.string(), "segments": pa.string(), "pool": pa.string(),
    "route": pa.string(), "segment": pa.string(), "start_s": pa.float64(), "end_s": pa.float64(),
    "channel": pa.int32(), "token_start": pa.int32(), "token_end": pa.int32(), "tile": pa.string(),
    "tile_x": pa.int64(), "tile_y": pa.int64(), "level": pa.int32(), "mpp": pa.float64(),
    "tissue_fraction": pa.float64(),
    "series_key": pa.string(), "slice_start": pa.int32(), "slice_end": pa.int32(),
    "spacing_mm": pa.list_(pa.float64()),
}


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
    cols: dict[str, list] = {k: [] for k in ("uri", "member", "record_id", "data", "tile", "t_read",
                                             *_STATUS_COLS)}

    def emit(i: int, uri: str, member: str, data: bytes | None, err: BaseException | None, dt: float,
             tile: str | None = None, rid: str | None = None, status: dict | None = None) -> None:
        index.append(i)
        cols["uri"].append(uri)
        cols["member"].append(member)
        cols["record_id"].append(rid or record_id(uri, member))
        cols["data"].append(data)
        cols["tile"].append(tile)
        cols["t_read"].append(dt)
        q = quarantine_fields(err, "read") if err is not None else (status or {"status": "ok"})
        for c in _STATUS_COLS:
            cols[c].append(q.get(c))

    from medray.platform.decoders.slide import sniff_slide

    uris = table.column("uri").to_pylist()
    members = table.column("member").to_pylist() if "member" in table.column_names else [""] * len(uris)
    col = opts.text_column
    texts = table.column(col).to_pylist() if col and col in table.column_names else None
    for i, (uri, member) in enumerate(zip(uris, members)):
        member = member or ""
        if part == "slides" and (member or (texts is not None and texts[i] is not None)):
            continue  # archive members and documents are never lazily read slides
        if texts is not None and texts[i] is not None:
            # The document is the manifest cell; it travels as bytes and the column is dropped below.
            if record_id(uri, member) not in opts.done:
                emit(i, uri, member, str(texts[i]).encode("utf-8"), None, 0.0)
            continue
        if member == ARCHIVE_MEMBER_PENDING:
            t0 = time.perf_counter()
            try:
                for name, data in iter_archive_members(uri, opts.storage_options, opts.max_bytes):
                    if record_id(uri, name) in opts.done:
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
        if record_id(uri, member) in opts.done:
            continue
        t0 = time.perf_counter()
        try:
            fs, path = open_fs(uri, opts.storage_options)
            slide = sniff_slide(uri, fs, path, opts.storage_options)
        except Exception as err:  # noqa: BLE001 - e.g. a bad URI in a manifest: reported once, by the main part
            if part != "slides":
                emit(i, uri, member, None, err, time.perf_counter() - t0)
            continue
        if (part == "main" and slide is not None) or (part == "slides" and slide is None):
            continue  # the other branch's record
        try:
            if slide is not None:
                _emit_tiles(i, uri, member, slide, opts, emit, t0)
                continue
            if _series_slice_object(fs, path, opts):
                # the series branch reads it with its series: only its header is fetched here
                emit(i, uri, member, None, None, time.perf_counter() - t0, status=_SERIES_NOOP)
                continue
            data = read_bytes(fs, path, opts.max_bytes)
            emit(i, uri, member, data, None, time.perf_counter() - t0)
        except RecordError as err:
            emit(i, uri, member, None, err, time.perf_counter() - t0)
        except Exception as err:  # noqa: BLE001 - e.g. a bad URI in a manifest
            emit(i, uri, member, None, err, time.perf_counter() - t0)
    return _assemble(table, index, cols, drop=(col,) if texts is not None else ())


_SERIES_NOOP = {"status": "noop", "stage": "series"}
#: Objects per main-branch read task (at least) when ``series.mode`` is on.
SERIES_MODE_READ_BATCH = 64


def _series_slice_object(fs: Any, path: str, opts: StageOptions) -> bool:
    """``series.mode`` on and the object is a CT/MR series slice, judged from its header alone.

    A ranged read of the header (``stop_before_pixels``) instead of the whole
    object: a series slice's pixels are read once, by its series' assembly task.
    """
    from medray.platform.series_stage import is_series_slice, series_options

    if series_options(opts) is None or path.rsplit("/", 1)[-1].lower().endswith(_NOT_DICOM):
        return False
    try:
        with fs.open(path, "rb", block_size=1 << 16) as f:
            return is_series_slice(f, opts)
    except Exception:  # noqa: BLE001 - unreadable: read_bytes reports it with its reason
        return False


# Extensions that are never DICOM Part-10 (others, .dcm or none, may be).
_NOT_DICOM = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".svs", ".wav", ".flac", ".ogg", ".txt",
              ".json", ".xml", ".csv", ".zip", ".tar", ".gz", ".tgz")


def _slide_wanted(opts: StageOptions) -> bool:
    """True unless the job has an encoder list without a slide or image encoder."""
    if opts.encoder_specs:
        return bool({"slide", "image"} & set(opts.encoder_specs))
    if opts.encoder_spec is None:
        return True
    from medray.encoders import family_modality

    return family_modality(opts.encoder_spec.family) == "image"


def _emit_tiles(i: int, uri: str, member: str, slide: Any, opts: StageOptions, emit: Any, t0: float) -> None:
    """One record per tissue tile not yet done; the slide's own id is its pooled row (or its error)."""
    from dataclasses import asdict

    from medray.platform.decoders.slide import SlideOptions, plan_slide
    from medray.platform.records import tile_record_id

    if not _slide_wanted(opts):  # skipped and counted in the decode stage, never tiled
        emit(i, uri, member, None, None, time.perf_counter() - t0, tile="{}")
        return
    try:
        plan = plan_slide(slide, SlideOptions(**(opts.slide or {})))
    except RecordError as err:
        emit(i, uri, member, None, err, time.perf_counter() - t0)
        return
    dt = (time.perf_counter() - t0) / max(1, len(plan.tiles))
    emitted = 0
    for tile in plan.tiles:
        rid = tile_record_id(uri, member, tile.tile_id)
        if rid in opts.done:
            continue
        info = dict(asdict(tile), n_tiles=len(plan.tiles), slide=plan.metadata)
        emit(i, uri, member, None, None, dt, tile=json.dumps(info), rid=rid)
        emitted += 1
    if plan.tiles and not emitted:
        # Every tile is written but the pooled row is not (a run stopped in between): a marker row
        # ("noop", never written) tells the job to run its pooling pass.
        emit(i, uri, member, None, None, dt, tile='{"pending_pool": true}')


@functools.lru_cache(maxsize=4)
def _preprocessor(spec_json: str) -> Any:
    from medray.encoders import create_preprocessor, spec_from_dict

    return create_preprocessor(spec_from_dict(json.loads(spec_json)))


def _decode_options(opts: StageOptions) -> tuple[Any, Any]:
    from medray.platform.decoders import DecodeLimits, DicomOptions

    frames = opts.frames
    if isinstance(frames, (list, tuple)):
        frames = tuple(int(f) for f in frames)
    windows = {str(k): (float(v[0]), float(v[1])) for k, v in (opts.windows or {}).items()}
    return (
        DicomOptions(frames=frames, windows=windows, prefer_file_voi=opts.prefer_file_voi),
        DecodeLimits(max_bytes=opts.max_bytes, max_pixels=opts.max_pixels),
    )


def _preprocessors(opts: StageOptions) -> dict[str, Any]:
    from medray.encoders import spec_to_dict

    return {m: _preprocessor(json.dumps(spec_to_dict(spec), sort_keys=True))
            for m, spec in encoder_routes(opts).items()}


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
    from medray.platform.decoders import _check_size, decode_bytes, detect_modality
    from medray.platform.decoders.audio import AudioOptions
    from medray.platform.modalities import TextOptions, prepare_record
    from medray.platform.series_stage import is_series_slice as series_slice

    dicom_opts, limits = _decode_options(opts)
    audio_opts = AudioOptions(**(opts.audio or {}))
    text_opts = TextOptions(**(opts.text or {}))
    pres = _preprocessors(opts)
    n = table.num_rows
    new: dict[str, list] = {k: [None] * n for k in (
        "content_sha256", "modality", "patient_key", "metadata", "pixel_values", "pixel_shape", "pixel_dtype",
        "frames", "segments", "pool", "route", "t_decode", "t_preprocess", *_STATUS_COLS)}
    datas = table.column("data").to_pylist()
    tiles = table.column("tile").to_pylist() if "tile" in table.column_names else [None] * n
    status = table.column("status").to_pylist()
    members = table.column("member").to_pylist()
    uris = table.column("uri").to_pylist()
    for i in range(n):
        new["status"][i] = status[i]
        if status[i] != "ok":
            for c in _STATUS_COLS[1:]:
                new[c][i] = table.column(c)[i].as_py()
            continue
        t0 = time.perf_counter()
        if tiles[i] is not None:
            _decode_tile(i, uris[i], tiles[i], pres, opts, new, t0)
            continue
        data = datas[i] or b""
        new["content_sha256"][i] = hashlib.sha256(data).hexdigest()
        name = (members[i] or uris[i]).rsplit("/", 1)[-1]
        try:
            _check_size(data, limits)
            route, fmt = detect_modality(data, name)
            if fmt == "dicom" and series_slice(data, opts):
                # a CT/MR series slice: the series branch embeds it with its series (not written here)
                new["status"][i], new["stage"][i], new["route"][i] = "noop", "series", route
                continue
            if route == "slide":
                route = _slide_route(pres)
            new["route"][i] = route
            pre = pres.get(route)
            if pre is None:
                new["status"][i], new["stage"][i] = "skipped", "route"
                new["message"][i] = f"no encoder configured for modality '{route}'"
                continue
            if fmt == "slide":
                from medray.platform.errors import UnsupportedFormat

                raise UnsupportedFormat("whole-slide image inside an archive (or with a non-TIFF name): "
                                        "list the slide itself as an input object so its tiles are read lazily")
            if route != "image":
                prepared = prepare_record(data, fmt, pre, audio=audio_opts, text=text_opts, salt=opts.salt)
                t1 = time.perf_counter()
                new["t_decode"][i] = t1 - t0
                values = np.ascontiguousarray(prepared.inputs)
                new["modality"][i] = prepared.modality
                new["patient_key"][i] = prepared.patient_key
                new["metadata"][i] = json.dumps(prepared.metadata, sort_keys=True, default=str)
                new["pixel_values"][i] = values.tobytes()
                new["pixel_shape"][i] = list(values.shape)
                new["pixel_dtype"][i] = values.dtype.name
                new["frames"][i] = list(range(len(prepared.segments)))
                new["segments"][i] = json.dumps(prepared.segments)
                new["pool"][i] = prepared.pool
                new["t_preprocess"][i] = 0.0
                continue
            decoded = decode_bytes(data, name=name, dicom=dicom_opts, limits=limits, salt=opts.salt)
            t1 = time.perf_counter()
            new["t_decode"][i] = t1 - t0
            if not decoded.frames:
                raise RecordError("no frames selected", stage="decode")
            try:
                pixels = pre.preprocess([f.image for f in decoded.frames])
            except RecordError:
                raise
            except Exception as err:  # noqa: BLE001
                raise RecordError(f"preprocessing failed ({type(err).__name__})", stage="preprocess") from None
            pixels = np.ascontiguousarray(pixels, dtype=np.float32)
            new["t_preprocess"][i] = time.perf_counter() - t1
            new["modality"][i] = decoded.modality
            new["patient_key"][i] = decoded.patient_key
            new["metadata"][i] = json.dumps(decoded.metadata, sort_keys=True, default=str)
            new["pixel_values"][i] = pixels.tobytes()
            new["pixel_shape"][i] = list(pixels.shape)
            new["pixel_dtype"][i] = "float32"
            new["frames"][i] = [int(f.frame) for f in decoded.frames]
        except Exception as err:  # noqa: BLE001 - every failure becomes a quarantine row
            q = quarantine_fields(err, "decode")
            for c in _STATUS_COLS:
                new[c][i] = q[c]
            new["pixel_values"][i] = None
    return _assemble(table, list(range(n)), new, drop=("data",))


def _slide_route(pres: Mapping[str, Any]) -> str:
    """Slides are embedded by ``encoders.slide``, else by the image encoder."""
    return "slide" if "slide" in pres or "image" not in pres else "image"


def _decode_tile(i: int, uri: str, tile_json: str, pres: Mapping[str, Any], opts: StageOptions,
                 new: dict[str, list], t0: float) -> None:
    """Read one slide tile (a ranged read) and preprocess it with the slide's encoder."""
    from medray.platform.decoders.slide import SlideTile, open_slide, read_tile

    route = _slide_route(pres)
    new["route"][i] = route
    pre = pres.get(route)
    info = json.loads(tile_json)
    if info.get("pending_pool"):
        new["status"][i], new["stage"][i], new["modality"][i] = "noop", "pool", "slide"
        return
    if pre is None or not info:
        new["route"][i] = "slide"
        new["status"][i], new["stage"][i] = "skipped", "route"
        new["message"][i] = "no encoder configured for modality 'slide' (set encoders.slide or an image encoder)"
        return
    try:
        tile = SlideTile(**{k: info[k] for k in SlideTile.__dataclass_fields__})
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
        new["segments"][i] = json.dumps([{"segment": "tile", "tile_x": tile.x, "tile_y": tile.y,
                                          "level": tile.level, "mpp": tile.mpp,
                                          "tissue_fraction": tile.tissue_fraction,
                                          "n_items": info.get("n_tiles")}])
        new["pool"][i] = "none"  # the slide's pooled row is written after all its tiles (embed job)
    except Exception as err:  # noqa: BLE001 - every failure becomes a quarantine row
        q = quarantine_fields(err, "decode")
        for c in _STATUS_COLS:
            new[c][i] = q[c]
        new["pixel_values"][i] = None


class EncoderActor:
    """Ray Data actor: loads the encoders once, embeds batches of records.

    Each record is embedded by the encoder of its ``route`` (modality). All
    rows of a record, its pooled row included, come out of one call, so
    "record id present in the output" stays the resume criterion. A batch
    that fails is retried record by record so that one poison record becomes
    a quarantine row instead of failing (and endlessly retrying) the whole
    batch.

    Args:
        spec: the primary encoder spec (dict form).
        device: ``cpu``, ``cuda`` or ``auto``.
        dtype: ``auto`` (bf16 on GPU), ``float32``, ``bfloat16`` or ``float16``.
        batch_size: items (frames, windows, chunks) per forward pass.
        provenance: columns stamped on every row (encoder, hashes, version).
        specs: modality -> spec dict when the job has several encoders;
            ``None``: ``spec`` alone, under its family's modality.
        provenances: modality -> provenance columns, with ``specs``.
    """

    def __init__(self, spec: dict, device: str = "auto", dtype: str = "auto", batch_size: int = 32,
                 provenance: Mapping[str, Any] | None = None, specs: Mapping[str, dict] | None = None,
                 provenances: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        import torch

        from medray.encoders import create_encoder, family_modality, spec_from_dict

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        if not specs:
            specs = {family_modality(spec["family"]): spec}
        self.encoders = {m: create_encoder(spec_from_dict(s), device=device, dtype=dtype) for m, s in specs.items()}
        self.primary = next(iter(self.encoders))
        self.encoder = self.encoders[self.primary]
        self.batch_size = int(batch_size)
        self.provenance = dict(provenance or {})
        self.provenances = {m: dict(p) for m, p in (provenances or {}).items()}
        # One encoder: a fixed-size embedding column, exactly as before; several: variable lists
        # that the sink types per encoder.
        self.fixed = len(self.encoders) == 1

    def _embed(self, items: list[tuple[str, np.ndarray]]) -> list[np.ndarray]:
        """Embed each (route, input) in batches of items that share an encoder and a shape."""
        out: list[np.ndarray | None] = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for k, (route, arr) in enumerate(items):
            groups.setdefault((route, arr.shape[1:], arr.dtype.str), []).append(k)
        for (route, _, _), ks in groups.items():
            encoder = self.encoders[route]
            flat = np.concatenate([items[k][1] for k in ks], axis=0)
            parts = [encoder.embed(flat[s:s + self.batch_size]) for s in range(0, len(flat), self.batch_size)]
            emb = np.concatenate(parts, axis=0).astype(np.float32, copy=False) if parts else \
                np.zeros((0, encoder.dim), np.float32)
            if not np.all(np.isfinite(emb)):
                raise EncodeError("model produced non-finite values")
            for k, e in zip(ks, np.split(emb, np.cumsum([len(items[k][1]) for k in ks])[:-1])):
                out[k] = e
        return out  # type: ignore[return-value]

    def __call__(self, table: pa.Table) -> pa.Table:
        from medray.platform.modalities import SEGMENT_FIELDS, pooled_segment

        n = table.num_rows
        status = table.column("status").to_pylist()
        pv = table.column("pixel_values").to_pylist()
        shapes = table.column("pixel_shape").to_pylist()
        names = table.column_names
        dtypes = table.column("pixel_dtype").to_pylist() if "pixel_dtype" in names else [None] * n
        routes = table.column("route").to_pylist() if "route" in names else [None] * n
        routes = [r or self.primary for r in routes]
        segs = table.column("segments").to_pylist() if "segments" in names else [None] * n
        pools = table.column("pool").to_pylist() if "pool" in names else [None] * n
        results: list[np.ndarray | BaseException | None] = [None] * n
        ok_idx = [i for i in range(n) if status[i] == "ok"]
        arrays = {}
        for i in ok_idx:
            if routes[i] not in self.encoders:
                results[i] = EncodeError(f"no encoder for modality '{routes[i]}' in this actor")
                continue
            arrays[i] = np.frombuffer(pv[i], dtype=np.dtype(dtypes[i] or "float32")).reshape(shapes[i])
        todo = [i for i in ok_idx if i in arrays]
        t0 = time.perf_counter()
        try:
            if todo:
                for i, emb in zip(todo, self._embed([(routes[i], arrays[i]) for i in todo])):
                    results[i] = emb
        except Exception:  # noqa: BLE001 - isolate the poison record(s)
            for i in todo:
                try:
                    results[i] = self._embed([(routes[i], arrays[i])])[0]
                except Exception as err:  # noqa: BLE001
                    results[i] = err if isinstance(err, RecordError) else EncodeError(
                        f"model failed ({type(err).__name__})")
        dt = (time.perf_counter() - t0) / max(1, sum(len(arrays[i]) for i in todo))

        seg_names = [f for f, _ in SEGMENT_FIELDS]
        index: list[int] = []
        new: dict[str, list] = {k: [] for k in ("frame", "n_frames", "embedding", "t_encode", *_STATUS_COLS,
                                                *seg_names)}

        def add(i: int, frame: Any, n_frames: Any, emb: Any, t: Any, q: Mapping[str, Any], seg: Mapping) -> None:
            index.append(i)
            new["frame"].append(frame)
            new["n_frames"].append(n_frames)
            new["embedding"].append(emb)
            new["t_encode"].append(t)
            for c in _STATUS_COLS:
                new[c].append(q.get(c))
            for c in seg_names:
                new[c].append(seg.get(c))

        ok_q = {"status": "ok"}
        frames_col = table.column("frames").to_pylist()
        for i in range(n):
            res = results[i]
            if status[i] == "ok" and isinstance(res, np.ndarray):
                frames = frames_col[i]
                items = json.loads(segs[i]) if segs[i] else [{"segment": "frame"}] * len(frames)
                for j, f in enumerate(frames):
                    # slide tiles are one record each; n_frames is the slide's tile count
                    add(i, int(f), items[j].get("n_items") or len(frames), res[j], dt, ok_q, items[j])
                if pools[i] == "mean" and len(frames):
                    add(i, -1, len(frames), res.mean(axis=0), 0.0, ok_q, pooled_segment(items))
                continue
            if status[i] == "ok":
                q = quarantine_fields(res if isinstance(res, BaseException) else EncodeError("no result"), "encode")
            else:
                q = {c: table.column(c)[i].as_py() for c in _STATUS_COLS}
            add(i, None, None, None, None, q, {})
        route_of = [routes[i] for i in index]
        emb_values = new.pop("embedding")
        if self.fixed:
            emb_type = pa.list_(pa.float32(), self.encoder.dim)
        else:
            emb_type = pa.list_(pa.float32())
        emb_col = pa.array([None if e is None else np.asarray(e, np.float32).tolist() for e in emb_values],
                           type=emb_type)
        out = _assemble(table, index, new, drop=("pixel_values", "pixel_shape", "pixel_dtype", "frames",
                                                  "segments", "pool", "tile"))
        out = out.append_column("embedding", emb_col)
        if "route" not in out.column_names:
            out = out.append_column("route", pa.array(route_of, pa.string()))
        for k, v in self.provenance.items():
            vals = [self.provenances.get(r, self.provenance).get(k, v) for r in route_of]
            out = out.append_column(k, pa.array(vals))
        # when this batch left the model: the summary's steady-state throughput comes from it
        return out.append_column("t_done", pa.array([time.time()] * out.num_rows, pa.float64()))


def plan_dataset(ds: Any, opts: StageOptions, *, encoder_spec: dict, provenance: Mapping[str, Any],
                 decode_concurrency: int | None, read_batch_size: int, decode_batch_size: int,
                 encode_batch_size: int, actors: tuple[int, int], num_gpus: float, device: str,
                 dtype: str, task_retries: int = 2, decode_num_cpus: float = 1.0,
                 actor_num_cpus: float = 1.0, encoder_specs: Mapping[str, dict] | None = None,
                 provenances: Mapping[str, Mapping[str, Any]] | None = None,
                 series_source: Any = None, slide_branch: bool = False) -> Any:
    """Chain the stages on a Ray Dataset of source records.

    With ``series_source`` (the same source records, ``series.mode`` on), CT/MR
    series slices are grouped by series in a branch of their own
    (:mod:`medray.platform.series_stage`) whose records join the decoded stream
    before the encoder pool. With ``slide_branch``, whole-slide images are read
    in a branch of their own whose tiles are spread over many decode tasks
    (without it they are still tiled, by the task that reads them).

    Decode/preprocess run as CPU tasks and the encoder as an actor pool, so the
    two scale independently. Retries are bounded (Ray Data retries actor tasks
    forever by default), and record-level failures never raise at all.
    """
    import warnings

    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    tasks = TaskPoolStrategy(size=decode_concurrency) if decode_concurrency else None
    main_read_batch = read_batch_size
    if series_source is not None:
        # Series slices are header-only reads on the main branch (their series' task reads the pixels):
        # larger read tasks there, or Ray's per-task cost is most of what the series mode costs.
        main_read_batch = max(read_batch_size, SERIES_MODE_READ_BATCH)
    with warnings.catch_warnings():
        # Bounded retries have no named parameter yet; Ray warns about ``**ray_remote_args``.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        source = ds
        slides = slide_branch and _slide_wanted(opts)
        ds = source.map_batches(read_batch, fn_kwargs={"opts": opts, "part": "main" if slides else "all"},
                                batch_format="pyarrow", compute=tasks, batch_size=main_read_batch,
                                num_cpus=decode_num_cpus, max_retries=task_retries)
        ds = ds.map_batches(decode_batch, fn_kwargs={"opts": opts}, batch_format="pyarrow", compute=tasks,
                            batch_size=decode_batch_size, num_cpus=decode_num_cpus, max_retries=task_retries)
        if slides:
            # Whole slides in a branch of their own: a read task expands a slide into its tissue tiles,
            # which a streaming repartition cuts into decode-sized blocks, so one large slide's tiles
            # are decoded by many tasks in parallel. (Read and decode fuse into one task on the main
            # branch; a repartition there halved image throughput on 2 cores, and the branch itself
            # costs ~7 s of fixed start-up there, hence only when the inputs may hold slides.)
            tiles = source.map_batches(read_batch, fn_kwargs={"opts": opts, "part": "slides"},
                                       batch_format="pyarrow", compute=tasks, batch_size=read_batch_size,
                                       num_cpus=decode_num_cpus, max_retries=task_retries)
            tiles = tiles.repartition(target_num_rows_per_block=decode_batch_size)
            tiles = tiles.map_batches(decode_batch, fn_kwargs={"opts": opts}, batch_format="pyarrow",
                                      compute=tasks, batch_size=decode_batch_size, num_cpus=decode_num_cpus,
                                      max_retries=task_retries)
            ds = ds.union(tiles)
        if series_source is not None:
            from medray.platform.series_stage import plan_series_branch

            ds = ds.union(plan_series_branch(series_source, opts, batch_size=read_batch_size,
                                             num_cpus=decode_num_cpus, task_retries=task_retries))
        ds = ds.map_batches(
            EncoderActor,
            fn_constructor_kwargs={"spec": encoder_spec, "device": device, "dtype": dtype,
                                   "batch_size": encode_batch_size, "provenance": dict(provenance),
                                   "specs": dict(encoder_specs) if encoder_specs else None,
                                   "provenances": dict(provenances) if provenances else None},
            batch_format="pyarrow", batch_size=encode_batch_size,
            compute=ActorPoolStrategy(min_size=actors[0], max_size=actors[1]),
            num_gpus=num_gpus or None, num_cpus=actor_num_cpus,
            max_restarts=task_retries, max_task_retries=task_retries,
        )
    return ds


