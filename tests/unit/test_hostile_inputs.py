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
from medray.testing.hostile import wav_claiming
from medray.testing.media import encode, lying_wav, tone


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (wav_claiming(1, 16000, 10**12), LimitExceeded),  # claims ~1.7 years (data size clamped to 4 GiB: 37 h)
        (wav_claiming(0, 16000, 100), DecodeError),  # zero channels
        (wav_claiming(8, 768_000, 100), LimitExceeded),  # 8 channels at 768 kHz: over audio.max_sample_rate
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


# ---- whole slides (sizes are claimed by headers: each file is at most a few MiB)


def _sniffed(data: bytes, name: str):
    import fsspec

    from medray.platform.decoders.slide import sniff_slide

    fs = fsspec.filesystem("memory")
    fs.pipe(f"/hostile/{name}", data)
    return sniff_slide(f"memory:///hostile/{name}", fs, f"/hostile/{name}")


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_a_slide_level_of_10e12_pixels_is_refused_before_any_pixel_is_read():
    from medray.platform.decoders.slide import SlideOptions, plan_slide
    from medray.testing.hostile import slide_huge_level

    slide = _sniffed(slide_huge_level(20), "huge.svs")
    assert slide.level_dimensions[0] == (1 << 20, 1 << 20) and slide.level_count == 5
    before = _peak_rss_mb()
    with pytest.raises(LimitExceeded, match="slide.max_pixels") as info:
        plan_slide(slide, SlideOptions(tile_size=64))
    assert quarantine_fields(info.value)["error_class"] == "LimitExceeded"
    with pytest.raises(LimitExceeded, match="tile grid has 67108864 tiles"):  # not 10^8 cells of fractions
        plan_slide(slide, SlideOptions(tile_size=64, max_pixels=1 << 41))
    assert _peak_rss_mb() - before < 64  # never the level, its giant tiles, nor the grid


def test_giant_tiff_tiles_are_refused_before_one_is_decoded(monkeypatch):
    from medray.platform.decoders.slide import SlideOptions, plan_slide
    from medray.testing.media import slide_tiff

    monkeypatch.setattr("medray.platform.decoders.slide.MAX_CHUNK_PIXELS", 128 * 127)
    with pytest.raises(LimitExceeded, match="128x128-pixel tiles"):
        plan_slide(_sniffed(slide_tiff(size=512, levels=3), "tiles.svs"), SlideOptions(tile_size=64))


def test_an_ifd_chain_that_loops_is_refused_without_walking_it_forever():
    import io

    from medray.platform.decoders.slide import check_ifd_chain
    from medray.platform.formats import detect
    from medray.testing.hostile import slide_ifd_loop
    from medray.testing.media import slide_tiff

    data = slide_ifd_loop(extra=120, back_to=110)  # tifffile alone looks for loops only at the 100th IFD
    with pytest.raises(DecodeError, match="loops back"):
        _sniffed(data, "loop.svs")
    with pytest.raises(DecodeError, match="loops back"):  # in memory too (an archive member)
        detect(data, "loop.svs")
    with pytest.raises(LimitExceeded):
        check_ifd_chain(io.BytesIO(data), max_ifds=50)
    assert check_ifd_chain(io.BytesIO(slide_tiff(size=256, levels=2))) == 1  # SubIFD levels: one main IFD


@pytest.mark.parametrize("kind", ["past_end", "zero_bytes"])
def test_a_slide_whose_read_level_is_damaged_is_quarantined(kind):
    from medray.platform.decoders.slide import SlideOptions, plan_slide
    from medray.testing.hostile import slide_tiles_past_end, slide_zero_byte_tiles

    data = slide_tiles_past_end(1) if kind == "past_end" else slide_zero_byte_tiles(1)
    with pytest.raises(DecodeError, match="slide.max_damaged_fraction") as info:
        plan_slide(_sniffed(data, f"{kind}.svs"), SlideOptions(tile_size=64))
    assert "empty (0 bytes) or lie past the end of the file" in str(info.value)


def test_a_few_damaged_tiles_are_dropped_and_counted_the_rest_planned():
    from medray.platform.decoders.slide import SlideOptions, plan_slide, read_tile
    from medray.testing.hostile import slide_tiles_past_end, slide_zero_byte_tiles
    from medray.testing.media import slide_tiff

    opts = SlideOptions(tile_size=64, max_damaged_fraction=0.5)
    good = plan_slide(_sniffed(slide_tiff(size=1024, levels=4), "good.svs"), opts)
    for data in (slide_zero_byte_tiles(1, [5]), slide_tiles_past_end(1, [5])):
        slide = _sniffed(data, "few.svs")
        plan = plan_slide(slide, opts)
        assert 0 < plan.metadata["damaged_tiles"] == len(good.tiles) - len(plan.tiles)
        assert plan.background == good.background
        for tile in plan.tiles:  # every tile kept reads cleanly and is not black
            assert read_tile(slide, tile).mean() > 50


