"""Decode DICOM bytes into the frames a radiologist's viewer would show.

The pipeline follows the DICOM grayscale chain: stored values -> Modality LUT
(rescale slope/intercept, e.g. to HU) -> VOI (the file's VOI LUT or window,
else a configured window for the modality, else the frame's min-max) ->
0..255 -> inverted for MONOCHROME1 or a Presentation LUT Shape of INVERSE ->
three channels. Colour data goes through the palette or YCbCr->RGB
conversion, is scaled to 8 bits and, when the object carries an ICC profile
(ICC Profile module, or its first optical path), converted from it to sRGB as
a colour-managed viewer shows it.

Pixel data is decoded by pydicom's backends (pylibjpeg and its plugins,
pyjpegls), one selected frame at a time, and only after the header has passed
:class:`~medray.platform.decoders.DecodeLimits`.

Example:
    >>> from pydicom.data import get_testdata_file
    >>> data = open(get_testdata_file("CT_small.dcm"), "rb").read()
    >>> out = decode_dicom(data, options=DicomOptions(windows={"CT": (40, 400)}))
    >>> out.modality, out.frames[0].image.shape, out.frames[0].image.dtype
    ('CT', (128, 128, 3), dtype('uint8'))
"""

from __future__ import annotations

import contextlib
import logging
import struct
import warnings
import zlib
from collections.abc import Iterator
from io import BytesIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import (
    apply_color_lut,
    apply_icc_profile,
    apply_modality_lut,
    apply_voi,
    as_pixel_options,
    convert_color_space,
    create_icc_transform,
    get_decoder,
)
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from medray.platform.decoders.base import (
    Decoded,
    DecodedFrame,
    DecodeLimits,
    DicomOptions,
    check_size,
)
from medray.platform.deid import extract_metadata, patient_key, safe_uid
from medray.platform.errors import DecodeError, LimitExceeded, RecordError, SkipRecord, UnsupportedFormat

__all__ = ["BURNED_IN_PRONE", "check_burned_in", "decode_dicom", "dicom_display_frames", "frame_view", "icc_transform"]

_NATIVE = {
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
}
# Every Photometric Interpretation the standard defines; anything else is
# reported as "unrecognised" rather than echoed.
_KNOWN_PHOTOMETRIC = {
    "MONOCHROME1",
    "MONOCHROME2",
    "PALETTE COLOR",
    "RGB",
    "YBR_FULL",
    "YBR_FULL_422",
    "YBR_ICT",
    "YBR_RCT",
    "YBR_PARTIAL_420",
    "YBR_PARTIAL_422",
    "HSV",
    "ARGB",
    "CMYK",
    "XYB",
}
_MONOCHROME = {"MONOCHROME1", "MONOCHROME2"}
_COLOR = {"PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"}
# Elements the grayscale chain reads; copied into a per-frame view when an
# enhanced multi-frame overrides them in its functional groups.
_VOI_KEYWORDS = (
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
    "PresentationLUTShape",
)
_FRAME_MACROS = ("PixelValueTransformationSequence", "FrameVOILUTSequence")
_INFLATE_CHUNK = 1 << 24


