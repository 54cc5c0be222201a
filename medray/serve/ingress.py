"""The HTTP ingress: FastAPI routes, auth, limits and error mapping, nothing else.

Routes (OpenAPI at ``/docs``)::

    POST /v1/embeddings        upload (multipart ``file``), raw body (application/dicom,
                               image/png, image/jpeg, audio/wav, audio/flac, audio/ogg,
                               text/plain, application/octet-stream) or JSON
                               {"bytes_b64": ...} | {"uri": "s3://..."} | {"text": ...}
                               | {"dicomweb_uri": "https://.../instances/<uid>", "access_credential"?: token}
    POST /v1/predict/{head}    the same inputs; the head's label probabilities
    POST /v1/zero_shot         the same inputs plus "labels" (and "prompts") in the JSON or the query:
                               class scores from an image-text encoder (see medray.serve.zeroshot)
    POST /v1/search            the stored records nearest to an image, a text or a record id
                               (serve.search.index; see medray.serve.search)
    GET  /v1/models            the encoder and the heads served
    GET  /healthz, /readyz     liveness; readiness (the encoder answers)
    POST /predict              Google HAI-DEF's format: {"instances": [...]} -> {"predictions": [...]}
                               (route from serve.haidef or AIP_PREDICT_ROUTE; see medray.serve.haidef)
    GET  /health               HAI-DEF / Vertex AI health (serve.haidef.health_route or AIP_HEALTH_ROUTE)

Every error is JSON ``{"code", "message", "request_id"}``: 400/422 malformed
request or undecodable input, 401 missing or wrong bearer token, 403 URI
outside the allowed prefixes, 404 unknown head, 409 head trained on other
encoder weights, 413 body or input over a limit, 415 unsupported media,
503 overloaded or a replica unavailable (with ``Retry-After``), 504 past the
request deadline. Messages never carry PHI: decoders' messages are
structural, and anything unexpected is reported by type only.
"""

# No `from __future__ import annotations`: FastAPI must see the route annotations
# (Request, ...) as objects once Serve has wrapped the methods.

import asyncio
import base64
import binascii
import dataclasses
import hmac
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

import medray
from medray.platform.errors import RecordError
from medray.platform.formats import detect_modality, media_types
from medray.platform.zeroshot import expand_prompts
from medray.serve.config import uri_allowed
from medray.serve.haidef import InstanceError, ParsedInstance, instance_error, parse_instances, prediction
from medray.serve.zeroshot import ZeroShotRequestError, zero_shot_answer, zero_shot_request

__all__ = [
    "ApiError",
    "IngressSettings",
    "Ingress",
    "api",
    "error_for_result",
    "read_body",
    "parse_input",
    "load_token",
    "check_bearer",
    "Timeline",
]

log = logging.getLogger("ray.serve.medray.ingress")  # a "ray.serve" child: lines carry the request id

#: Raw body media types and the file-name hint each gives the decoder (content decides; this only helps):
#: what the registered formats accept, plus untyped bytes.
RAW_TYPES = {**media_types(), "application/octet-stream": "input"}
_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "DICOM, PNG, JPEG, WAV/FLAC/OGG or UTF-8 text, as the encoder embeds",
                        }
                    },
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "bytes_b64": {"type": "string", "description": "the file, base64"},
                        "uri": {"type": "string", "description": "object-storage URI under an allowed prefix"},
                        "text": {"type": "string", "description": "a report (text encoders)"},
                    },
                }
            },
            **{
                t: {"schema": {"type": "string", "format": "binary"}}
                for t in ("application/dicom", "image/png", "image/jpeg", "audio/wav", "audio/flac", "audio/ogg")
            },
            "text/plain": {"schema": {"type": "string"}},
        },
    }
}

#: RecordError class -> (HTTP status, code).
_RECORD_ERRORS = {
    "UnsupportedFormat": (415, "unsupported_media"),
    "LimitExceeded": (413, "too_large"),
    "SkipRecord": (422, "not_embedded"),  # e.g. burned-in patient text (decode.allow_burned_in)
    "ReadError": (422, "unreadable"),
    "DecodeError": (422, "undecodable"),
    "PreprocessError": (422, "undecodable"),
    "EncodeError": (422, "unencodable"),
    "RecordError": (422, "undecodable"),
    "UnknownHead": (404, "unknown_head"),
    "HeadRefused": (409, "head_mismatch"),
    "HeadUnavailable": (503, "head_unavailable"),
}


_SEARCH_DISABLED = (
    "search is not enabled on this server: build an index with `medray index embeddings=<output of medray embed>` "
    "and serve it with serve.search.index=<that output>/index"
)


