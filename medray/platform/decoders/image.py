"""Decode photographs (PNG, JPEG, TIFF, BMP, WebP) into 8-bit RGB.

Pillow reads the header lazily, so the size limits are checked before any
pixel is decoded. EXIF orientation is applied (a phone photo shows upright, as
in any viewer), transparency is composited on white, 16-bit grayscale is
scaled by its bit depth, an embedded ICC profile (a phone's Display P3, a
scanner's Adobe RGB) is converted to sRGB as a colour-managed viewer shows it,
and EXIF never reaches the metadata.

Example:
    >>> import io
    >>> from PIL import Image
    >>> buf = io.BytesIO()
    >>> Image.new("RGBA", (5, 2), (255, 0, 0, 255)).save(buf, format="PNG")
    >>> out = decode_image(buf.getvalue())
    >>> out.metadata
    {'width': 5, 'height': 2, 'mode': 'RGBA', 'format': 'PNG'}
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from io import BytesIO
from typing import Any

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from medray.platform.decoders.base import Decoded, DecodedFrame, DecodeLimits, check_size
from medray.platform.errors import DecodeError, LimitExceeded, UnsupportedFormat

__all__ = ["decode_image", "srgb_transform"]

# Only these plugins may open input: others (EPS runs Ghostscript, for one)
# are attack surface a photo pipeline does not need. The JPEG opener also
# returns MPO, as many phone cameras write.
_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP")
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


def _open(data: bytes, limits: DecodeLimits) -> Image.Image:
    """Open lazily and check the header against `limits`."""
    Image.init()  # registers TIFF, WebP, MPO...: `formats` names only registered ones
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: we check below
            image = Image.open(BytesIO(data), formats=_FORMATS)
    except Image.DecompressionBombError:
        raise LimitExceeded(
            f"image header declares more pixels than Pillow's limit (Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS})"
        ) from None
    except UnidentifiedImageError:
        raise UnsupportedFormat(f"not a {'/'.join(_FORMATS)} image Pillow can identify") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types; the class name is the message
        raise DecodeError(f"unreadable image header ({type(exc).__name__})") from None
    width, height = image.size
    bands = len(image.getbands())
    pixels = width * height * bands
    if pixels > limits.max_pixels:
        raise LimitExceeded(
            f"width*height*bands = {width}*{height}*{bands} = {pixels:.3g} exceeds "
            f"max_pixels = {limits.max_pixels:.3g}; raise DecodeLimits.max_pixels to accept it"
        )
    return image


def _scaled_gray(image: Image.Image) -> np.ndarray:
    """16/32-bit integer or float grayscale -> uint8, by bit depth where known."""
    values = np.asarray(image).astype(np.float64)
    values = np.nan_to_num(values)
    low, high = float(values.min(initial=0.0)), float(values.max(initial=0.0))
    if image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and high <= 65535):
        scale_low, scale_high = 0.0, 65535.0
    elif image.mode == "F" and low >= 0 and high <= 1:
        scale_low, scale_high = 0.0, 1.0
    else:  # unknown range: stretch what is there
        scale_low, scale_high = low, max(high, low + 1e-12)
    gray = np.rint((values - scale_low) * (255.0 / (scale_high - scale_low)))
    return np.clip(gray, 0, 255).astype(np.uint8)


_PROFILES: dict[str, bytes] = {}


@functools.lru_cache(maxsize=32)
def _cached_transform(digest: str, mode: str) -> Any:
    src = ImageCms.ImageCmsProfile(BytesIO(_PROFILES[digest]))
    dst = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    return ImageCms.buildTransform(src, dst, mode, "RGB")


def srgb_transform(icc: bytes, mode: str = "RGB") -> Any | None:
    """A Pillow colour transform from an ICC profile to sRGB, or ``None`` when the profile is unusable.

    Transforms are cached by the profile's hash: the photos of one camera or
    scanner share one. A broken profile leaves the pixels as stored, as viewers do.
    """
    digest = hashlib.sha256(icc).hexdigest()
    _PROFILES.setdefault(digest, bytes(icc))
    try:
        return _cached_transform(digest, mode)
    except Exception:  # noqa: BLE001 - ImageCms raises PyCMSError, OSError...: use the pixels as stored
        return None


def _to_srgb(image: Image.Image) -> tuple[Image.Image, bool]:
    """Apply the image's embedded ICC profile (RGB and CMYK images); ``(image, applied)``."""
    icc = image.info.get("icc_profile")
    if not icc or image.mode not in ("RGB", "RGBA", "CMYK"):
        return image, False
    alpha = image.getchannel("A") if image.mode == "RGBA" else None
    source = image.convert("RGB") if image.mode == "RGBA" else image
    transform = srgb_transform(icc, source.mode)
    if transform is None:
        return image, False
    try:
        out = ImageCms.applyTransform(source, transform)
    except Exception:  # noqa: BLE001 - a profile that does not fit the pixels: use them as stored
        return image, False
    if out is None:
        return image, False
    if alpha is not None:
        out.putalpha(alpha)
    return out, True


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Any Pillow mode -> uint8 ``(H, W, 3)`` as a viewer shows it."""
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        gray = _scaled_gray(image)
        return np.repeat(gray[..., np.newaxis], 3, axis=2)
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def decode_image(data: bytes, *, limits: DecodeLimits = DecodeLimits()) -> Decoded:
    """Decode a photograph into one display-ready RGB frame.

    Multi-page files (TIFF, MPO) give their first page.

    Args:
        data: the file's bytes.
        limits: checked against the byte size and the header's
            ``width*height*bands`` before decoding. Pillow's own
            ``Image.MAX_IMAGE_PIXELS`` bomb check also applies.

    Returns:
        A :class:`Decoded` with ``kind="image"``, ``modality="photo"``, one
        frame, metadata ``{width, height, mode, format}`` (size after EXIF
        orientation, mode and format of the source; ``icc_profile: True``
        when an embedded profile was converted to sRGB) and no patient key.

    Raises:
        UnsupportedFormat: empty input or not a supported image format.
        LimitExceeded: over ``limits.max_bytes`` or ``limits.max_pixels``.
        DecodeError: truncated or corrupt image data.
    """
    check_size(data, limits)
    image = _open(data, limits)
    source_mode, source_format = image.mode, image.format or "unknown"
    try:
        image.load()
    except Exception as exc:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError...
        raise DecodeError(
            f"could not decode {source_format} image data ({type(exc).__name__}); the file may be truncated"
        ) from None
    try:
        image = ImageOps.exif_transpose(image) or image
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose the picture
        pass
    image, icc_applied = _to_srgb(image)
    try:
        rgb = np.ascontiguousarray(_to_rgb(image))
    except Exception as exc:  # noqa: BLE001 - any failure of the conversion is a decode error
        raise DecodeError(
            f"could not convert {source_format} mode {source_mode} to RGB ({type(exc).__name__})"
        ) from None
    height, width = rgb.shape[:2]
    return Decoded(
        kind="image",
        modality="photo",
        frames=[DecodedFrame(image=rgb, frame=0)],
        metadata={
            "width": width,
            "height": height,
            "mode": source_mode,
            "format": source_format,
            **({"icc_profile": True} if icc_applied else {}),
        },
        patient_key=None,
    )