class _WithholdPydicomLog(logging.Filter):
    """pydicom's logs quote raw element values (PHI) and attach tracebacks
    that may too: keep the event (level, logger, location), drop the text."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = "pydicom message withheld by medray (it may quote DICOM header values)"
        record.args = ()
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def _withhold_pydicom_logs() -> None:
    """Attach the filter to every pydicom logger (filters do not propagate)."""
    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] == "pydicom"]
    for name in ["pydicom", *names]:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _WithholdPydicomLog) for f in logger.filters):
            logger.addFilter(_WithholdPydicomLog())


_withhold_pydicom_logs()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence pydicom's warnings, which quote header values (PHI)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def guarded(what: str) -> Iterator[None]:
    """Run quietly and turn any library failure into a PHI-free DecodeError.

    pydicom converts elements lazily, so a damaged header can raise anything
    (NotImplementedError for an unknown VR, TypeError, ...) wherever a value is
    first read; Rust codecs even panic with a non-``Exception``. Only the
    exception's class name is kept: its text may quote header values.
    """
    try:
        with quiet():
            yield
    except (RecordError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - pydicom and its plugins raise anything; messages may quote values
        raise DecodeError(f"{what} ({type(exc).__name__})") from None


def _ts_label(uid: object) -> str:
    """Name and UID of a transfer syntax, or a placeholder for odd values."""
    safe = safe_uid(uid)
    return f"{UID(safe).name} ({safe})" if safe else "a non-standard transfer syntax UID"


def _meta_transfer_syntax(data: bytes) -> tuple[str, int]:
    """Read (TransferSyntaxUID, end offset) from a Part 10 file meta group.

    Just enough parsing to learn whether the dataset is deflated before pydicom
    inflates it; returns ``("", offset)`` when the UID is not found.
    """
    pos, uid = 132, ""
    while pos + 12 <= len(data):  # the longest element header is 12 bytes
        group, element = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        if bytes(data[pos + 4 : pos + 6]) in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
            length, header = struct.unpack_from("<I", data, pos + 8)[0], 12
        else:
            length, header = struct.unpack_from("<H", data, pos + 6)[0], 8
        if element == 0x0010:
            raw = bytes(data[pos + header : pos + header + length])
            uid = raw.rstrip(b"\x00 ").decode("ascii", "replace")
        pos += header + length
    return uid, pos


def _check_inflated_size(data: bytes, limits: DecodeLimits) -> None:
    """Reject a deflated dataset whose inflated size is over ``max_bytes``.

    pydicom inflates the whole dataset at once, so a small deflate bomb would
    otherwise become gigabytes in memory before any header check.
    """
    if bytes(data[128:132]) != b"DICM":
        return
    uid, start = _meta_transfer_syntax(data)
    if uid != DeflatedExplicitVRLittleEndian:
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pending, total = bytes(data[start:]), 0
    try:
        while pending:
            total += len(inflater.decompress(pending, _INFLATE_CHUNK))
            if total > limits.max_bytes:
                raise LimitExceeded(
                    f"deflated dataset inflates to over max_bytes = {limits.max_bytes}; "
                    "raise DecodeLimits.max_bytes to accept it"
                )
            pending = inflater.unconsumed_tail
    except zlib.error:
        raise DecodeError(f"deflated dataset of {_ts_label(uid)} is corrupt (zlib.error)") from None


def read_dataset(data: bytes, limits: DecodeLimits) -> Dataset:
    """Parse `data` with pydicom, making sure a transfer syntax is known."""
    _check_inflated_size(data, limits)
    has_preamble = bytes(data[128:132]) == b"DICM"
    with guarded("not a readable DICOM dataset; the file may be truncated or not DICOM"):
        ds = pydicom.dcmread(BytesIO(data), force=not has_preamble)
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is None:
        ds.file_meta = file_meta = FileMetaDataset()
    if not file_meta.get("TransferSyntaxUID"):
        # No file meta (raw dataset): the reader already worked out the encoding.
        implicit, little = ds.original_encoding
        if little is None:
            raise DecodeError("cannot tell the dataset's encoding: no transfer syntax")
        file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
    return ds


def _header_int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    """A required positive integer from the Image Pixel module."""
    value = ds.get(keyword, default)
    try:
        number = int(value)  # IS values arrive as str subclasses
    except (TypeError, ValueError):
        raise DecodeError(f"{keyword} is missing or not an integer") from None
    if number < 1:
        raise DecodeError(f"{keyword} must be >= 1, got {number}")
    return number


def _photometric(ds: Dataset) -> str:
    """The Photometric Interpretation, validated against the standard's list."""
    value = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    if value not in _KNOWN_PHOTOMETRIC:
        raise UnsupportedFormat("Photometric Interpretation is missing or unrecognised")
    if value not in _MONOCHROME | _COLOR:
        raise UnsupportedFormat(f"Photometric Interpretation {value} is not supported")
    return value