class ApiError(Exception):
    """An error answer: HTTP status, stable code, PHI-free message."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


@dataclass
class IngressSettings:
    """What the ingress enforces (from the ``serve:`` section)."""

    heads: list = field(default_factory=list)
    primary: str = "image"  # the modality of `encoder:`; others come from `encoders:`
    max_body_bytes: int = 64 << 20
    request_timeout_s: float = 60.0
    max_header_bytes: int = 16384
    max_json_depth: int = 64
    allowed_uri_prefixes: list = field(default_factory=list)
    haidef_enabled: bool = True
    predict_route: str = "/predict"  # AIP_PREDICT_ROUTE in the replica's environment wins
    health_route: str = "/health"  # AIP_HEALTH_ROUTE wins
    max_instances: int = 64
    patch_size: int = 224
    auth_enabled: bool = False
    token_env: str | None = "MEDRAY_SERVE_TOKEN"
    token_file: str | None = None


def load_token(settings: IngressSettings) -> str | None:
    """The bearer token, from ``token_file`` else ``token_env``; ``None`` when auth is off.

    Raises:
        RuntimeError: auth is on and no token is found (the replica refuses to start: fail closed).
    """
    if not settings.auth_enabled:
        return None
    token = ""
    if settings.token_file:
        try:
            with open(os.path.expanduser(settings.token_file)) as f:
                token = f.read().strip()
        except OSError as err:
            raise RuntimeError(f"serve.auth.token_file cannot be read ({type(err).__name__})") from None
    elif settings.token_env:
        token = os.environ.get(settings.token_env, "").strip()
    if not token:
        raise RuntimeError(f"serve.auth is enabled but no token was found (token_file or ${settings.token_env})")
    return token


def check_bearer(header: str | None, token: str | None) -> None:
    """Accept ``Authorization: Bearer <token>``; constant-time compare.

    Raises:
        ApiError: 401 when the header is missing or the token differs.
    """
    if token is None:
        return
    challenge = {"WWW-Authenticate": 'Bearer realm="medray"'}
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise ApiError(401, "unauthorized", "missing bearer token (Authorization: Bearer <token>)", challenge)
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(401, "unauthorized", "invalid bearer token", challenge)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit``.

    Content-Length is checked before a byte is read; without it (chunked
    uploads) the stream is counted as it arrives.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, "invalid_request", "Content-Length is not a number") from None
        if size > limit:
            raise ApiError(413, "too_large", f"body of {size} bytes is over serve.limits.max_body_bytes={limit}")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise ApiError(413, "too_large", f"body is over serve.limits.max_body_bytes={limit}")
    return bytes(buf)


async def parse_input(content_type: str, body: bytes, settings: IngressSettings) -> dict:
    """Turn a request body into the encoder's payload: ``{"data", "name"}`` or ``{"uri"}``.

    Raises:
        ApiError: 415 unsupported content type, 422 malformed body, 403 URI not allowed.
    """
    ctype = (content_type or "").split(";", 1)[0].strip().lower()
    if ctype == "multipart/form-data":
        return await _parse_multipart(content_type, body)
    if ctype == "application/json" or ctype.endswith("+json"):
        return await _parse_json(body, settings)
    if ctype in RAW_TYPES:
        if not body:
            raise ApiError(422, "invalid_request", "empty body")
        return {"data": body, "name": RAW_TYPES[ctype]}
    raise ApiError(
        415,
        "unsupported_media",
        f"unsupported Content-Type {ctype or '(none)'}; send multipart/form-data (field 'file'), "
        f'application/json ({{"bytes_b64"}}, {{"uri"}} or {{"text"}}) or one of '
        f"{', '.join(RAW_TYPES)}",
    )


async def _parse_multipart(content_type: str, body: bytes) -> dict:
    from starlette.datastructures import Headers, UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream():
        yield body
        yield b""

    try:
        form = await MultiPartParser(
            Headers({"content-type": content_type}), stream(), max_files=1, max_fields=16
        ).parse()
    except MultiPartException as err:
        raise ApiError(422, "invalid_request", f"malformed multipart body ({err.message})") from None
    except Exception as err:  # noqa: BLE001
        raise ApiError(422, "invalid_request", f"malformed multipart body ({type(err).__name__})") from None
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        upload = next((v for _, v in form.multi_items() if isinstance(v, UploadFile)), None)
    if upload is None:
        raise ApiError(422, "invalid_request", "multipart body has no file part; send it as field 'file'")
    data = await upload.read()
    await form.close()
    if not data:
        raise ApiError(422, "invalid_request", "the uploaded file is empty")
    return {"data": data, "name": upload.filename or ""}


def json_depth(body: bytes, limit: int) -> int:
    """The nesting depth of a JSON document without parsing it, or an upper bound of it that is <= ``limit``.

    Linear and in C: strings are cut out, then the running count of opening
    minus closing brackets is taken with numpy. A body with at most ``limit``
    brackets cannot be deeper: its bracket count is returned without a scan.
    """
    brackets = body.count(b"[") + body.count(b"{")
    if brackets <= limit:
        return brackets
    import numpy as np

    # escapes first (an escaped backslash, then an escaped quote), so every '"' left opens or closes a string
    arr = np.frombuffer(body.replace(b"\\\\", b"").replace(b'\\"', b""), dtype=np.uint8)
    quotes = np.flatnonzero(arr == ord('"'))
    opens = np.flatnonzero((arr == ord("[")) | (arr == ord("{")))
    closes = np.flatnonzero((arr == ord("]")) | (arr == ord("}")))
    opens = opens[np.searchsorted(quotes, opens) % 2 == 0]  # outside strings: an even number of quotes before
    closes = closes[np.searchsorted(quotes, closes) % 2 == 0]
    where = np.concatenate([opens, closes])
    step = np.concatenate([np.ones(len(opens), np.int64), -np.ones(len(closes), np.int64)])
    return int(np.cumsum(step[np.argsort(where, kind="stable")]).max(initial=0))


async def _load_json(body: bytes, settings: IngressSettings) -> Any:
    """The parsed JSON body, its depth checked before parsing.

    Raises:
        ApiError: 422 ``too_deep`` or ``invalid_request``.
    """
    if json_depth(body, settings.max_json_depth) > settings.max_json_depth:
        raise ApiError(
            422, "too_deep", f"JSON nested deeper than serve.limits.max_json_depth={settings.max_json_depth}"
        )
    try:
        return await asyncio.to_thread(json.loads, body) if len(body) > (1 << 20) else json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(422, "invalid_request", "body is not valid JSON") from None
    except RecursionError:  # deeper than Python's parser goes, if the limit is set that high
        raise ApiError(422, "too_deep", "JSON body is nested too deeply") from None


async def _parse_json(body: bytes, settings: IngressSettings) -> dict:
    return await _payload_of(await _load_json(body, settings), settings)


async def _payload_of(doc: Any, settings: IngressSettings) -> dict:
    """The encoder payload of a parsed JSON body (``bytes_b64``, ``uri``, ``dicomweb_uri`` or ``text``)."""
    if not isinstance(doc, dict) or len({"bytes_b64", "uri", "text", "dicomweb_uri"} & set(doc)) != 1:
        raise ApiError(
            422,
            "invalid_request",
            'JSON body must hold exactly one of "bytes_b64", "uri", "dicomweb_uri" or "text"',
        )
    if "dicomweb_uri" in doc:
        return _dicomweb_payload(doc, settings)
    if "text" in doc:
        if not isinstance(doc["text"], str) or not doc["text"].strip():
            raise ApiError(422, "invalid_request", '"text" must be a non-empty string')
        return {"data": doc["text"].encode("utf-8"), "name": "input.txt"}
    if "uri" in doc:
        uri = doc["uri"]
        if not isinstance(uri, str) or not uri_allowed(uri, settings.allowed_uri_prefixes):
            raise _refuse_uri(settings)
        if uri.startswith("dicomweb+"):
            return {"dicomweb_uri": uri, "credential": None}
        if uri.startswith(("http://", "https://")):
            return {"url": uri}
        return {"uri": uri}
    text = doc["bytes_b64"]
    if not isinstance(text, str) or not text:
        raise ApiError(422, "invalid_request", '"bytes_b64" must be a non-empty base64 string')
    try:
        data = (
            await asyncio.to_thread(base64.b64decode, text, validate=True)
            if len(text) > (1 << 18)
            else base64.b64decode(text, validate=True)
        )
    except (binascii.Error, ValueError):
        raise ApiError(422, "invalid_request", '"bytes_b64" is not valid base64') from None
    return {"data": data, "name": str(doc.get("name") or "")}


_DICOMWEB_INSTANCE = re.compile(r"^(dicomweb\+)?https?://.+/studies/[0-9.]+/series/[0-9.]+/instances/[0-9.]+$")


def _refuse_uri(settings: IngressSettings) -> ApiError:
    return ApiError(
        403,
        "uri_not_allowed",
        "this URI is not under an allowed prefix (serve.inputs.allowed_uri_prefixes)"
        if settings.allowed_uri_prefixes
        else "URI inputs are disabled (serve.inputs.allowed_uri_prefixes is empty)",
    )


def _dicomweb_payload(doc: dict, settings: IngressSettings) -> dict:
    """``{"dicomweb_uri": ".../studies/<uid>/series/<uid>/instances/<uid>", "access_credential"?: token}``."""
    uri, credential = doc["dicomweb_uri"], doc.get("access_credential")
    if not isinstance(uri, str) or not _DICOMWEB_INSTANCE.match(uri):
        raise ApiError(
            422, "invalid_request", '"dicomweb_uri" is http(s)://<store>/studies/<uid>/series/<uid>/instances/<uid>'
        )
    if credential is not None and not (isinstance(credential, str) and re.match(r"^[A-Za-z0-9_\-.]+$", credential)):
        raise ApiError(422, "invalid_request", '"access_credential" must be a bearer token')
    if not uri_allowed(uri, settings.allowed_uri_prefixes):
        raise _refuse_uri(settings)
    return {"dicomweb_uri": uri, "credential": credential}


def error_for_result(result: dict) -> ApiError | None:
    """The :class:`ApiError` for a deployment's ``{"error": ...}`` result, else ``None``."""
    err = result.get("error") if isinstance(result, dict) else None
    if not err:
        return None
    status, code = _RECORD_ERRORS.get(err.get("class", ""), (422, "undecodable"))
    if "status" in err and "code" in err:  # a deployment that names its answer (search)
        status, code = int(err["status"]), str(err["code"])
    headers = {"Retry-After": "1"} if status == 503 else None
    return ApiError(status, code, str(err.get("message") or code), headers)


