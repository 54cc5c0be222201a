"""Sources: listing, manifests' relative URIs, archive streaming, hostile members."""

from __future__ import annotations

import io
import tarfile
import zipfile

import pytest

from medray.platform.errors import ConfigError, LimitExceeded, ReadError
from medray.platform.sources import (
    ARCHIVE_MEMBER_PENDING,
    classify_input,
    iter_archive_members,
    list_objects,
    resolve_member_uri,
    safe_member_name,
)


def _zip(path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)


def test_list_prefix_skips_hidden_and_marks_archives(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.dcm").write_bytes(b"1")
    (tmp_path / ".hidden").write_bytes(b"1")
    (tmp_path / "_medray.json").write_bytes(b"{}")
    _zip(tmp_path / "b.zip", {"m.dcm": b"2"})
    rows = list(list_objects(str(tmp_path)))
    assert [(r["uri"].rsplit("/", 1)[-1], r["member"]) for r in rows] == [
        ("x.dcm", ""),
        ("b.zip", ARCHIVE_MEMBER_PENDING),
    ]


def test_glob_input(tmp_path):
    for n in ("a.dcm", "b.png", "c.dcm"):
        (tmp_path / n).write_bytes(b"1")
    rows = list(list_objects(str(tmp_path / "*.dcm")))
    assert sorted(r["uri"].rsplit("/", 1)[-1] for r in rows) == ["a.dcm", "c.dcm"]
    assert classify_input(str(tmp_path / "*.dcm")).kind == "prefix"


def test_classify_input(tmp_path):
    (tmp_path / "m.csv").write_text("uri\nx\n")
    assert classify_input(str(tmp_path / "m.csv")).kind == "manifest"
    assert classify_input(str(tmp_path)).kind == "prefix"
    with pytest.raises(ConfigError, match="input"):
        classify_input(str(tmp_path / "missing"))


def test_relative_manifest_uris():
    assert resolve_member_uri("a/b.dcm", "s3://bkt/dir/m.csv") == "s3://bkt/dir/a/b.dcm"
    assert resolve_member_uri("../x.dcm", "/data/m/m.csv") == "/data/x.dcm"
    assert resolve_member_uri("s3://o/x.dcm", "/data/m.csv") == "s3://o/x.dcm"


@pytest.mark.parametrize("name", ["../../etc/x", "/etc/passwd", "a/../../b", "C:evil", "a\x00b"])
def test_unsafe_member_names(name):
    with pytest.raises(ReadError):
        safe_member_name(name)


def test_zip_members_stream_and_hostile_member_is_isolated(tmp_path):
    _zip(tmp_path / "a.zip", {"d/one.dcm": b"one", "../../etc/x": b"evil", "two.dcm": b"two"})
    out = dict(iter_archive_members(str(tmp_path / "a.zip"), None, max_bytes=100))
    assert out["d/one.dcm"] == b"one" and out["two.dcm"] == b"two"
    assert isinstance(out["../../etc/x"], ReadError)


def test_tar_gz_members_and_size_limit(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in {"a.dcm": b"x" * 10, "big.dcm": b"y" * 1000}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (tmp_path / "a.tar.gz").write_bytes(buf.getvalue())
    out = dict(iter_archive_members(str(tmp_path / "a.tar.gz"), None, max_bytes=100))
    assert out["a.dcm"] == b"x" * 10
    assert isinstance(out["big.dcm"], LimitExceeded)


def test_corrupt_archive_is_a_read_error(tmp_path):
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(ReadError):
        list(iter_archive_members(str(tmp_path / "bad.zip"), None, max_bytes=100))