def check_header(ds: Dataset, limits: DecodeLimits) -> tuple[int, str]:
    """Validate the Image Pixel module against `limits`; touch no pixel data.

    Returns:
        (number of frames, photometric interpretation).
    """
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise UnsupportedFormat("float pixel data (e.g. parametric maps) is not supported")
        sop = safe_uid(ds.get("SOPClassUID"))
        what = f"SOP class {sop} ({UID(sop).name})" if sop else "SOP class unknown"
        raise DecodeError(f"no Pixel Data element: a truncated file or a non-image object ({what})")
    rows = _header_int(ds, "Rows")
    columns = _header_int(ds, "Columns")
    frames = _header_int(ds, "NumberOfFrames", 1) if ds.get("NumberOfFrames") else 1
    samples = _header_int(ds, "SamplesPerPixel", 1)
    bits = _header_int(ds, "BitsAllocated")
    pixels = rows * columns * frames * samples
    if pixels > limits.max_pixels:
        raise LimitExceeded(
            f"Rows*Columns*Frames*SamplesPerPixel = {rows}*{columns}*{frames}*{samples} "
            f"= {pixels:.3g} exceeds max_pixels = {limits.max_pixels:.3g}; "
            "raise DecodeLimits.max_pixels to accept it"
        )
    photometric = _photometric(ds)
    if (samples == 1) != (photometric in _MONOCHROME | {"PALETTE COLOR"}):
        raise DecodeError(f"SamplesPerPixel = {samples} contradicts {photometric}")
    if ds.file_meta.TransferSyntaxUID in _NATIVE:
        per_frame = rows * columns * samples * bits
        if photometric == "YBR_FULL_422":
            per_frame = per_frame * 2 // 3  # two chroma samples shared by two pixels
        expected = (per_frame * frames + 7) // 8
        if len(ds.PixelData) < expected:
            raise DecodeError(
                f"pixel data is truncated: {len(ds.PixelData)} bytes, the header implies "
                f"{expected} ({frames} frames of {rows}x{columns}x{samples} at {bits} bits)"
            )
    return frames, photometric


def _select_frames(spec: str | tuple[int, ...], count: int) -> list[int]:
    """Resolve a :attr:`DicomOptions.frames` spec against `count` frames."""
    if spec == "all":
        return list(range(count))
    if spec == "first":
        return [0]
    if spec == "middle":
        return [count // 2]
    indices = [int(i) for i in spec]  # a tuple of ints (DicomOptions checked it)
    bad = [i for i in indices if not 0 <= i < count]
    if bad:
        raise DecodeError(f"frame index {bad[0]} is out of range for {count} frames")
    return indices


def frame_view(ds: Dataset, index: int) -> Dataset:
    """`ds`, or a small view of it with frame `index`'s functional groups applied.

    Enhanced multi-frame objects keep rescale and window per frame (or shared)
    in Pixel Value Transformation / Frame VOI LUT macros; pydicom's LUT
    functions read top-level elements, so those are copied into a view.
    """
    groups = []
    for keyword, position in (("SharedFunctionalGroupsSequence", 0), ("PerFrameFunctionalGroupsSequence", index)):
        sequence = ds.get(keyword)
        if sequence and position < len(sequence):
            groups.append(sequence[position])
    items = [g.get(m)[0] for g in groups for m in _FRAME_MACROS if g.get(m)]
    if not items:
        return ds
    view = Dataset()
    view.file_meta = ds.file_meta  # VOI/Modality LUT data endianness
    view.set_original_encoding(*ds.original_encoding)
    for keyword in _VOI_KEYWORDS:
        if keyword in ds:
            view[keyword] = ds[keyword]
    for item in items:  # shared first, then per-frame: per-frame wins
        for keyword in _VOI_KEYWORDS:
            if keyword in item:
                view[keyword] = item[keyword]
    return view


def _nth(value: object, index: int) -> float:
    """`index`-th value of a multi-valued DS (first when there are fewer)."""
    if isinstance(value, (str, bytes, int, float)):
        return float(value)
    values = list(value)  # type: ignore[call-overload]
    return float(values[index] if index < len(values) else values[0])


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray | None:
    """A window (PS3.3 C.11.2.1.2) normalised to 0..1; None if `width` is invalid.

    Same as pydicom's ``apply_windowing`` divided by its output range.
    """
    if function == "SIGMOID":
        if width <= 0:
            return None
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        if width <= 0:
            return None
    else:  # LINEAR, also the default for absent or unknown functions
        if width < 1:
            return None
        center, width = center - 0.5, width - 1.0
        if width == 0:
            return (values > center).astype(np.float64)
    return np.clip((values - center) / width + 0.5, 0.0, 1.0)


def _file_voi(values: np.ndarray, view: Dataset, index: int) -> np.ndarray | None:
    """The file's VOI LUT (preferred) or window, normalised to 0..1, or None."""
    sequence = view.get("VOILUTSequence")
    if sequence:
        item = sequence[index] if index < len(sequence) else sequence[0]
        descriptor = item.get("LUTDescriptor")
        if descriptor is not None and item.get("LUTData") is not None:
            lut_view = Dataset()
            lut_view.file_meta = view.file_meta
            lut_view.set_original_encoding(*view.original_encoding)
            lut_view.VOILUTSequence = [item]
            try:
                out = apply_voi(values, lut_view, 0)
                return np.clip(out / float(2 ** int(descriptor[2]) - 1), 0.0, 1.0)
            except Exception:  # noqa: BLE001 - a malformed LUT falls back to the window
                pass
    center, width = view.get("WindowCenter"), view.get("WindowWidth")
    if center in (None, "") or width in (None, ""):
        return None
    try:
        c, w = _nth(center, index), _nth(width, index)
    except (TypeError, ValueError, IndexError):
        return None
    function = str(view.get("VOILUTFunction") or "LINEAR").strip().upper()
    return _window(values, c, w, function)


def _voi_window(values: np.ndarray, view: Dataset, options: DicomOptions, modality: str) -> np.ndarray | None:
    """The file's or the configured VOI per `options`, values in 0..1; None when neither applies."""

    def configured() -> np.ndarray | None:
        window = options.windows.get(modality) or options.windows.get("*")
        return _window(values, window[0], window[1], "LINEAR") if window else None

    def from_file() -> np.ndarray | None:
        return _file_voi(values, view, options.voi_index)

    for step in (from_file, configured) if options.prefer_file_voi else (configured, from_file):
        out = step()
        if out is not None:
            return out
    return None


def _voi_normalised(values: np.ndarray, view: Dataset, options: DicomOptions, modality: str) -> np.ndarray:
    """Pick the VOI transform per `options` and return values in 0..1 (min-max as the last resort)."""
    out = _voi_window(values, view, options, modality)
    if out is not None:
        return out
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.float64)
    return (values - low) / (high - low)


