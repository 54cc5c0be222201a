"""The watch cursor and the feed helpers of :mod:`medray.platform.dicomweb` (no server, no Ray)."""

from __future__ import annotations

import json

import fsspec
import pytest

from medray.platform.dicomweb import (
    CURSOR_FILE,
    OrthancChanges,
    QidoSince,
    cursor_state,
    open_feed,
    orthanc_root,
    parse_location,
    read_cursor,
)
from medray.platform.errors import ConfigError
from medray.platform.storage import atomic_write_bytes


def test_orthanc_root_is_the_dicomweb_roots_parent():
    assert orthanc_root("http://h:8042/dicom-web") == "http://h:8042"
    assert orthanc_root("https://pacs.example/orthanc/dicom-web") == "https://pacs.example/orthanc"
    assert orthanc_root("http://h:8042") == "http://h:8042"


def test_a_cursor_round_trips_and_a_foreign_one_is_ignored(tmp_path):
    fs = fsspec.filesystem("file")
    path = str(tmp_path / CURSOR_FILE)
    loc = parse_location("dicomweb+http://127.0.0.1:1/dicom-web")
    changes = OrthancChanges(loc, "http://127.0.0.1:1")
    assert read_cursor(fs, path, changes) is None
    atomic_write_bytes(fs, path, cursor_state(changes, 42, rounds=3))
    assert read_cursor(fs, path, changes) == 42
    state = json.loads((tmp_path / CURSOR_FILE).read_text())
    assert state["feed"] == "changes" and state["rounds"] == 3 and state["base"] == "http://127.0.0.1:1/dicom-web"
    # another feed kind or another server: start again with a full listing
    assert read_cursor(fs, path, QidoSince(loc)) is None
    other = OrthancChanges(parse_location("dicomweb+http://127.0.0.1:2/dicom-web"), "http://127.0.0.1:2")
    assert read_cursor(fs, path, other) is None


def test_qido_cursor_is_yesterday():
    import datetime as dt

    head = QidoSince(parse_location("dicomweb+http://h/dicom-web")).head()
    assert len(head) == 8 and dt.datetime.strptime(head, "%Y%m%d").date() < dt.datetime.now(dt.timezone.utc).date()


def test_open_feed_refuses_unknown_modes_and_single_instances():
    with pytest.raises(ConfigError, match="dicomweb.feed"):
        open_feed("dicomweb+http://h/dicom-web", "rss")
    with pytest.raises(ConfigError, match="'input'"):
        open_feed("dicomweb+http://h/dicom-web/studies/1.2/series/1.3/instances/1.4", "qido")
    assert isinstance(open_feed("dicomweb+http://h/dicom-web", "qido"), QidoSince)


def test_an_unreachable_server_is_an_error_not_a_silent_switch_of_feed():
    # nothing listens on port 1: auto must not fall back to QIDO (a stored cursor would be lost)
    with pytest.raises(ConfigError, match="cannot reach"):
        open_feed("dicomweb+http://127.0.0.1:1/dicom-web", "auto")
