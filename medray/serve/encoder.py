"""The encoder deployment: decode off the event loop, embed items in dynamic batches.

One replica loads one encoder (GPU when the replica has one). A request is
raw bytes or an allowed object-storage URI; it is routed by content and
decoded and preprocessed with the functions the batch job uses
(:func:`decode_input`), in a thread pool: an image becomes its frames, a
recording its windows, a report its token chunks. The items join a
``@serve.batch`` queue shared by every request on the replica. The forward pass runs in its own
thread, so the event loop keeps accepting and decoding while the model works.

Bad input never raises out of a handle call: :meth:`EncoderDeployment.embed`
returns ``{"error": {...}}`` with the :class:`~medray.platform.errors.RecordError`
class and its PHI-free message, and the ingress maps it to an HTTP status.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import secrets
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import numpy as np
from ray import serve

from medray.encoders import family_modalities, get_spec
from medray.pipeline.options import StageOptions, decode_options
from medray.pipeline.stages import format_options
from medray.platform.decoders import DecodeLimits, check_size
from medray.platform.decoders.dicom_wsi import read_dicomweb_wsi_patches
from medray.platform.dicomweb import fetch_instance, fetch_url
from medray.platform.errors import DecodeError, EncodeError, LimitExceeded, ReadError, RecordError, UnsupportedFormat
from medray.platform.formats import PrepareContext, detect, pooled_segment, prepare_record
from medray.platform.storage import open_fs, read_bytes
from medray.serve.config import uri_allowed
from medray.serve.engine import choose_engine, create_runner
from medray.serve.ood import OODMonitor

__all__ = ["DecodeSettings", "DecodedInput", "decode_input", "EncoderDeployment", "InReplicaEncoder", "replica_tag"]

log = logging.getLogger("ray.serve.medray.encoder")  # a "ray.serve" child: lines carry the request id


class _BatchParams(Protocol):
    """The batch knobs Ray documents on a ``@serve.batch`` method (its annotations give a plain callable)."""

    def set_max_batch_size(self, new_max_batch_size: int) -> None: ...


_MAX_BATCH = 16  # frames per forward pass until user_config says otherwise


@dataclass(frozen=True)
class DecodeSettings:
    """How a request becomes frames; the ``decode:`` section plus serving limits."""

    frames: Any = "all"
    windows: Mapping[str, Any] = field(default_factory=dict)
    prefer_file_voi: bool = True
    allow_burned_in: bool = False
    max_bytes: int = 1 << 30
    max_pixels: int = 1_000_000_000
    max_frames: int = 256
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    allowed_uri_prefixes: tuple = ()
    audio: Mapping[str, Any] = field(default_factory=dict)
    text: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_conf(
        cls,
        decode: Any,
        *,
        max_frames: int,
        storage_options: Mapping[str, Any],
        allowed_uri_prefixes: Any,
        audio: Mapping[str, Any] | None = None,
        text: Mapping[str, Any] | None = None,
    ) -> DecodeSettings:
        """Build from a :class:`medray.config.DecodeConf` (or its dict) and the ``audio:``/``text:`` sections."""
        d = decode if isinstance(decode, Mapping) else decode.__dict__
        return cls(
            frames=d.get("frames", "all"),
            windows=dict(d.get("windows") or {}),
            prefer_file_voi=bool(d.get("prefer_file_voi", True)),
            allow_burned_in=bool(d.get("allow_burned_in", False)),
            max_bytes=int(d.get("max_bytes", 1 << 30)),
            max_pixels=int(d.get("max_pixels", 1_000_000_000)),
            max_frames=int(max_frames),
            storage_options=dict(storage_options or {}),
            allowed_uri_prefixes=tuple(allowed_uri_prefixes or ()),
            audio=dict(audio or {}),
            text=dict(text or {}),
        )


@dataclass
class DecodedInput:
    """Model input of one request: ``pixels`` holds one item per row.

    Images: float32 frames ``(F, C, H, W)``; audio: windows; text: token
    chunks. ``segments`` gives each item's provenance (as the columns
    ``medray embed`` writes: ``segment``, ``start_s``/``end_s``,
    ``token_start``/``token_end``, ...); ``None`` for image frames.
    ``pool == "mean"`` asks for a pooled embedding over the items.
    """

    pixels: np.ndarray
    frames: list
    modality: str
    segments: list | None = None
    pool: str = "none"


def _fetch_web(payload: Mapping[str, Any], settings: DecodeSettings) -> tuple[bytes, str]:
    """A DICOMweb instance (``dicomweb_uri``) or an image on a web server (``url``), with the
    caller's credential (``credential``) for this request only."""
    key, what = ("dicomweb_uri", "DICOMweb URI") if payload.get("dicomweb_uri") is not None else ("url", "image URL")
    uri = str(payload[key])
    if not uri_allowed(uri, list(settings.allowed_uri_prefixes)):
        raise ReadError(f"{what} is not under an allowed prefix (serve.inputs.allowed_uri_prefixes)")
    credential = payload.get("credential")
    try:
        if key == "dicomweb_uri":
            return fetch_instance(uri, settings.max_bytes, credential), "input.dcm"
        return fetch_url(uri, settings.max_bytes, credential), _extension(uri)
    except RecordError:
        raise
    except Exception as err:  # noqa: BLE001 - connection errors: the class only (the URL holds UIDs)
        raise ReadError(f"cannot fetch the {what} ({type(err).__name__})") from None


