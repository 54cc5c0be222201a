"""Object storage through fsspec: one code path for local files, s3://, gs://.

s3fs reads ``AWS_ENDPOINT_URL``, the standard AWS credential variables and
profiles by itself; options from config (``storage.options``) are passed on
unchanged, so anything s3fs/gcsfs accept works (``endpoint_url``, ``profile``,
``anon``, ``client_kwargs``...).
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import random
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs

from medray.platform.errors import LimitExceeded, ReadError

__all__ = [
    "open_fs",
    "unstrip",
    "join_uri",
    "uri_protocol",
    "is_remote",
    "atomic_write_bytes",
    "read_bytes",
    "redact_options",
    "is_transient",
    "retry_transient",
]

log = logging.getLogger("medray.storage")
T = TypeVar("T")

#: Exception classes (by name: botocore, aiohttp, urllib3 are optional) of a store that is briefly unreachable.
_TRANSIENT_NAMES = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ClientConnectorError",
    "ClientConnectionError",
    "ServerDisconnectedError",
    "ClientOSError",
    "FSTimeoutError",
    "NewConnectionError",
    "ProtocolError",
    "IncompleteRead",
    "ResponseStreamingError",
}
_TRANSIENT_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT, errno.EPIPE, errno.EHOSTUNREACH}
_TRANSIENT_STATUS = {500, 502, 503, 504}


def is_transient(err: BaseException) -> bool:
    """Whether ``err`` (or what it wraps) says the store is briefly unreachable, not that the request is wrong."""
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, (ConnectionError, TimeoutError)) or type(cur).__name__ in _TRANSIENT_NAMES:
            return True
        if isinstance(cur, OSError) and cur.errno in _TRANSIENT_ERRNOS:
            return True
        status = getattr(cur, "response", {}) or {}
        if isinstance(status, dict):
            code = status.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _TRANSIENT_STATUS or status.get("Error", {}).get("Code") in ("SlowDown", "ServiceUnavailable"):
                return True
        cur = cur.__cause__ or cur.__context__
    return False


def retry_transient(fn: Callable[..., T], *args: Any, what: str = "storage call", budget_s: float | None = None) -> T:
    """Call ``fn(*args)``, retrying with backoff while the store is unreachable (see :func:`is_transient`).

    A store that restarts or drops connections for a while (``budget_s``,
    default ``MEDRAY_STORAGE_RETRY_S`` or 60 s) delays the work instead of
    failing records; any other error is raised at once.
    """
    budget = float(os.environ.get("MEDRAY_STORAGE_RETRY_S", "60")) if budget_s is None else budget_s
    deadline = time.monotonic() + budget
    delay = 0.25
    while True:
        try:
            return fn(*args)
        except Exception as err:
            if not is_transient(err) or time.monotonic() + delay > deadline:
                raise
            log.warning("%s: store unreachable (%s); retrying in %.1fs", what, type(err).__name__, delay)
            time.sleep(delay * (0.8 + 0.4 * random.random()))
            delay = min(delay * 2, 8.0)


_SECRET_HINTS = ("secret", "token", "password", "key", "credential")


def uri_protocol(uri: str) -> str:
    """Return the fsspec protocol of ``uri`` (``file`` for plain paths)."""
    if "://" not in uri:
        return "file"
    return uri.split("://", 1)[0]


def is_remote(uri: str) -> bool:
    """True when ``uri`` is not on the local file system."""
    return uri_protocol(uri) not in ("file", "local")


def _protocol_options(uri: str, options: Mapping[str, Any] | None) -> dict:
    """Pick the options that apply to ``uri``'s protocol.

    ``options`` may be flat (applied to every remote protocol) or keyed by
    protocol (``{"s3": {...}, "gs": {...}}``).
    """
    if not options:
        return {}
    options = dict(options)
    proto = uri_protocol(uri)
    if proto in ("file", "local"):
        return {}
    if any(k in ("s3", "gs", "gcs", "az", "abfs") for k in options):
        return dict(options.get(proto) or options.get("gcs" if proto == "gs" else proto) or {})
    return options


def open_fs(uri: str, options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Resolve ``uri`` to ``(filesystem, path)``.

    Args:
        uri: a local path, ``file://``, ``s3://``, ``gs://`` or any fsspec URI.
        options: storage options, flat or keyed by protocol.

    Returns:
        The fsspec filesystem and the protocol-less path inside it.
    """
    # None means "not set" (e.g. conf/storage/s3.yaml's ${oc.env:AWS_PROFILE,null}): leave it to fsspec
    opts = {k: v for k, v in _protocol_options(uri, options).items() if v is not None}
    if uri_protocol(uri) == "s3" and "endpoint_url" not in opts and os.environ.get("AWS_ENDPOINT_URL"):
        # s3fs honours AWS_ENDPOINT_URL through botocore, but only in newer
        # releases; setting it explicitly makes older ones behave the same.
        opts["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    fs, path = url_to_fs(uri, **opts)
    return fs, path


def join_uri(base: str, *parts: str) -> str:
    """Join path parts onto a URI or local path without touching the scheme."""
    if "://" in base:
        scheme, rest = base.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest, *parts)
    return os.path.join(base, *parts)


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Turn a protocol-less ``path`` of ``fs`` back into a full URI."""
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if proto in ("file", "local"):
        return path
    return f"{proto}://{path}"


def read_bytes(
    fs: fsspec.AbstractFileSystem,
    path: str,
    max_bytes: int,
    *,
    large: tuple[int, Callable[[int, bytes], None]] | None = None,
) -> bytes:
    """Read a whole object, refusing (before reading) objects over ``max_bytes``.

    Args:
        fs: the filesystem.
        path: the object's path in it.
        max_bytes: larger objects are refused unread.
        large: ``(size, check)``: an object over ``size`` bytes has its first
            4 KiB read first and passed to ``check(object size, head)``, which
            raises a :class:`RecordError` to refuse it before the whole is read
            (e.g. a text far over its character limit).

    Raises:
        ReadError: the object is missing or cannot be read.
        LimitExceeded: the object is over ``max_bytes``.
        RecordError: what ``large``'s check raises.
    """
    try:
        size = retry_transient(fs.size, path, what="stat")
    except FileNotFoundError:
        raise ReadError("object not found") from None
    except Exception as err:  # noqa: BLE001 - storage errors become record errors
        raise ReadError(f"cannot stat object ({type(err).__name__})") from None
    if size is not None and size > max_bytes:
        raise LimitExceeded(f"object is {size} bytes, over limits.max_bytes={max_bytes}", stage="read")
    if large is not None and size is not None and size > large[0]:

        def _head() -> bytes:
            with fs.open(path, "rb", block_size=1 << 16) as f:
                return bytes(f.read(4096))

        try:
            head = retry_transient(_head, what="read")
        except Exception as err:  # noqa: BLE001
            raise ReadError(f"cannot read object ({type(err).__name__})") from None
        large[1](size, head)

    def _read() -> bytes:
        with fs.open(path, "rb") as f:
            return f.read(max_bytes + 1)

    try:
        data = retry_transient(_read, what="read")
    except Exception as err:  # noqa: BLE001
        raise ReadError(f"cannot read object ({type(err).__name__})") from None
    if len(data) > max_bytes:
        raise LimitExceeded(f"object is over limits.max_bytes={max_bytes}", stage="read")
    return data


def atomic_write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so that readers see the whole object or nothing.

    Local files are written beside the target and renamed (atomic on POSIX);
    object stores make a single PUT visible atomically.
    """
    parent = posixpath.dirname(path)
    if fs.protocol in ("file", "local") or "file" in fs.protocol:
        fs.makedirs(parent, exist_ok=True)
        tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}")
        with fs.open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        retry_transient(fs.pipe_file, path, data, what="write")


def redact_options(options: Mapping[str, Any] | None) -> dict:
    """Copy storage options with anything secret-looking replaced by ``***``."""
    out: dict = {}
    for k, v in (options or {}).items():
        if isinstance(v, Mapping):
            out[k] = redact_options(v)
        elif any(h in str(k).lower() for h in _SECRET_HINTS):
            out[k] = "***"
        else:
            out[k] = v
    return out
