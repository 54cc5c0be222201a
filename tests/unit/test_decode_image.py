"""Photograph decoding and format detection."""

from __future__ import annotations

import struct
import zlib
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, features

from medray.platform.decoders import DecodeLimits, decode_bytes, detect_format
from medray.platform.decoders.image import decode_image
from medray.platform.errors import DecodeError, LimitExceeded, UnsupportedFormat


def _save(image: Image.Image, fmt: str, **params) -> bytes:
    buf = BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def _rgb(width: int = 24, height: int = 16) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "BMP"])
def test_lossless_rgb_round_trip(fmt: str) -> None:
    rgb = _rgb()
    out = decode_bytes(_save(Image.fromarray(rgb), fmt))
    assert out.kind == "image" and out.modality == "photo" and out.patient_key is None
    assert [f.frame for f in out.frames] == [0]
    np.testing.assert_array_equal(out.frames[0].image, rgb)
    assert out.metadata == {"width": 24, "height": 16, "mode": "RGB", "format": fmt}


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
def test_webp_lossless() -> None:
    rgb = _rgb()
    out = decode_bytes(_save(Image.fromarray(rgb), "WEBP", lossless=True))
    np.testing.assert_array_equal(out.frames[0].image, rgb)


def test_jpeg_is_close() -> None:
    smooth = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (16, 1))
    rgb = np.stack([smooth, smooth[:, ::-1], np.full_like(smooth, 90)], axis=-1)
    got = decode_bytes(_save(Image.fromarray(rgb), "JPEG", quality=95)).frames[0].image
    assert got.shape == (16, 32, 3) and np.abs(got.astype(int) - rgb).mean() < 3


def test_grayscale_and_palette() -> None:
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    got = decode_bytes(_save(Image.fromarray(gray, "L"), "PNG")).frames[0].image
    np.testing.assert_array_equal(got, np.stack([gray] * 3, axis=-1))

    palette = Image.fromarray(_rgb()).quantize(colors=16)
    got = decode_bytes(_save(palette, "PNG")).frames[0].image
    np.testing.assert_array_equal(got, np.asarray(palette.convert("RGB")))


def test_sixteen_bit_grayscale_scaled_by_bit_depth() -> None:
    values = np.array([[0, 257 * 100, 32768, 65535]], dtype=np.uint16)
    want = np.array([0, 100, 128, 255], dtype=np.uint8)
    for fmt in ("PNG", "TIFF"):
        out = decode_bytes(_save(Image.fromarray(values), fmt))
        np.testing.assert_array_equal(out.frames[0].image[0, :, 0], want)
        assert out.metadata["mode"].startswith("I")


def test_alpha_composited_on_white() -> None:
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (255, 0, 0, 0)  # fully transparent
    rgba[1, 0] = (0, 0, 0, 128)  # half-transparent black
    got = decode_bytes(_save(Image.fromarray(rgba, "RGBA"), "PNG")).frames[0].image
    assert tuple(got[0, 0]) == (255, 0, 0)
    assert tuple(got[0, 1]) == (255, 255, 255)
    assert all(abs(int(v) - 127) <= 1 for v in got[1, 0])


def test_cmyk() -> None:
    cmyk = Image.fromarray(_rgb()).convert("CMYK")
    got = decode_bytes(_save(cmyk, "TIFF")).frames[0].image
    np.testing.assert_array_equal(got, np.asarray(cmyk.convert("RGB")))


def test_multipage_tiff_gives_first_page() -> None:
    first, second = Image.new("RGB", (4, 4), (10, 20, 30)), Image.new("RGB", (4, 4), (200, 0, 0))
    data = _save(first, "TIFF", save_all=True, append_images=[second])
    got = decode_bytes(data).frames
    assert len(got) == 1 and tuple(got[0].image[0, 0]) == (10, 20, 30)