def _to_uint8(values: np.ndarray, max_value: float) -> np.ndarray:
    """Scale 0..`max_value` to 0..255 with rounding."""
    if values.dtype == np.uint8 and max_value == 255:
        return values
    scaled = np.rint(values.astype(np.float64) * (255.0 / max_value))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _monochrome_rgb(
    arr: np.ndarray, view: Dataset, options: DicomOptions, modality: str, photometric: str
) -> np.ndarray:
    """Grayscale chain: Modality LUT -> VOI -> 8 bits -> MONOCHROME1 inversion."""
    lut = _display_lut(arr, view, options, modality, photometric)
    if lut is not None:
        table, low = lut
        if low >= 0:  # pad the table down to 0 so the stored values index it directly
            table = np.concatenate([np.zeros(low, np.uint8), table]) if low else table
            gray = np.take(table, arr)
        else:
            gray = np.take(table, arr.astype(np.int32) - low)
        return np.stack([gray, gray, gray], axis=-1)
    values = apply_modality_lut(arr, view)
    gray = _to_uint8(_voi_normalised(values.astype(np.float64), view, options, modality), 1.0)
    if _inverted(view, photometric):
        gray = 255 - gray  # after windowing, as the standard orders it
    return np.repeat(gray[..., np.newaxis], 3, axis=2)


def _inverted(view: Dataset, photometric: str) -> bool:
    """Whether the displayed grey levels are inverted: MONOCHROME1 (low values bright), or a
    Presentation LUT Shape of INVERSE (PS3.3 C.11.6), as a viewer shows them.

    A MONOCHROME1 object that also says INVERSE (as DX objects must) is inverted
    once: both name the same thing.
    """
    shape = str(view.get("PresentationLUTShape") or "").strip().upper()
    return photometric == "MONOCHROME1" or shape == "INVERSE"


def _display_lut(
    arr: np.ndarray, view: Dataset, options: DicomOptions, modality: str, photometric: str
) -> tuple[np.ndarray, int] | None:
    """The whole grayscale chain as one uint8 lookup table over the stored values.

    Modality LUT, VOI and inversion are element-wise functions of the stored
    value, so for integer pixels a viewer evaluates them once per distinct
    value (at most 65536) and gathers, instead of once per pixel in float64.
    Returns ``(lut, lowest stored value)``, or None when a table does not pay
    off or does not apply (float pixels, no window so min-max of the frame).
    """
    if arr.dtype.kind not in "iu" or arr.dtype.itemsize > 2 or arr.size < 4096:
        return None
    low, high = int(arr.min()), int(arr.max())
    domain = np.arange(low, high + 1, dtype=np.int64).astype(arr.dtype)
    norm = _voi_window(apply_modality_lut(domain, view).astype(np.float64), view, options, modality)
    if norm is None:
        return None
    lut = _to_uint8(norm, 1.0)
    if _inverted(view, photometric):
        lut = 255 - lut
    return lut, low