def error_for_exception(err: BaseException) -> ApiError:
    """Map a failed handle call to an answer (never the exception's own text)."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError

    if isinstance(err, ApiError):
        return err
    if isinstance(err, BackPressureError):
        return ApiError(503, "overloaded", "the server is at capacity; retry shortly", {"Retry-After": "1"})
    if isinstance(err, (asyncio.TimeoutError, TimeoutError)):
        return ApiError(504, "timeout", "the request did not finish within serve.limits.request_timeout_s")
    if isinstance(err, (RayActorError, DeploymentUnavailableError, RequestCancelledError)):
        return ApiError(503, "unavailable", "a model replica became unavailable; retry", {"Retry-After": "1"})
    # anything else: this request failed, the service did not (4xx, 503 or 504 only, never a bare 500)
    return ApiError(503, "internal", f"the request failed ({type(err).__name__}); retry", {"Retry-After": "1"})


def _request_id(request: Request) -> str:
    rid = request.headers.get("x-request-id")
    if rid:
        return rid
    try:
        return serve.context._get_serve_request_context().request_id or ""  # noqa: SLF001
    except Exception:  # noqa: BLE001
        return ""


class Timeline:
    """One request's stages on the ingress, as ``time.perf_counter`` deltas, sent as ``Server-Timing``.

    Cheap (a dict of floats, no extra request): :meth:`mark` closes the stage that ran since the
    previous mark; :meth:`add` records a duration measured elsewhere (the encoder replica's
    ``timings``). :meth:`header` gives the standard ``Server-Timing`` value, durations in
    milliseconds, ``total`` last. Stages (``docs/serve.md``, "Where the time goes"): ``read``,
    ``parse``, ``route``, ``handle`` (the awaited handle call: ``hop`` + ``replica``), ``hop``
    (the call's transport both ways: router, Ray, pickling), ``replica`` (on the encoder, which is
    ``decode`` + ``gate`` + ``batch`` + ``forward`` + ``ood`` (when ``serve.ood`` is on) + the
    rest), ``serialize`` (answer to JSON bytes).
    """

    __slots__ = ("start", "last", "stages")

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.stages: dict[str, float] = {}

    def mark(self, stage: str) -> None:
        """Close ``stage``: the time since the previous mark (or the start) is added to it."""
        now = time.perf_counter()
        self.stages[stage] = self.stages.get(stage, 0.0) + now - self.last
        self.last = now

    def add(self, stage: str, seconds: float) -> None:
        """Record a duration measured elsewhere (it does not move the clock)."""
        self.stages[stage] = self.stages.get(stage, 0.0) + float(seconds)

    def add_replica(self, timings: Any) -> None:
        """The encoder replica's ``timings`` (seconds) of a handle call, and the hop around it."""
        if not isinstance(timings, dict):
            return
        for key, stage in _REPLICA_STAGES:
            if isinstance(timings.get(key), (int, float)):
                self.add(stage, timings[key])
        if "replica" in self.stages and "handle" in self.stages:
            self.stages["hop"] = max(0.0, self.stages["handle"] - self.stages["replica"])

    def header(self) -> str:
        """The ``Server-Timing`` header value: ``read;dur=0.05, ..., total;dur=12.3`` (ms)."""
        parts = [f"{k};dur={1000 * v:.2f}" for k, v in self.stages.items()]
        parts.append(f"total;dur={1000 * (time.perf_counter() - self.start):.2f}")
        return ", ".join(parts)


