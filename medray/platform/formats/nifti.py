"""NIfTI-1 and NIfTI-2 volumes (``.nii``, ``.nii.gz``), read with nibabel.

A NIfTI image is embedded like a CT/MR series: through a 3D encoder with
``series.mode=volume``, otherwise slice by slice through the image encoder plus
a pooled row, with the same windows (``series.windows``/``series.channels``),
resampling (``series.spacing``) and limits (``series.max_slices``,
``series.max_voxels``, ``decode.max_bytes`` on the inflated file,
``decode.max_pixels`` on the voxel count, both checked from the header before
the voxels are read).

Orientation and spacing come from the image's affine: the voxels are turned to
DICOM's patient axes (columns towards the patient's left, rows towards
posterior, slices from inferior to superior, as an axial DICOM series is
stacked), so a NIfTI converted from a DICOM series gives the same volume as the
series itself. The header's free-text fields (``descrip``, ``aux_file``,
``intent_name``, ``db_name``) may hold identifiers and never leave the file.

Options (config section ``nifti``): :class:`NiftiOptions`.
"""

from __future__ import annotations

import hashlib
import io
import struct
import time
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from medray.platform.decoders.base import DecodeLimits
from medray.platform.decoders.series import (
    SeriesError,
    SeriesOptions,
    Volume,
    resample_volume,
    series_key,
    target_geometry,
    to_patient_axes,
)
from medray.platform.errors import ConfigError, DecodeError, LimitExceeded, UnsupportedFormat
from medray.platform.formats.dicom import SERIES_COLUMNS
from medray.platform.formats.registry import Format, PrepareContext, Prepared, register_format
from medray.platform.formats.volume import prepare_volume

__all__ = ["NIFTI", "NiftiOptions", "read_nifti", "nifti_volume", "prepare_nifti"]

_GZIP = b"\x1f\x8b"
_N1_MAGIC = (b"n+1\x00",)  # single-file NIfTI-1 (a .hdr/.img pair, "ni1", is not one object)
_N2_MAGIC = b"n+2\x00\r\n\x1a\n"


@dataclass(frozen=True)
class NiftiOptions:
    """How NIfTI images are read (config section ``nifti``).

    Args:
        modality: what the voxels hold: ``CT`` (Hounsfield units: ``series.windows``
            apply as they are) or ``MR`` (no absolute scale: each channel is a
            0.5-99.5 percentile normalisation). NIfTI files do not say.
        volume_index: which 3-D volume of a 4-D image (time series) to embed.
    """

    modality: str = "CT"
    volume_index: int = 0

    def __post_init__(self) -> None:
        modality = str(self.modality).strip().upper()
        if modality not in ("CT", "MR"):
            raise ConfigError("nifti.modality", f"expected CT or MR, got {self.modality!r}")
        object.__setattr__(self, "modality", modality)
        if isinstance(self.volume_index, bool) or not isinstance(self.volume_index, int) or self.volume_index < 0:
            raise ConfigError("nifti.volume_index", f"expected an int >= 0, got {self.volume_index!r}")


def _header_bytes(data: bytes) -> bytes:
    """The first 544 bytes of the (inflated) file, never inflating more."""
    if bytes(data[:2]) == _GZIP:
        try:
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(bytes(data), 544)
        except zlib.error:
            return b""
    return bytes(data[:544])


def _is_nifti_header(head: bytes) -> int:
    """1 or 2 for a NIfTI-1/2 single-file header, else 0."""
    if len(head) >= 348 and head[344:348] in _N1_MAGIC:
        size = struct.unpack("<i", head[:4])[0], struct.unpack(">i", head[:4])[0]
        return 1 if 348 in size else 0
    if len(head) >= 12 and head[4:12] == _N2_MAGIC:
        size = struct.unpack("<i", head[:4])[0], struct.unpack(">i", head[:4])[0]
        return 2 if 540 in size else 0
    return 0


