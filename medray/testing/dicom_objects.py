"""Generated DICOM objects that real archives hold: enhanced multi-frame CT/MR, other planes, LUTs, ICC.

* :func:`enhanced_from_series` turns the classic series that
  :func:`~medray.testing.samples.ct_series` writes into one Enhanced CT (or MR)
  Image Storage object of the same voxels: per-frame Plane Position, shared
  Plane Orientation and Pixel Measures, each frame keeping its slice's own
  rescale in a per-frame Pixel Value Transformation item, frames in a shuffled
  order (the reader must sort them along the normal), optional per-frame
  windows (Frame VOI LUT).
* :func:`phantom_acquisition` gives the :func:`~medray.testing.samples.ct_series`
  arguments that acquire one axial phantom in another plane (sagittal,
  coronal): the same patient-space voxels, another stack.
* :func:`monochrome_image` writes a small grayscale image with a Presentation
  LUT Shape (``IDENTITY``/``INVERSE``) and a MONOCHROME1/2 photometric.
* :func:`rgb_image` writes an RGB image, optionally with an ICC profile;
  :func:`linear_rgb_profile` is an ICC v2 matrix/TRC profile with sRGB's
  primaries and a linear (gamma 1) tone curve, so converting it to sRGB
  visibly changes the pixels.

Example:
    >>> import numpy as np
    >>> from medray.testing.samples import ct_phantom, ct_series
    >>> phantom = ct_phantom(4, 8, seed=1)
    >>> data = enhanced_from_series(ct_series(phantom, seed=1))
    >>> import pydicom, io
    >>> int(pydicom.dcmread(io.BytesIO(data)).NumberOfFrames)
    4
"""

from __future__ import annotations

import io
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "enhanced_from_series",
    "phantom_acquisition",
    "monochrome_image",
    "rgb_image",
    "linear_rgb_profile",
]

_ENHANCED = {"CT": "1.2.840.10008.5.1.4.1.1.2.1", "MR": "1.2.840.10008.5.1.4.1.1.4.1"}
# Header elements every frame of a classic series shares; copied to the enhanced object.
_SHARED = (
    "SpecificCharacterSet",
    "StudyDate",
    "SeriesDate",
    "ContentDate",
    "StudyTime",
    "SeriesTime",
    "ContentTime",
    "Modality",
    "BurnedInAnnotation",
    "Manufacturer",
    "ManufacturerModelName",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "StudyID",
    "SeriesNumber",
    "FrameOfReferenceUID",
    "BodyPartExamined",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
)


