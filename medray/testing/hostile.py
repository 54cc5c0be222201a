"""Hostile inputs for tests: damaged or oversized files of every modality, cheap to make.

Each generator returns bytes (or writes a file) that a medray job must turn
into a quarantine or skip row with its reason, never a crash, a hang or an
unbounded allocation. Sizes are claimed by headers, not stored: a slide
level of 10^6 x 10^6 pixels is a few hundred kilobytes, a "500 MB" text line
is a sparse file.

Nothing here reads the network; every output depends only on the arguments.

Example:
    >>> len(slide_huge_level()) < 1 << 20  # a level of 2^20 x 2^20 pixels, claimed
    True
"""

from __future__ import annotations

import io
import math
import os
import struct
import zipfile
from pathlib import Path
from typing import Any

from medray.testing.media import encode, lying_wav, slide_tiff, tone
from medray.testing.samples import ct_phantom, ct_series

__all__ = [
    "slide_huge_level",
    "slide_ifd_loop",
    "slide_tiles_past_end",
    "slide_zero_byte_tiles",
    "hostile_series",
    "HOSTILE_SERIES",
    "wav_claiming",
    "HOSTILE_AUDIO",
    "zip_many_members",
    "zip_lying_member",
    "sparse_text_line",
    "many_tokens_text",
    "HOSTILE_SLIDES",
]


def _ifds(data: bytes) -> list[tuple[int, dict[int, tuple[int, int, int, int]]]]:
    """The IFDs of a little-endian classic TIFF as written by ``slide_tiff``: level 0, then its SubIFDs.

    Each IFD is its offset and a map of tag code to ``(entry offset, type, count, value or value offset)``.
    """
    import tifffile

    with tifffile.TiffFile(io.BytesIO(data)) as tf:
        page = tf.pages.first
        offsets = [page.offset, *(page.subifds or ())]
    out = []
    for off in offsets:
        tags = {}
        for k in range(struct.unpack_from("<H", data, off)[0]):
            at = off + 2 + 12 * k
            code, kind, count, value = struct.unpack_from("<HHII", data, at)
            tags[code] = (at, kind, count, value)
        out.append((off, tags))
    return out


def _patch_tile_table(data: bytearray, level: int, tag: int, tiles: list[int] | None, value: int) -> None:
    at, _, count, where = _ifds(bytes(data))[level][1][tag]
    for k in range(count) if tiles is None else tiles:
        if count == 1:
            struct.pack_into("<I", data, at + 8, value)
        else:
            struct.pack_into("<I", data, where + 4 * k, value)


def slide_huge_level(side_log2: int = 20) -> bytes:
    """A slide whose level 0 claims ``2**side_log2`` pixels a side (2^20 > 10^6), a real-looking pyramid below it.

    Five levels, each a quarter of the one above (the pyramid tifffile
    recognises), the smallest 2^(side_log2 - 8) a side; the stored tiles are
    those of a 256-pixel slide, so reading any of it fails, and laying a
    tile grid over level 0 would allocate ~10^8 cells. About 200 KB.
    """
    data = bytearray(slide_tiff(size=256, levels=5))  # levels of 256 ... 16 px
    for k, (_, tags) in enumerate(_ifds(bytes(data))):
        per_side = math.isqrt(tags[324][2])  # TileOffsets count: tiles a side, kept
        side = 1 << (side_log2 - 2 * k)
        tile = side // per_side
        for code, value in ((256, side), (257, side), (322, tile), (323, tile)):  # width, length, tile w, h
            struct.pack_into("<HHII", data, tags[code][0], code, 4, 1, value)
        if 270 in tags:  # tifffile's "shaped" description would no longer match: hide it (a private tag)
            struct.pack_into("<H", data, tags[270][0], 65000)
    return bytes(data)


def slide_ifd_loop(extra: int = 120, back_to: int = 110) -> bytes:
    """A slide whose main IFD chain holds ``extra`` more IFDs, the last pointing back to IFD ``back_to``.

    tifffile looks for loops only once, at the 100th IFD, so a loop closed
    later would be walked forever.
    """
    data = bytearray(slide_tiff(size=512, levels=3))
    ifds = _ifds(bytes(data))
    first = ifds[0][0]
    low_at = ifds[-1][0]  # copy the smallest level's IFD (its values point into the file)
    low = bytes(data[low_at : low_at + 2 + 12 * struct.unpack_from("<H", data, low_at)[0]])
    prev_next = first + 2 + 12 * struct.unpack_from("<H", data, first)[0]  # level 0's next-IFD offset
    positions = []
    for _ in range(extra):
        pos = len(data) + (len(data) & 1)
        data.extend(b"\x00" * (pos - len(data)))
        data.extend(low + b"\x00\x00\x00\x00")
        struct.pack_into("<I", data, prev_next, pos)
        positions.append(pos)
        prev_next = pos + len(low)
    struct.pack_into("<I", data, prev_next, positions[back_to])
    return bytes(data)


def slide_tiles_past_end(level: int = 1, tiles: list[int] | None = None) -> bytes:
    """A slide whose ``level`` has tile offsets past the end of the file (all its tiles when ``tiles`` is None).

    At the default ``slide.target_mpp`` (0.5) the tiles of this 0.25-mpp slide
    are read from level 1; level 3 is the one used for tissue detection.
    """
    data = bytearray(slide_tiff(size=1024, levels=4))
    _patch_tile_table(data, level, 324, tiles, len(data) + (1 << 20))
    return bytes(data)


def slide_zero_byte_tiles(level: int = 1, tiles: list[int] | None = None) -> bytes:
    """A slide whose ``level`` has zero-byte tiles (all its tiles when ``tiles`` is None): they decode as black."""
    data = bytearray(slide_tiff(size=1024, levels=4))
    _patch_tile_table(data, level, 325, tiles, 0)
    return bytes(data)


