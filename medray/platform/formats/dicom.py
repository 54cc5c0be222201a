"""DICOM Part-10 objects (and preamble-less datasets): images, structured reports, and the rest.

Three formats share the DICOM sniff: ``sr`` (Structured Reports, embedded as
text), ``dicom`` (pixel data: one item per selected frame, display-ready through
the modality/VOI LUTs, or ``other`` when the object has no pixels at all).
CT/MR series slices are grouped into volumes by the pipeline
(:mod:`medray.pipeline.series`); the columns they add are declared here.

An Enhanced CT/MR multi-frame object is a whole series in one object: it is
sniffed as a ``volume`` and, with ``series.mode=volume``, embedded as one volume
(:func:`~medray.platform.decoders.series.assemble_enhanced`: the same volume
and model input as its classic series); otherwise its frames go through the
image encoder like any multi-frame image, each with its own rescale and window
(Pixel Value Transformation, Frame VOI LUT).
"""

from __future__ import annotations

import io
import time

import numpy as np

from medray.platform.decoders import DICOM_EXTENSIONS, decode_dicom, is_image_signature, is_raw_dataset
from medray.platform.decoders.audio import is_audio
from medray.platform.decoders.base import Decoded, check_size
from medray.platform.decoders.dicom import check_burned_in, guarded, read_dataset
from medray.platform.decoders.series import (
    ENHANCED_SOP_CLASSES,
    SeriesOptions,
    assemble_enhanced_stacks,
    is_enhanced_volume,
)
from medray.platform.decoders.text import is_structured_report, sr_text
from medray.platform.deid import extract_metadata, patient_key
from medray.platform.errors import DecodeError, RecordError, SkipRecord
from medray.platform.formats.image import frames_input
from medray.platform.formats.registry import Format, PrepareContext, Prepared, dicom_options, register_format
from medray.platform.formats.text import TextOptions, prepare_text
from medray.platform.formats.volume import prepare_volume

__all__ = [
    "DICOM",
    "SR",
    "SERIES_COLUMNS",
    "is_dicom",
    "is_enhanced_multiframe",
    "is_non_image_dicom",
    "is_sr",
    "prepare_dicom",
    "prepare_sr",
]

#: Provenance columns of CT/MR series rows (salted series hash, sorted source slices, voxel spacing [z, y, x]).
SERIES_COLUMNS = (
    ("series_key", "string"),
    ("slice_start", "int32"),
    ("slice_end", "int32"),
    ("spacing_mm", "list<float64>"),
)

_PIXEL_TAGS = (b"\xe0\x7f\x10\x00", b"\xe0\x7f\x08\x00", b"\xe0\x7f\x09\x00", b"\x7f\xe0\x00\x10")
_DEFLATED_UID = b"1.2.840.10008.1.2.1.99"
_ENHANCED_UIDS = tuple(uid.encode() for uid in ENHANCED_SOP_CLASSES)


def is_dicom(data: bytes, name: str = "") -> bool:
    """A preamble with ``DICM``, or a plausible dataset start that no image/audio signature claims."""
    head = bytes(data[:132])
    if head[128:132] == b"DICM":
        return True
    hinted = name.lower().endswith(DICOM_EXTENSIONS)
    return not is_image_signature(head) and not is_audio(head) and is_raw_dataset(head, len(data), any_group=hinted)


def is_non_image_dicom(data: bytes) -> bool:
    """True for a complete DICOM object that is not an image (RT structures, presentation
    states, DICOMDIR, encapsulated documents...): no pixel data element and no Rows.

    Such objects sit beside images in every study folder; they are skipped and counted
    (no encoder for them), not quarantined. A truncated image still has Rows, so it is
    not mistaken for one and fails in the decoder with its own reason.
    """
    if any(tag in data for tag in _PIXEL_TAGS) or _DEFLATED_UID in bytes(data[:1024]):
        return False
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=bytes(data[128:132]) != b"DICM")
        return "Rows" not in ds and "PixelData" not in ds
    except Exception:  # noqa: BLE001 - a damaged header is the decoder's to report
        return False


def is_sr(data: bytes) -> bool:
    """True when a DICOM object is a Structured Report (header only, no pixel data)."""
    # Cheap byte prefilter: SR SOP classes are 1.2.840.10008.5.1.4.1.1.88.*, in the file meta
    # or the first elements; image objects skip the header parse entirely.
    if b"1.2.840.10008.5.1.4.1.1.88." not in bytes(data[:8192]):
        return False
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
    return is_structured_report(ds)


def is_enhanced_multiframe(data: bytes) -> bool:
    """True when a DICOM object is an Enhanced (or Legacy Converted Enhanced) CT/MR image: a volume.

    A byte prefilter on the SOP Class UIDs keeps other objects to one scan of
    their first 8 kB; a candidate's header is then read without its pixels.
    """
    head = bytes(data[:8192])
    if not any(uid in head for uid in _ENHANCED_UIDS):
        return False
    import pydicom

    try:
        ds = pydicom.dcmread(
            io.BytesIO(data),
            stop_before_pixels=True,
            force=bytes(data[128:132]) != b"DICM",
            specific_tags=["SOPClassUID"],
        )
    except Exception:  # noqa: BLE001 - the decoder reports damage with its own message
        return False
    return is_enhanced_volume(ds)