def test_a_slide_whose_tissue_level_lies_past_the_end_is_quarantined():
    from medray.platform.decoders.slide import SlideOptions, plan_slide
    from medray.testing.hostile import slide_tiles_past_end

    with pytest.raises(DecodeError, match="lowest-resolution level has tiles past the end"):
        plan_slide(_sniffed(slide_tiles_past_end(3), "trunc.svs"), SlideOptions(tile_size=64))


def test_the_read_stage_gives_every_hostile_slide_one_row_with_its_reason(tmp_path):
    import pyarrow as pa

    from medray.pipeline import StageOptions, read_batch
    from medray.testing.hostile import HOSTILE_SLIDES
    from medray.testing.media import slide_tiff

    files = {name: make() for name, make in HOSTILE_SLIDES.items()}
    files["blank.svs"] = slide_tiff(size=512, levels=3, blob=(0.5, 0.5, 0.0))
    uris = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        uris.append(str(tmp_path / name))
    src = pa.table({"uri": uris, "member": [""] * len(uris)})
    opts = StageOptions(slide={"target_mpp": 0.5, "tile_size": 64})
    rows = read_batch(src, opts).to_pylist()
    got = {r["uri"].rsplit("/", 1)[-1]: (r["status"], r["error_class"], r["message"]) for r in rows}
    assert len(rows) == len(files) == len(got)  # one row each, no tile of any of them
    assert got["huge_level.svs"][:2] == ("error", "LimitExceeded")
    assert got["ifd_loop.svs"][:2] == ("error", "DecodeError") and "loops back" in got["ifd_loop.svs"][2]
    assert got["tiles_past_end.svs"][:2] == got["zero_byte_tiles.svs"][:2] == ("error", "DecodeError")
    assert got["blank.svs"][:2] == ("skipped", "NoTissue")


# ---- CT/MR series (real Part-10 files, through the series stages: header pass, then one group task)


@pytest.fixture(scope="module")
def image_ckpt(tmp_path_factory) -> str:
    from medray.encoders import build_tiny_checkpoint

    return build_tiny_checkpoint("hf_image", str(tmp_path_factory.mktemp("img")), arch="vit", image_size=32)


def _series_rows(files: list[bytes], tmp_path, ckpt: str, mode: str = "slicewise", **series) -> list[dict]:
    import pyarrow as pa

    from medray.encoders import get_spec
    from medray.pipeline import StageOptions
    from medray.pipeline.series import assemble_group, series_header_batch

    opts = StageOptions(salt="s", encoder_spec=get_spec("hf_image", checkpoint=ckpt), series={"mode": mode, **series})
    uris = []
    for k, data in enumerate(files):
        (tmp_path / f"{k:03d}.dcm").write_bytes(data)
        uris.append(str(tmp_path / f"{k:03d}.dcm"))
    headers = series_header_batch(pa.table({"uri": uris, "member": [""] * len(uris)}), opts)
    return assemble_group(headers, opts).to_pylist()


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("same_position", "duplicate slice positions: 1 slices share a position"),
        ("mixed_orientation", "mixed orientations: 2 distinct ImageOrientationPatient values"),
        ("no_position", "1 of 8 slices lack ImagePositionPatient"),
    ],
)
def test_a_hostile_series_is_one_quarantine_row_with_its_reason(kind, reason, image_ckpt, tmp_path):
    from medray.testing.hostile import hostile_series

    rows = _series_rows(hostile_series(kind), tmp_path, image_ckpt)
    assert len(rows) == 1 and (rows[0]["status"], rows[0]["error_class"]) == ("error", "SeriesError")
    assert reason in rows[0]["message"] and rows[0]["pixel_values"] is None


def test_a_series_over_max_voxels_is_refused_before_its_pixels_are_read(image_ckpt, tmp_path):
    from medray.testing.hostile import hostile_series

    files = hostile_series("same_position")[:4]  # four good slices
    rows = _series_rows(files, tmp_path, image_ckpt, max_voxels=4 * 16 * 16 - 1)
    assert len(rows) == 1 and (rows[0]["status"], rows[0]["error_class"]) == ("error", "LimitExceeded")
    assert "series.max_voxels" in rows[0]["message"]


