"""DICOM whole-slide images: grouping, the slide interface, parity with TIFF, ICC, hostile headers (no Ray)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from medray.platform.decoders.dicom_wsi import (
    MAX_LEVEL_TILES,
    DicomWsiSlide,
    open_dicom_wsi,
    sniff_dicom_wsi,
)
from medray.platform.decoders.slide import SlideOptions, open_slide, plan_slide, read_tile
from medray.platform.errors import DecodeError, LimitExceeded, RecordError, SkipRecord
from medray.platform.formats import detect
from medray.platform.storage import open_fs
from medray.testing.dicom_wsi import (
    PATIENT_ID,
    PATIENT_NAME,
    dicom_wsi_files,
    dicom_wsi_level,
    srgb_icc_profile,
    wide_gamut_icc_profile,
)
from medray.testing.media import slide_pyramid, slide_tiff

OPTIONS = SlideOptions(target_mpp=0.5, tile_size=64)


def _write(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def _sniff(path: Path) -> DicomWsiSlide | None:
    fs, p = open_fs(str(path))
    return sniff_dicom_wsi(str(path), fs, p)


def test_detect_claims_wsi_before_generic_dicom() -> None:
    from pydicom.data import get_testdata_file

    level = dicom_wsi_files(size=256, levels=2)["level0.dcm"]
    fmt, route = detect(level, "level0.dcm")
    assert (fmt.name, route) == ("dicom_wsi", "slide")
    ct = Path(str(get_testdata_file("CT_small.dcm"))).read_bytes()
    assert detect(ct, "ct.dcm")[0].name == "dicom"


def test_level_files_group_into_one_slide_keyed_by_its_base_level(tmp_path: Path) -> None:
    folder = _write(tmp_path / "slides", dicom_wsi_files(size=512, levels=3))
    # a second slide (another series) in the same folder, and a label image of the first
    other = dicom_wsi_files(size=256, levels=2, series_uid="1.2.826.0.1.3680043.8.498.99", seed=3)
    _write(folder, {f"b_{k}": v for k, v in other.items()})
    label = dicom_wsi_level(np.full((64, 64, 3), 200, np.uint8), mpp=10.0, tile=64, level=5)
    (folder / "label.dcm").write_bytes(_retype(label, "LABEL"))
    (folder / "notes.txt").write_text("not a slide")

    slide = _sniff(folder / "level0.dcm")
    assert slide is not None and slide.uri == str(folder / "level0.dcm")
    assert [Path(f.uri).name for f in slide.files] == ["level0.dcm", "level1.dcm", "level2.dcm", "label.dcm"]
    assert slide.level_count == 3 and slide.level_dimensions == ((512, 512), (256, 256), (128, 128))
    with pytest.raises(SkipRecord) as level:
        _sniff(folder / "level2.dcm")
    assert level.value.reason == "WsiLevel"
    with pytest.raises(SkipRecord) as lab:
        _sniff(folder / "label.dcm")
    assert lab.value.reason == "WsiLabel"
    second = _sniff(folder / "b_level0.dcm")
    assert second is not None and second.level_dimensions[0] == (256, 256)
    assert _sniff(folder / "notes.txt") is None


def _retype(data: bytes, kind: str) -> bytes:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.ImageType = ["ORIGINAL", "PRIMARY", kind, "NONE"]
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("sparse", [False, True], ids=["tiled_full", "tiled_sparse"])
def test_tiles_equal_the_same_pixels_as_a_tiff_slide(tmp_path: Path, sparse: bool) -> None:
    folder = _write(tmp_path / "wsi", dicom_wsi_files(size=512, levels=3, sparse=sparse))
    tif = tmp_path / "slide.tif"
    tif.write_bytes(slide_tiff(size=512, levels=3))
    dcm, tiff = open_dicom_wsi(str(folder / "level0.dcm")), open_slide(str(tif))
    assert dcm.level_dimensions == tiff.level_dimensions
    assert dcm.level_downsamples == tiff.level_downsamples
    for options in (OPTIONS, SlideOptions(target_mpp=0.25, tile_size=32), SlideOptions(target_mpp=0.7, tile_size=40)):
        plan_d, plan_t = plan_slide(dcm, options), plan_slide(tiff, options)
        assert plan_d.tiles == plan_t.tiles and plan_d.tiles
        assert {k: v for k, v in plan_d.metadata.items() if k != "vendor"} == {
            k: v for k, v in plan_t.metadata.items() if k != "vendor"
        }
        for a, b in zip(plan_d.tiles, plan_t.tiles):
            assert np.array_equal(read_tile(dcm, a), read_tile(tiff, b))


def test_region_outside_the_level_is_padded_black_like_tiffslide(tmp_path: Path) -> None:
    folder = _write(tmp_path / "wsi", dicom_wsi_files(size=256, levels=2))
    tif = tmp_path / "slide.tif"
    tif.write_bytes(slide_tiff(size=256, levels=2))
    dcm, tiff = open_dicom_wsi(str(folder / "level0.dcm")), open_slide(str(tif))
    a = np.asarray(dcm.read_region((200, 220), 0, (100, 50)).convert("RGB"))
    b = np.asarray(tiff.read_region((200, 220), 0, (100, 50)).convert("RGB"))
    assert np.array_equal(a, b) and (a[:, 60:] == 0).all()


def test_sparse_gaps_are_white_background_not_damage(tmp_path: Path) -> None:
    # level 0 has tiles 128 px; drop two tissue tiles of the ellipse
    folder = _write(tmp_path / "wsi", dicom_wsi_files(size=512, levels=3, sparse=True, drop_tiles=[(1, 1), (0, 1)]))
    slide = _sniff(folder / "level0.dcm")
    assert slide is not None
    gap = slide.read_region((128, 128), 0, (128, 128), as_array=True)
    assert (gap == 255).all()
    kept = slide.read_region((256, 0), 0, (128, 128), as_array=True)
    assert np.array_equal(kept, slide_pyramid(512, 3)[0][0:128, 256:384])
    plan_slide(slide, SlideOptions(target_mpp=0.25, tile_size=64))  # reads fine, gaps and all


def test_icc_profile_is_converted_to_srgb(tmp_path: Path) -> None:
    icc = wide_gamut_icc_profile()
    plain = open_dicom_wsi(str(_write(tmp_path / "plain", dicom_wsi_files(size=256, levels=2)) / "level0.dcm"))
    tagged = open_dicom_wsi(
        str(_write(tmp_path / "icc", dicom_wsi_files(size=256, levels=2, icc_profile=icc)) / "level0.dcm")
    )
    srgb = open_dicom_wsi(
        str(
            _write(tmp_path / "srgb", dicom_wsi_files(size=256, levels=2, icc_profile=srgb_icc_profile()))
            / "level0.dcm"
        )
    )
    raw = plain.read_region((0, 0), 0, (128, 128))
    expected = ImageCms.profileToProfile(raw, ImageCms.ImageCmsProfile(io.BytesIO(icc)), ImageCms.createProfile("sRGB"))
    got = tagged.read_region((0, 0), 0, (128, 128))
    assert isinstance(expected, Image.Image)
    assert np.array_equal(np.asarray(got), np.asarray(expected))
    assert np.abs(np.asarray(got, int) - np.asarray(raw, int)).max() > 20  # red and blue really moved
    assert np.abs(np.asarray(srgb.read_region((0, 0), 0, (128, 128)), int) - np.asarray(raw, int)).max() <= 1
    assert tagged.properties["dicom.icc_profile"] is True


def _quarantine_reason(tmp_path: Path, level0: bytes) -> RecordError:
    folder = _write(tmp_path / "bad", {"level0.dcm": level0})
    with pytest.raises(RecordError) as err:
        _sniff(folder / "level0.dcm")
    text = str(err.value)
    assert PATIENT_NAME.split("^")[0] not in text and PATIENT_ID not in text and str(folder) not in text
    return err.value


def test_level_claiming_huge_dimensions_is_quarantined_before_any_pixel(tmp_path: Path) -> None:
    image = slide_pyramid(256, 1)[0]
    err = _quarantine_reason(tmp_path, dicom_wsi_level(image, mpp=0.25, claim_size=(2_000_000, 2_000_000)))
    assert isinstance(err, LimitExceeded) and f"over {MAX_LEVEL_TILES} tiles" in str(err)
    err = _quarantine_reason(tmp_path / "b", dicom_wsi_level(image, mpp=0.25, claim_size=(4096, 4096)))
    assert isinstance(err, DecodeError) and "tiles are missing" in str(err)


def test_truncated_pixel_data_and_inconsistent_sparse_frames_are_quarantined(tmp_path: Path) -> None:
    image = slide_pyramid(256, 1)[0]
    err = _quarantine_reason(tmp_path, dicom_wsi_level(image, mpp=0.25, truncate_frames=2))
    assert isinstance(err, DecodeError) and "shorter than its 4 frames" in str(err)
    err = _quarantine_reason(tmp_path / "b", dicom_wsi_level(image, mpp=0.25, sparse=True, truncate_frames=1))
    assert isinstance(err, DecodeError) and "TILED_SPARSE" in str(err)


def test_frame_over_max_pixels_is_quarantined(tmp_path: Path) -> None:
    from medray.platform.decoders.base import DecodeLimits

    folder = _write(tmp_path / "wsi", dicom_wsi_files(size=256, levels=2))
    fs, p = open_fs(str(folder / "level0.dcm"))
    with pytest.raises(LimitExceeded, match="limits.max_pixels"):
        sniff_dicom_wsi(str(folder / "level0.dcm"), fs, p, limits=DecodeLimits(max_pixels=1000))


def test_a_lone_smaller_level_becomes_the_base(tmp_path: Path) -> None:
    files = dicom_wsi_files(size=512, levels=3)
    folder = _write(tmp_path / "wsi", {"level1.dcm": files["level1.dcm"], "level2.dcm": files["level2.dcm"]})
    slide = _sniff(folder / "level1.dcm")
    assert slide is not None and slide.dimensions == (256, 256) and slide.level_count == 2
    assert os.path.basename(slide.files[1].uri) == "level2.dcm"


def test_stages_tile_a_dicom_wsi_like_its_tiff_and_skip_its_other_levels(tmp_path: Path) -> None:
    import json
    import zipfile

    import pyarrow as pa

    from medray.encoders import build_tiny_checkpoint, get_spec
    from medray.pipeline import StageOptions, decode_batch, read_batch
    from medray.platform.sources import ARCHIVE_MEMBER_PENDING

    folder = _write(tmp_path / "wsi", dicom_wsi_files(size=512, levels=3))
    tif = tmp_path / "slide.tif"
    tif.write_bytes(slide_tiff(size=512, levels=3))
    archive = tmp_path / "inside.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("level0.dcm", (folder / "level0.dcm").read_bytes())
    ckpt = build_tiny_checkpoint("hf_image", str(tmp_path / "vit"), arch="vit", image_size=32)
    opts = StageOptions(encoder_spec=get_spec("hf_image", checkpoint=ckpt), slide={"target_mpp": 0.5, "tile_size": 32})
    uris = [str(tif), *(str(folder / f"level{k}.dcm") for k in range(3))]
    src = pa.table({"uri": uris, "member": [""] * len(uris)})

    main = read_batch(src, opts, part="main").to_pylist()
    assert [(Path(r["uri"]).name, r["status"], r["error_class"]) for r in main] == [
        ("level1.dcm", "skipped", "WsiLevel"),
        ("level2.dcm", "skipped", "WsiLevel"),
    ]
    tiles = read_batch(src, opts, part="slides")
    decoded = decode_batch(tiles, opts).to_pylist()
    by_slide: dict[str, list[dict]] = {}
    for row in decoded:
        assert row["status"] == "ok", row["message"]
        by_slide.setdefault(Path(row["uri"]).name, []).append(row)
    t, d = by_slide["slide.tif"], by_slide["level0.dcm"]
    assert len(t) == len(d) == 10
    for a, b in zip(t, d):
        assert json.loads(a["segments"]) == json.loads(b["segments"])
        assert a["pixel_values"] == b["pixel_values"] and a["content_sha256"] == b["content_sha256"]
    assert json.loads(d[0]["metadata"])["vendor"] == "dicom"
    # without a slide branch (inputs of DICOM names only) one read task does both parts
    both = read_batch(src.slice(1), opts).to_pylist()
    assert sum(1 for r in both if r["tile"]) == 10
    assert sorted(r["error_class"] for r in both if r["status"] == "skipped") == ["WsiLevel", "WsiLevel"]

    zipped = decode_batch(read_batch(pa.table({"uri": [str(archive)], "member": [ARCHIVE_MEMBER_PENDING]}), opts), opts)
    row = zipped.to_pylist()[0] if zipped.num_rows else None
    assert (
        row is not None and row["status"] == "error" and "DICOM whole-slide image level met as bytes" in row["message"]
    )
