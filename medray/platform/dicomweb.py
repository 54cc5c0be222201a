"""DICOMweb as a source: QIDO-RS to list instances, WADO-RS to fetch them (dicomweb-client).

An input ``dicomweb+http://host:8042/dicom-web`` (or ``dicomweb+https://``),
optionally narrowed to ``/studies/<uid>`` or ``/studies/<uid>/series/<uid>``,
is listed on the driver as UIDs only (QIDO-RS, study by study, filtered by
``dicomweb.query``), one record per instance whose ``uri`` is
``dicomweb+http://.../studies/<study>/series/<series>/instances/<sop>``; the
read stage fetches each instance with WADO-RS in its original transfer syntax.
Records are keyed by that URI, so resume works by SOP Instance UID.

Credentials never live in config files, outputs or logs: they come from the
environment (``MEDRAY_DICOMWEB_TOKEN`` for a bearer token, or
``MEDRAY_DICOMWEB_USER`` and ``MEDRAY_DICOMWEB_PASSWORD``) or from a file
named by ``MEDRAY_DICOMWEB_SECRET_FILE`` holding ``user:password`` or a token.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from medray.platform.errors import ConfigError, ReadError

__all__ = [
    "SCHEME_PREFIX",
    "DicomWebLocation",
    "is_dicomweb",
    "parse_location",
    "list_instances",
    "fetch_instance",
    "fetch_url",
    "instance_uri",
]

SCHEME_PREFIX = "dicomweb+"

_UID = r"[0-9.]+"
_PATH = re.compile(
    rf"^(?P<base>.*?)(?:/studies/(?P<study>{_UID})(?:/series/(?P<series>{_UID})(?:/instances/(?P<sop>{_UID}))?)?)?/?$"
)


@dataclass(frozen=True)
class DicomWebLocation:
    """A parsed ``dicomweb+http(s)://`` URI: the service root and the UIDs it narrows to."""

    base: str  # http(s)://host:port/dicom-web (no trailing slash)
    study: str | None = None
    series: str | None = None
    sop: str | None = None


def is_dicomweb(uri: str) -> bool:
    """Whether ``uri`` names a DICOMweb service (``dicomweb+http://`` or ``dicomweb+https://``)."""
    return uri.startswith((SCHEME_PREFIX + "http://", SCHEME_PREFIX + "https://"))


def parse_location(uri: str) -> DicomWebLocation:
    """Split a ``dicomweb+`` URI into the service root and study/series/instance UIDs.

    Raises:
        ConfigError: (key ``input``) not a DICOMweb URI, or a malformed UID path.
    """
    if not is_dicomweb(uri):
        raise ConfigError("input", f"not a DICOMweb URI (dicomweb+http://host/dicom-web): {uri!r}")
    m = _PATH.match(uri[len(SCHEME_PREFIX) :])
    if m is None or not m.group("base").split("://", 1)[-1].strip("/"):
        raise ConfigError(
            "input", "a DICOMweb URI is dicomweb+http(s)://host[:port]/root[/studies/<uid>[/series/<uid>]]"
        )
    return DicomWebLocation(m.group("base").rstrip("/"), m.group("study"), m.group("series"), m.group("sop"))


def instance_uri(base: str, study: str, series: str, sop: str) -> str:
    """The record URI of one instance."""
    return f"{SCHEME_PREFIX}{base}/studies/{study}/series/{series}/instances/{sop}"


def _credentials() -> tuple[str | None, tuple[str, str] | None]:
    """(bearer token, (user, password)) from the environment or ``MEDRAY_DICOMWEB_SECRET_FILE``."""
    token = os.environ.get("MEDRAY_DICOMWEB_TOKEN")
    user, password = os.environ.get("MEDRAY_DICOMWEB_USER"), os.environ.get("MEDRAY_DICOMWEB_PASSWORD")
    path = os.environ.get("MEDRAY_DICOMWEB_SECRET_FILE")
    if path and not token and not user:
        try:
            with open(path, encoding="utf-8") as f:
                secret = f.read().strip()
        except OSError as err:
            why = f"cannot read the secret file ({type(err).__name__})"
            raise ConfigError("MEDRAY_DICOMWEB_SECRET_FILE", why) from None
        if ":" in secret and "\n" not in secret and " " not in secret:
            user, password = secret.split(":", 1)
        else:
            token = secret
    return token, ((user, password or "") if user else None)


