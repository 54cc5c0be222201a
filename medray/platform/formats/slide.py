"""Whole-slide images (tiled pyramidal TIFF, SVS, NDPI...): opened lazily, one record per tissue tile.

A slide is never read whole: the read stage opens it with ranged reads and
emits one record per tissue tile (:func:`~medray.platform.decoders.slide.plan_slide`),
so this format only recognises slide bytes (e.g. inside an archive, where
lazy reads are impossible) and declares the slide's options and columns.
"""

from __future__ import annotations

import io

from medray.platform.decoders import is_image_signature
from medray.platform.decoders.slide import SLIDE_EXTENSIONS, SlideOptions, check_ifd_chain, is_slide, is_tiff
from medray.platform.formats.registry import Format, PrepareContext, register_format

__all__ = ["SLIDE", "slide_route"]


def is_slide_bytes(data: bytes, name: str = "") -> bool:
    """True when in-memory TIFF bytes are a whole-slide image (tiled pyramid).

    Raises:
        DecodeError: the TIFF's IFD chain loops or is too long (no decoder may walk it).
    """
    if not is_tiff(bytes(data[:4])):
        return False
    check_ifd_chain(io.BytesIO(data))  # raises on a loop: tifffile would walk it forever
    try:
        import tiffslide

        slide = tiffslide.TiffSlide(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - the image decoder reports damaged TIFFs
        return False
    try:
        return is_slide(slide, name)
    finally:
        slide.close()


def _sniff(data: bytes, name: str) -> str | None:
    return "slide" if is_image_signature(bytes(data[:132])) and is_slide_bytes(data, name) else None


def slide_route(route: str, ctx: PrepareContext) -> str:
    """Slides are embedded by ``encoders.slide``, else by the image encoder."""
    pres = ctx.preprocessors
    return "slide" if "slide" in pres or "image" not in pres else "image"


SLIDE = register_format(
    Format(
        name="slide",
        modality="slide",
        sniff=_sniff,
        prepare=None,
        priority=15,  # before plain images: a slide is a TIFF too
        extensions=SLIDE_EXTENSIONS,
        options=SlideOptions,
        options_key="slide",
        columns=(
            ("tile_x", "int64"),
            ("tile_y", "int64"),
            ("level", "int32"),
            ("mpp", "float64"),
            ("tissue_fraction", "float64"),
        ),
        resolve_route=slide_route,
        description="a whole-slide image",
    )
)