def _ycbcr_rct_to_rgb(arr: np.ndarray, bits: int) -> np.ndarray:
    """Inverse reversible colour transform (JPEG 2000 RCT), when left undone."""
    offset = 1 << (bits - 1)
    y, cb, cr = (arr[..., i].astype(np.int64) for i in range(3))
    cb, cr = cb - offset, cr - offset
    g = y - ((cb + cr) >> 2)
    return np.stack([cr + g, g, cb + g], axis=-1).clip(0, (1 << bits) - 1)


def _color_rgb(arr: np.ndarray, ds: Dataset, photometric: str, bits: int) -> np.ndarray:
    """Palette/YCbCr/RGB frame -> 8-bit RGB."""
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        lut_bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        return _to_uint8(rgb, float(2**lut_bits - 1))
    if photometric == "YBR_RCT":
        arr = _ycbcr_rct_to_rgb(arr, bits)
    elif photometric.startswith("YBR_"):
        # ICT is the YBR_FULL transform; the decoder normally undid it already.
        current = "YBR_FULL_422" if photometric == "YBR_FULL_422" else "YBR_FULL"
        arr = convert_color_space(arr, current, "RGB")
    return _to_uint8(arr, float(2**bits - 1))


def icc_transform(ds: Dataset) -> object | None:
    """The colour transform from the object's ICC profile to sRGB, or ``None`` when it has none.

    The profile is the ICC Profile module's (0028,2000), or that of the first
    optical path (whole-slide and other VL objects). A damaged profile gives
    ``None``: the pixels are shown unmanaged, as a viewer would.
    """
    profile = ds.get("ICCProfile")
    if not profile:
        paths = ds.get("OpticalPathSequence")
        profile = paths[0].get("ICCProfile") if paths else None
    if not profile:
        return None
    try:
        with quiet():
            return create_icc_transform(icc_profile=bytes(profile), color_space="sRGB")
    except Exception:  # noqa: BLE001 - littlecms rejects a damaged profile with various errors
        return None


def dicom_display_frames(
    ds: Dataset,
    options: DicomOptions = DicomOptions(),
    *,
    limits: DecodeLimits = DecodeLimits(),
) -> list[DecodedFrame]:
    """Decode the selected frames of `ds` into display-ready RGB.

    Args:
        ds: a dataset read by pydicom, with its pixel data (and file meta).
        options: frame selection and VOI choice.
        limits: checked against the header before any frame is decoded.

    Returns:
        One :class:`DecodedFrame` per selected frame, ``uint8`` ``(H, W, 3)``.

    Raises:
        LimitExceeded: the header's pixel count is over ``limits.max_pixels``.
        UnsupportedFormat: unsupported transfer syntax or photometric
            interpretation.
        DecodeError: missing/truncated pixel data, no installed plugin for the
            transfer syntax (the message says what to install), bad frame
            index, or a codec failure.
    """
    with guarded("malformed DICOM header or pixel data"):
        return _display_frames(ds, options, limits)


#: SOP classes whose pixels often carry burned-in patient text: secondary capture (screenshots,
#: scanned documents) and ultrasound (the scanner's overlay is part of the image).
BURNED_IN_PRONE = {
    "1.2.840.10008.5.1.4.1.1.7": "secondary capture",
    "1.2.840.10008.5.1.4.1.1.7.1": "secondary capture",
    "1.2.840.10008.5.1.4.1.1.7.2": "secondary capture",
    "1.2.840.10008.5.1.4.1.1.7.3": "secondary capture",
    "1.2.840.10008.5.1.4.1.1.7.4": "secondary capture",
    "1.2.840.10008.5.1.4.1.1.6.1": "ultrasound",
    "1.2.840.10008.5.1.4.1.1.6.2": "ultrasound",
    "1.2.840.10008.5.1.4.1.1.3.1": "ultrasound",
}


