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
    "is_image_signature",
    "is_raw_dataset",
    "DICOM_EXTENSIONS",
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
DICOM_EXTENSIONS = (".dcm", ".dicom", ".dic")


def is_image_signature(head: bytes) -> bool:
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


def is_raw_dataset(head: bytes, size: int, any_group: bool) -> bool:
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
    if is_image_signature(head):
        return "image"
    hinted = name.lower().endswith(DICOM_EXTENSIONS)
    if is_raw_dataset(head, len(data), any_group=hinted):
        return "dicom"
    raise UnsupportedFormat(
        f"content of {len(data)} bytes is neither DICOM (no 'DICM' at offset 128, no "
        "plausible dataset start) nor a PNG/JPEG/TIFF/BMP/WebP image"
    )


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