@functools.lru_cache(maxsize=8)
def _client(base: str) -> Any:
    """A DICOMweb client for ``base`` (one per process and service), authenticated from the environment."""
    import requests
    from dicomweb_client import DICOMwebClient

    session = requests.Session()
    token, basic = _credentials()
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif basic:
        session.auth = basic
    return DICOMwebClient(url=base, session=session, timeout=(10, 120))


def _uid(entry: Mapping[str, Any], tag: str) -> str | None:
    value = (entry.get(tag) or {}).get("Value") or [None]
    return str(value[0]) if value[0] else None


def _qido_error(err: Exception, what: str) -> ConfigError:
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status in (401, 403):
        return ConfigError(
            "input",
            f"the DICOMweb server refused {what} ({status}): set MEDRAY_DICOMWEB_TOKEN, "
            "MEDRAY_DICOMWEB_USER/MEDRAY_DICOMWEB_PASSWORD or MEDRAY_DICOMWEB_SECRET_FILE",
        )
    code = f" {status}" if status else ""
    return ConfigError("input", f"cannot {what} on the DICOMweb server ({type(err).__name__}{code})")


def _paged(search: Any, tag: str, page: int, *args: Any, **kwargs: Any) -> Iterator[str]:
    """UIDs (``tag``) of a QIDO-RS search, page by page; stops when a page brings nothing new.

    Some servers ignore ``offset`` for some filters and answer the same page
    forever (Orthanc 1.10 with ``ModalitiesInStudy``): a page without a new UID ends it.
    """
    seen: set[str] = set()
    offset = 0
    while True:
        found = search(*args, limit=page, offset=offset, **kwargs)
        new = [u for u in (_uid(e, tag) for e in found) if u and u not in seen]
        seen.update(new)
        yield from new
        if len(found) < page or not new:
            return
        offset += len(found)