def test_a_one_slice_series_is_embedded_as_a_series_of_one_or_refused_by_min_slices(image_ckpt, tmp_path):
    from medray.testing.hostile import hostile_series

    files = hostile_series("one_slice")
    (tmp_path / "a").mkdir()
    rows = _series_rows(files, tmp_path / "a", image_ckpt)
    assert len(rows) == 1 and rows[0]["status"] == "ok" and rows[0]["pixel_shape"][0] == 1
    (tmp_path / "b").mkdir()
    rows = _series_rows(files, tmp_path / "b", image_ckpt, min_slices=2)
    assert len(rows) == 1 and (rows[0]["status"], rows[0]["error_class"]) == ("error", "SeriesError")
    assert "fewer than series.min_slices = 2" in rows[0]["message"]


# ---- text: one line of 500 MB, a document of 10^6 tokens


def test_a_500_mb_text_line_is_refused_after_reading_its_first_bytes(tmp_path):
    import pyarrow as pa

    from medray.pipeline import StageOptions, read_batch
    from medray.testing.hostile import sparse_text_line

    path = sparse_text_line(tmp_path / "line.txt", size=500 << 20)  # 500 MB claimed, ~64 KiB on disk
    before = _peak_rss_mb()
    rows = read_batch(pa.table({"uri": [str(path)], "member": [""]}), StageOptions()).to_pylist()
    assert _peak_rss_mb() - before < 100  # never the 500 MB
    assert len(rows) == 1 and (rows[0]["status"], rows[0]["error_class"], rows[0]["stage"]) == (
        "error",
        "LimitExceeded",
        "read",
    )
    assert "text.max_chars = 10000000" in rows[0]["message"] and "refused unread" in rows[0]["message"]


def test_text_bytes_far_over_max_chars_are_refused_before_decoding():
    from medray.platform.decoders.text import check_text_size

    with pytest.raises(LimitExceeded, match="4001 bytes holds more than text.max_chars = 1000"):
        decode_text(b"a" * 4001, max_chars=1000)
    check_text_size(4001, b"\x89PNG\r\n\x1a\n", 1000)  # not text: the image path judges it
    with pytest.raises(LimitExceeded, match="refused unread"):
        check_text_size(4001, b"Findings: a very long line", 1000)


def test_a_document_of_a_million_tokens_is_quarantined_by_max_chunks(tmp_path):
    from medray.encoders import build_tiny_checkpoint, get_spec
    from medray.encoders.registry import create_preprocessor
    from medray.platform.formats import PrepareContext, TextOptions, prepare_record
    from medray.testing.hostile import many_tokens_text

    ckpt = build_tiny_checkpoint("hf_text", str(tmp_path / "txt"), arch="bert")
    pre = create_preprocessor(get_spec("hf_text", checkpoint=ckpt))
    ctx = PrepareContext(name="long.txt", route="text", preprocessors={"text": pre}, options={})
    with pytest.raises(LimitExceeded, match=r"more than \d+ chunks of 64 tokens .* text.max_chunks = 1000"):
        prepare_record(many_tokens_text(10**6), ctx)  # a prefix of 512 000 characters is tokenized, not 2 MB
    small = {"text": TextOptions(max_chunks=10)}
    with pytest.raises(LimitExceeded, match=r"document has 1000 tokens in 17 chunks of 64, over text.max_chunks = 10"):
        prepare_record(many_tokens_text(1000), PrepareContext(route="text", preprocessors={"text": pre}, options=small))
    ctx = PrepareContext(
        name="long.txt", route="text", preprocessors={"text": pre}, options={"text": TextOptions(max_chunks=10**5)}
    )
    _, prepared = prepare_record(many_tokens_text(10**4), ctx)
    assert prepared.inputs.shape[0] == len(prepared.segments) > 1


def test_an_archive_of_10e5_members_is_refused_whole(tmp_path):
    from medray.testing.hostile import zip_many_members

    with pytest.raises(LimitExceeded, match="archive lists 100000 members, over 50000"):
        _outcomes(zip_many_members(100_000), "many.zip", tmp_path)


def test_a_zip_member_lying_about_its_size_is_never_inflated_whole(tmp_path):
    from medray.testing.hostile import zip_lying_member

    before = _peak_rss_mb()
    out = _outcomes(zip_lying_member(inflated=64 << 20, claimed=10), "bomb.zip", tmp_path, max_bytes=1 << 20)
    assert _peak_rss_mb() - before < 48  # not the 64 MiB it inflates to
    assert isinstance(out["bomb.dcm"], RecordError)  # the CRC of 10 bytes fails: a corrupt member
    assert quarantine_fields(out["bomb.dcm"])["stage"] == "read"
