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
import logging
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
    "fetch_instances",
    "instance_uri",
    "FEEDS",
    "CURSOR_FILE",
    "FeedPoll",
    "OrthancChanges",
    "QidoSince",
    "open_feed",
    "orthanc_root",
    "read_cursor",
    "cursor_state",
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

    # its INFO lines name study and series UIDs: identifiers stay out of logs
    logging.getLogger("dicomweb_client").setLevel(logging.WARNING)

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
    filters = _filters(query)
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


def fetch_instances(uris: list[str], max_bytes: int, in_flight: int = 4) -> list[bytes | BaseException]:
    """:func:`fetch_instance` for each URI, ``in_flight`` requests at a time; each result in ``uris`` order.

    A server that is briefly unreachable is waited for
    (:func:`~medray.platform.storage.retry_transient`); any other failure is
    returned in place of the bytes, for the caller to quarantine.
    """
    from concurrent.futures import ThreadPoolExecutor

    from medray.platform.storage import retry_transient

    def one(uri: str) -> bytes | BaseException:
        try:
            return retry_transient(fetch_instance, uri, max_bytes, what="WADO-RS")
        except Exception as err:  # noqa: BLE001 - the caller's record error, with its PHI-free reason
            return err

    if len(uris) <= 1:
        return [one(u) for u in uris]
    with ThreadPoolExecutor(max_workers=max(1, in_flight)) as pool:
        return list(pool.map(one, uris))


# ---------------------------------------------------------------------------------------------- watch
#: Feeds :func:`open_feed` knows: Orthanc's ``/changes`` log, or QIDO-RS by StudyDate.
FEEDS = ("auto", "changes", "qido")


@dataclass
class FeedPoll:
    """What one poll of a feed found: instance rows (``{"uri", "member"}``) and the cursor to store after them.

    ``more``: the feed holds more than one round's worth (poll again at once).
    """

    rows: list[dict]
    cursor: Any
    more: bool = False


class OrthancChanges:
    """New instances from Orthanc's change log (``GET {root}/changes?since=N&limit=M``).

    The cursor is the log's sequence number. ``NewInstance`` changes become
    instance rows (Orthanc ids mapped to UIDs through ``/instances``,
    ``/series`` and ``/studies``, series and studies cached); in series mode
    (``stable_series=True``) a series is taken once Orthanc calls it stable
    (``StableSeries``, after its ``StableAge``), whole, so that a volume is
    never embedded while its slices still arrive.

    Args:
        loc: the watched location (its study/series narrow what is kept).
        root: Orthanc's REST root (``http://host:8042``).
        query: QIDO-RS study filters a study must match to be kept.
        page: changes per request.
    """

    kind = "changes"

    def __init__(
        self,
        loc: DicomWebLocation,
        root: str,
        query: Mapping[str, Any] | None = None,
        *,
        page: int = 1000,
        stable_series: bool = False,
    ) -> None:
        self.loc, self.root, self.page, self.stable_series = loc, root.rstrip("/"), page, stable_series
        self.query = _filters(query)
        self._series: dict[str, tuple[str, str]] = {}  # Orthanc series id -> (study UID, series UID)
        self._study_ok: dict[str, bool] = {}

    def _get(self, path: str) -> Any:
        r = _client(self.loc.base)._session.get(f"{self.root}{path}", timeout=(10, 120))
        if r.status_code == 404:
            return None  # deleted since: nothing to embed
        if r.status_code != 200:
            raise ReadError(f"Orthanc answered {r.status_code} for {path.split('?')[0].split('/')[1]}")
        return r.json()

    def head(self) -> int:
        """The log's last sequence number now (the cursor before a full listing)."""
        body = self._get("/changes?last")
        if not isinstance(body, dict) or "Last" not in body:
            raise ReadError("no Orthanc change log at this root")
        return int(body["Last"])

    def _series_uids(self, series_id: str) -> tuple[str, str] | None:
        if series_id not in self._series:
            series = self._get(f"/series/{series_id}")
            study = self._get(f"/studies/{series['ParentStudy']}") if series else None
            if not series or not study:
                return None
            pair = (study["MainDicomTags"]["StudyInstanceUID"], series["MainDicomTags"]["SeriesInstanceUID"])
            self._series[series_id] = pair
        return self._series[series_id]

    def _wanted(self, study: str, series: str) -> bool:
        if (self.loc.study and study != self.loc.study) or (self.loc.series and series != self.loc.series):
            return False
        if not self.query:
            return True
        if study not in self._study_ok:
            client = _client(self.loc.base)
            found = client.search_for_studies(search_filters={**self.query, "StudyInstanceUID": study}, limit=1)
            self._study_ok[study] = any(_uid(e, "0020000D") == study for e in found)
        return self._study_ok[study]

    def poll(self, cursor: int, max_rows: int = 10_000) -> FeedPoll:
        """Instances added since ``cursor``, at most about ``max_rows`` (the rest: ``more``)."""
        rows: list[dict] = []
        want = "StableSeries" if self.stable_series else "NewInstance"
        while True:
            body = self._get(f"/changes?since={int(cursor)}&limit={self.page}") or {}
            for change in body.get("Changes") or []:
                if change.get("ChangeType") != want:
                    continue
                if self.stable_series:
                    pair = self._series_uids(change["ID"])
                    if pair and self._wanted(*pair):
                        where = f"{SCHEME_PREFIX}{self.loc.base}/studies/{pair[0]}/series/{pair[1]}"
                        rows += list(list_instances(where))
                    continue
                inst = self._get(f"/instances/{change['ID']}")
                pair = self._series_uids(inst["ParentSeries"]) if inst else None
                if inst and pair and self._wanted(*pair):
                    sop = inst["MainDicomTags"]["SOPInstanceUID"]
                    rows.append({"uri": instance_uri(self.loc.base, pair[0], pair[1], sop), "member": ""})
            cursor = max(int(cursor), int(body.get("Last", cursor)))
            done = bool(body.get("Done", True)) or not body.get("Changes")
            if done or len(rows) >= max_rows:
                return FeedPoll(rows, cursor, more=not done)


