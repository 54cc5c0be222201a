"""Decode DICOM objects and photographs into display-ready RGB frames.

Pure Python, no Ray: the same functions serve ``embed``, ``finetune`` and
``serve``. :func:`decode_bytes` sniffs the content and hands it to
:func:`~medray.platform.decoders.dicom.decode_dicom` or
:func:`~medray.platform.decoders.image.decode_image`. Every failure is a
:class:`~medray.platform.errors.RecordError` whose message carries no PHI.

Example:
    >>> import io
    >>> from PIL import Image
    >>> buf = io.BytesIO()
    >>> Image.new("L", (4, 3), 128).save(buf, format="PNG")
    >>> out = decode_bytes(buf.getvalue(), name="photo.png")
    >>> out.kind, out.modality, out.frames[0].image.shape
    ('image', 'photo', (3, 4, 3))
"""

from __future__ import annotations

import struct

from medray.platform.decoders.base import (
    Decoded,
    DecodedFrame,
    DecodeLimits,
    DicomOptions,
    check_size,
)
from medray.platform.decoders.dicom import decode_dicom, dicom_display_frames
from medray.platform.decoders.image import decode_image
from medray.platform.errors import UnsupportedFormat

__all__ = [
    "DecodeLimits",
    "check_size",
    "DicomOptions",
    "DecodedFrame",
    "Decoded",
    "detect_format",
    "detect_modality",
    "MODALITIES",
    "decode_bytes",
    "decode_dicom",
    "decode_image",
    "dicom_display_frames",
]

# Explicit VRs whose length field is 4 bytes after 2 reserved bytes.
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_SHORT_VRS = {
    b"AE",
    b"AS",
    b"AT",
    b"CS",
    b"DA",
    b"DS",
    b"DT",
    b"FD",
    b"FL",
    b"IS",
    b"LO",
    b"LT",
    b"PN",
    b"SH",
    b"SL",
    b"SS",
    b"ST",
    b"TM",
    b"UI",
    b"UL",
    b"US",
}
_DICOM_EXTENSIONS = (".dcm", ".dicom", ".dic")


def _is_image(head: bytes) -> bool:
    """True when `head` starts with a PNG, JPEG, TIFF, BMP or WebP signature."""
    if head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*")):
        return True
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    # "BM" alone is too weak; also require a known DIB header size.
    return (
        head[:2] == b"BM"
        and len(head) >= 18
        and struct.unpack_from("<I", head, 14)[0]
        in {
            12,
            40,
            52,
            56,
            64,
            108,
            124,
        }
    )


def _is_raw_dataset(head: bytes, size: int, any_group: bool) -> bool:
    """True when `head` starts like a DICOM dataset with no preamble.

    Args:
        head: the first bytes of the object.
        size: the object's length, to bound element lengths.
        any_group: accept any even group (the name hints DICOM), not only the
            file meta (0x0002) and identification (0x0008) groups.
    """
    if len(head) < 8:
        return False
    for order in ("<", ">"):
        group = struct.unpack_from(f"{order}H", head, 0)[0]
        plausible = group in (0x0002, 0x0008) or (any_group and group % 2 == 0 and 0 < group < 0x7FE1)
        if not plausible:
            continue
        vr = head[4:6]
        if vr in _SHORT_VRS:
            length = struct.unpack_from(f"{order}H", head, 6)[0]
            return 8 + length <= size
        if vr in _LONG_VRS and len(head) >= 12 and head[6:8] == b"\x00\x00":
            length = struct.unpack_from(f"{order}I", head, 8)[0]
            return length == 0xFFFFFFFF or 12 + length <= size
        if order == "<":  # implicit VR is little endian only
            length = struct.unpack_from("<I", head, 4)[0]
            if length == 0xFFFFFFFF or 8 + length <= size:
                return True
    return False


def detect_format(data: bytes, name: str = "") -> str:
    """Tell DICOM from photographs by content; the name is only a hint.

    Args:
        data: the object's bytes.
        name: file name or key; a DICOM extension lets a preamble-less dataset
            start with any group, nothing more. It never appears in errors.

    Returns:
        ``"dicom"`` or ``"image"``.

    Raises:
        UnsupportedFormat: empty input or content that is neither.
    """
    if len(data) == 0:
        raise UnsupportedFormat("empty input (0 bytes)")
    head = bytes(data[:132])
    if head[128:132] == b"DICM":
        return "dicom"
    if _is_image(head):
        return "image"
    hinted = name.lower().endswith(_DICOM_EXTENSIONS)
    if _is_raw_dataset(head, len(data), any_group=hinted):
        return "dicom"
    raise UnsupportedFormat(
        f"content of {len(data)} bytes is neither DICOM (no 'DICM' at offset 128, no "
        "plausible dataset start) nor a PNG/JPEG/TIFF/BMP/WebP image"
    )


#: Encoder modalities a record can be routed to (``slide``: whole-slide images, embedded
#: by ``encoders.slide`` or else the image encoder).
MODALITIES = ("image", "audio", "text", "slide", "volume")  # volume: CT/MR series (series.mode=volume)