def _fetch(payload: Mapping[str, Any], settings: DecodeSettings) -> tuple[bytes, str]:
    """The request's bytes and a format hint (an extension only: file names may hold PHI)."""
    if payload.get("dicomweb_uri") is not None or payload.get("url") is not None:
        return _fetch_web(payload, settings)
    if payload.get("uri") is not None:
        uri = str(payload["uri"])
        if not uri_allowed(uri, list(settings.allowed_uri_prefixes)):
            raise ReadError("URI is not under an allowed prefix (serve.inputs.allowed_uri_prefixes)")

        try:
            fs, path = open_fs(uri, settings.storage_options)
        except Exception as err:  # noqa: BLE001 - a malformed URI is the caller's error
            raise ReadError(f"cannot open URI ({type(err).__name__})") from None
        return read_bytes(fs, path, settings.max_bytes), _extension(uri)
    data = payload.get("data")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ReadError("request carries no bytes")
    return bytes(data), _extension(str(payload.get("name") or ""))


def _extension(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return "input" + (base[base.rfind(".") :].lower()[:8] if "." in base else "")


def decode_input(
    payload: Mapping[str, Any],
    settings: DecodeSettings,
    preprocessor: Any,
    *,
    salt: str = "",
    modality: str | Sequence[str] = "image",
) -> DecodedInput:
    """Route, decode and preprocess one request exactly as ``medray embed`` does.

    Args:
        payload: ``{"data": bytes, "name": str}``, ``{"uri": "s3://..."}``,
            ``{"dicomweb_uri": ..., "credential": token | None}`` or ``{"url": "https://..."}``;
            optionally ``"window": (center, width)`` (used before the file's, for every
            modality) and ``"patches": [(x, y, width, height), ...]`` (image inputs:
            one item per patch of the first frame, instead of one per frame).
        settings: decode options and limits.
        preprocessor: the encoder (or its :class:`~medray.encoders.Preprocessor`).
        salt: patient-key salt (the key is never returned by the server).
        modality: what the served encoder embeds (``image``, ``audio`` or
            ``text``; an image-text encoder: ``("image", "text")``); content of
            another modality is refused (415).

    Returns:
        The preprocessed items (frames, windows or chunks).

    Raises:
        RecordError: unreadable, undecodable, of another modality or over a
            limit; the message carries no PHI.
    """
    image_endpoint = "image" in ((modality,) if isinstance(modality, str) else tuple(modality))
    if payload.get("patches") and payload.get("dicomweb_uri") is not None and image_endpoint:
        slide = _slide_patches_input(payload, settings, preprocessor)
        if slide is not None:  # a whole-slide instance: only the frames under the patches are fetched
            return slide
    # The batch job's own StageOptions -> format options mapping, so that windows, frame
    # selection and limits are read exactly as `medray embed` reads them.
    data, name = _fetch(payload, settings)
    windows = {k: list(v) for k, v in settings.windows.items()}
    prefer_file_voi = settings.prefer_file_voi
    if payload.get("window") is not None:  # the caller's window wins over the file's and the configured ones
        windows, prefer_file_voi = {"*": [float(v) for v in payload["window"]]}, False
    stage = StageOptions(
        max_bytes=settings.max_bytes,
        max_pixels=settings.max_pixels,
        frames=settings.frames,
        windows=windows,
        prefer_file_voi=prefer_file_voi,
        allow_burned_in=settings.allow_burned_in,
        audio=dict(settings.audio),
        text=dict(settings.text),
    )
    dicom, limits = decode_options(stage)
    check_size(data, limits)
    fmt, route = detect(data, name)
    if route == "slide":
        raise UnsupportedFormat(
            "a whole slide is too large for one request: send patch_coordinates_list with a DICOMweb URI of "
            "one of its levels, or embed the slide with `medray embed`"
        )
    if route == "other":
        raise UnsupportedFormat(
            "DICOM object without pixel data or report text (e.g. RTSTRUCT, presentation state); nothing to embed"
        )
    allowed = (modality,) if isinstance(modality, str) else tuple(modality)
    ctx = PrepareContext(
        name=name,
        route=route,
        preprocessors={m: preprocessor for m in allowed},
        options=format_options(stage, dicom),
        limits=limits,
        salt=salt,
    )
    # a format may embed its records with another encoder (an enhanced CT's frames on an image endpoint)
    route = fmt.resolve_route(route, ctx) if route not in allowed else route
    if route not in allowed:
        raise UnsupportedFormat(f"this endpoint's encoder embeds {' and '.join(allowed)} inputs; the input is {route}")
    ctx = dataclasses.replace(ctx, route=route)
    if payload.get("patches"):
        return _patches_input(data, ctx, fmt, payload["patches"], preprocessor, settings)
    _, prepared = prepare_record(data, ctx, fmt)
    n = len(prepared.inputs)
    what, hint = _ITEMS.get(route, ("items", "send a smaller input"))
    _check_items(n, settings, what, hint)
    items = prepared.items if prepared.items is not None else list(range(n))
    if prepared.segments is None:
        return DecodedInput(np.ascontiguousarray(prepared.inputs, dtype=np.float32), items, prepared.modality)
    return DecodedInput(
        np.ascontiguousarray(prepared.inputs),
        items,
        prepared.modality,
        segments=prepared.segments,
        pool=prepared.pool,
    )


def _slide_patches_input(
    payload: Mapping[str, Any], settings: DecodeSettings, preprocessor: Any
) -> DecodedInput | None:
    """HAI-DEF patches of a DICOMweb whole-slide instance (``None``: the instance is no slide)."""
    uri = str(payload["dicomweb_uri"])
    if not uri_allowed(uri, list(settings.allowed_uri_prefixes)):
        raise ReadError("DICOMweb URI is not under an allowed prefix (serve.inputs.allowed_uri_prefixes)")
    patches = [(int(p[0]), int(p[1]), int(p[2]), int(p[3])) for p in payload["patches"]]
    _check_items(len(patches), settings, "patches", "send fewer patches")
    limits = DecodeLimits(max_bytes=settings.max_bytes, max_pixels=settings.max_pixels)
    try:
        crops = read_dicomweb_wsi_patches(
            uri,
            patches,
            credential=payload.get("credential"),
            limits=limits,
        )
    except RecordError:
        raise
    except Exception as err:  # noqa: BLE001 - connection errors: the class only (the URL holds UIDs)
        raise ReadError(f"cannot read the slide's patches ({type(err).__name__})") from None
    if crops is None:
        return None
    return _crops_input(crops, preprocessor, "SM")


def _patches_input(
    data: bytes, ctx: PrepareContext, fmt: Any, patches: Any, preprocessor: Any, settings: DecodeSettings
) -> DecodedInput:
    """One item per rectangle ``(x, y, width, height)`` of the first frame, as a viewer shows it."""
    if fmt.decode is None:
        raise UnsupportedFormat(f"patch coordinates apply to images; this input is {fmt.name}")
    _check_items(len(patches), settings, "patches", "send fewer patches")
    decoded = fmt.decode(data, ctx)
    if not decoded.frames:
        raise RecordError("no frames selected", stage="decode")
    frame = decoded.frames[0].image
    height, width = frame.shape[:2]
    crops = []
    for x, y, w, h in patches:
        if x < 0 or y < 0 or w < 1 or h < 1 or x + w > width or y + h > height:
            raise DecodeError(f"patch ({x}, {y}, {w}, {h}) lies outside the {width}x{height} image")
        crops.append(np.ascontiguousarray(frame[y : y + h, x : x + w]))
    return _crops_input(crops, preprocessor, decoded.modality)


def _crops_input(crops: list[np.ndarray], preprocessor: Any, modality: str) -> DecodedInput:
    """Patches through the encoder's preprocessing, one item each."""
    try:
        pixels = preprocessor.preprocess(crops)
    except RecordError:
        raise
    except Exception as err:  # noqa: BLE001 - processors raise anything; the class name is the message
        raise RecordError(f"preprocessing failed ({type(err).__name__})", stage="preprocess") from None
    return DecodedInput(np.ascontiguousarray(pixels, dtype=np.float32), list(range(len(crops))), modality)


#: What a route's items are called in a limit error, and how to need fewer.
_ITEMS = {
    "image": ("frames", "select frames with decode.frames"),
    "audio": ("windows", "lengthen audio.window_s"),
    "text": ("chunks", "send a shorter document"),
}


def _check_items(n: int, settings: DecodeSettings, what: str, hint: str) -> None:
    if n > settings.max_frames:
        raise LimitExceeded(
            f"input has {n} {what}, over serve.limits.max_frames={settings.max_frames}; {hint} or raise the limit"
        )


def error_result(err: BaseException) -> dict:
    """``{"error": {class, stage, message}}`` for a failed input (message PHI-free).

    An exception that is not a :class:`RecordError` is logged by type and
    code location only: library messages may quote header values.
    """
    if isinstance(err, RecordError):
        return {"error": {"class": type(err).__name__, "stage": err.stage, "message": str(err)}}
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}" if tb is not None else "?"
    log.warning("unexpected %s at %s while decoding an input", type(err).__name__, where)
    return {
        "error": {
            "class": "DecodeError",
            "stage": "decode",
            "message": f"input could not be decoded ({type(err).__name__})",
        }
    }