def _item(**elements: Any) -> Any:
    from pydicom.dataset import Dataset

    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def _part10(ds: Any) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def enhanced_from_series(
    files: Sequence[bytes],
    *,
    seed: int = 0,
    shuffle: bool = True,
    windows: Mapping[int, tuple[float, float]] | None = None,
    shared_window: tuple[float, float] | None = None,
    stack_ids: Sequence[str] | None = None,
    echo_times: Sequence[float] | None = None,
) -> bytes:
    """One Enhanced CT/MR object holding the slices of a classic series (its voxels, geometry and rescales).

    Args:
        files: the Part-10 slices of one series (e.g. from
            :func:`~medray.testing.samples.ct_series`), any order.
        seed: the frame order (when ``shuffle``) and the SOP Instance UID.
        shuffle: store the frames in a random order rather than along the normal.
        windows: per-frame windows ``{frame: (center, width)}`` (Frame VOI LUT
            in that frame's functional groups), by stored frame number.
        shared_window: a window for every frame, in the shared functional groups.
        stack_ids: the Stack ID of each of ``files`` (default ``"1"`` for all):
            several stacks in one object.
        echo_times: the MR Effective Echo Time (ms) of each of ``files``: several
            echoes in one object.

    Returns:
        The object's Part-10 bytes (Explicit VR Little Endian).
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

    slices = [pydicom.dcmread(io.BytesIO(f)) for f in files]
    rng = np.random.default_rng(seed)
    order = list(rng.permutation(len(slices))) if shuffle else list(range(len(slices)))
    first = slices[0]
    modality = str(first.Modality)
    sop_uid = generate_uid(entropy_srcs=["medray-enhanced", str(seed), str(first.SeriesInstanceUID)])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(_ENHANCED[modality])
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    for keyword in _SHARED:
        if keyword in first:
            setattr(ds, keyword, first.data_element(keyword).value)  # type: ignore[union-attr]
    ds.SOPClassUID, ds.SOPInstanceUID = _ENHANCED[modality], sop_uid
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.NumberOfFrames = len(slices)
    shared = _item(
        PlaneOrientationSequence=[_item(ImageOrientationPatient=list(first.ImageOrientationPatient))],
        PixelMeasuresSequence=[
            _item(PixelSpacing=list(first.PixelSpacing), SliceThickness=first.get("SliceThickness", 1.0))
        ],
    )
    if shared_window is not None:
        shared.FrameVOILUTSequence = [_item(WindowCenter=shared_window[0], WindowWidth=shared_window[1])]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame, pixels = [], []
    for n, k in enumerate(order):
        s = slices[k]
        group = _item(
            PlanePositionSequence=[_item(ImagePositionPatient=list(s.ImagePositionPatient))],
            PixelValueTransformationSequence=[
                _item(
                    RescaleSlope=s.RescaleSlope,
                    RescaleIntercept=s.RescaleIntercept,
                    RescaleType=s.get("RescaleType", "US"),
                )
            ],
            FrameContentSequence=[
                _item(InStackPositionNumber=int(k) + 1, StackID=stack_ids[k] if stack_ids is not None else "1")
            ],
        )
        if echo_times is not None:
            group.MREchoSequence = [_item(EffectiveEchoTime=float(echo_times[k]))]
        if windows and n in windows:
            group.FrameVOILUTSequence = [_item(WindowCenter=windows[n][0], WindowWidth=windows[n][1])]
        per_frame.append(group)
        pixels.append(np.asarray(s.pixel_array))
    ds.PerFrameFunctionalGroupsSequence = per_frame
    dtype = "<i2" if int(first.PixelRepresentation) else "<u2"
    ds.PixelData = np.stack(pixels).astype(dtype).tobytes()
    return _part10(ds)


def phantom_acquisition(
    phantom: np.ndarray,
    plane: str,
    *,
    spacing: Sequence[float] = (2.5, 0.8, 0.8),
    origin: Sequence[float] = (-12.5, -12.5, -100.0),
) -> dict[str, Any]:
    """:func:`~medray.testing.samples.ct_series` arguments that acquire an axial phantom in ``plane``.

    ``phantom`` is the volume :func:`~medray.testing.samples.ct_series` writes
    with its default orientation, ``spacing`` and ``origin`` (slices inferior to
    superior, rows to posterior, columns to the patient's left). The returned
    ``phantom``, ``spacing``, ``orientation`` and ``origin`` put the same voxels
    at the same patient positions as a ``sagittal`` (slices right to left, rows
    superior to inferior, columns to posterior), ``coronal`` (slices anterior to
    posterior, rows superior to inferior, columns to the left) or ``axial``
    (unchanged) stack.
    """
    dz, dy, dx = (float(v) for v in spacing)
    depth, rows, cols = phantom.shape
    x0, y0, z0 = (float(v) for v in origin)
    if plane == "axial":
        return {"phantom": phantom, "spacing": (dz, dy, dx), "orientation": (1, 0, 0, 0, 1, 0), "origin": origin}
    flipped = phantom[::-1]  # rows run superior to inferior in both other planes
    top = z0 + (depth - 1) * dz
    if plane == "sagittal":  # slice k at x = x0 + (W-1-k) dx, row r at z = top - r dz, column c at y = y0 + c dy
        stack = np.transpose(flipped[:, :, ::-1], (2, 0, 1))
        return {
            "phantom": np.ascontiguousarray(stack),
            "spacing": (dx, dz, dy),
            "orientation": (0, 1, 0, 0, 0, -1),
            "origin": (x0 + (cols - 1) * dx, y0, top),
        }
    if plane == "coronal":  # slice k at y = y0 + k dy, row r at z = top - r dz, column c at x = x0 + c dx
        stack = np.transpose(flipped, (1, 0, 2))
        return {
            "phantom": np.ascontiguousarray(stack),
            "spacing": (dy, dz, dx),
            "orientation": (1, 0, 0, 0, 0, -1),
            "origin": (x0, y0, top),
        }
    raise ValueError(f"plane must be axial, sagittal or coronal, got {plane!r}")


def _image_dataset(modality: str, photometric: str, shape: tuple[int, ...], seed: int) -> Any:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

    sop_class = "1.2.840.10008.5.1.4.1.1.1.1" if modality == "DX" else "1.2.840.10008.5.1.4.1.1.77.1.4"
    uid = generate_uid(entropy_srcs=["medray-object", modality, photometric, str(seed)])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid
    ds.Modality = modality
    ds.PatientID = "ANON-OBJECT"
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["medray-object-study", str(seed)])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["medray-object-series", str(seed)])
    ds.BurnedInAnnotation = "NO"
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(shape[0]), int(shape[1])
    return ds


def monochrome_image(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    presentation_lut_shape: str | None = None,
    window: tuple[float, float] | None = None,
    seed: int = 0,
) -> bytes:
    """A DX image of 16-bit unsigned ``pixels`` with a Presentation LUT Shape and a window.

    Args:
        pixels: ``(rows, columns)`` integers in ``[0, 4095]``.
        photometric: ``MONOCHROME2`` (low values dark) or ``MONOCHROME1`` (low values bright).
        presentation_lut_shape: ``IDENTITY``, ``INVERSE`` or ``None`` (absent).
        window: ``(center, width)`` written as WindowCenter/WindowWidth.
    """
    ds = _image_dataset("DX", photometric, pixels.shape, seed)
    ds.SamplesPerPixel = 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if presentation_lut_shape is not None:
        ds.PresentationLUTShape = presentation_lut_shape
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = np.asarray(pixels).astype("<u2").tobytes()
    return _part10(ds)


def rgb_image(pixels: np.ndarray, *, icc_profile: bytes | None = None, seed: int = 0) -> bytes:
    """A VL photographic image of ``uint8`` RGB ``pixels``, with ``icc_profile`` as its ICC Profile when given."""
    ds = _image_dataset("XC", "RGB", pixels.shape, seed)
    ds.SamplesPerPixel = 3
    ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if icc_profile is not None:
        ds.ICCProfile = icc_profile
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    return _part10(ds)


def _s15(value: float) -> bytes:
    return struct.pack(">i", int(round(value * 65536)))


def linear_rgb_profile() -> bytes:
    """An ICC v2 display profile: sRGB's primaries (D50-adapted) with a linear tone curve.

    Pixels tagged with it are linear light; converting them to sRGB brightens
    the mid-tones (128 -> about 188), which shows that the profile was applied.
    """
    # sRGB colorants adapted to D50 (the values in the sRGB IEC61966-2.1 profile)
    colorants = {
        b"rXYZ": (0.4361, 0.2225, 0.0139),
        b"gXYZ": (0.3851, 0.7169, 0.0971),
        b"bXYZ": (0.1431, 0.0606, 0.7141),
        b"wtpt": (0.9642, 1.0, 0.8249),
    }
    tags: list[tuple[bytes, bytes]] = []
    for sig, xyz in colorants.items():
        tags.append((sig, b"XYZ \x00\x00\x00\x00" + b"".join(_s15(v) for v in xyz)))
    curve = b"curv\x00\x00\x00\x00" + struct.pack(">I", 1) + struct.pack(">H", 256) + b"\x00\x00"  # gamma 1.0
    tags += [(b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    text = b"linear sRGB primaries\x00"
    tags.append((b"desc", b"desc\x00\x00\x00\x00" + struct.pack(">I", len(text)) + text + b"\x00" * 79))
    tags.append((b"cprt", b"text\x00\x00\x00\x00" + b"no copyright, generated\x00"))
    offset = 128 + 4 + 12 * len(tags)
    table, blobs = b"", b""
    for sig, blob in tags:
        blob += b"\x00" * (-len(blob) % 4)
        table += sig + struct.pack(">II", offset + len(blobs), len(blob))
        blobs += blob
    body = struct.pack(">I", len(tags)) + table + blobs
    size = 128 + len(body)
    header = (
        struct.pack(">I", size)
        + b"none"
        + bytes([2, 0x10, 0, 0])  # version 2.1
        + b"mntrRGB XYZ "
        + b"\x00" * 12  # date
        + b"acsp"
        + b"\x00" * 16  # platform, flags, manufacturer, model
        + b"\x00" * 8  # attributes
        + struct.pack(">I", 0)  # rendering intent: perceptual
        + _s15(0.9642)
        + _s15(1.0)
        + _s15(0.8249)
        + b"\x00" * 4  # creator
        + b"\x00" * 44
    )
    assert len(header) == 128
    return header + body
