"""Sources: turn ``input=`` into a stream of records.

A *record* is one thing to embed: an object (``uri``) or one member of an
archive (``uri`` + ``member``). Three kinds of input are understood:

* a URI prefix, optionally with a glob (``s3://b/cxr/``, ``/data/**/*.dcm``);
* a manifest (``.csv``, ``.jsonl``/``.json``, ``.parquet``) with a ``uri``
  column; every other column is carried through to the outputs;
* archives (``.zip``, ``.tar``, ``.tar.gz``/``.tgz``), listed directly or found
  under a prefix: their members stream as records, never unpacked to disk.

Functions here are pure (fsspec and pyarrow only) so they test without Ray;
``medray.pipeline.stages`` wires them into Ray Data.
"""

from __future__ import annotations

import posixpath
import tarfile
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from medray.platform.dicomweb import is_dicomweb, parse_location
from medray.platform.errors import ConfigError, LimitExceeded, ReadError, RecordError, SkipRecord
from medray.platform.storage import open_fs, unstrip

__all__ = [
    "ARCHIVE_MEMBER_PENDING",
    "InputSpec",
    "classify_input",
    "is_archive",
    "is_manifest",
    "list_objects",
    "iter_archive_members",
    "resolve_member_uri",
    "safe_member_name",
]

#: ``member`` value of a listed archive whose members are not expanded yet.
ARCHIVE_MEMBER_PENDING = "*"

_ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
_MANIFEST_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")
_GLOB_CHARS = set("*?[")


def is_archive(path: str) -> bool:
    """True when ``path`` names an archive medray expands (by extension)."""
    return path.lower().endswith(_ARCHIVE_SUFFIXES)


def is_manifest(path: str) -> bool:
    """True when ``path`` names a manifest table (by extension)."""
    return path.lower().endswith(_MANIFEST_SUFFIXES)


@dataclass(frozen=True)
class InputSpec:
    """What ``input=`` turned out to be.

    Attributes:
        kind: ``manifest``, ``prefix``, ``object`` (one file or archive) or ``dicomweb``
            (a DICOMweb service, study or series; see :mod:`medray.platform.dicomweb`).
        uri: the input as given.
    """

    kind: str
    uri: str


def classify_input(uri: str, options: Mapping[str, Any] | None = None) -> InputSpec:
    """Decide what kind of input ``uri`` is; fail early when it does not exist.

    Raises:
        ConfigError: naming ``input`` when nothing is there.
    """
    if not uri:
        raise ConfigError("input", "is empty; give a path, prefix, glob, manifest or archive URI")
    if is_dicomweb(uri):
        parse_location(uri)  # a malformed UID path names the key now
        return InputSpec("dicomweb", uri)
    fs, path = open_fs(uri, options)
    if _GLOB_CHARS & set(path):
        return InputSpec("prefix", uri)
    try:
        exists = fs.exists(path)
        isdir = exists and fs.isdir(path)
    except Exception as err:  # noqa: BLE001 - auth/endpoint errors: say which key
        raise ConfigError(
            "input",
            f"cannot reach {uri.split('://')[0]} storage ({type(err).__name__}: {err}); "
            "check storage.options / AWS_ENDPOINT_URL and credentials",
        ) from None
    if isdir or uri.endswith("/"):
        return InputSpec("prefix", uri)
    if not exists:
        raise ConfigError("input", f"nothing found at '{uri}'")
    if is_manifest(path):
        return InputSpec("manifest", uri)
    return InputSpec("object", uri)


def list_objects(uri: str, options: Mapping[str, Any] | None = None) -> Iterator[dict]:
    """List the objects under a prefix or glob as record rows.

    Hidden objects (a path component starting with ``.``) and medray's own
    outputs (``_``-prefixed) are skipped. Archives become one row with
    ``member == ARCHIVE_MEMBER_PENDING``; the read stage expands them.

    Yields:
        ``{"uri": str, "member": str}`` rows, in sorted order.
    """
    fs, path = open_fs(uri, options)
    if _GLOB_CHARS & set(path):
        paths = sorted(fs.glob(path))
        paths = [p for p in paths if not fs.isdir(p)]
        root = path.split("*")[0].rsplit("/", 1)[0]
    elif fs.isdir(path):
        paths = sorted(fs.find(path))
        root = path
    else:
        paths = [path]
        root = posixpath.dirname(path)
    for p in paths:
        rel = p[len(root) :].lstrip("/") if p.startswith(root) else posixpath.basename(p)
        if any(part.startswith((".", "_")) for part in rel.split("/") if part):
            continue
        full = unstrip(fs, p)
        yield {"uri": full, "member": ARCHIVE_MEMBER_PENDING if is_archive(p) else ""}


def resolve_member_uri(value: str, manifest_uri: str) -> str:
    """Resolve a manifest's ``uri`` cell: absolute URIs stay, relative ones
    are taken relative to the manifest's own location."""
    if "://" in value or value.startswith("/"):
        return value
    base = manifest_uri.rsplit("/", 1)[0] if "/" in manifest_uri else "."
    if "://" in base:
        scheme, rest = base.split("://", 1)
        return f"{scheme}://" + posixpath.normpath(posixpath.join(rest, value))
    return posixpath.normpath(posixpath.join(base, value))


