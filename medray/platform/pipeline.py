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

__all__ = ["StageOptions", "read_batch", "decode_batch", "EncoderActor", "INTERNAL_COLUMNS"]

#: Columns that live only inside the pipeline; the sink drops them.
INTERNAL_COLUMNS = ("data", "pixel_values", "pixel_shape", "frames", "status", "stage", "error_class",
                    "message", "t_read", "t_decode", "t_preprocess", "t_encode")


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
    "t_encode": pa.float64(),
}


def read_batch(table: pa.Table, opts: StageOptions) -> pa.Table:
    """Fetch the bytes of each record; expand archives into member records.

    Records whose id is in ``opts.done`` are dropped (resume). A record that
    cannot be read becomes an error row; one bad archive member never hides
    its neighbours.
    """
    index: list[int] = []
    cols: dict[str, list] = {k: [] for k in ("uri", "member", "record_id", "data", "t_read", *_STATUS_COLS)}

    def emit(i: int, uri: str, member: str, data: bytes | None, err: BaseException | None, dt: float) -> None:
        index.append(i)
        cols["uri"].append(uri)
        cols["member"].append(member)
        cols["record_id"].append(record_id(uri, member))
        cols["data"].append(data)
        cols["t_read"].append(dt)
        q = quarantine_fields(err, "read") if err is not None else {"status": "ok"}
        for c in _STATUS_COLS:
            cols[c].append(q.get(c))

    uris = table.column("uri").to_pylist()
    members = table.column("member").to_pylist() if "member" in table.column_names else [""] * len(uris)
    for i, (uri, member) in enumerate(zip(uris, members)):
        member = member or ""
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
            data = read_bytes(fs, path, opts.max_bytes)
            emit(i, uri, member, data, None, time.perf_counter() - t0)
        except RecordError as err:
            emit(i, uri, member, None, err, time.perf_counter() - t0)
        except Exception as err:  # noqa: BLE001 - e.g. a bad URI in a manifest
            emit(i, uri, member, None, err, time.perf_counter() - t0)
    return _assemble(table, index, cols)


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


def decode_batch(table: pa.Table, opts: StageOptions) -> pa.Table:
    """Decode each record's bytes and apply the encoder's own preprocessing.

    Output: one row per record with ``pixel_values`` (float32 ``(F, C, H, W)``
    as bytes, plus ``pixel_shape``), ``frames`` (source frame indices), the
    allow-listed ``metadata`` as JSON, ``patient_key`` and ``content_sha256``.
    The raw bytes are dropped here.
    """
    from medray.encoders import spec_to_dict
    from medray.platform.decoders import decode_bytes

    dicom_opts, limits = _decode_options(opts)
    pre = _preprocessor(json.dumps(spec_to_dict(opts.encoder_spec), sort_keys=True))
    n = table.num_rows
    new: dict[str, list] = {k: [None] * n for k in (
        "content_sha256", "modality", "patient_key", "metadata", "pixel_values", "pixel_shape", "frames",
        "t_decode", "t_preprocess", *_STATUS_COLS)}
    datas = table.column("data").to_pylist()
    status = table.column("status").to_pylist()
    members = table.column("member").to_pylist()
    uris = table.column("uri").to_pylist()
    for i in range(n):
        new["status"][i] = status[i]
        if status[i] != "ok":
            for c in _STATUS_COLS[1:]:
                new[c][i] = table.column(c)[i].as_py()
            continue
        data = datas[i] or b""
        new["content_sha256"][i] = hashlib.sha256(data).hexdigest()
        name = members[i] or uris[i]
        t0 = time.perf_counter()
        try:
            decoded = decode_bytes(data, name=name.rsplit("/", 1)[-1], dicom=dicom_opts, limits=limits, salt=opts.salt)
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
            new["frames"][i] = [int(f.frame) for f in decoded.frames]
        except Exception as err:  # noqa: BLE001 - every failure becomes a quarantine row
            q = quarantine_fields(err, "decode")
            for c in _STATUS_COLS:
                new[c][i] = q[c]
            new["pixel_values"][i] = None
    return _assemble(table, list(range(n)), new, drop=("data",))


