"""DICOM whole-slide images (VL Whole Slide Microscopy) for tests: one Part-10 file per pyramid level.

The pixels are :func:`medray.testing.media.slide_pyramid`'s, the same as
:func:`medray.testing.media.slide_tiff`'s, stored uncompressed (lossless), so a
slide read from the DICOM files and from the TIFF gives the same tiles.
Hostile variants: TILED_SPARSE levels with tiles left out, a level that claims
a huge pixel matrix, a level whose pixel data is cut short.

Example:
    >>> files = dicom_wsi_files(size=256, levels=2)
    >>> sorted(files)
    ['level0.dcm', 'level1.dcm']
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from medray.testing.media import slide_pyramid

__all__ = ["WSI_SOP_CLASS", "dicom_wsi_files", "dicom_wsi_level", "srgb_icc_profile", "wide_gamut_icc_profile"]

#: VL Whole Slide Microscopy Image Storage.
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
#: Names that must never reach an output (the tests look for them).
PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "MRN-WSI-0042"


def srgb_icc_profile() -> bytes:
    """An sRGB ICC profile (Pillow's built-in), as scanners embed."""
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def wide_gamut_icc_profile() -> bytes:
    """An RGB ICC profile that is not sRGB (sRGB with its red and blue primaries swapped).

    Converting from it to sRGB changes the pixels visibly, so a test can tell
    whether the profile was applied.
    """
    from PIL import ImageCms

    data = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    count = int.from_bytes(data[128:132], "big")
    tags = {}
    for k in range(count):
        sig, off, size = (int.from_bytes(data[132 + 12 * k + j : 136 + 12 * k + j], "big") for j in (0, 4, 8))
        tags[sig.to_bytes(4, "big")] = (132 + 12 * k, off, size)
    # swap where the red and blue colorant (rXYZ / bXYZ) tags point
    r, b = tags[b"rXYZ"], tags[b"bXYZ"]
    data[r[0] + 4 : r[0] + 12], data[b[0] + 4 : b[0] + 12] = data[b[0] + 4 : b[0] + 12], data[r[0] + 4 : r[0] + 12]
    return bytes(data)


def dicom_wsi_level(
    image: np.ndarray,
    *,
    mpp: float,
    tile: int = 128,
    level: int = 0,
    series_uid: str = "1.2.826.0.1.3680043.8.498.1",
    study_uid: str = "1.2.826.0.1.3680043.8.498.2",
    frame_of_reference_uid: str = "1.2.826.0.1.3680043.8.498.3",
    sparse: bool = False,
    drop_tiles: Iterable[tuple[int, int]] = (),
    icc_profile: bytes | None = None,
    claim_size: tuple[int, int] | None = None,
    truncate_frames: int = 0,
) -> bytes:
    """One pyramid level of a DICOM WSI as Part-10 bytes (Explicit VR Little Endian, RGB).

    Args:
        image: the level's ``(H, W, 3)`` ``uint8`` pixels.
        mpp: microns per pixel of this level.
        tile: tile (frame) side in pixels; edge tiles are padded with white.
        level: pyramid index (0 is ``ORIGINAL\\PRIMARY\\VOLUME``, others ``DERIVED\\RESAMPLED``).
        series_uid, study_uid, frame_of_reference_uid: shared by a slide's levels.
        sparse: TILED_SPARSE (a per-frame position for every stored tile) instead of TILED_FULL.
        drop_tiles: ``(column, row)`` tiles left out of a TILED_SPARSE level (gaps).
        icc_profile: an ICC profile for the optical path (``None``: none).
        claim_size: ``(width, height)`` written as the total pixel matrix instead of the real one (hostile).
        truncate_frames: frames cut off the end of the pixel data (hostile).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    h, w = image.shape[:2]
    cols, rows = math.ceil(w / tile), math.ceil(h / tile)
    dropped = set(drop_tiles)
    if dropped and not sparse:
        raise ValueError("drop_tiles needs sparse=True (TILED_FULL stores every tile)")
    positions = [(c, r) for r in range(rows) for c in range(cols) if (c, r) not in dropped]
    frames = []
    for c, r in positions:
        block = np.full((tile, tile, 3), 255, np.uint8)
        part = image[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile]
        block[: part.shape[0], : part.shape[1]] = part
        frames.append(block)
    if truncate_frames:
        frames = frames[: max(0, len(frames) - truncate_frames)]
    sop_uid = generate_uid(entropy_srcs=[series_uid, str(level), str(sparse), str(sorted(dropped))])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(WSI_SOP_CLASS)
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = WSI_SOP_CLASS
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.Modality = "SM"
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.ContentDate = "20240101"
    ds.ContentTime = "120000"
    ds.AcquisitionDateTime = "20240101120000"
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC-WSI-1"
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = level + 1
    ds.Manufacturer = "medray-testing"
    ds.ManufacturerModelName = "synthetic"
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = "0"
    ds.ImageType = (
        ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if level == 0 else ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
    )
    ds.BurnedInAnnotation = "NO"
    ds.SpecimenLabelInImage = "NO"
    ds.VolumetricProperties = "VOLUME"
    ds.ContainerIdentifier = "SLIDE-1"
    ds.IssuerOfTheContainerIdentifierSequence = DicomSequence([])
    ds.ContainerTypeCodeSequence = DicomSequence([_code("433466003", "SCT", "Microscope slide")])
    ds.SpecimenDescriptionSequence = DicomSequence([])
    ds.FocusMethod = "AUTO"
    ds.ExtendedDepthOfField = "NO"
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    ds.DimensionOrganizationType = "TILED_SPARSE" if sparse else "TILED_FULL"
    width, height = claim_size or (w, h)
    ds.TotalPixelMatrixColumns = width
    ds.TotalPixelMatrixRows = height
    ds.TotalPixelMatrixFocalPlanes = 1
    ds.NumberOfOpticalPaths = 1
    ds.ImagedVolumeWidth = width * mpp / 1000
    ds.ImagedVolumeHeight = height * mpp / 1000
    ds.ImagedVolumeDepth = 0.001
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem = 20.0
    origin.YOffsetInSlideCoordinateSystem = 40.0
    ds.TotalPixelMatrixOriginSequence = DicomSequence([origin])
    measures = Dataset()
    measures.PixelSpacing = [mpp / 1000, mpp / 1000]
    measures.SliceThickness = 0.001
    measures.SpacingBetweenSlices = 0.001
    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence([measures])
    optical = Dataset()
    optical.OpticalPathIdentifier = "0"
    optical.IlluminationTypeCodeSequence = DicomSequence([_code("111744", "DCM", "Brightfield illumination")])
    optical.IlluminationColorCodeSequence = DicomSequence([_code("11744", "DCM", "Full Spectrum")])
    if icc_profile is not None:
        optical.ICCProfile = icc_profile
    ds.OpticalPathSequence = DicomSequence([optical])
    shared.OpticalPathIdentificationSequence = DicomSequence([_optical_id()])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    if sparse:
        per_frame = []
        for c, r in positions[: len(frames)]:
            pos = Dataset()
            pos.ColumnPositionInTotalImagePixelMatrix = c * tile + 1
            pos.RowPositionInTotalImagePixelMatrix = r * tile + 1
            pos.XOffsetInSlideCoordinateSystem = 20.0 - r * tile * mpp / 1000
            pos.YOffsetInSlideCoordinateSystem = 40.0 - c * tile * mpp / 1000
            pos.ZOffsetInSlideCoordinateSystem = 0.0
            item = Dataset()
            item.PlanePositionSlideSequence = DicomSequence([pos])
            content = Dataset()
            content.DimensionIndexValues = [c + 1, r + 1]
            item.FrameContentSequence = DicomSequence([content])
            per_frame.append(item)
        ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.Rows = tile
    ds.Columns = tile
    ds.NumberOfFrames = len(positions)  # what the header claims, even when frames were cut off
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "00"
    ds.PixelData = b"".join(f.tobytes() for f in frames) if frames else b"\xff\xff"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def dicom_wsi_files(
    size: int = 1024,
    mpp: float = 0.25,
    levels: int = 4,
    seed: int = 0,
    blob: tuple[float, float, float] = (0.3, 0.35, 0.22),
    *,
    tile: int = 128,
    sparse: bool = False,
    drop_tiles: Sequence[tuple[int, int]] = (),
    icc_profile: bytes | None = None,
    series_uid: str = "1.2.826.0.1.3680043.8.498.1",
) -> dict[str, bytes]:
    """A slide as DICOM WSI files ``level<k>.dcm``: the pixels of ``slide_tiff(size, mpp, levels, seed, blob)``.

    Args:
        size, mpp, levels, seed, blob: as :func:`medray.testing.media.slide_tiff`.
        tile: tile side of every level (smaller levels are one padded tile).
        sparse: TILED_SPARSE levels.
        drop_tiles: tiles (column, row) left out of level 0 (needs ``sparse``).
        icc_profile: an ICC profile written on every level.
        series_uid: the slide's Series Instance UID (two slides in one folder need two).
    """
    pyramid = slide_pyramid(size, levels, seed, blob)
    return {
        f"level{k}.dcm": dicom_wsi_level(
            img,
            mpp=mpp * 2**k,
            tile=tile,
            level=k,
            series_uid=series_uid,
            sparse=sparse,
            drop_tiles=drop_tiles if k == 0 else (),
            icc_profile=icc_profile,
        )
        for k, img in enumerate(pyramid)
    }


def _code(value: str, scheme: str, meaning: str) -> Any:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _optical_id() -> Any:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.OpticalPathIdentifier = "0"
    return item
