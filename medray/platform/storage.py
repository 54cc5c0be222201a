"""Object storage through fsspec: one code path for local files, s3://, gs://.

s3fs reads ``AWS_ENDPOINT_URL``, the standard AWS credential variables and
profiles by itself; options from config (``storage.options``) are passed on
unchanged, so anything s3fs/gcsfs accept works (``endpoint_url``, ``profile``,
``anon``, ``client_kwargs``...).
"""

from __future__ import annotations

import os
import posixpath
import uuid
from collections.abc import Mapping
from typing import Any

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
]

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


def read_bytes(fs: fsspec.AbstractFileSystem, path: str, max_bytes: int) -> bytes:
    """Read a whole object, refusing (before reading) objects over ``max_bytes``."""
    try:
        size = fs.size(path)
    except FileNotFoundError:
        raise ReadError("object not found") from None
    except Exception as err:  # noqa: BLE001 - storage errors become record errors
        raise ReadError(f"cannot stat object ({type(err).__name__})") from None
    if size is not None and size > max_bytes:
        raise LimitExceeded(f"object is {size} bytes, over limits.max_bytes={max_bytes}", stage="read")
    try:
        with fs.open(path, "rb") as f:
            data = f.read(max_bytes + 1)
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
        fs.pipe_file(path, data)


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
