"""Hostile inputs: each ends as a quarantine or skip record with its reason, never a crash or an unbounded read."""

from __future__ import annotations

import io
import struct
import tarfile
import zipfile

import pytest

from medray.platform.decoders.audio import AudioOptions, decode_audio
from medray.platform.decoders.text import decode_text
from medray.platform.errors import DecodeError, LimitExceeded, ReadError, RecordError, SkipRecord
from medray.platform.records import quarantine_fields
from medray.platform.sources import iter_archive_members
from medray.testing.media import encode, lying_wav, tone


def _wav_header(channels: int, rate: int, frames: int, bits: int = 16) -> bytes:
    block = channels * bits // 8
    data_size = min(frames * block, 0xFFFFFFFF)
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * block, block, bits)
    return (
        b"RIFF"
        + struct.pack("<I", 36 + 64)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + struct.pack("<I", data_size)
        + b"\x00" * 64
    )


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (_wav_header(1, 16000, 10**12), LimitExceeded),  # claims ~1.7 years (data size clamped to 4 GiB: 37 h)
        (_wav_header(0, 16000, 100), DecodeError),  # zero channels
        (_wav_header(8, 768_000, 100), LimitExceeded),  # 8 channels at 768 kHz: over audio.max_sample_rate
        (lying_wav(2.0), DecodeError),  # the data chunk claims more than the file holds
    ],
)
def test_hostile_audio_headers_fail_before_samples_are_read(data, error):
    with pytest.raises(error) as info:
        decode_audio(data, options=AudioOptions(max_duration_s=3600))
    assert quarantine_fields(info.value)["status"] == "error"


def test_truncated_flac_is_a_decode_error():
    flac = encode(tone(16000, 2.0), 16000, "FLAC")
    with pytest.raises(RecordError):
        decode_audio(flac[: len(flac) // 3])


def test_invalid_utf8_and_nul_bytes_are_not_text():
    from medray.platform.errors import UnsupportedFormat
    from medray.platform.formats import detect

    with pytest.raises(UnsupportedFormat, match="not UTF-8"):
        decode_text(b"\xff\xfe\xfa not utf-8 \xc3\x28")
    with pytest.raises(UnsupportedFormat):  # NUL bytes: no format claims it, so it is quarantined
        detect(b"report text\x00with a NUL byte in it", "report.txt")


def test_text_over_max_chars_is_a_limit():
    with pytest.raises(LimitExceeded):
        decode_text(b"a" * 1001, max_chars=1000)


# ---- archives


def _outcomes(data: bytes, name: str, tmp_path, max_bytes: int = 1 << 20) -> dict:
    path = tmp_path / name
    path.write_bytes(data)
    return dict(iter_archive_members(str(path), None, max_bytes))


def test_tar_links_and_devices_are_skipped_with_a_reason_never_followed(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, kind in (("link", tarfile.SYMTYPE), ("hard", tarfile.LNKTYPE), ("dev", tarfile.CHRTYPE)):
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "/etc/passwd"
            tf.addfile(info)
        good = tarfile.TarInfo("ok.txt")
        good.size = 5
        tf.addfile(good, io.BytesIO(b"hello"))
        hidden = tarfile.TarInfo(".DS_Store")
        hidden.size = 1
        tf.addfile(hidden, io.BytesIO(b"x"))
    out = _outcomes(buf.getvalue(), "a.tar", tmp_path)
    assert out["ok.txt"] == b"hello"
    assert isinstance(out["link"], SkipRecord) and out["link"].reason == "ArchiveLink"
    assert isinstance(out["hard"], SkipRecord) and out["hard"].reason == "ArchiveLink"
    assert isinstance(out["dev"], SkipRecord) and out["dev"].reason == "NotAFile"
    assert out[".DS_Store"].reason == "HiddenMember"
    assert quarantine_fields(out["link"])["status"] == "skipped"


def test_zip_symlink_encrypted_member_and_nested_bomb(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        link = zipfile.ZipInfo("link")
        link.external_attr = 0o120777 << 16
        zf.writestr(link, "/etc/passwd")
        zf.writestr("secret.dcm", b"not really encrypted")
        inner = io.BytesIO()
        with zipfile.ZipFile(inner, "w", zipfile.ZIP_DEFLATED) as z2:
            z2.writestr("zeros.bin", b"\x00" * (8 << 20))  # 8 MiB of zeros, ~8 KiB compressed
        zf.writestr("bomb.zip", inner.getvalue())
        zf.writestr("big.bin", b"\x00" * (4 << 20))  # over the member limit once inflated
    out = _outcomes(_encrypted_flag(buf.getvalue(), b"secret.dcm"), "a.zip", tmp_path, max_bytes=1 << 20)
    assert out["link"].reason == "ArchiveLink"
    assert isinstance(out["secret.dcm"], ReadError) and "encrypted" in str(out["secret.dcm"])
    assert isinstance(out["bomb.zip"], bytes) and len(out["bomb.zip"]) < (1 << 20)  # not expanded: a member's bytes
    assert isinstance(out["big.bin"], LimitExceeded)


def _encrypted_flag(data: bytes, name: bytes) -> bytes:
    """Set the 'encrypted' bit of ``name``'s local and central headers (zipfile cannot write encrypted zips)."""
    out = bytearray(data)
    for sig, flag_at, name_len_at, name_at in ((b"PK\x03\x04", 6, 26, 30), (b"PK\x01\x02", 8, 28, 46)):
        pos = out.find(sig)
        while pos >= 0:
            n = struct.unpack_from("<H", out, pos + name_len_at)[0]
            if bytes(out[pos + name_at : pos + name_at + n]) == name:
                out[pos + flag_at] |= 0x1
            pos = out.find(sig, pos + 4)
    return bytes(out)


def test_an_archive_with_too_many_members_is_refused_whole(tmp_path, monkeypatch):
    monkeypatch.setattr("medray.platform.sources.MAX_ARCHIVE_MEMBERS", 100)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(101):
            zf.writestr(f"m{i}.txt", b"x")
    with pytest.raises(LimitExceeded):
        _outcomes(buf.getvalue(), "many.zip", tmp_path)
    tbuf = io.BytesIO()
    with tarfile.open(fileobj=tbuf, mode="w") as tf:
        for i in range(101):
            info = tarfile.TarInfo(f"m{i}.txt")
            info.size = 1
            tf.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(LimitExceeded):
        _outcomes(tbuf.getvalue(), "many.tar", tmp_path)