#: The encoder's ``timings`` keys and their Server-Timing names.
_REPLICA_STAGES = (
    ("decode_s", "decode"),
    ("gate_s", "gate"),
    ("batch_wait_s", "batch"),
    ("forward_s", "forward"),
    ("ood_s", "ood"),
    ("replica_s", "replica"),
)


def error_response(err: ApiError, request_id: str = "") -> JSONResponse:
    """The JSON answer for an :class:`ApiError`."""
    # The Serve proxy adds the X-Request-ID header to every response itself.
    return JSONResponse(
        {"code": err.code, "message": err.message, "request_id": request_id},
        status_code=err.status,
        headers=dict(err.headers),
    )


api = FastAPI(
    title="medray",
    version=medray.__version__,
    description="Embeddings and task-head predictions for medical images (DICOM, PNG, JPEG), "
    "health audio (WAV, FLAC, OGG) and clinical text, by the served encoder's modality.",
)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(ApiError(exc.status_code, code, str(exc.detail)), _request_id(request))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(ApiError(422, "invalid_request", "request does not match the API"), _request_id(request))


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unexpected %s", type(exc).__name__)
    err = ApiError(503, "internal", f"the request failed ({type(exc).__name__}); retry", {"Retry-After": "1"})
    return error_response(err, _request_id(request))