class EncoderActor:
    """Ray Data actor: loads the encoder once, embeds batches of records.

    A batch that fails is retried record by record so that one poison record
    becomes a quarantine row instead of failing (and endlessly retrying) the
    whole batch.

    Args:
        spec: the encoder spec (dict form).
        device: ``cpu``, ``cuda`` or ``auto``.
        dtype: ``auto`` (bf16 on GPU), ``float32``, ``bfloat16`` or ``float16``.
        batch_size: frames per forward pass.
        provenance: columns stamped on every row (encoder, hashes, version).
    """

    def __init__(self, spec: dict, device: str = "auto", dtype: str = "auto", batch_size: int = 32,
                 provenance: Mapping[str, Any] | None = None) -> None:
        import torch

        from medray.encoders import create_encoder, spec_from_dict

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        self.encoder = create_encoder(spec_from_dict(spec), device=device, dtype=dtype)
        self.batch_size = int(batch_size)
        self.provenance = dict(provenance or {})

    def _embed(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        flat = np.concatenate(arrays, axis=0)
        outs = [self.encoder.embed(flat[s:s + self.batch_size]) for s in range(0, len(flat), self.batch_size)]
        emb = np.concatenate(outs, axis=0).astype(np.float32, copy=False)
        if not np.all(np.isfinite(emb)):
            raise EncodeError("model produced non-finite values")
        splits = np.cumsum([len(a) for a in arrays])[:-1]
        return np.split(emb, splits)

    def __call__(self, table: pa.Table) -> pa.Table:
        n = table.num_rows
        status = table.column("status").to_pylist()
        pv = table.column("pixel_values").to_pylist()
        shapes = table.column("pixel_shape").to_pylist()
        results: list[np.ndarray | BaseException | None] = [None] * n
        ok_idx = [i for i in range(n) if status[i] == "ok"]
        arrays = {i: np.frombuffer(pv[i], dtype=np.float32).reshape(shapes[i]) for i in ok_idx}
        t0 = time.perf_counter()
        try:
            if ok_idx:
                for i, emb in zip(ok_idx, self._embed([arrays[i] for i in ok_idx])):
                    results[i] = emb
        except Exception:  # noqa: BLE001 - isolate the poison record(s)
            for i in ok_idx:
                try:
                    results[i] = self._embed([arrays[i]])[0]
                except Exception as err:  # noqa: BLE001
                    results[i] = err if isinstance(err, RecordError) else EncodeError(
                        f"model failed ({type(err).__name__})")
        dt = (time.perf_counter() - t0) / max(1, sum(len(arrays[i]) for i in ok_idx))

        index: list[int] = []
        new: dict[str, list] = {k: [] for k in ("frame", "n_frames", "embedding", "t_encode", *_STATUS_COLS)}
        frames_col = table.column("frames").to_pylist()
        for i in range(n):
            res = results[i]
            if status[i] == "ok" and isinstance(res, np.ndarray):
                frames = frames_col[i]
                for j, f in enumerate(frames):
                    index.append(i)
                    new["frame"].append(int(f))
                    new["n_frames"].append(len(frames))
                    new["embedding"].append(res[j])
                    new["t_encode"].append(dt)
                    new["status"].append("ok")
                    for c in _STATUS_COLS[1:]:
                        new[c].append(None)
                continue
            index.append(i)
            new["frame"].append(None)
            new["n_frames"].append(None)
            new["embedding"].append(None)
            new["t_encode"].append(None)
            if status[i] == "ok":
                q = quarantine_fields(res if isinstance(res, BaseException) else EncodeError("no result"), "encode")
            else:
                q = {c: table.column(c)[i].as_py() for c in _STATUS_COLS}
            for c in _STATUS_COLS:
                new[c].append(q[c])
        dim = self.encoder.dim
        emb_type = pa.list_(pa.float32(), dim)
        emb_col = pa.array([None if e is None else e.tolist() for e in new.pop("embedding")], type=emb_type)
        out = _assemble(table, index, new, drop=("pixel_values", "pixel_shape", "frames"))
        out = out.append_column("embedding", emb_col)
        for k, v in self.provenance.items():
            out = out.append_column(k, pa.array([v] * out.num_rows))
        return out


def plan_dataset(ds: Any, opts: StageOptions, *, encoder_spec: dict, provenance: Mapping[str, Any],
                 decode_concurrency: int | None, read_batch_size: int, decode_batch_size: int,
                 encode_batch_size: int, actors: tuple[int, int], num_gpus: float, device: str,
                 dtype: str, task_retries: int = 2, decode_num_cpus: float = 1.0,
                 actor_num_cpus: float = 1.0) -> Any:
    """Chain the stages on a Ray Dataset of source records.

    Decode/preprocess run as CPU tasks and the encoder as an actor pool, so the
    two scale independently. Retries are bounded (Ray Data retries actor tasks
    forever by default), and record-level failures never raise at all.
    """
    import warnings

    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    tasks = TaskPoolStrategy(size=decode_concurrency) if decode_concurrency else None
    with warnings.catch_warnings():
        # Bounded retries have no named parameter yet; Ray warns about ``**ray_remote_args``.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        ds = ds.map_batches(read_batch, fn_kwargs={"opts": opts}, batch_format="pyarrow", compute=tasks,
                            batch_size=read_batch_size, num_cpus=decode_num_cpus, max_retries=task_retries)
        ds = ds.map_batches(decode_batch, fn_kwargs={"opts": opts}, batch_format="pyarrow", compute=tasks,
                            batch_size=decode_batch_size, num_cpus=decode_num_cpus, max_retries=task_retries)
        ds = ds.map_batches(
            EncoderActor,
            fn_constructor_kwargs={"spec": encoder_spec, "device": device, "dtype": dtype,
                                   "batch_size": encode_batch_size, "provenance": dict(provenance)},
            batch_format="pyarrow", batch_size=encode_batch_size,
            compute=ActorPoolStrategy(min_size=actors[0], max_size=actors[1]),
            num_gpus=num_gpus or None, num_cpus=actor_num_cpus,
            max_restarts=task_retries, max_task_retries=task_retries,
        )
    return ds