def test_exif_orientation_is_applied_and_exif_never_copied() -> None:
    rgb = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high
    rgb[:, :20] = (255, 0, 0)  # left half red
    rgb[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    exif[0x013B] = "Doe^Jane"  # Artist
    exif[0x010E] = "MRN 884422"  # ImageDescription
    out = decode_bytes(_save(Image.fromarray(rgb), "JPEG", quality=95, exif=exif.tobytes()))
    image = out.frames[0].image
    assert image.shape == (40, 20, 3)  # now portrait
    assert image[5, 10, 0] > 200 and image[5, 10, 2] < 60  # top is the red left half
    assert image[35, 10, 2] > 200 and image[35, 10, 0] < 60  # bottom is the blue right half
    assert out.metadata == {"width": 20, "height": 40, "mode": "RGB", "format": "JPEG"}
    assert "Doe" not in str(out.metadata) and "884422" not in str(out.metadata)


# ---------------------------------------------------------------- hostile input


def _png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit all-black PNG, a few hundred KB at most on disk."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [12_000, 20_000])  # under / over Pillow's own bomb limit
def test_png_bomb(side: int) -> None:
    data = _png_bomb(side, side)
    assert len(data) < 1_000_000
    with pytest.raises(LimitExceeded):
        decode_bytes(data, limits=DecodeLimits(max_pixels=100_000_000))


def test_pixel_limit_counts_bands() -> None:
    data = _save(Image.fromarray(_rgb(10, 10)), "PNG")
    with pytest.raises(LimitExceeded, match="width\\*height\\*bands"):
        decode_image(data, limits=DecodeLimits(max_pixels=299))
    assert decode_image(data, limits=DecodeLimits(max_pixels=300)).frames


def test_oversize_and_empty() -> None:
    data = _save(Image.fromarray(_rgb()), "PNG")
    with pytest.raises(LimitExceeded, match="max_bytes"):
        decode_bytes(data, limits=DecodeLimits(max_bytes=len(data) - 1))
    with pytest.raises(UnsupportedFormat):
        decode_image(b"")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_photo(fmt: str) -> None:
    data = _save(Image.fromarray(_rgb(64, 64)), fmt)
    with pytest.raises(DecodeError):
        decode_bytes(data[: len(data) // 2])


def test_garbage_after_magic() -> None:
    with pytest.raises(DecodeError):
        decode_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 200)
    with pytest.raises(UnsupportedFormat):
        decode_image(b"GIF89a" + b"\x00" * 200)  # not an accepted format


# ---------------------------------------------------------------- detection


def test_detect_format_by_content_not_name() -> None:
    png = _save(Image.new("L", (2, 2)), "PNG")
    dicom = (Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm").read_bytes()
    assert detect_format(png, "scan.dcm") == "image"
    assert detect_format(dicom, "photo.png") == "dicom"
    assert detect_format(_save(Image.new("RGB", (2, 2)), "JPEG")) == "image"
    assert detect_format(_save(Image.new("RGB", (2, 2)), "TIFF")) == "image"
    assert detect_format(_save(Image.new("RGB", (2, 2)), "BMP")) == "image"
    assert detect_format(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image"
    with pytest.raises(UnsupportedFormat):
        detect_format(b"")
    with pytest.raises(UnsupportedFormat):
        detect_format(b"plain text, not an image " * 8, "notes.dcm")


def test_detect_format_raw_dataset_name_hint() -> None:
    # (0010,0010) PN first: only plausible as DICOM when the name says so.
    raw = b"\x10\x00\x10\x00PN\x08\x00Doe^Jane" + b"\x10\x00\x20\x00LO\x02\x00X "
    with pytest.raises(UnsupportedFormat):
        detect_format(raw)
    assert detect_format(raw, "export/IM0001.dcm") == "dicom"
    # (0008,0005) first is plausible without a hint.
    assert detect_format(b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100") == "dicom"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_an_embedded_icc_profile_is_converted_to_srgb(fmt: str) -> None:
    from PIL import ImageCms

    from medray.testing.dicom_objects import linear_rgb_profile

    ramp = np.linspace(0, 255, 32).round().astype(np.uint8)
    pixels = np.stack([np.tile(ramp, (8, 1)), np.tile(ramp[::-1], (8, 1)), np.full((8, 32), 128, np.uint8)], -1)
    profile = linear_rgb_profile()
    tagged, plain = BytesIO(), BytesIO()
    Image.fromarray(pixels).save(tagged, format=fmt, icc_profile=profile, **({"quality": 100} if fmt == "JPEG" else {}))
    Image.fromarray(pixels).save(plain, format=fmt, **({"quality": 100} if fmt == "JPEG" else {}))
    managed, unmanaged = decode_image(tagged.getvalue()), decode_image(plain.getvalue())
    assert managed.metadata["icc_profile"] is True and "icc_profile" not in unmanaged.metadata
    # what littlecms gives a colour-managed viewer: linear light -> sRGB brightens the mid-tones
    transform = ImageCms.buildTransform(
        ImageCms.ImageCmsProfile(BytesIO(profile)), ImageCms.createProfile("sRGB"), "RGB", "RGB"
    )
    want = np.asarray(ImageCms.applyTransform(Image.fromarray(unmanaged.frames[0].image), transform))
    np.testing.assert_array_equal(managed.frames[0].image, want)
    assert managed.frames[0].image[0, 0, 2] > 180  # 128 linear is about 188 in sRGB


def test_a_damaged_icc_profile_leaves_the_pixels_as_stored() -> None:
    pixels = np.full((4, 4, 3), (200, 30, 60), np.uint8)
    buf = BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", icc_profile=b"not a profile" * 10)
    out = decode_image(buf.getvalue())
    np.testing.assert_array_equal(out.frames[0].image, pixels)
    assert "icc_profile" not in out.metadata