def detect_modality(data: bytes, name: str = "") -> tuple[str, str]:
    """Route an object to a modality by content; the name is only a hint.

    DICOM (preamble or plausible dataset start) is ``image``, or ``text``
    for a Structured Report; PNG/JPEG/TIFF/BMP/WebP is ``image``;
    RIFF/WAVE, fLaC and OggS are ``audio``; UTF-8 text is ``text``; a
    tiled pyramidal TIFF (or a tiled TIFF named ``.svs``/``.ndpi``...) is
    ``slide``, while plain photo TIFFs stay ``image``.

    Args:
        data: the object's bytes.
        name: file name or key (a DICOM extension lets a preamble-less
            dataset start with any group). It never appears in errors.

    Returns:
        ``(modality, format)``: modality one of :data:`MODALITIES`, format
        one of ``dicom``, ``sr``, ``image``, ``audio``, ``text``, ``slide``.

    Raises:
        UnsupportedFormat: empty input or content that is none of these.
    """
    from medray.platform.decoders.audio import is_audio
    from medray.platform.decoders.text import is_text

    if len(data) == 0:
        raise UnsupportedFormat("empty input (0 bytes)")
    head = bytes(data[:132])
    hinted = name.lower().endswith(_DICOM_EXTENSIONS)
    if head[128:132] == b"DICM" or (
        not _is_image(head) and not is_audio(head) and _is_raw_dataset(head, len(data), any_group=hinted)
    ):
        if _is_sr(data):
            return "text", "sr"
        return ("other", "dicom") if _is_non_image_dicom(data) else ("image", "dicom")
    if _is_image(head):
        if _is_slide_bytes(data, name):
            return "slide", "slide"
        return "image", "image"
    if is_audio(head):
        return "audio", "audio"
    if is_text(bytes(data[:4096])):
        return "text", "text"
    raise UnsupportedFormat(
        f"content of {len(data)} bytes is not DICOM, a PNG/JPEG/TIFF/BMP/WebP image, WAV/FLAC/OGG audio or UTF-8 text"
    )


def _is_slide_bytes(data: bytes, name: str) -> bool:
    """True when in-memory TIFF bytes are a whole-slide image (tiled pyramid)."""
    from medray.platform.decoders.slide import is_slide, is_tiff

    if not is_tiff(bytes(data[:4])):
        return False
    import io

    try:
        import tiffslide

        slide = tiffslide.TiffSlide(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - the image decoder reports damaged TIFFs
        return False
    try:
        return is_slide(slide, name)
    finally:
        slide.close()


_PIXEL_TAGS = (b"\xe0\x7f\x10\x00", b"\xe0\x7f\x08\x00", b"\xe0\x7f\x09\x00", b"\x7f\xe0\x00\x10")
_DEFLATED_UID = b"1.2.840.10008.1.2.1.99"


def _is_non_image_dicom(data: bytes) -> bool:
    """True for a complete DICOM object that is not an image (RT structures, presentation
    states, DICOMDIR, encapsulated documents...): no pixel data element and no Rows.

    Such objects sit beside images in every study folder; they are skipped and counted
    (no encoder for them), not quarantined. A truncated image still has Rows, so it is
    not mistaken for one and fails in the decoder with its own reason.
    """
    if any(tag in data for tag in _PIXEL_TAGS) or _DEFLATED_UID in bytes(data[:1024]):
        return False
    import io

    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=bytes(data[128:132]) != b"DICM")
        return "Rows" not in ds and "PixelData" not in ds
    except Exception:  # noqa: BLE001 - a damaged header is the decoder's to report
        return False


def _is_sr(data: bytes) -> bool:
    """True when a DICOM object is a Structured Report (header only, no pixel data)."""
    # Cheap byte prefilter: SR SOP classes are 1.2.840.10008.5.1.4.1.1.88.*, in the file meta
    # or the first elements; image objects skip the header parse entirely.
    if b"1.2.840.10008.5.1.4.1.1.88." not in bytes(data[:8192]):
        return False
    import io

    import pydicom

    try:
        ds = pydicom.dcmread(
            io.BytesIO(data),
            stop_before_pixels=True,
            force=bytes(data[128:132]) != b"DICM",
            specific_tags=["SOPClassUID", "Modality"],
        )
    except Exception:  # noqa: BLE001 - the image decoder reports damage with its own message
        return False
    from medray.platform.decoders.text import is_structured_report

    return is_structured_report(ds)


def decode_bytes(
    data: bytes,
    *,
    name: str = "",
    dicom: DicomOptions = DicomOptions(),
    limits: DecodeLimits = DecodeLimits(),
    salt: str = "",
) -> Decoded:
    """Decode a DICOM object or a photograph into display-ready RGB frames.

    Args:
        data: the object's bytes.
        name: file name or key, used only as a format hint.
        dicom: how to window and select DICOM frames.
        limits: size and pixel-count limits, checked before decoding.
        salt: secret salt for :func:`~medray.platform.deid.patient_key`.

    Returns:
        The :class:`Decoded` object.

    Raises:
        UnsupportedFormat: empty or unrecognised content.
        LimitExceeded: the object or its pixel count is over `limits`.
        DecodeError: the content is damaged or cannot be decoded.
    """
    check_size(data, limits)
    if detect_format(data, name) == "dicom":
        return decode_dicom(data, options=dicom, limits=limits, salt=salt)
    return decode_image(data, limits=limits)