def _sniff(data: bytes, name: str) -> str | None:
    head = bytes(data[:544])
    if head[:2] == _GZIP:
        head = _header_bytes(data)  # 544 bytes inflated at most, whatever the stream holds
    return "volume" if _is_nifti_header(head) else None


def _inflate(data: bytes, expected: int) -> bytes:
    """Inflate a ``.nii.gz`` up to the size its header promises (a gzip bomb stops there)."""
    out = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        raw = out.decompress(bytes(data), expected)
    except zlib.error:
        raise DecodeError("damaged gzip stream in a .nii.gz") from None
    if len(raw) < expected:
        raise DecodeError(f"truncated NIfTI: {len(raw)} bytes inflated, the header promises {expected}")
    return raw


def read_nifti(data: bytes, limits: DecodeLimits = DecodeLimits()) -> Any:
    """A nibabel image from the bytes of a ``.nii`` or ``.nii.gz``, with limits checked from the header.

    Raises:
        UnsupportedFormat: not a single-file NIfTI-1/2.
        LimitExceeded: the inflated size or the voxel count is over ``limits``.
        DecodeError: a damaged header or data.
    """
    import nibabel as nib

    head = _header_bytes(data)
    version = _is_nifti_header(head)
    if not version:
        raise UnsupportedFormat("not a single-file NIfTI-1/2 image")
    cls = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    header_cls = nib.Nifti1Header if version == 1 else nib.Nifti2Header
    try:
        header = header_cls.from_fileobj(io.BytesIO(head))
        shape = tuple(int(v) for v in header.get_data_shape())
        itemsize = int(header.get_data_dtype().itemsize)
        offset = int(header.get_data_offset())
    except Exception as err:  # noqa: BLE001 - nibabel raises many types for a damaged header
        raise DecodeError(f"unreadable NIfTI header ({type(err).__name__})") from None
    voxels = int(np.prod(shape, dtype=np.int64)) if shape else 0
    if voxels > limits.max_pixels:
        raise LimitExceeded(f"NIfTI image has {voxels} voxels, over max_pixels = {limits.max_pixels}")
    expected = offset + voxels * itemsize
    if expected > limits.max_bytes:
        raise LimitExceeded(f"NIfTI image needs {expected} bytes inflated, over max_bytes = {limits.max_bytes}")
    raw = _inflate(data, expected) if bytes(data[:2]) == _GZIP else bytes(data)
    if len(raw) < expected:
        raise DecodeError(f"truncated NIfTI: {len(raw)} bytes, the header promises {expected}")
    try:
        return cls.from_bytes(raw[:expected])
    except Exception as err:  # noqa: BLE001 - nibabel raises many types for damaged data
        raise DecodeError(f"unreadable NIfTI image ({type(err).__name__})") from None


