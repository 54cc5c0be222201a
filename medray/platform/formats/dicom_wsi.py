"""DICOM whole-slide images (VL Whole Slide Microscopy Image Storage) as a format plugin.

A DICOM WSI is tiled like a TIFF slide: the read stage opens it lazily (its
level files grouped by series, see :mod:`medray.platform.decoders.dicom_wsi`)
and emits one record per tissue tile, with the ``slide.*`` options and the
provenance columns of the ``slide`` format. This module recognises a WSI
instance from its bytes, ahead of the generic ``dicom`` format, so a level
file met as bytes (inside an archive, or posted to an endpoint) is never
embedded frame by frame as an image; such a record is quarantined with what to
do instead.
"""

from __future__ import annotations

from medray.platform.decoders.dicom_wsi import is_dicom_wsi_bytes
from medray.platform.formats.registry import Format, register_format
from medray.platform.formats.slide import slide_route

__all__ = ["DICOM_WSI"]


def _sniff(data: bytes, name: str) -> str | None:
    return "slide" if is_dicom_wsi_bytes(data) else None


DICOM_WSI = register_format(
    Format(
        name="dicom_wsi",
        modality="slide",
        sniff=_sniff,
        prepare=None,  # read lazily, tile by tile, by the read stage
        priority=9,  # before the generic ``dicom`` (11) and ``sr`` (10): a WSI level is DICOM too
        resolve_route=slide_route,
        description="a DICOM whole-slide image",
    )
)
