"""Photographs and other raster images (PNG, JPEG, TIFF, BMP, WebP), read with Pillow."""

from __future__ import annotations

import time

import numpy as np

from medray.platform.decoders import decode_image, is_image_signature
from medray.platform.decoders.base import Decoded
from medray.platform.errors import RecordError
from medray.platform.formats.registry import Format, PrepareContext, Prepared, register_format

__all__ = ["IMAGE", "frames_input", "prepare_image"]


def frames_input(decoded: Decoded, ctx: PrepareContext, decode_s: float) -> Prepared:
    """Decoded frames through the route's image preprocessing: one item per frame."""
    if not decoded.frames:
        raise RecordError("no frames selected", stage="decode")
    pre = ctx.preprocessor
    try:
        pixels = pre.preprocess([f.image for f in decoded.frames])
    except RecordError:
        raise
    except Exception as err:  # noqa: BLE001 - processors raise anything; the class name is the message
        raise RecordError(f"preprocessing failed ({type(err).__name__})", stage="preprocess") from None
    return Prepared(
        inputs=np.ascontiguousarray(pixels, dtype=np.float32),
        segments=None,
        pool="none",
        modality=decoded.modality,
        metadata=decoded.metadata,
        patient_key=decoded.patient_key,
        items=[int(f.frame) for f in decoded.frames],
        decode_s=decode_s,
    )


def _sniff(data: bytes, name: str) -> str | None:
    return "image" if is_image_signature(bytes(data[:132])) else None


def decode_frames(data: bytes, ctx: PrepareContext) -> Decoded:
    """One RGB frame, EXIF orientation applied."""
    return decode_image(data, limits=ctx.limits)


def prepare_image(data: bytes, ctx: PrepareContext) -> Prepared:
    """One RGB frame (EXIF orientation applied) through the image encoder's preprocessing."""
    t0 = time.perf_counter()
    decoded = decode_frames(data, ctx)
    return frames_input(decoded, ctx, time.perf_counter() - t0)


IMAGE = register_format(
    Format(
        name="image",
        modality="image",
        sniff=_sniff,
        prepare=prepare_image,
        decode=decode_frames,
        priority=20,
        media_types={"image/png": "input.png", "image/jpeg": "input.jpg"},
        extensions=(".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"),
        description="a PNG/JPEG/TIFF/BMP/WebP image",
    )
)