#: name -> bytes of each hostile slide, for mixed-folder tests.
HOSTILE_SLIDES: dict[str, Any] = {
    "huge_level.svs": slide_huge_level,
    "ifd_loop.svs": slide_ifd_loop,
    "tiles_past_end.svs": slide_tiles_past_end,
    "zero_byte_tiles.svs": slide_zero_byte_tiles,
}


def _same_position(k: int, ds: Any) -> None:
    if k == 5:  # slice 5 lies where slice 4 does
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z - 2.5]  # ct_series' default slice spacing


def _mixed_orientation(k: int, ds: Any) -> None:
    if k % 2:
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.9, 0.43589]


def _no_position(k: int, ds: Any) -> None:
    if k == 3:
        del ds.ImagePositionPatient


#: kind -> ``fn(k, ds)`` tweaking each slice of a generated CT series (``None``: a one-slice series).
HOSTILE_SERIES: dict[str, Any] = {
    "same_position": _same_position,
    "mixed_orientation": _mixed_orientation,
    "no_position": _no_position,
    "one_slice": None,
}


def hostile_series(kind: str, *, slices: int = 8, size: int = 16, seed: int = 0) -> list[bytes]:
    """Part-10 bytes of a small CT series with one defect (a key of :data:`HOSTILE_SERIES`).

    ``one_slice`` is a series of a single instance; the others have
    ``slices`` instances, each its own SeriesInstanceUID per ``kind``.
    """
    if kind not in HOSTILE_SERIES:
        raise ValueError(f"unknown hostile series {kind!r}; expected one of {', '.join(HOSTILE_SERIES)}")
    phantom = ct_phantom(1 if kind == "one_slice" else slices, size, seed=seed)
    return ct_series(phantom, seed=seed, series=f"hostile-{kind}", tweak=HOSTILE_SERIES[kind])


def sparse_text_line(path: str | os.PathLike[str], size: int = 500 << 20) -> Path:
    """Write a one-line "text" file of ``size`` bytes that takes almost no disk: 64 KiB of words, then a hole.

    Its head is text; the hole reads as NUL bytes. A reader that sizes the
    object and sniffs its head refuses it unread; one that reads it must stream.
    """
    path = Path(path)
    words = b"Findings: " + b"no acute abnormality " * (65536 // 21)
    with open(path, "wb") as f:
        f.write(words)
        f.seek(size - 1)
        f.write(b".")
    return path


def many_tokens_text(tokens: int = 1_000_000) -> bytes:
    """A report of ``tokens`` short words (one token each in any tokenizer's vocabulary: 'a')."""
    return b"a " * tokens


def zip_many_members(n: int = 100_000) -> bytes:
    """A zip of ``n`` one-byte stored members ``m<k>.txt`` (~110 bytes each: 10^5 members are ~11 MB).

    Headers are packed directly (zipfile takes seconds for 10^5 members); the
    result is a valid archive that :mod:`zipfile` reads.
    """
    import zlib

    crc = zlib.crc32(b"x")
    local, central = io.BytesIO(), io.BytesIO()
    for k in range(n):
        name = f"m{k}.txt".encode()
        offset = local.tell()
        local.write(struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, 0, 0, 0x21, crc, 1, 1, len(name), 0))
        local.write(name + b"x")
        fields = (20, 20, 0, 0, 0, 0x21, crc, 1, 1, len(name), 0, 0, 0, 0, 0, offset)
        central.write(struct.pack("<4s6H3I5H2I", b"PK\x01\x02", *fields))
        central.write(name)
    start, size = local.tell(), central.tell()
    count = min(n, 0xFFFF)  # the classic end record's 16-bit counts; zipfile counts the directory itself
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, count, count, size, start, 0)
    return local.getvalue() + central.getvalue() + end


def zip_lying_member(inflated: int = 64 << 20, claimed: int = 10) -> bytes:
    """A zip whose one member inflates to ``inflated`` bytes of zeros but whose headers claim ``claimed``.

    A reader that sizes members from their headers, or reads them whole,
    inflates a bomb; the ZIP_DEFLATED data is ~1/1000 of ``inflated``.
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("bomb.dcm", "w", force_zip64=False) as f:
            chunk = b"\x00" * (1 << 20)
            for _ in range(inflated // len(chunk)):
                f.write(chunk)
    data = bytearray(buf.getvalue())
    for sig, at in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # uncompressed size in local / central header
        pos = data.find(sig)
        struct.pack_into("<I", data, pos + at, claimed)
    return bytes(data)


def wav_claiming(channels: int, rate: int, frames: int, bits: int = 16) -> bytes:
    """A PCM WAV header claiming ``frames`` frames of ``channels`` x ``rate`` Hz, followed by 64 bytes.

    The data chunk's size is clamped to the 32-bit field (a 10^12-frame claim reads as 4 GiB).
    """
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


def _truncated_flac() -> bytes:
    flac = encode(tone(16000, 2.0), 16000, "FLAC")
    return flac[: len(flac) // 3]


#: name -> bytes-maker of each hostile audio file (with the error class medray gives it).
HOSTILE_AUDIO: dict[str, Any] = {
    "frames_1e12.wav": lambda: wav_claiming(1, 16000, 10**12),  # LimitExceeded: audio.max_duration_s
    "zero_channels.wav": lambda: wav_claiming(0, 16000, 100),  # DecodeError
    "8ch_768khz.wav": lambda: wav_claiming(8, 768_000, 100),  # LimitExceeded: audio.max_sample_rate
    "truncated.flac": _truncated_flac,  # DecodeError
    "lying_data_chunk.wav": lambda: lying_wav(2.0),  # DecodeError: the data chunk claims more than the file
}