def replica_tag() -> str:
    """This replica's unique id (``"local"`` outside Serve)."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001
        return "local"


class EncoderDeployment:
    """Serve deployment body: one encoder, dynamic batches of frames.

    Args:
        encoder: the encoder spec (``encoder:`` section as a dict).
        settings: decode options and limits.
        device: ``auto`` (CUDA when this replica got a GPU), ``cpu`` or ``cuda``.
        dtype: ``auto`` (bf16 autocast on GPU), ``float32``, ``bfloat16`` or ``float16``.
        torch_threads: intra-op threads; ``None``: the replica's CPUs.
        decode_threads: threads decoding requests.
        num_cpus: the replica's CPU reservation (sizes ``torch_threads``).
        ood: ``serve.ood`` as a dict: score each answer against its reference (see :mod:`medray.serve.ood`).

    ``user_config`` (``max_batch_size``, ``batch_wait_timeout_s``) is applied
    by :meth:`reconfigure`, so batching can change without a restart.
    """

    def __init__(
        self,
        encoder: dict,
        settings: DecodeSettings,
        *,
        device: str = "auto",
        dtype: str = "auto",
        torch_threads: int | None = None,
        decode_threads: int = 2,
        num_cpus: float = 1.0,
        ood: Mapping[str, Any] | None = None,
        engine: str = "auto",
    ) -> None:
        import torch

        threads = torch_threads or max(1, int(round(num_cpus)))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        spec = get_spec(dict(encoder))
        self._modality = family_modalities(spec.family)  # an image-text encoder: image and text
        self._engine = choose_engine(engine, device, threads)
        # In `process` mode no thread of this process runs a multi-threaded region (see engine.py).
        model_threads = threads if self._engine == "thread" else 1
        torch.set_num_threads(model_threads)
        self._runner, self._preprocessor = create_runner(
            dict(encoder), engine=self._engine, device=device, dtype=dtype, threads=threads
        )
        self._settings = settings
        self._ident = {k: v for k, v in self._runner.describe().items() if k != "checkpoint"}
        self._ident["device"] = device
        self._replica = replica_tag()
        self._ood = OODMonitor.from_conf(ood, settings.storage_options, encoder=self._ident)
        self._salt = secrets.token_hex(16)  # patient keys are computed by the decoder but never leave
        # OpenMP's thread count is per thread and starts from OMP_NUM_THREADS, which Ray sets to the
        # replica's num_cpus: set it inside each pool thread, or the model runs on fewer cores than asked.
        self._decode_pool = ThreadPoolExecutor(
            max(1, int(decode_threads)),
            thread_name_prefix="medray-decode",
            initializer=torch.set_num_threads,
            initargs=(1,),
        )
        self._model_pool = ThreadPoolExecutor(
            1, thread_name_prefix="medray-model", initializer=torch.set_num_threads, initargs=(model_threads,)
        )
        self._batches = 0
        self._frames = 0
        self._decoding = 0  # requests in the decode pool now (the adaptive batch wait reads it)
        self._ready = 0  # decoded requests not yet handed to the model (direct or batch queue)
        self._inflight = 0  # requests handed to the model (direct or batch queue) and not yet answered
        self._decoded: asyncio.Event | None = None  # set when a request finishes decoding (see _gate)
        self._batch_wait_s = 0.005  # the configured wait; reconfigure() sets it
        self._max_batch = _MAX_BATCH  # the configured batch; reconfigure() sets it
        # Open while no batch runs. Ray Serve 2.60 forms the next batch as soon as one is
        # handed to the model (and parks it until the model is free), so under load batches
        # would only hold what arrives within batch_wait_timeout_s. Frames wait here instead
        # while the model works, then enter the batch queue together: batches grow with load.
        self._model_idle: asyncio.Event | None = None
        log.info(
            "encoder %s ready on %s (dim %d, %d torch threads, %s engine)",
            self._ident["name"],
            device,
            self._runner.dim,
            threads,
            self._engine,
        )

    def reconfigure(self, config: Mapping[str, Any]) -> None:
        """Apply ``user_config``: ``max_batch_size``, ``batch_wait_timeout_s``."""
        batching = cast(_BatchParams, self._embed_frames)
        if "max_batch_size" in config:
            self._max_batch = int(config["max_batch_size"])
            batching.set_max_batch_size(self._max_batch)
        if "batch_wait_timeout_s" in config:  # read by _gate; the batch queue itself never waits
            self._batch_wait_s = float(config["batch_wait_timeout_s"])

    async def describe(self) -> dict:
        """What identifies this encoder's output (name, dim, weights and preprocessing hashes)."""
        return dict(self._ident)

    async def stats(self) -> dict:
        """Batches and frames embedded by this replica so far."""
        return {
            "replica": self._replica,
            "batches": self._batches,
            "frames": self._frames,
            "max_batch_size": self._max_batch,
        }

    async def embed(self, payload: dict) -> dict:
        """Embed one input.

        Args:
            payload: ``{"data": bytes, "name": str}`` or ``{"uri": "s3://..."}``.

        Returns:
            ``{"embeddings": float32 (F, dim), "frames", "modality", "encoder", "batch_size",
            "replica", "timings"}`` (``timings``: ``decode_s``, ``gate_s``, ``batch_wait_s``,
            ``forward_s``, ``ood_s`` (``serve.ood`` on), ``replica_s``; audio and text add
            ``segments`` and, when pooling, ``pooled``), or ``{"error": {"class", "stage", "message"}}``.
        """
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        self._decoding += 1
        try:
            decoded = await loop.run_in_executor(
                self._decode_pool,
                functools.partial(
                    decode_input, payload, self._settings, self._preprocessor, salt=self._salt, modality=self._modality
                ),
            )
        except Exception as err:  # noqa: BLE001 - bad input is an answer, not a crash
            out = error_result(err)
            log.info("input refused: %s (%s)", out["error"]["class"], out["error"]["stage"])
            return out
        finally:
            self._decoding -= 1
            if self._decoded is not None:  # wake the requests holding a batch open for this one
                self._decoded.set()
                self._decoded = None
        t1 = time.perf_counter()
        self._ready += 1
        try:
            await self._gate()
        finally:
            self._ready -= 1
        t2 = time.perf_counter()
        frames = list(decoded.pixels)
        alone = self._alone() and len(frames) <= self._max_batch
        self._inflight += 1
        try:
            if alone:
                # Nothing else to batch with (no other request decoding, waiting, queued or running):
                # the frames are one batch already, so they skip the batch queue.
                results = await self._run_batch(frames)
            else:
                results = await asyncio.gather(*(self._embed_frames(frame) for frame in frames))
        finally:
            self._inflight -= 1
        for res in results:
            if isinstance(res[0], BaseException):
                out = error_result(res[0])
                log.warning("encode failed: %s", out["error"]["message"])
                return out
        emb = np.stack([r[0] for r in results]).astype(np.float32, copy=False)
        started = max(r[2] for r in results)
        out = {
            "embeddings": emb,
            "frames": decoded.frames,
            "modality": decoded.modality,
            "encoder": dict(self._ident),
            "batch_size": max(r[1] for r in results),
            "replica": self._replica,
            # the request's timeline on this replica (seconds; see docs/serve.md "Where the time goes")
            "timings": {
                "decode_s": t1 - t0,  # thread-pool queue + decode + preprocess
                "gate_s": t2 - t1,  # waiting for the model to finish the previous batch
                "batch_wait_s": max(0.0, started - t2),  # in the @serve.batch queue
                "forward_s": max(r[3] for r in results),  # the batch's forward pass (model thread)
            },
        }
        if decoded.segments is not None:
            out["segments"] = decoded.segments
            if decoded.pool == "mean":  # the row `medray embed` writes with frame -1
                out["pooled"] = {"embedding": emb.mean(axis=0), **pooled_segment(decoded.segments)}
        if self._ood is not None:  # the record's embedding, as `medray drift` scores a stored record
            record = out["pooled"]["embedding"] if out.get("pooled") else emb.mean(axis=0)
            t3 = time.perf_counter()
            out["ood"] = await loop.run_in_executor(self._decode_pool, self._ood.observe, record)
            out["timings"]["ood_s"] = time.perf_counter() - t3
        out["timings"]["replica_s"] = time.perf_counter() - t0
        return out

    async def embed_texts(self, texts: list[str]) -> dict:
        """Text-tower embeddings of short texts (zero-shot prompts) of an image-text encoder.

        Returns:
            ``{"embeddings": float32 (N, dim), "encoder"}``, or ``{"error": {...}}``
            when the encoder has no text tower in its images' space.
        """
        if "text" not in self._modality or "image" not in self._modality:
            return error_result(
                UnsupportedFormat(f"encoder {self._ident['name']} is not an image-text encoder: it embeds no prompts")
            )
        loop = asyncio.get_running_loop()
        try:
            emb = await loop.run_in_executor(self._model_pool, self._runner.embed_text, list(texts))
        except Exception as err:  # noqa: BLE001 - a bad prompt is an answer, not a crash
            return error_result(
                err if isinstance(err, RecordError) else EncodeError(f"model failed ({type(err).__name__})")
            )
        return {"embeddings": np.asarray(emb, dtype=np.float32), "encoder": dict(self._ident)}

    async def _gate(self) -> None:
        """Wait until this request's frames may go to the model.

        While the model runs, frames wait here (not in the batch queue), so everything that arrived
        meanwhile forms the next batch. With the model idle, the batch is held open while other
        requests are being decoded on this replica, as long as each finishes decoding within
        ``batch_wait_timeout_s`` of the one before (so at most ``max_batch_size`` such gaps): a
        burst's requests share one forward pass instead of splitting into a small batch and a large
        one behind it. With nothing being decoded, nothing waits.
        """
        if self._model_idle is None:
            self._model_idle = asyncio.Event()
            self._model_idle.set()
        while True:
            await self._model_idle.wait()
            if self._decoding == 0 or self._ready >= self._max_batch or self._batch_wait_s <= 0:
                return
            if self._decoded is None:
                self._decoded = asyncio.Event()
            try:
                await asyncio.wait_for(self._decoded.wait(), self._batch_wait_s)
            except TimeoutError:
                return

    def _alone(self) -> bool:
        """True when no other request on this replica could join a batch now (and so the model is idle:
        only requests in flight run it)."""
        return self._decoding == 0 and self._ready == 0 and self._inflight == 0

    @serve.batch(max_batch_size=_MAX_BATCH, batch_wait_timeout_s=0.0)  # the wait is _gate's
    async def _embed_frames(self, frames: list) -> list:
        """One forward pass over frames from many requests (the batch queue's side).

        Returns:
            ``[(embedding | error, batch size, batch start (perf_counter), forward seconds)]``.
        """
        return await self._run_batch(frames)

    async def _run_batch(self, frames: list) -> list:
        """One forward pass over ``frames``; a frame the model cannot take fails alone.

        Returns:
            ``[(embedding | error, batch size, batch start (perf_counter), forward seconds)]``.
        """
        n = len(frames)
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        if self._model_idle is not None:
            self._model_idle.clear()
        try:
            try:
                emb = await loop.run_in_executor(self._model_pool, self._forward, np.stack(frames))
                forward = time.perf_counter() - started
                out = [(emb[i], n, started, forward) for i in range(n)]
            except Exception:  # noqa: BLE001 - isolate a poison frame instead of failing the whole batch
                out = []
                for frame in frames:
                    try:
                        one = await loop.run_in_executor(self._model_pool, self._forward, frame[None])
                        out.append((one[0], n, started, time.perf_counter() - started))
                    except Exception as err:  # noqa: BLE001
                        out.append(
                            (
                                err
                                if isinstance(err, RecordError)
                                else EncodeError(f"model failed ({type(err).__name__})"),
                                n,
                                started,
                                0.0,
                            )
                        )
        finally:
            if self._model_idle is not None:
                self._model_idle.set()
        self._batches += 1
        self._frames += n
        return out

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        emb = self._runner.embed(batch)
        if not np.all(np.isfinite(emb)):
            raise EncodeError("model produced non-finite values")
        return emb

    def check_health(self) -> None:
        """Serve's health check: the pools must still accept work."""
        if self._model_pool._shutdown or self._decode_pool._shutdown:  # noqa: SLF001
            raise RuntimeError("encoder replica is shutting down")
        if not self._runner.alive():
            raise RuntimeError("the encoder's model process has exited")

    def __del__(self) -> None:
        for pool in (getattr(self, "_decode_pool", None), getattr(self, "_model_pool", None)):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        runner = getattr(self, "_runner", None)
        if runner is not None:
            runner.close()


