"""Generated media for tests and demos: tones, reports, DICOM SRs and hostile WAVs.

Nothing here reads the network; every output depends only on the arguments.
"""

from __future__ import annotations

import io
import struct
from typing import Any

import numpy as np

__all__ = ["REPORT", "tone", "encode", "sr_dataset", "lying_wav", "slide_tiff", "slide_pyramid"]

#: A report longer than a 64-token model limit; its words are in the tiny vocabulary.
REPORT = (
    "Findings: mild right pleural effusion without pneumonia. The heart is normal. "
    "Impression: stable small nodule in the left lung, no acute change. "
) * 6


def tone(rate: int, seconds: float, channels: int = 1, freq: float = 440.0) -> np.ndarray:
    """A sine tone, float32, ``(samples,)`` or ``(samples, channels)``."""
    t = np.arange(int(round(rate * seconds))) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    if channels == 1:
        return wave
    return np.stack([wave * (c + 1) / channels for c in range(channels)], axis=1)


def encode(samples: np.ndarray, rate: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    """Encode samples with soundfile (WAV, FLAC, OGG)."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def sr_dataset(text: str) -> bytes:
    """A DICOM Basic Text SR holding ``text`` (and a fake patient name, to check it never leaks)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    def code(meaning: str) -> Dataset:
        c = Dataset()
        c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = "121071", "DCM", meaning
        return c

    item = Dataset()
    item.ValueType, item.RelationshipType = "TEXT", "CONTAINS"
    item.ConceptNameCodeSequence = [code("Finding")]
    item.TextValue = text
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.88.11")
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName, ds.PatientID = "SR", "DOE^JANE", "P123"
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = [code("Radiology Report")]
    ds.ContentSequence = [item]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def lying_wav(seconds: float, rate: int = 16000) -> bytes:
    """A WAV whose 'data' chunk claims ``seconds`` but holds 10 samples."""
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    size = int(seconds * rate * 2)
    return (
        b"RIFF"
        + struct.pack("<I", 36 + size)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + struct.pack("<I", min(size, 0xFFFFFFFF))
        + b"\x00" * 20
    )


def slide_tiff(
    size: int = 1024,
    mpp: float | None = 0.25,
    levels: int = 4,
    seed: int = 0,
    blob: tuple[float, float, float] = (0.3, 0.35, 0.22),
) -> bytes:
    """A tiled pyramidal TIFF (SubIFD levels, each half the last) like a scanned slide.

    A pink, textured, tissue-like ellipse on a near-white background. Level 0 is
    ``size`` x ``size`` pixels; ``mpp`` (microns per pixel of level 0) is written as
    the resolution tags (``None``: no resolution, like a slide without mpp metadata).

    Args:
        size: level-0 side, a multiple of ``2 ** (levels - 1) * 16``.
        mpp: level-0 microns per pixel, or ``None``.
        levels: pyramid levels (1 = a single tiled page).
        seed: noise seed.
        blob: ellipse centre (x, y) and radius as fractions of ``size``.
    """
    import tifffile

    pyramid = slide_pyramid(size, levels, seed, blob)
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tif:
        for k, level in enumerate(pyramid):
            res: dict[str, Any] = {}
            if mpp is not None:
                per_cm = 1e4 / (mpp * 2**k)
                res = {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}
            kw: dict[str, Any] = {"subifds": levels - 1} if k == 0 and levels > 1 else ({"subfiletype": 1} if k else {})
            tile = 128 if level.shape[0] >= 128 else 16
            tif.write(level, tile=(tile, tile), photometric="rgb", compression="zlib", **res, **kw)
    return buf.getvalue()


def slide_pyramid(
    size: int = 1024, levels: int = 4, seed: int = 0, blob: tuple[float, float, float] = (0.3, 0.35, 0.22)
) -> list[np.ndarray]:
    """The RGB ``uint8`` levels of :func:`slide_tiff`'s slide (each half the last, 2x2 means).

    The same pixels serve other slide containers (DICOM whole-slide images,
    :mod:`medray.testing.dicom_wsi`), so embeddings of the two can be compared.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    cx, cy, r = blob
    inside = ((xx - cx) ** 2 + ((yy - cy) / 0.8) ** 2) < r * r
    img = rng.integers(238, 256, (size, size, 3)).astype(np.uint8)
    tissue = np.stack(
        [
            rng.integers(170, 230, inside.sum()),
            rng.integers(60, 130, inside.sum()),
            rng.integers(140, 200, inside.sum()),
        ],
        axis=1,
    ).astype(np.uint8)
    img[inside] = tissue
    pyramid = [img]
    for _ in range(levels - 1):
        prev = pyramid[-1].astype(np.float32)
        pyramid.append(
            ((prev[0::2, 0::2] + prev[1::2, 0::2] + prev[0::2, 1::2] + prev[1::2, 1::2]) / 4).round().astype(np.uint8)
        )
    return pyramid


def nifti_bytes(values: np.ndarray, affine: np.ndarray, *, compress: bool = False, version: int = 1) -> bytes:
    """Encode ``values`` (voxel axes i, j, k) with ``affine`` (RAS) as a single-file NIfTI-1/2."""
    import gzip

    import nibabel as nib

    cls = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    image = cls(np.asarray(values), np.asarray(affine, dtype=np.float64))
    image.header.set_qform(image.affine, code=1)
    image.header.set_sform(image.affine, code=1)
    raw = image.to_bytes()
    return gzip.compress(raw, mtime=0) if compress else raw