def _sniff_sr(data: bytes, name: str) -> str | None:
    return "text" if is_dicom(data, name) and is_sr(data) else None


def _sniff_dicom(data: bytes, name: str) -> str | None:
    if not is_dicom(data, name):
        return None
    if is_non_image_dicom(data):
        return "other"
    return "volume" if is_enhanced_multiframe(data) else "image"


def _route(route: str, ctx: PrepareContext) -> str:
    """An enhanced CT/MR object is one volume with ``series.mode=volume`` (or only a 3D encoder), else its frames."""
    if route != "volume":
        return route
    mode = getattr(ctx.options.get("series"), "mode", "off")
    if mode == "volume" or ("volume" in ctx.preprocessors and "image" not in ctx.preprocessors):
        return "volume"
    return "image"


def decode_frames(data: bytes, ctx: PrepareContext) -> Decoded:
    """Selected frames, display-ready RGB (modality and VOI LUTs, windows), with allow-listed metadata."""
    return decode_dicom(data, options=dicom_options(ctx), limits=ctx.limits, salt=ctx.salt)


def prepare_dicom(data: bytes, ctx: PrepareContext) -> Prepared:
    """Selected frames, display-ready RGB, through the image encoder's preprocessing;
    an enhanced CT/MR object routed to ``volume``: one volume through the 3D encoder's."""
    t0 = time.perf_counter()
    if ctx.route == "volume":
        return _prepare_enhanced(data, ctx, t0)
    decoded = decode_frames(data, ctx)
    return frames_input(decoded, ctx, time.perf_counter() - t0)


def _prepare_enhanced(data: bytes, ctx: PrepareContext, t0: float) -> Prepared:
    """An enhanced CT/MR object as its classic series would be prepared (``series.*`` options)."""
    series = ctx.options.get("series") or SeriesOptions(mode="volume")
    check_size(data, ctx.limits)
    with guarded("malformed DICOM header"):
        ds = read_dataset(data, ctx.limits)
    check_burned_in(ds, dicom_options(ctx))
    modality = str(ds.get("Modality") or "").strip().upper()
    if modality not in series.modalities:
        raise SkipRecord(
            "SeriesModality",
            f"an enhanced {modality or 'multi-frame'} object, a modality series.modalities does not list "
            f"({', '.join(series.modalities)}): add it to embed the object as a volume",
        )
    stacks = assemble_enhanced_stacks(ds, series, salt=ctx.salt, limits=ctx.limits)
    decode_s = time.perf_counter() - t0
    if len(stacks) == 1:
        prepared = prepare_volume(stacks[0][1], series, ctx, mode="volume")
        prepared.decode_s = decode_s
        return prepared
    # several stacks, echoes or time points: one volume each, item k (the row's `frame`) = stack k
    parts = [prepare_volume(volume, series, ctx, mode="volume") for _, volume in stacks]
    first = parts[0]
    first.metadata["stacks"] = [
        {**stack.describe(), "series": part.metadata.get("series")} for (stack, _), part in zip(stacks, parts)
    ]
    first.inputs = np.ascontiguousarray(np.concatenate([part.inputs for part in parts]), dtype=np.float32)
    first.segments = [seg for part in parts for seg in part.segments or []]
    first.items = list(range(len(parts)))
    first.decode_s = decode_s
    return first


def _sr(data: bytes, salt: str) -> tuple[str, str, str | None, dict]:
    """Text, modality, patient key and allow-listed metadata of a DICOM SR."""
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=bytes(data[128:132]) != b"DICM")
        text = sr_text(ds)
        meta = extract_metadata(ds)
        key = patient_key(ds, salt)
    except RecordError:
        raise
    except Exception as err:  # noqa: BLE001 - pydicom messages may quote values
        raise DecodeError(f"unreadable DICOM structured report ({type(err).__name__})") from None
    return text, str(meta.get("modality") or "SR"), key, meta


def prepare_sr(data: bytes, ctx: PrepareContext) -> Prepared:
    """A Structured Report's text content, chunked like any document."""
    text, modality, key, meta = _sr(data, ctx.salt)
    options = ctx.options.get("text") or TextOptions()
    return prepare_text(text, ctx, options, modality=modality, patient_key=key, metadata=meta)


SR = register_format(
    Format(
        name="sr",
        modality="text",
        sniff=_sniff_sr,
        prepare=prepare_sr,
        priority=10,
        description="DICOM structured report",
    )
)

DICOM = register_format(
    Format(
        name="dicom",
        modality="image",
        sniff=_sniff_dicom,
        prepare=prepare_dicom,
        decode=decode_frames,
        priority=11,
        media_types={"application/dicom": "input.dcm"},
        extensions=DICOM_EXTENSIONS,
        columns=SERIES_COLUMNS,
        resolve_route=_route,
        description="DICOM",
    )
)