class _LocalMethod:
    """``handle.method`` of an :class:`InReplicaEncoder`: ``.remote(...)`` is the awaitable call."""

    def __init__(self, method: Any) -> None:
        self._method = method

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self._method(*args, **kwargs)


class InReplicaEncoder:
    """An encoder that runs inside the calling replica, called like its deployment's handle.

    ``serve.topology=fused``: the ingress builds the encoder in its own replica (:meth:`start`) and
    calls ``encoder.embed.remote(payload)`` as it would call the ``Encoder`` deployment's handle, minus
    the hop (a router decision, an actor call each way, pickling the bytes in and the array out).
    The object holds only the constructor's arguments until :meth:`start`, so it travels as a bind
    argument; decoding, batching and the model engine are the deployment's own.

    Args:
        args, kwargs: what :class:`EncoderDeployment` takes.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._args = args
        self._kwargs = kwargs
        self._deployment: EncoderDeployment | None = None

    def start(self) -> EncoderDeployment:
        """Build the encoder in this process (once); returns it."""
        if self._deployment is None:
            self._deployment = EncoderDeployment(*self._args, **self._kwargs)
        return self._deployment

    def __getstate__(self) -> dict:
        return {"_args": self._args, "_kwargs": self._kwargs, "_deployment": None}

    def __getattr__(self, name: str) -> _LocalMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        if self._deployment is None:
            raise RuntimeError("InReplicaEncoder.start() was not called")
        return _LocalMethod(getattr(self._deployment, name))