def nifti_volume(
    image: Any,
    options: SeriesOptions,
    nifti: NiftiOptions = NiftiOptions(),
    *,
    key: str = "",
    salt: str = "",
) -> Volume:
    """The image's voxels on DICOM's patient axes, resampled as ``series.spacing`` asks.

    Args:
        image: a nibabel NIfTI image.
        options: the series options (spacing, limits).
        nifti: which volume of a 4-D image, and what the voxels hold.
        key: what identifies the image (hashed with ``salt`` into ``series_key``).
        salt: the patient-key salt.

    Raises:
        SeriesError, LimitExceeded: not a usable volume, or over a limit.
    """
    shape = tuple(int(v) for v in image.shape)
    if len(shape) > 3:
        extra = int(np.prod(shape[3:]))
        if nifti.volume_index >= extra:
            raise SeriesError(f"4-D NIfTI with {extra} volumes has no volume {nifti.volume_index} (nifti.volume_index)")
    elif len(shape) < 3:
        raise SeriesError(f"NIfTI image of {len(shape)} dimension(s); a volume needs 3")
    if shape[2] > options.max_slices:
        raise LimitExceeded(f"NIfTI volume has {shape[2]} slices, over series.max_slices = {options.max_slices}")
    if shape[2] < options.min_slices:
        raise SeriesError(f"NIfTI volume has {shape[2]} slice(s), under series.min_slices = {options.min_slices}")
    try:
        dataobj = image.dataobj
        if len(shape) > 3:
            flat = np.asanyarray(dataobj).reshape(*shape[:3], -1)[..., nifti.volume_index]
        else:
            flat = np.asanyarray(dataobj)
        values = np.asarray(flat, dtype=np.float32)
    except Exception as err:  # noqa: BLE001 - nibabel/numpy errors on damaged data
        raise DecodeError(f"could not read the NIfTI voxels ({type(err).__name__})") from None
    if not np.all(np.isfinite(values)):
        raise DecodeError("NIfTI voxels hold NaN or infinite values")
    affine = np.asarray(image.affine, dtype=np.float64)
    grid = to_patient_axes(values, affine)  # the one reorientation DICOM series share
    src_shape = (int(grid.values.shape[0]), int(grid.values.shape[1]), int(grid.values.shape[2]))
    spacing = grid.spacing
    tshape, tspacing = target_geometry(src_shape, spacing, options)
    resampled = resample_volume(grid.values, tshape)
    codes = grid.source_orientation
    normal = grid.normal
    positions = [float(np.dot(grid.origin, normal)) + z * spacing[0] for z in range(src_shape[0])]
    header = image.header
    metadata = {
        "modality": nifti.modality,
        "source_format": f"nifti{2 if 'Nifti2' in type(image).__name__ else 1}",
        "source_orientation": codes,
        "qform_code": int(header["qform_code"]),
        "sform_code": int(header["sform_code"]),
        "datatype": str(header.get_data_dtype()),
    }
    return Volume(
        values=resampled,
        spacing=tspacing,
        source_spacing=spacing,
        source_shape=src_shape,
        positions=positions,
        order=list(range(src_shape[0])),
        normal=normal,
        modality=nifti.modality,
        series_key=series_key(key, salt),
        patient_key=None,
        metadata=metadata,
    )


def _route(route: str, ctx: PrepareContext) -> str:
    """``volume`` with ``series.mode=volume`` or when only a 3D encoder is configured; else ``image``."""
    mode = getattr(ctx.options.get("series"), "mode", "off")
    if mode == "volume" or ("volume" in ctx.preprocessors and "image" not in ctx.preprocessors):
        return "volume"
    return "image"


def prepare_nifti(data: bytes, ctx: PrepareContext) -> Prepared:
    """A NIfTI volume as a CT/MR series is prepared (see the module docstring)."""
    t0 = time.perf_counter()
    series = ctx.options.get("series") or SeriesOptions()
    nifti = ctx.options_of(NIFTI)
    image = read_nifti(data, ctx.limits)
    key = "nifti:" + hashlib.sha256(bytes(data)).hexdigest()
    volume = nifti_volume(image, series, nifti, key=key, salt=ctx.salt)
    decode_s = time.perf_counter() - t0
    prepared = prepare_volume(volume, series, ctx, mode="volume" if ctx.route == "volume" else "slicewise")
    prepared.decode_s = decode_s
    return prepared


NIFTI = register_format(
    Format(
        name="nifti",
        modality="volume",
        sniff=_sniff,
        prepare=prepare_nifti,
        priority=5,  # its magic number is specific, and a .nii.gz would otherwise be nothing
        media_types={
            "application/x-nifti": "input.nii",
            "application/x-nifti-gz": "input.nii.gz",
            "application/gzip": "input.nii.gz",
        },
        extensions=(".nii", ".nii.gz"),
        options=NiftiOptions,
        options_key="nifti",
        columns=SERIES_COLUMNS,
        resolve_route=_route,
        description="NIfTI-1/2",
    )
)
