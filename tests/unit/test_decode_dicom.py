"""DICOM decoding: parity with pydicom's own pipeline, windows, hostile input.

The reference (`_reference_frames`) is built only from pydicom calls
(``ds.pixel_array``, ``apply_modality_lut``, ``apply_voi_lut``,
``apply_color_lut``) and the output range pydicom documents for them, so it is
independent of medray's own windowing arithmetic.
"""

from __future__ import annotations

import pickle
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, convert_color_space
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from medray.platform.decoders import (
    DecodeLimits,
    DicomOptions,
    decode_bytes,
    detect_format,
    dicom_display_frames,
)
from medray.platform.decoders.dicom import decode_dicom
from medray.platform.errors import ConfigError, DecodeError, LimitExceeded, UnsupportedFormat

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _bundled(name: str) -> str:
    """Path of a test file shipped in the pydicom wheel (never downloaded)."""
    if not (TEST_FILES / name).exists():
        pytest.skip(f"{name} is not bundled with this pydicom")
    return get_testdata_file(name)


def _scale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    norm = (values.astype(np.float64) - low) / (high - low) if high > low else values * 0.0
    return np.clip(np.rint(norm * 255), 0, 255).astype(np.uint8)


def _pydicom_window_range(ds: Dataset) -> tuple[float, float]:
    """Output range of pydicom's apply_windowing (its documented y_min/y_max)."""
    if ds.get("ModalityLUTSequence"):
        low, high = 0.0, 2.0 ** ds.ModalityLUTSequence[0].LUTDescriptor[2] - 1
    elif ds.PixelRepresentation == 0:
        low, high = 0.0, 2.0**ds.BitsStored - 1
    else:
        low, high = -(2.0 ** (ds.BitsStored - 1)), 2.0 ** (ds.BitsStored - 1) - 1
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        low = low * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        high = high * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return low, high


def _reference_frames(ds: Dataset) -> list[np.ndarray]:
    """What a viewer shows, computed with pydicom only."""
    arr = ds.pixel_array
    count = int(ds.get("NumberOfFrames") or 1)
    frames = list(arr) if count > 1 else [arr]
    photometric = ds.PhotometricInterpretation
    out = []
    for frame in frames:
        if photometric in ("MONOCHROME1", "MONOCHROME2"):
            values = apply_modality_lut(frame, ds)
            voi = apply_voi_lut(values, ds, index=0)
            if voi is values:  # no VOI in the file: min-max
                gray = _scale(values, float(values.min()), float(values.max()))
            elif ds.get("VOILUTSequence"):
                gray = _scale(voi, 0, 2.0 ** ds.VOILUTSequence[0].LUTDescriptor[2] - 1)
            else:
                gray = _scale(voi, *_pydicom_window_range(ds))
            if photometric == "MONOCHROME1":
                gray = 255 - gray
            out.append(np.stack([gray] * 3, axis=-1))
        elif photometric == "PALETTE COLOR":
            bits = ds.RedPaletteColorLookupTableDescriptor[2]
            out.append(_scale(apply_color_lut(frame, ds), 0, 2.0**bits - 1))
        else:  # pixel_array already converted YCbCr to RGB
            out.append(_scale(frame, 0, 2.0**ds.BitsStored - 1))
    return out


def _assert_close(got: np.ndarray, want: np.ndarray, tolerance: int = 1) -> None:
    assert got.dtype == np.uint8 and got.shape == want.shape
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.max() <= tolerance, f"max difference {diff.max()} grey levels"


