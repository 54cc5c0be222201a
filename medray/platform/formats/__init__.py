"""File formats as plugins: one module each, found by name in a registry.

Built in: ``sr`` and ``dicom`` (:mod:`.dicom`), ``dicom_wsi`` (:mod:`.dicom_wsi`),
``slide`` (:mod:`.slide`),
``image`` (:mod:`.image`), ``audio`` (:mod:`.audio`), ``nifti``
(:mod:`.nifti`) and ``text`` (:mod:`.text`). A new format is a module that
builds a :class:`Format` and calls :func:`register_format`, plus its import
below; see ``docs/formats.md``.
"""

from medray.platform.formats import audio, dicom, dicom_wsi, image, nifti, slide, text  # noqa: F401 - registers the formats
from medray.platform.formats.registry import (
    MODALITIES,
    Format,
    PrepareContext,
    Prepared,
    build_options,
    detect,
    extensions,
    get_format,
    list_formats,
    media_types,
    option_types,
    pooled_segment,
    prepare_record,
    register_format,
    segment_columns,
)
from medray.platform.formats.text import TextOptions

__all__ = [
    "MODALITIES",
    "Format",
    "PrepareContext",
    "Prepared",
    "TextOptions",
    "build_options",
    "detect",
    "detect_modality",
    "extensions",
    "get_format",
    "list_formats",
    "media_types",
    "option_types",
    "pooled_segment",
    "prepare_record",
    "register_format",
    "segment_columns",
]


def detect_modality(data: bytes, name: str = "") -> tuple[str, str]:
    """Route an object by content; the name is only a hint.

    Returns:
        ``(modality, format)``: e.g. ``("image", "dicom")``, ``("text", "sr")``,
        ``("other", "dicom")`` for a DICOM object without pixels,
        ``("slide", "slide")``, ``("volume", "nifti")``.

    Raises:
        UnsupportedFormat: empty input or content no registered format claims.
    """
    fmt, modality = detect(data, name)
    return modality, fmt.name