def list_instances(uri: str, query: Mapping[str, Any] | None = None, page: int = 500) -> Iterator[dict]:
    """Every instance under a DICOMweb URI, as record rows ``{"uri", "member": ""}``, study by study.

    Only UIDs are held: studies are searched with ``query`` (QIDO-RS
    attribute filters, e.g. ``{"ModalitiesInStudy": "CR", "StudyDate": "20240101-20241231"}``),
    then each study's series and each series' instances, in pages of ``page``.

    Raises:
        ConfigError: the server cannot be reached or refuses the credentials (key ``input``).
    """
    loc = parse_location(uri)
    client = _client(loc.base)
    filters = {
        str(k): (",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)) for k, v in (query or {}).items()
    }
    try:
        if loc.sop:
            assert loc.study and loc.series
            yield {"uri": instance_uri(loc.base, loc.study, loc.series, loc.sop), "member": ""}
            return
        studies: Iterable[str] = (
            [loc.study] if loc.study else _paged(client.search_for_studies, "0020000D", page, search_filters=filters)
        )
        for study in studies:
            series_list: Iterable[str] = (
                [loc.series] if loc.series else _paged(client.search_for_series, "0020000E", page, study)
            )
            for series in series_list:
                for sop in _paged(client.search_for_instances, "00080018", page, study, series):
                    yield {"uri": instance_uri(loc.base, study, series, sop), "member": ""}
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - requests/HTTP errors: the message names what to set
        raise _qido_error(err, "search") from None


def _first_part(body: bytes, content_type: str) -> bytes:
    """The first body of a ``multipart/related`` answer (WADO-RS wraps each instance in one part)."""
    boundary = None
    for item in content_type.split(";"):
        key, _, value = item.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip().strip('"')
    if not content_type.lower().startswith("multipart/") or not boundary:
        return body  # a server that answers application/dicom directly
    delimiter = b"--" + boundary.encode("latin-1")
    start = body.find(delimiter)
    if start < 0:
        raise ReadError("WADO-RS answer has no multipart boundary")
    head_end = body.find(b"\r\n\r\n", start)
    end = body.find(b"\r\n" + delimiter, head_end + 4)
    if head_end < 0 or end < 0:
        raise ReadError("WADO-RS answer is truncated")
    return body[head_end + 4 : end]


def _read_limited(response: Any, max_bytes: int, what: str) -> bytes:
    """The whole body of a streamed ``requests`` answer, refused past ``max_bytes`` (plus multipart framing)."""
    declared = int(response.headers.get("Content-Length") or 0)
    if declared > max_bytes + 4096:
        raise ReadError(f"{what} is {declared} bytes, over limits.max_bytes={max_bytes}")
    chunks, size = [], 0
    for chunk in response.iter_content(1 << 20):
        size += len(chunk)
        if size > max_bytes + 4096:
            raise ReadError(f"{what} is over limits.max_bytes={max_bytes}")
        chunks.append(chunk)
    return b"".join(chunks)


def _session_for(base: str, credential: str | None) -> Any:
    """The process's authenticated session for ``base``, or a one-request session with the caller's token."""
    if not credential or credential == "application_default":
        return _client(base)._session
    import requests

    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {credential}"
    return session


def fetch_instance(uri: str, max_bytes: int, credential: str | None = None) -> bytes:
    """One instance's Part 10 bytes as the server stores them (WADO-RS, any transfer syntax).

    The whole answer is read (no streaming), so each connection is free for the next request.

    Args:
        uri: ``dicomweb+http(s)://.../studies/<uid>/series/<uid>/instances/<uid>`` (the
            ``dicomweb+`` prefix may be left out).
        max_bytes: largest instance accepted.
        credential: a caller's bearer token for this one request (HTTP API);
            ``None`` or ``"application_default"``: the process's credentials
            (``MEDRAY_DICOMWEB_*``). It is sent, never stored or logged.

    Raises:
        ReadError: not found, refused, or over ``max_bytes`` (PHI-free messages: the
            status, never the URL with its UIDs). Connection errors are raised as they are,
            for :func:`~medray.platform.storage.retry_transient` to wait for the server.
    """
    loc = parse_location(uri if is_dicomweb(uri) else SCHEME_PREFIX + uri)
    if not (loc.study and loc.series and loc.sop):
        raise ReadError("a DICOMweb record URI names study, series and instance")
    session = _session_for(loc.base, credential)
    url = f"{loc.base}/studies/{loc.study}/series/{loc.series}/instances/{loc.sop}"
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    with session.get(url, headers={"Accept": accept}, timeout=(10, 300), stream=True) as r:
        if r.status_code != 200:
            refused = r.status_code in (401, 403)
            hint = " (credentials: MEDRAY_DICOMWEB_* or the request's access_credential)" if refused else ""
            raise ReadError(f"WADO-RS retrieve answered {r.status_code}{hint}")
        data = _first_part(_read_limited(r, max_bytes, "instance"), r.headers.get("Content-Type", ""))
    if len(data) > max_bytes:
        raise ReadError(f"instance is {len(data)} bytes, over limits.max_bytes={max_bytes}")
    return data


def fetch_url(url: str, max_bytes: int, credential: str | None = None) -> bytes:
    """The body of an ``http(s)://`` URL (an image on a web server), at most ``max_bytes``.

    No redirects are followed (a redirect could leave the allowed prefixes the
    caller checked). ``credential`` is sent as a bearer token for this request only.

    Raises:
        ReadError: not 200, a redirect, or over ``max_bytes`` (the status only, never the URL).
    """
    import requests

    headers = {"Authorization": f"Bearer {credential}"} if credential and credential != "application_default" else {}
    with requests.get(url, headers=headers, timeout=(10, 120), stream=True, allow_redirects=False) as r:
        if r.status_code != 200:
            raise ReadError(f"the image URL answered {r.status_code}")
        data = _read_limited(r, max_bytes, "image")
    if len(data) > max_bytes:
        raise ReadError(f"image is {len(data)} bytes, over limits.max_bytes={max_bytes}")
    return data