# (file, what it covers). Every listed file ships in the pydicom wheel.
PARITY_FILES = [
    ("MR_small_implicit.dcm", "Implicit VR LE"),
    ("rtdose.dcm", "Implicit VR LE, 15 frames, 32-bit"),
    ("CT_small.dcm", "Explicit VR LE, CT rescale, no window (min-max)"),
    ("MR_small.dcm", "Explicit VR LE, file window"),
    ("liver_1frame.dcm", "Explicit VR LE, 1-bit SEG"),
    ("examples_rgb_color.dcm", "Explicit VR LE, RGB"),
    ("MR_small_bigendian.dcm", "Explicit VR BE"),
    ("rtdose_expb.dcm", "Explicit VR BE, 15 frames"),
    ("SC_rgb_small_odd_big_endian.dcm", "Explicit VR BE, RGB"),
    ("image_dfl.dcm", "Deflated Explicit VR LE"),
    ("SC_rgb_jpeg_dcmtk.dcm", "JPEG baseline, YBR_FULL"),
    ("SC_rgb_dcmtk_+eb+cy+np.dcm", "JPEG baseline, YBR_FULL_422"),
    ("examples_ybr_color.dcm", "JPEG baseline, 30 frames"),
    ("JPGExtended.dcm", "JPEG extended 12-bit"),
    ("SC_rgb_jpeg_gdcm.dcm", "JPEG lossless SV1"),
    ("MR_small_jpeg_ls_lossless.dcm", "JPEG-LS lossless"),
    ("JPEGLSNearLossless_16.dcm", "JPEG-LS near-lossless, 16-bit"),
    ("SC_rgb_jls_lossy_line.dcm", "JPEG-LS near-lossless, RGB"),
    ("MR_small_jp2klossless.dcm", "JPEG 2000 lossless"),
    ("GDCMJ2K_TextGBR.dcm", "JPEG 2000 lossless, YBR_RCT"),
    ("693_J2KI.dcm", "JPEG 2000 lossy, CT with window"),
    ("SC_rgb_gdcm_KY.dcm", "JPEG 2000 lossy, RGB"),
    ("MR_small_RLE.dcm", "RLE lossless"),
    ("SC_rgb_rle_16bit_2frame.dcm", "RLE lossless, RGB 16-bit, 2 frames"),
    ("rtdose_rle.dcm", "RLE lossless, 15 frames"),
    ("examples_palette.dcm", "PALETTE COLOR"),
    ("SC_ybr_full_422_uncompressed.dcm", "YBR_FULL_422 uncompressed"),
]


@pytest.mark.parametrize("name", [n for n, _ in PARITY_FILES])
def test_bundled_file_matches_pydicom_reference(name: str) -> None:
    path = _bundled(name)
    data = Path(path).read_bytes()
    # pixel parity: secondary-capture and ultrasound files are decoded although they may hold burned-in text
    out = decode_bytes(data, name=name, dicom=DicomOptions(allow_burned_in=True))
    want = _reference_frames(pydicom.dcmread(path))
    assert out.kind == "dicom"
    assert [f.frame for f in out.frames] == list(range(len(want)))
    for frame, expected in zip(out.frames, want):
        assert frame.image.flags["C_CONTIGUOUS"]
        _assert_close(frame.image, expected)


def test_frame_selection() -> None:
    data = Path(_bundled("rtdose.dcm")).read_bytes()
    want = _reference_frames(pydicom.dcmread(BytesIO(data)))
    assert len(decode_bytes(data).frames) == 15

    middle = decode_bytes(data, dicom=DicomOptions(frames="middle")).frames
    assert [f.frame for f in middle] == [7]
    _assert_close(middle[0].image, want[7])

    assert [f.frame for f in decode_bytes(data, dicom=DicomOptions(frames="first")).frames] == [0]

    picked = decode_bytes(data, dicom=DicomOptions(frames=(14, 0, 3))).frames
    assert [f.frame for f in picked] == [14, 0, 3]
    for frame in picked:
        _assert_close(frame.image, want[frame.frame])

    with pytest.raises(DecodeError, match="out of range"):
        decode_bytes(data, dicom=DicomOptions(frames=(15,)))


def test_frame_selection_on_encapsulated_multiframe() -> None:
    data = Path(_bundled("examples_ybr_color.dcm")).read_bytes()
    out = decode_bytes(data, dicom=DicomOptions(frames=(29, 1), allow_burned_in=True))  # an ultrasound file
    want = _reference_frames(pydicom.dcmread(BytesIO(data)))
    assert [f.frame for f in out.frames] == [29, 1]
    _assert_close(out.frames[0].image, want[29])
    _assert_close(out.frames[1].image, want[1])