class QidoSince:
    """New instances by QIDO-RS: studies whose StudyDate is on or after the cursor date (``YYYYMMDD``).

    For servers without a change log. Each poll lists the instances of
    studies dated from the cursor on (the caller drops those already done)
    and moves the cursor to the day before the poll began, a margin for
    time zones. An instance added later to a study dated before the cursor is
    not seen: restart without the stored cursor (delete ``_watch.json``) to
    list everything again.
    """

    kind = "qido"

    def __init__(self, loc: DicomWebLocation, query: Mapping[str, Any] | None = None) -> None:
        self.loc, self.query = loc, dict(query or {})

    def head(self) -> str:
        """Yesterday (UTC), as ``YYYYMMDD``: the cursor before a full listing."""
        import datetime as dt

        return (dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=1)).strftime("%Y%m%d")

    def poll(self, cursor: str, max_rows: int = 10_000) -> FeedPoll:
        """Instances of studies dated ``cursor`` or later (all of them: a QIDO listing has no resume point)."""
        nxt = self.head()
        uri = SCHEME_PREFIX + self.loc.base
        if self.loc.study:
            uri += f"/studies/{self.loc.study}" + (f"/series/{self.loc.series}" if self.loc.series else "")
        rows = list(list_instances(uri, {**self.query, "StudyDate": f"{cursor}-"}))
        return FeedPoll(rows, nxt)


def _filters(query: Mapping[str, Any] | None) -> dict[str, str]:
    return {
        str(k): (",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)) for k, v in (query or {}).items()
    }


def orthanc_root(base: str) -> str:
    """Orthanc's REST root for a DICOMweb root: ``http://h:8042/dicom-web`` -> ``http://h:8042``."""
    return base.rsplit("/", 1)[0] if base.count("/") > 2 else base


def open_feed(
    uri: str,
    mode: str = "auto",
    query: Mapping[str, Any] | None = None,
    *,
    changes_root: str | None = None,
    stable_series: bool = False,
) -> OrthancChanges | QidoSince:
    """The change feed of a watched DICOMweb input.

    Args:
        uri: the ``dicomweb+`` input.
        mode: ``changes`` (Orthanc's ``/changes``), ``qido`` (StudyDate), or
            ``auto``: ``changes`` where ``{changes_root}/changes`` answers as Orthanc does.
        query: QIDO-RS study filters (``dicomweb.query``).
        changes_root: Orthanc's REST root; default: the DICOMweb root's parent.
        stable_series: follow whole series once stable (series mode), not single instances.

    Raises:
        ConfigError: an unknown mode, or ``changes`` where the server has no change log.
    """
    if mode not in FEEDS:
        raise ConfigError("dicomweb.feed", f"must be one of {', '.join(FEEDS)}, got {mode!r}")
    loc = parse_location(uri)
    if loc.sop:
        raise ConfigError("input", "watch=true follows a server, a study or a series, not one instance")
    if mode == "qido":
        return QidoSince(loc, query)
    feed = OrthancChanges(loc, changes_root or orthanc_root(loc.base), query, stable_series=stable_series)
    try:
        feed.head()
        return feed
    except (ReadError, ValueError) as err:  # an answer, but no change log: QIDO by date, or say what to set
        if mode == "changes":
            raise ConfigError(
                "dicomweb.feed",
                f"the server has no Orthanc change log at its root ({err}): "
                "set dicomweb.changes_root=http://host:port or dicomweb.feed=qido",
            ) from None
        return QidoSince(loc, query)
    except Exception as err:  # noqa: BLE001 - unreachable: do not silently switch feeds
        raise ConfigError("input", f"cannot reach the DICOMweb server ({type(err).__name__})") from None


#: Name of the watch cursor in an output.
CURSOR_FILE = "_watch.json"


def read_cursor(fs: Any, path: str, feed: OrthancChanges | QidoSince) -> Any | None:
    """The stored cursor of ``feed`` at ``path`` (``<output>/_watch.json``), or None.

    A cursor of another feed kind or another server is ignored (the watch
    starts again with a full listing; records already done are skipped).
    """
    import json

    try:
        with fs.open(path, "rb") as f:
            state = json.loads(f.read())
    except (FileNotFoundError, ValueError):
        return None
    if state.get("feed") != feed.kind or state.get("base") != feed.loc.base:
        return None
    return state.get("cursor")


def cursor_state(feed: OrthancChanges | QidoSince, cursor: Any, rounds: int) -> bytes:
    """The bytes of ``_watch.json``: feed kind, service root (no credentials: they live in the environment), cursor."""
    import json
    import time

    state = {
        "feed": feed.kind,
        "base": feed.loc.base,
        "cursor": cursor,
        "rounds": rounds,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return json.dumps(state, indent=2).encode()