class _HeaderLimit:
    """431 for headers over ``serve.limits.max_header_bytes`` (uvicorn in Serve's proxy sets no such limit).

    A plain ASGI middleware: Starlette's ``@app.middleware("http")`` (BaseHTTPMiddleware) wraps
    every request and answer in extra tasks and streams, a measurable cost per request.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        # the app serving this request (Starlette puts it in the scope): Serve runs a copy of `api`
        limit = getattr(getattr(scope.get("app", api), "state", None), "max_header_bytes", None)
        if scope["type"] == "http" and limit is not None:
            if sum(len(k) + len(v) for k, v in scope.get("headers") or ()) > limit:
                msg = f"request headers are over serve.limits.max_header_bytes={limit}"
                err = ApiError(431, "headers_too_large", msg)
                await error_response(err, _request_id(Request(scope)))(scope, receive, send)
                return
        await self.app(scope, receive, send)


api.add_middleware(_HeaderLimit)


def _segment_entry(frame: int, emb: Any, seg: dict | None) -> dict:
    out = {"frame": int(frame), "embedding": emb.tolist()}
    if seg:
        out.update({k: v for k, v in seg.items() if v is not None})
    return out


def _embedding_body(res: dict) -> dict:
    segs = res.get("segments") or [None] * len(res["frames"])
    items = [_segment_entry(f, e, s) for f, e, s in zip(res["frames"], res["embeddings"], segs)]
    if res.get("pooled") is not None:  # as `medray embed` writes it: frame -1, segment "pooled"
        pooled = dict(res["pooled"])
        items.append(_segment_entry(-1, pooled.pop("embedding"), pooled))
    return {
        "encoder": res["encoder"].get("name"),
        "weights_hash": res["encoder"].get("weights_hash"),
        "preprocessing_hash": res["encoder"].get("preprocessing_hash"),
        "dim": res["encoder"].get("dim"),
        "untrained": bool(res["encoder"].get("untrained")),
        "modality": res.get("modality"),
        "embeddings": items,
        "batch_size": res.get("batch_size"),
        "replica": res.get("replica"),
        **({"ood": res["ood"]} if res.get("ood") is not None else {}),
    }


def _prediction_body(res: dict) -> dict:
    labels = res["labels"]
    return {
        "head": res["head"],
        "model_card_id": res["model_card_id"],
        "task": res["task"],
        "labels": labels,
        "predictions": [
            {"frame": int(f), "probabilities": {lab: float(p) for lab, p in zip(labels, row)}}
            for f, row in zip(res["frames"], res["probabilities"])
        ],
        "encoder": res["encoder"].get("name"),
        "weights_hash": res["encoder"].get("weights_hash"),
        "replica": res.get("replica"),
    }


_OK = {"status": "ok"}
#: How long /v1/models reuses the encoders' identities (a redeploy restarts the ingress too; this
#: bounds staleness otherwise) instead of one handle call per listing.
_DESCRIBE_TTL_S = 5.0


@serve.ingress(api)
class Ingress:
    """Serve deployment body of the ingress.

    With several encoders (``encoders.audio=...``), an input goes to the
    encoder of its modality, sniffed from its bytes (a URI input: from its
    extension); content no served encoder embeds is a 415.

    Args:
        encoder: handle of the encoder deployment, or ``{modality: handle}``; with
            ``serve.topology=fused`` an :class:`~medray.serve.encoder.InReplicaEncoder`, built
            in this replica and called like the handle.
        heads: handle of the heads deployment (``None`` when no heads are configured).
        settings: limits, auth and the head ids.
        search: handle of the search deployment (``None`` when ``serve.search.index`` is null).

    Raises:
        RuntimeError: auth is enabled and no token can be read (fail closed).
    """

    def __init__(self, encoder: Any, heads: Any, settings: IngressSettings, search: Any = None) -> None:
        settings = dataclasses.replace(  # Vertex AI names the routes in the container's environment
            settings,
            predict_route=os.environ.get("AIP_PREDICT_ROUTE") or settings.predict_route,
            health_route=os.environ.get("AIP_HEALTH_ROUTE") or settings.health_route,
        )
        from medray.serve.encoder import InReplicaEncoder

        self._encoders = dict(encoder) if isinstance(encoder, dict) else {settings.primary: encoder}
        # serve.topology=fused: the encoder runs in this replica and is called like its handle
        self._local = list({id(e): e for e in self._encoders.values() if isinstance(e, InReplicaEncoder)}.values())
        for local in self._local:
            local.start()
        self._encoder = self._encoders[settings.primary]
        self._heads = heads
        self._search = search
        self._settings = settings
        self._head_ids = set(settings.heads)
        self._token = load_token(settings)
        self._described: tuple[float, dict] | None = None  # (when, {modality: describe()}) for /v1/models
        api.state.max_header_bytes = settings.max_header_bytes  # read by the header-limit middleware
        from ray.serve.metrics import Counter

        self._requests = Counter(
            "medray_requests",
            description="medray API requests by route and status code.",
            # ray.serve.metrics annotates tag_keys as Tuple[str] (one key); it takes any number
            tag_keys=cast("tuple[str]", ("route", "code")),
        )

    def reconfigure(self, config: dict) -> None:
        """``user_config``: the batch knobs of an encoder running in this replica (``serve.topology=fused``)."""
        for local in self._local:
            local.start().reconfigure(config)

    def check_health(self) -> None:
        """Serve's health check: an encoder running in this replica must be healthy too."""
        for local in self._local:
            local.start().check_health()

    async def _answer(self, request: Request, route: str, work) -> JSONResponse:
        tl = Timeline()
        try:
            check_bearer(request.headers.get("authorization"), self._token)
            body = await asyncio.wait_for(work(tl), timeout=self._settings.request_timeout_s)
            resp = JSONResponse(body)
            tl.mark("serialize")  # since the handle returned: the answer's body, then its JSON
        except asyncio.CancelledError:  # the client went away; Serve cancels the work downstream
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes a JSON answer
            err = error_for_exception(exc)
            if err.status >= 500:
                log.warning("%s -> %d %s (%s)", route, err.status, err.code, type(exc).__name__)
            resp = error_response(err, _request_id(request))
        resp.headers["server-timing"] = tl.header()
        self._requests.inc(tags={"route": route, "code": str(resp.status_code)})  # Serve logs the access line
        return resp

    async def _payload(self, request: Request, tl: Timeline) -> dict:
        body = await read_body(request, self._settings.max_body_bytes)
        tl.mark("read")
        payload = await parse_input(request.headers.get("content-type", ""), body, self._settings)
        tl.mark("parse")
        return payload

    async def _call(self, response: Any, tl: Timeline | None = None) -> dict:
        result = await response
        if tl is not None:
            tl.mark("handle")
            tl.add_replica(result.get("timings") if isinstance(result, dict) else None)
        err = error_for_result(result)
        if err is not None:
            raise err
        return result

    async def _route(self, payload: dict) -> Any:
        """The encoder handle for this input's modality."""
        if len(self._encoders) == 1:
            return self._encoder  # it checks the modality itself, after decoding off this loop
        if "data" not in payload:  # a URI: its extension tells (a DICOMweb instance is an image)
            where = str(payload.get("uri") or payload.get("url") or "")
            ext = where.rsplit("/", 1)[-1].rsplit(".", 1)[-1].lower()
            route = {"wav": "audio", "flac": "audio", "ogg": "audio", "txt": "text"}.get(ext, "image")
        else:
            try:
                route, _ = await asyncio.to_thread(detect_modality, payload["data"], payload.get("name") or "")
            except RecordError as err:
                api_err = error_for_result({"error": {"class": type(err).__name__, "message": str(err)}})
                assert api_err is not None  # a result with an "error" always maps to one
                raise api_err from None
            route = "image" if route in ("slide", "other") else route  # the image encoder says why it refuses
        if route not in self._encoders:
            raise ApiError(
                415,
                "unsupported_media",
                f"this server embeds {', '.join(sorted(self._encoders))} "
                f"inputs; the input is {route} (serve an encoder for it with encoders.{route}=...)",
            )
        return self._encoders[route]

    @api.post(
        "/v1/embeddings",
        openapi_extra=_BODY_DOC,
        summary="Embed an input: one vector per frame, audio window or text chunk",
    )
    async def embeddings(self, request: Request) -> JSONResponse:
        """Embeddings of the input, one per frame, with the encoder's name and weights hash."""

        async def work(tl: Timeline) -> dict:
            payload = await self._payload(request, tl)
            encoder = await self._route(payload)
            tl.mark("route")
            return _embedding_body(await self._call(encoder.embed.remote(payload), tl))

        return await self._answer(request, "embeddings", work)

    async def Embed(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802 - the RPC's name
        """gRPC ``medray.v1.Embeddings/Embed`` (``serve.grpc.enabled``): ``POST /v1/embeddings`` in protobuf.

        The same limits, auth (``authorization: Bearer`` metadata), routing and encoder call; an
        error is the call's gRPC status with ``"<code>: <message>"`` as details (see
        :mod:`medray.serve.grpc_api`).
        """
        from medray.serve.grpc_api import embed_response, grpc_status
        from medray.serve.proto import embeddings_pb2 as pb

        async def work() -> dict:
            payload = await self._grpc_payload(request)
            encoder = await self._route(payload)
            return _embedding_body(await self._call(encoder.embed.remote(payload)))

        try:
            metadata = dict(grpc_context.invocation_metadata()) if grpc_context is not None else {}
            check_bearer(metadata.get("authorization"), self._token)
            answer = embed_response(await asyncio.wait_for(work(), timeout=self._settings.request_timeout_s))
            code = "200"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes the call's status
            err = error_for_exception(exc)
            if err.status >= 500:
                log.warning("grpc Embed -> %d %s (%s)", err.status, err.code, type(exc).__name__)
            if grpc_context is not None:
                grpc_context.set_code(grpc_status(err.status))
                grpc_context.set_details(f"{err.code}: {err.message}")
            answer, code = pb.EmbedResponse(), str(err.status)
        self._requests.inc(tags={"route": "grpc_embed", "code": code})
        return answer

    async def _grpc_payload(self, request: Any) -> dict:
        """The encoder payload of an ``EmbedRequest``: its bytes, or its URI (checked as over HTTP)."""
        data, uri = bytes(request.data), str(request.uri)
        if bool(data) == bool(uri):
            raise ApiError(422, "invalid_request", "EmbedRequest must hold exactly one of data or uri")
        if uri:
            return await _payload_of({"uri": uri}, self._settings)
        if len(data) > self._settings.max_body_bytes:
            raise ApiError(
                413, "too_large", f"input is over serve.limits.max_body_bytes={self._settings.max_body_bytes}"
            )
        return {"data": data, "name": str(request.name)}

    @api.post(
        "/v1/zero_shot",
        openapi_extra=_BODY_DOC,
        summary="Zero-shot class scores of an image: labels (and prompts) in the JSON body or the query",
    )
    async def zero_shot(self, request: Request) -> JSONResponse:
        """Scores of each label for the input, from an image-text encoder (see :mod:`medray.serve.zeroshot`)."""

        async def work(tl: Timeline) -> dict:
            body = await read_body(request, self._settings.max_body_bytes)
            tl.mark("read")
            ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
            query = {k: request.query_params.getlist(k) for k in ("labels", "prompts")}
            doc = None
            if ctype == "application/json" or ctype.endswith("+json"):
                doc = await _load_json(body, self._settings)
                payload = await _payload_of(doc, self._settings)
            else:
                payload = await parse_input(request.headers.get("content-type", ""), body, self._settings)
            try:
                labels, templates = zero_shot_request(query, doc if isinstance(doc, dict) else None)
            except ZeroShotRequestError as err:
                raise ApiError(422, "invalid_request", str(err)) from None
            encoder = self._encoders.get("image", self._encoder)
            prompts = [p for row in expand_prompts(labels, templates) for p in row]
            tl.mark("parse")
            image, text = await asyncio.gather(
                self._call(encoder.embed.remote(payload)), self._call(encoder.embed_texts.remote(prompts))
            )
            tl.mark("handle")
            tl.add_replica(image.get("timings"))
            try:
                return zero_shot_answer(image, text["embeddings"], labels, templates)
            except ZeroShotRequestError as err:
                raise ApiError(400, "not_image_text", str(err)) from None

        return await self._answer(request, "zero_shot", work)

    @api.post("/v1/predict/{head}", openapi_extra=_BODY_DOC, summary="Label probabilities of a task head")
    async def predict(self, head: str, request: Request) -> JSONResponse:
        """Probabilities of the head's labels for each frame, and the head's model card id."""

        async def work(tl: Timeline) -> dict:
            if self._heads is None or head not in self._head_ids:
                raise ApiError(404, "unknown_head", f"no head named {head!r}; GET /v1/models lists them")
            payload = await self._payload(request, tl)
            handle = self._heads.options(multiplexed_model_id=head)
            tl.mark("route")
            return _prediction_body(await self._call(handle.predict.remote(payload), tl))

        return await self._answer(request, "predict", work)

    @api.post(
        "/v1/search", openapi_extra=_BODY_DOC, summary="Nearest stored records to an image, a text or a record id"
    )
    async def search(self, request: Request) -> JSONResponse:
        """Top k stored records with provenance and distance (``k``, filters: body or query parameters)."""

        async def work(tl: Timeline) -> dict:
            if self._search is None:
                raise ApiError(404, "search_disabled", _SEARCH_DISABLED)
            body = await read_body(request, self._settings.max_body_bytes)
            tl.mark("read")
            ctype = request.headers.get("content-type", "")
            return await self._call(self._search.search.remote(ctype, body, dict(request.query_params)), tl)

        return await self._answer(request, "search", work)

    @api.get("/v1/models", summary="The encoders and the heads served")
    async def models(self, request: Request) -> JSONResponse:
        """The served encoders (name, dim, hashes; ``encoder`` is the primary one) and the head ids.

        The encoders' identities are asked at most every 5 s (``readyz`` asks every time).
        """

        async def work(tl: Timeline) -> dict:
            now = time.monotonic()
            if self._described is None or now - self._described[0] > _DESCRIBE_TTL_S:
                described = await asyncio.gather(*(h.describe.remote() for h in self._encoders.values()))
                self._described = (now, dict(zip(self._encoders, described)))
                tl.mark("handle")
            by_modality = self._described[1]
            return {
                "encoder": by_modality[self._settings.primary],
                "encoders": by_modality,
                "heads": [{"id": h} for h in sorted(self._head_ids)],
            }

        return await self._answer(request, "models", work)

    @api.get("/healthz", summary="Liveness")
    async def healthz(self) -> JSONResponse:
        """200 while the ingress runs (answered here: no other deployment is asked)."""
        return JSONResponse(_OK)

    @api.get("/readyz", summary="Readiness: every encoder (and the heads deployment) answers")
    async def readyz(self) -> JSONResponse:
        """200 when a replica of every encoder, and of the heads deployment if any, answers within 5 s."""
        calls = [h.describe.remote() for h in self._encoders.values()]
        if self._heads is not None:
            calls.append(self._heads.ready.remote())
        try:
            answers = await asyncio.wait_for(asyncio.gather(*calls), timeout=5.0)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - not ready, whatever the reason
            return error_response(ApiError(503, "not_ready", "a model deployment is not ready", {"Retry-After": "1"}))
        names = {m: a.get("name") for m, a in zip(self._encoders, answers)}
        return JSONResponse(
            {
                "status": "ready",
                "encoder": names[self._settings.primary],
                "encoders": names,
                "heads": self._heads is not None,
            }
        )

    async def _haidef_instance(self, parsed: ParsedInstance | InstanceError) -> dict:
        """One HAI-DEF instance: its prediction, or its own error (never the request's)."""
        if isinstance(parsed, InstanceError):
            return instance_error(parsed.code, str(parsed))
        try:
            if parsed.source in ("dicomweb_uri", "image_url", "gcs_uri", "s3_uri"):
                where = parsed.payload.get("dicomweb_uri") or parsed.payload.get("url") or parsed.payload.get("uri")
                if not uri_allowed(str(where), self._settings.allowed_uri_prefixes):
                    raise _refuse_uri(self._settings)
            # a text instance goes to the text encoder; anything else is routed as /v1/embeddings routes it
            text_encoder = self._encoders.get("text") if parsed.input_type == "text" else None
            encoder = text_encoder or await self._route(parsed.payload)
            return prediction(await self._call(encoder.embed.remote(parsed.payload)), parsed)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - one instance's failure is its own answer
            err = error_for_exception(exc)
            if err.status >= 500:
                log.warning("predict instance -> %d %s (%s)", err.status, err.code, type(exc).__name__)
            return instance_error(err.code, err.message)

    async def _haidef_predict(self, request: Request) -> JSONResponse:
        async def work(tl: Timeline) -> dict:
            body = await read_body(request, self._settings.max_body_bytes)
            tl.mark("read")
            doc = await _load_json(body, self._settings)
            try:
                parsed = parse_instances(
                    doc, patch_size=self._settings.patch_size, max_instances=self._settings.max_instances
                )
            except InstanceError as err:
                raise ApiError(413 if err.code == "too_large" else 400, err.code, str(err)) from None
            tl.mark("parse")
            answers = await asyncio.gather(*(self._haidef_instance(p) for p in parsed))
            tl.mark("handle")
            return {"predictions": list(answers)}

        return await self._answer(request, "haidef_predict", work)

    @api.get("/{path:path}", include_in_schema=False)
    async def other_get(self, path: str, request: Request) -> JSONResponse:
        """HAI-DEF's health route (``AIP_HEALTH_ROUTE``); anything else is a JSON 404."""
        if self._settings.haidef_enabled and "/" + path == self._settings.health_route:
            return JSONResponse({"status": "ok"})
        return error_response(ApiError(404, "not_found", "no such route; see /docs"), _request_id(request))

    @api.post("/{path:path}", include_in_schema=False)
    async def other_post(self, path: str, request: Request) -> JSONResponse:
        """HAI-DEF's predict route (``AIP_PREDICT_ROUTE``, default ``/predict``); anything else is a JSON 404."""
        if self._settings.haidef_enabled and "/" + path == self._settings.predict_route:
            return await self._haidef_predict(request)
        return error_response(ApiError(404, "not_found", "no such route; see /docs"), _request_id(request))