def test_bad_options_fail_as_config_errors() -> None:
    with pytest.raises(ConfigError, match="dicom.frames"):
        DicomOptions(frames="last")
    with pytest.raises(ConfigError, match="dicom.frames"):
        DicomOptions(frames=(-1,))
    with pytest.raises(ConfigError, match="dicom.windows.CT"):
        DicomOptions(windows={"CT": (40, 0)})
    with pytest.raises(ConfigError, match="limits.max_pixels"):
        DecodeLimits(max_pixels=0)


# ---------------------------------------------------------------- generated data


def _to_bytes(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """Write `ds` as a Part 10 file."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.SOPClassUID = ds.get("SOPClassUID", CTImageStorage)
    ds.SOPInstanceUID = ds.get("SOPInstanceUID", generate_uid())
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _image(arr: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 16, **elements) -> Dataset:
    ds = Dataset()
    ds.Modality = "CT"
    ds.set_pixel_data(arr, photometric, bits)
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


# HU values of a small CT slice: air, lung, fat, water, soft tissue, bone.
HU = np.array([[-1024, -1000, -800, -600], [-100, 0, 40, 150], [400, 1000, 2000, 3000]])


def _ct(**elements) -> Dataset:
    """Stored values HU+1024 with the usual rescale, no window unless given."""
    stored = (HU + 1024).astype(np.uint16)
    return _image(stored, RescaleSlope=1, RescaleIntercept=-1024, **elements)


def test_ct_configured_lung_window_when_file_has_none() -> None:
    options = DicomOptions(windows={"CT": (-600, 1500)})
    got = decode_bytes(_to_bytes(_ct()), dicom=options).frames[0].image
    # Same as pydicom windowing the file if the lung window were in it.
    want = _reference_frames(pydicom.dcmread(BytesIO(_to_bytes(_ct(WindowCenter=-600, WindowWidth=1500)))))
    _assert_close(got, want[0])
    # PS3.3 C.11.2.1.2.1 with c=-600, w=1500: air (-1024 HU) is dark grey,
    # -600 HU mid grey, 150 HU and above white.
    assert got[0, 0, 0] == round(255 * ((-1024 + 600.5) / 1499 + 0.5))
    assert abs(int(got[0, 3, 0]) - 128) <= 1
    assert (got[1, 3:, 0] == 255).all() and (got[2, :, 0] == 255).all()
    assert (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()


def test_file_window_wins_unless_told_otherwise() -> None:
    data = _to_bytes(_ct(WindowCenter=40, WindowWidth=400))
    lung = {"CT": (-600.0, 1500.0)}
    file_first = decode_bytes(data, dicom=DicomOptions(windows=lung)).frames[0].image
    _assert_close(file_first, _reference_frames(pydicom.dcmread(BytesIO(data)))[0])

    config_first = decode_bytes(data, dicom=DicomOptions(windows=lung, prefer_file_voi=False))
    lung_only = decode_bytes(_to_bytes(_ct()), dicom=DicomOptions(windows=lung))
    np.testing.assert_array_equal(config_first.frames[0].image, lung_only.frames[0].image)


def test_no_window_anywhere_is_min_max() -> None:
    got = decode_bytes(_to_bytes(_ct())).frames[0].image[..., 0]
    assert got.min() == 0 and got.max() == 255
    assert got[0, 0] == 0 and got[2, 3] == 255


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_voi_lut_functions_match_pydicom(function: str) -> None:
    data = _to_bytes(_ct(WindowCenter=-200, WindowWidth=900, VOILUTFunction=function))
    got = decode_bytes(data).frames[0].image
    _assert_close(got, _reference_frames(pydicom.dcmread(BytesIO(data)))[0])


def test_voi_index_selects_second_window() -> None:
    data = _to_bytes(_ct(WindowCenter=[40, -600], WindowWidth=[400, 1500]))
    second = decode_bytes(data, dicom=DicomOptions(voi_index=1)).frames[0].image
    lung = decode_bytes(_to_bytes(_ct(WindowCenter=-600, WindowWidth=1500))).frames[0].image
    np.testing.assert_array_equal(second, lung)
    # A file with fewer windows falls back to its first one.
    single = _to_bytes(_ct(WindowCenter=40, WindowWidth=400))
    np.testing.assert_array_equal(
        decode_bytes(single, dicom=DicomOptions(voi_index=3)).frames[0].image,
        decode_bytes(single).frames[0].image,
    )


def test_voi_lut_sequence_matches_pydicom() -> None:
    item = Dataset()
    item.LUTDescriptor = [256, 0, 12]  # 256 entries, first mapped value 0, 12 bits
    item.add_new("LUTData", "US", [min(4095, i * 17) for i in range(256)])
    ds = _image(np.arange(300, dtype=np.uint16).reshape(15, 20), Modality="MR")
    ds.VOILUTSequence = [item]
    data = _to_bytes(ds)
    got = decode_bytes(data).frames[0].image
    _assert_close(got, _reference_frames(pydicom.dcmread(BytesIO(data)))[0])
    assert got[..., 0].max() == 255  # values past the LUT take its last entry


def test_monochrome1_is_inverted_after_windowing() -> None:
    stored = (HU + 1024).astype(np.uint16)
    mono1 = _image(
        stored, "MONOCHROME1", RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400, Modality="CR"
    )
    mono2 = _image(
        stored, "MONOCHROME2", RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400, Modality="CR"
    )
    got1 = decode_bytes(_to_bytes(mono1)).frames[0].image
    got2 = decode_bytes(_to_bytes(mono2)).frames[0].image
    np.testing.assert_array_equal(got1, 255 - got2)
    assert got1[0, 0, 0] == 255  # air is white on MONOCHROME1
    _assert_close(got1, _reference_frames(pydicom.dcmread(BytesIO(_to_bytes(mono1))))[0])


def test_uncompressed_ybr_full_becomes_rgb() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(16, 24, 3), dtype=np.uint8)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    ds = _image(ybr, "YBR_FULL", 8, Modality="XC")
    got = decode_bytes(_to_bytes(ds)).frames[0].image
    _assert_close(got, convert_color_space(ybr, "YBR_FULL", "RGB"))
    _assert_close(got, rgb, tolerance=3)  # the YCbCr round trip rounds


def test_enhanced_multiframe_uses_per_frame_groups() -> None:
    stored = np.stack([(HU + 1024).astype(np.uint16)] * 2)
    ds = _image(stored, NumberOfFrames=2)

    def group(**elements) -> Dataset:
        item = Dataset()
        for keyword, value in elements.items():
            setattr(item, keyword, value)
        return item

    shared = group(PixelValueTransformationSequence=[group(RescaleSlope=1, RescaleIntercept=-1024, RescaleType="HU")])
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = [
        group(FrameVOILUTSequence=[group(WindowCenter=40, WindowWidth=400)]),
        group(FrameVOILUTSequence=[group(WindowCenter=-600, WindowWidth=1500)]),
    ]
    out = decode_bytes(_to_bytes(ds))
    soft = decode_bytes(_to_bytes(_ct(WindowCenter=40, WindowWidth=400))).frames[0].image
    lung = decode_bytes(_to_bytes(_ct(WindowCenter=-600, WindowWidth=1500))).frames[0].image
    np.testing.assert_array_equal(out.frames[0].image, soft)
    np.testing.assert_array_equal(out.frames[1].image, lung)


# Transfer syntaxes re-encoded here to show lossless round trips through our
# decoder (the bundled files above cover every syntax once already).
@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_generated_lossless_round_trip(syntax: str) -> None:
    stored = np.random.default_rng(2).integers(0, 4096, size=(48, 64), dtype=np.uint16)
    ds = _image(stored, bits=12, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400)
    plain = _to_bytes(ds)
    ds = pydicom.dcmread(BytesIO(plain))
    ds.compress(syntax)
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    got = decode_bytes(buf.getvalue())
    assert got.metadata["transfer_syntax"] == syntax
    np.testing.assert_array_equal(got.frames[0].image, decode_bytes(plain).frames[0].image)


def test_generated_deflated_round_trip() -> None:
    plain = _to_bytes(_ct())
    deflated = _to_bytes(_ct(), DeflatedExplicitVRLittleEndian)
    assert deflated != plain
    got = decode_bytes(deflated)
    assert got.metadata["transfer_syntax"] == DeflatedExplicitVRLittleEndian
    np.testing.assert_array_equal(got.frames[0].image, decode_bytes(plain).frames[0].image)


def test_raw_dataset_without_preamble() -> None:
    ds = _ct(WindowCenter=40, WindowWidth=400)
    del ds.file_meta
    buf = BytesIO()
    pydicom.dcmwrite(buf, ds, implicit_vr=True, little_endian=True)  # no preamble, no meta
    raw = buf.getvalue()
    assert raw[128:132] != b"DICM" and detect_format(raw) == "dicom"
    got = decode_bytes(raw)
    np.testing.assert_array_equal(
        got.frames[0].image, decode_bytes(_to_bytes(_ct(WindowCenter=40, WindowWidth=400))).frames[0].image
    )


def test_dicom_display_frames_on_a_read_dataset() -> None:
    ds = pydicom.dcmread(_bundled("rtdose.dcm"))
    frames = dicom_display_frames(ds, DicomOptions(frames="first"))
    assert [f.frame for f in frames] == [0] and frames[0].image.shape == (10, 10, 3)


# ---------------------------------------------------------------- hostile input


def test_empty_and_random_bytes() -> None:
    with pytest.raises(UnsupportedFormat):
        decode_bytes(b"")
    with pytest.raises(UnsupportedFormat):
        decode_dicom(b"")
    noise = b"\x13\x37" + np.random.default_rng(1).bytes(4094)
    with pytest.raises(UnsupportedFormat):
        decode_bytes(noise)
    with pytest.raises(DecodeError):  # forced through the DICOM reader anyway
        decode_dicom(noise)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_jp2klossless.dcm", "examples_ybr_color.dcm"])
def test_truncated_in_half(name: str) -> None:
    data = Path(_bundled(name)).read_bytes()
    with pytest.raises(DecodeError):
        decode_bytes(data[: len(data) // 2])


def test_bomb_header_rejected_before_pixel_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    ds = _image(np.zeros((2, 2), dtype=np.uint16))
    ds.Rows = ds.Columns = 65535
    ds.NumberOfFrames = 10000
    data = _to_bytes(ds)

    def no_decode(*args, **kwargs):
        raise AssertionError("pixel data was decoded")

    from pydicom.pixels.decoders.base import Decoder

    monkeypatch.setattr(Decoder, "iter_array", no_decode)
    monkeypatch.setattr(Decoder, "as_array", no_decode)
    start = time.perf_counter()
    with pytest.raises(LimitExceeded, match="max_pixels"):
        decode_bytes(data)
    assert time.perf_counter() - start < 0.5


def test_limits() -> None:
    data = Path(_bundled("CT_small.dcm")).read_bytes()
    with pytest.raises(LimitExceeded, match="max_bytes"):
        decode_bytes(data, limits=DecodeLimits(max_bytes=len(data) - 1))
    with pytest.raises(LimitExceeded, match="max_pixels"):
        decode_bytes(data, limits=DecodeLimits(max_pixels=128 * 128 - 1))
    assert len(decode_bytes(data, limits=DecodeLimits(max_pixels=128 * 128)).frames) == 1


def test_deflate_bomb_is_rejected() -> None:
    ds = _image(np.zeros((1024, 1024), dtype=np.uint16))  # 2 MiB of zeros
    data = _to_bytes(ds, DeflatedExplicitVRLittleEndian)
    assert len(data) < 64 * 1024
    with pytest.raises(LimitExceeded, match="inflates"):
        decode_bytes(data, limits=DecodeLimits(max_bytes=1_000_000))


def test_missing_pixel_data() -> None:
    ds = _ct()
    del ds.PixelData
    with pytest.raises(DecodeError, match="no Pixel Data"):
        decode_bytes(_to_bytes(ds))


def test_undecodable_compressed_data_names_transfer_syntax() -> None:
    ds = pydicom.dcmread(_bundled("MR_small_jp2klossless.dcm"))
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 60])
    buf = BytesIO()
    ds.save_as(buf)
    with pytest.raises(DecodeError, match=r"1\.2\.840\.10008\.1\.2\.4\.90"):
        decode_bytes(buf.getvalue())


def test_unsupported_transfer_syntax() -> None:
    ds = pydicom.dcmread(_bundled("MR_small_jp2klossless.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2
    buf = BytesIO()
    ds.save_as(buf)
    with pytest.raises(UnsupportedFormat, match="MPEG2"):
        decode_bytes(buf.getvalue())


def test_missing_plugin_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    class Unavailable:
        is_available = False
        missing_dependencies = ["pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-openjpeg>=2.0"]

    monkeypatch.setattr("medray.platform.decoders.dicom.get_decoder", lambda uid: Unavailable())
    data = Path(_bundled("MR_small_jp2klossless.dcm")).read_bytes()
    with pytest.raises(DecodeError, match="install one of: pylibjpeg") as info:
        decode_bytes(data)
    assert "JPEG 2000" in str(info.value)


def test_options_normalise_and_pickle() -> None:
    # Hydra hands lists and lower-case keys; Ray pickles options to workers.
    options = DicomOptions(frames=[0, 2], windows={"ct": [-600, 1500]})
    assert options.frames == (0, 2)
    assert dict(options.windows) == {"CT": (-600.0, 1500.0)}
    assert pickle.loads(pickle.dumps(options)) == options
    assert pickle.loads(pickle.dumps(DecodeLimits(max_pixels=10))) == DecodeLimits(max_pixels=10)


@pytest.mark.parametrize(
    "name", ["CT_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "SC_rgb_jpeg_gdcm.dcm"]
)
def test_mutated_files_raise_only_record_errors(name: str) -> None:
    # Damaged headers make pydicom raise anything (NotImplementedError for an
    # unknown VR, TypeError, codec panics); all must surface as DecodeError.
    original = Path(_bundled(name)).read_bytes()
    rng = np.random.default_rng(7)
    for case in range(40):
        data = bytearray(original)
        if case % 3 == 0:
            data = data[: rng.integers(0, len(data))]
        else:
            for _ in range(rng.integers(1, 20)):
                data[rng.integers(0, len(data))] = rng.integers(0, 256)
        try:
            decode_bytes(
                bytes(data),
                limits=DecodeLimits(max_pixels=50_000_000),
                dicom=DicomOptions(allow_burned_in=True),  # the pixel path is what is fuzzed here
            )
        except DecodeError:
            pass


# ---- burned-in annotation: skipped (not quarantined) unless allowed


@pytest.mark.parametrize(
    ("sop_class", "modality", "flag", "skipped"),
    [
        (CTImageStorage, "CT", "YES", True),  # any object that says so
        (CTImageStorage, "CT", None, False),
        ("1.2.840.10008.5.1.4.1.1.7", "OT", None, True),  # secondary capture without an explicit NO
        ("1.2.840.10008.5.1.4.1.1.7", "OT", "NO", False),
        ("1.2.840.10008.5.1.4.1.1.6.1", "US", None, True),  # ultrasound
        ("1.2.840.10008.5.1.4.1.1.6.1", "US", "NO", False),
        ("1.2.840.10008.5.1.4.1.1.1", "US", None, True),  # modality US under another class
    ],
)
def test_burned_in_annotation_is_skipped_unless_allowed(sop_class, modality, flag, skipped) -> None:
    from medray.platform.errors import SkipRecord
    from medray.platform.records import quarantine_fields

    ds = _ct(SOPClassUID=sop_class, Modality=modality, PatientName="Doe^Jane", PatientID="MRN-0042")
    if flag is not None:
        ds.BurnedInAnnotation = flag
    data = _to_bytes(ds)
    if skipped:
        with pytest.raises(SkipRecord) as info:
            decode_bytes(data)
        row = quarantine_fields(info.value, "decode")
        assert row["status"] == "skipped" and row["error_class"] == "BurnedInAnnotation"
        assert "decode.allow_burned_in=true" in row["message"]
        assert "Doe" not in row["message"] and "MRN-0042" not in row["message"]
    else:
        assert decode_bytes(data).frames
    assert decode_bytes(data, dicom=DicomOptions(allow_burned_in=True)).frames  # allowed: decoded


def test_a_damaged_burned_in_object_is_quarantined_not_skipped() -> None:
    ds = _ct(SOPClassUID="1.2.840.10008.5.1.4.1.1.7", Modality="OT")
    data = _to_bytes(ds)
    with pytest.raises(DecodeError):
        decode_bytes(data[: len(data) - 200])