def safe_member_name(name: str) -> str:
    """Return a normalised archive member name, or raise if it is unsafe.

    Members are never written to disk, but a name that climbs out of the
    archive (``../../etc/x``) or is absolute marks a hostile archive; such a
    member is quarantined rather than trusted.

    Raises:
        ReadError: for absolute names, ``..`` components or NUL bytes.
    """
    if "\x00" in name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise ReadError("archive member has an absolute or invalid name", stage="read")
    parts = name.replace("\\", "/").split("/")
    if any(p == ".." for p in parts):
        raise ReadError("archive member name climbs out of the archive ('..')", stage="read")
    return "/".join(p for p in parts if p not in ("", "."))


def iter_archive_members(
    uri: str, options: Mapping[str, Any] | None, max_bytes: int
) -> Iterator[tuple[str, bytes | RecordError]]:
    """Stream the file members of a zip/tar archive without unpacking to disk.

    Zip archives are read through fsspec's seekable file (ranged reads on
    object storage: only the central directory and the members are fetched);
    tar archives stream front to back.

    Yields:
        ``(member_name, data)`` or ``(member_name, RecordError)`` for members
        that cannot be used (unsafe name, over ``max_bytes``, corrupt).

    Raises:
        ReadError: when the archive itself cannot be opened.
    """
    fs, path = open_fs(uri, options)
    lower = path.lower()
    try:
        f = fs.open(path, "rb")
    except Exception as err:  # noqa: BLE001
        raise ReadError(f"cannot open archive ({type(err).__name__})") from None
    with f:
        if lower.endswith(".zip"):
            yield from _iter_zip(f, max_bytes)
        else:
            yield from _iter_tar(f, max_bytes)


def _check_member(name: str, size: int, max_bytes: int) -> str:
    safe = safe_member_name(name)
    if size > max_bytes:
        raise LimitExceeded(f"archive member is {size} bytes, over limits.max_bytes={max_bytes}", stage="read")
    return safe


#: Most members one archive may list; more is quarantined as a whole (a member-count bomb).
MAX_ARCHIVE_MEMBERS = 50_000

_HIDDEN = SkipRecord("HiddenMember", "hidden archive member (a name part starts with '.')", stage="read")


def _iter_zip(f: Any, max_bytes: int) -> Iterator[tuple[str, bytes | RecordError]]:
    try:
        zf = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ReadError(f"not a readable zip archive ({type(err).__name__})") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_ARCHIVE_MEMBERS:
            raise LimitExceeded(f"archive lists {len(infos)} members, over {MAX_ARCHIVE_MEMBERS}", stage="read")
        for info in infos:
            if info.is_dir():
                continue
            try:
                name = _check_member(info.filename, info.file_size, max_bytes)
            except RecordError as err:
                yield info.filename, err
                continue
            if any(part.startswith(".") for part in name.split("/")):
                yield name, _HIDDEN
                continue
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                yield name, SkipRecord("ArchiveLink", "symbolic link member: links are never followed", stage="read")
                continue
            if info.flag_bits & 0x1:
                yield name, ReadError("encrypted archive member: medray reads no passwords")
                continue
            try:
                with zf.open(info) as member:
                    data = member.read(max_bytes + 1)
                if len(data) > max_bytes:
                    raise LimitExceeded(f"archive member is over limits.max_bytes={max_bytes}", stage="read")
                yield name, data
            except RecordError as err:
                yield name, err
            except Exception as err:  # noqa: BLE001 - corrupt member, bad CRC...
                yield name, ReadError(f"corrupt archive member ({type(err).__name__})")


def _iter_tar(f: Any, max_bytes: int) -> Iterator[tuple[str, bytes | RecordError]]:
    try:
        tf = tarfile.open(fileobj=f, mode="r|*")
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ReadError(f"not a readable tar archive ({type(err).__name__})") from None
    with tf:
        try:
            for count, info in enumerate(tf, 1):
                if count > MAX_ARCHIVE_MEMBERS:
                    raise LimitExceeded(f"archive holds over {MAX_ARCHIVE_MEMBERS} members", stage="read")
                if info.isdir():
                    continue
                if not info.isfile():  # links, devices, FIFOs: accounted for, never followed or opened
                    kind = "link" if (info.issym() or info.islnk()) else "device or FIFO"
                    yield (
                        info.name,
                        SkipRecord(
                            "ArchiveLink" if kind == "link" else "NotAFile",
                            f"{kind} member: never followed or read",
                            stage="read",
                        ),
                    )
                    continue
                try:
                    name = _check_member(info.name, info.size, max_bytes)
                except RecordError as err:
                    yield info.name, err
                    continue
                if any(part.startswith(".") for part in name.split("/")):
                    yield name, _HIDDEN
                    continue
                member = tf.extractfile(info)
                yield name, member.read() if member is not None else b""
        except (tarfile.TarError, OSError, EOFError, zlib_error()) as err:
            raise ReadError(f"archive is truncated or corrupt ({type(err).__name__})") from None


def zlib_error() -> type[BaseException]:
    import zlib

    return zlib.error