def check_burned_in(ds: Dataset, options: DicomOptions) -> None:
    """Skip an object whose pixels may show patient text, unless ``options.allow_burned_in``.

    ``BurnedInAnnotation=YES`` always; secondary capture and ultrasound objects
    (by SOP class, or modality US) unless they say ``BurnedInAnnotation=NO``.

    Raises:
        SkipRecord: reason ``BurnedInAnnotation``.
    """
    if options.allow_burned_in:
        return
    flag = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if flag == "YES":
        raise SkipRecord(
            "BurnedInAnnotation",
            "BurnedInAnnotation=YES: its pixels show text that may identify the patient "
            "(decode.allow_burned_in=true embeds it anyway)",
        )
    sop = str(ds.get("SOPClassUID", "") or getattr(ds.get("file_meta"), "MediaStorageSOPClassUID", "") or "")
    kind = BURNED_IN_PRONE.get(sop) or ("ultrasound" if str(ds.get("Modality", "")).upper() == "US" else None)
    if kind is not None and flag != "NO":
        raise SkipRecord(
            "BurnedInAnnotation",
            f"a {kind} object without BurnedInAnnotation=NO: its pixels may show text that identifies the patient "
            "(decode.allow_burned_in=true embeds it anyway)",
        )


def _display_frames(ds: Dataset, options: DicomOptions, limits: DecodeLimits) -> list[DecodedFrame]:
    """Body of :func:`dicom_display_frames`, run with pydicom's warnings off."""
    if getattr(ds, "file_meta", None) is None or not ds.file_meta.get("TransferSyntaxUID"):
        raise DecodeError("dataset has no file meta Transfer Syntax UID")
    count, photometric = check_header(ds, limits)  # damage and limits first: those are quarantined
    check_burned_in(ds, options)
    indices = _select_frames(options.frames, count)
    uid = ds.file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise UnsupportedFormat(f"no pixel decoder for {_ts_label(uid)}") from None
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
        raise DecodeError(f"no installed plugin decodes {_ts_label(uid)}; install one of: {needs}")

    modality = str(ds.get("Modality") or "").strip().upper()
    transform = None if photometric in _MONOCHROME else icc_transform(ds)
    frames: list[DecodedFrame] = []
    position = 0
    try:
        opts = as_pixel_options(ds)
        for arr, meta in decoder.iter_array(ds, indices=indices, validate=True, **opts):
            index = indices[position]
            decoded_as = str(meta.get("photometric_interpretation", photometric))
            if photometric in _MONOCHROME:
                view = frame_view(ds, index)
                image = _monochrome_rgb(arr, view, options, modality, photometric)
            else:
                bits = int(meta.get("bits_stored") or ds.get("BitsStored") or 8)
                image = _color_rgb(arr, ds, decoded_as.upper(), bits)
                if transform is not None:  # to sRGB, as a colour-managed viewer shows it
                    image = apply_icc_profile(np.array(image, dtype=np.uint8), transform=transform)  # type: ignore[arg-type]
            frames.append(DecodedFrame(image=np.ascontiguousarray(image), frame=index))
            position += 1
    except (RecordError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - as in guarded, but naming the frame
        raise DecodeError(
            f"could not decode frame {indices[min(position, len(indices) - 1)]} of "
            f"{_ts_label(uid)}, {photometric} ({type(exc).__name__})"
        ) from None
    return frames


def decode_dicom(
    data: bytes,
    *,
    options: DicomOptions = DicomOptions(),
    limits: DecodeLimits = DecodeLimits(),
    salt: str = "",
) -> Decoded:
    """Decode a DICOM object (Part 10 file or raw dataset) from bytes.

    Args:
        data: the object's bytes.
        options: frame selection and VOI choice.
        limits: size and pixel-count limits, checked before pixel decoding.
        salt: secret salt for the patient key.

    Returns:
        A :class:`Decoded` with ``kind="dicom"``, allow-listed metadata and
        the salted patient key.

    Raises:
        UnsupportedFormat: empty input, unsupported transfer syntax or
            photometric interpretation.
        LimitExceeded: over ``limits.max_bytes`` or ``limits.max_pixels``.
        DecodeError: unreadable, truncated or undecodable content.
    """
    check_size(data, limits)
    with guarded("malformed DICOM header"):
        ds = read_dataset(data, limits)
        frames = dicom_display_frames(ds, options, limits=limits)
        metadata = extract_metadata(ds)
        key = patient_key(ds, salt)
    return Decoded(
        kind="dicom",
        modality=metadata["modality"] or "OT",
        frames=frames,
        metadata=metadata,
        patient_key=key,
    )
