"""Synthetic sample data for the demo, the tests and the benchmarks.

:func:`generate_samples` writes a small, deterministic (by ``seed``) corpus
into a local directory:

* ``dicom/<patient>/<nnnn>_<modality>.dcm`` — valid DICOM Part-10 files made
  with pydicom: chest-X-ray-like DX/CR phantoms (12-bit, MONOCHROME2 and some
  MONOCHROME1, with window, view position PA/AP, pixel spacing), CT slices
  (int16, RescaleIntercept -1024, no window), one multi-frame file
  (NumberOfFrames 3) and several transfer syntaxes (explicit/implicit VR
  little endian, explicit VR big endian, deflated, RLE, JPEG 2000 lossless,
  JPEG-LS lossless; the compressed ones are skipped, and reported under
  ``"skipped"``, when pydicom has no encoder for them). Half of the labelled
  instances carry a bright Gaussian "lesion" (label 1).
* ``photos/`` — one PNG and one JPEG (EXIF Orientation 6) for the
  dermatology path.
* ``archive.zip`` / ``archive.tar.gz`` — copies of a few DICOMs in
  subfolders (plus a ``../../etc/x`` path-traversal member if ``hostile``).
* ``hostile/`` (if ``hostile``) — ``not_dicom.dcm`` (random bytes),
  ``truncated.dcm`` (a valid file cut in half), ``bomb.dcm`` (header claims
  65535 x 65535 x 10000 frames, a few bytes of pixel data), ``empty.dcm``.
* ``manifest.csv`` / ``manifest.parquet`` — one row per DICOM and photo
  (not the hostile files, not archive members) with columns :data:`MANIFEST_COLUMNS`.
  ``path`` is relative to ``out_dir``; ``uri`` equals ``path`` until
  :func:`write_manifest` rewrites it to ``<base_uri>/<path>`` (call it before
  uploading the directory). The manifest never contains PHI values.
* ``samples.json`` — the dict that :func:`generate_samples` returns.

PHI: with ``phi=True`` every patient ``k`` (two digits, ``00``, ``01``...)
gets planted identifiers — PatientName ``PHI^SENTINEL^k``, PatientID
``PHIID-k``, PatientBirthDate ``19700101``, InstitutionName
``PHI-HOSPITAL-k``, AccessionNumber ``PHIACCk``, ReferringPhysicianName,
OperatorsName, InstitutionAddress, PatientAddress, OtherPatientIDsSequence
(nested) and a private tag — listed in ``result["phi"]``; photos get PHI in
EXIF (Artist, ImageDescription) and a PNG text chunk. Do not check for PHI by
grepping raw bytes of the deflated-transfer-syntax file (its dataset is
zlib-compressed; see ``result["phi"]["raw_grep_unreliable"]``): parse it.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import math
import os
import tarfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medray.testing.media import nifti_bytes

__all__ = [
    "MANIFEST_COLUMNS",
    "claiming_series_instance",
    "ct_phantom",
    "ct_series",
    "PHI_BIRTH_DATE",
    "generate_samples",
    "write_manifest",
    "read_manifest",
]

#: Columns of ``manifest.csv`` / ``manifest.parquet``, in order.
MANIFEST_COLUMNS: tuple[str, ...] = (
    "uri",  # full URI after write_manifest(); equals `path` until then
    "path",  # relative to out_dir
    "kind",  # "dicom" | "photo"
    "label",  # 0/1: lesion present
    "site",  # "site-A" | "site-B" | "site-C"
    "patient",  # pseudonymous key ("p00"), never the PHI PatientID
    "split",  # "train" | "val" | "test", by patient
    "modality",  # DX, CR, CT, XC (photo)
    "sex",  # M | F
    "age",  # years (int)
    "view",  # PA | AP | "" (X-ray view position)
    "frames",  # number of frames = expected records from this file
    "rows",
    "columns",
    "photometric",  # MONOCHROME1 | MONOCHROME2 | RGB
    "transfer_syntax",  # UID ("" for photos)
    "sha256",  # of the file bytes
)

PHI_BIRTH_DATE = "19700101"
_PER_PATIENT = 4  # instances per patient: DX PA, DX AP, CR, CT
_SITES = ("site-A", "site-B", "site-C")
_FIXED_DATE = "20240102"
_ZIP_DATE = (2024, 1, 2, 3, 4, 6)
_TAR_MTIME = 1704164646  # 2024-01-02T03:04:06Z
_PRIVATE_CREATOR = "MEDRAY PHANTOM"


# --------------------------------------------------------------------------
# phantoms
# --------------------------------------------------------------------------
def _grid(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float64)
    return (yy / (rows - 1)) * 2 - 1, (xx / (cols - 1)) * 2 - 1


def _ellipse(y: np.ndarray, x: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def _lesion_site(rng: np.random.Generator) -> tuple[float, float, float]:
    """A lesion centre inside one lung (normalised coords) and sigma (fraction)."""
    side = -1.0 if rng.random() < 0.5 else 1.0
    cy = float(rng.uniform(-0.35, 0.3))
    cx = side * float(rng.uniform(0.28, 0.48))
    sigma = float(rng.uniform(0.05, 0.08))
    return cy, cx, sigma


def _gauss(y: np.ndarray, x: np.ndarray, cy: float, cx: float, sigma: float) -> np.ndarray:
    return np.exp(-(((y - cy) ** 2) + ((x - cx) ** 2)) / (2 * sigma**2))


def _xray(
    rng: np.random.Generator,
    rows: int,
    cols: int,
    lesion: tuple[float, float, float] | None,
    gain: float,
    shift: float = 0.0,
) -> np.ndarray:
    """Chest-radiograph-like image, 12-bit MONOCHROME2 values (uint16)."""
    y, x = _grid(rows, cols)
    x = x - shift
    img = np.full((rows, cols), 0.08)
    img += 0.45 * _ellipse(y, x, 0.05, 0.0, 0.92, 0.85)
    img -= 0.30 * _ellipse(y, x, -0.05, -0.38, 0.55, 0.28)
    img -= 0.30 * _ellipse(y, x, -0.05, 0.38, 0.55, 0.28)
    img += 0.25 * (np.abs(x) < 0.1) * _ellipse(y, x, 0.05, 0.0, 0.92, 0.85)
    img += 0.15 * ((y > 0.55) & _ellipse(y, x, 0.05, 0.0, 0.92, 0.85))
    for r in np.linspace(-0.6, 0.4, 5):  # faint ribs
        img += 0.05 * (np.abs(y - r - 0.15 * x**2) < 0.03) * _ellipse(y, x, 0.05, 0.0, 0.9, 0.8)
    if lesion is not None:
        img += 0.35 * _gauss(y, x, *lesion)
    img = img * gain + rng.normal(0.0, 0.015, img.shape)
    return np.clip(np.round(img * 3600 + 200), 0, 4095).astype(np.uint16)


def _ct(
    rng: np.random.Generator,
    size: int,
    lesion: tuple[float, float, float] | None,
    z: float,
) -> np.ndarray:
    """Axial chest-CT-like slice in HU (float)."""
    y, x = _grid(size, size)
    hu = np.full((size, size), -1000.0)
    body = _ellipse(y, x, 0.0, 0.0, 0.65, 0.9)
    hu[body] = 40.0
    hu[_ellipse(y, x, -0.05, -0.42, 0.45, 0.3 + 0.02 * z)] = -850.0
    hu[_ellipse(y, x, -0.05, 0.42, 0.45, 0.3 + 0.02 * z)] = -850.0
    hu[_ellipse(y, x, 0.45, 0.0, 0.12, 0.12)] = 700.0  # vertebra
    if lesion is not None:
        cy, cx, sigma = lesion
        hu += 900.0 * _gauss(y, x, cy * 0.8, cx * 0.9, sigma)
    hu += rng.normal(0.0, 10.0, hu.shape)
    hu[x**2 + y**2 > 1.0] = -2048.0  # outside the scan FOV: negative stored values
    return hu


# --------------------------------------------------------------------------
# DICOM writing
# --------------------------------------------------------------------------
def _uid(seed: int, *parts: object) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["medray-samples", str(seed), *map(str, parts)]))


def _phi_for(k: int, key: str, phi: bool) -> dict[str, str]:
    if not phi:
        return {"PatientName": f"ANON^{key}", "PatientID": key}
    kk = f"{k:02d}"
    return {
        "PatientName": f"PHI^SENTINEL^{kk}",
        "PatientID": f"PHIID-{kk}",
        "PatientBirthDate": PHI_BIRTH_DATE,
        "InstitutionName": f"PHI-HOSPITAL-{kk}",
        "InstitutionAddress": f"PHI-ADDRESS-{kk} Main Street",
        "AccessionNumber": f"PHIACC{kk}",
        "ReferringPhysicianName": f"PHI^REFERRER^{kk}",
        "OperatorsName": f"PHI^OPERATOR^{kk}",
        "PatientAddress": f"PHI-STREET-{kk}",
        "OtherPatientID": f"PHIOTHER-{kk}",  # inside OtherPatientIDsSequence
        "Private": f"PHI-PRIVATE-{kk}",  # private tag (0x0009,0x1001)
    }


def _base_dataset(
    *,
    seed: int,
    patient: Mapping[str, Any],
    sop_class: str,
    sop_uid: str,
    modality: str,
    series_no: int,
    instance_no: int,
) -> Any:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "MEDRAY_SAMPLES"

    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = _FIXED_DATE
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.Modality = modality
    ds.BurnedInAnnotation = "NO"  # synthetic pixels carry no text
    ds.Manufacturer = f"PHANTOM-VENDOR-{patient['site'][-1]}"
    ds.ManufacturerModelName = "medray-synthetic"
    pv = patient["phi_values"]
    ds.PatientName = pv["PatientName"]
    ds.PatientID = pv["PatientID"]
    ds.PatientBirthDate = pv.get("PatientBirthDate", "")
    ds.PatientSex = patient["sex"]
    ds.PatientAge = f"{patient['age']:03d}Y"
    ds.AccessionNumber = pv.get("AccessionNumber", "")
    ds.ReferringPhysicianName = pv.get("ReferringPhysicianName", "")
    if "InstitutionName" in pv:
        ds.InstitutionName = pv["InstitutionName"]
        ds.InstitutionAddress = pv["InstitutionAddress"]
        ds.OperatorsName = pv["OperatorsName"]
        ds.PatientAddress = pv["PatientAddress"]
        other = Dataset()
        other.PatientID = pv["OtherPatientID"]
        other.IssuerOfPatientID = "PHI-ISSUER"
        ds.OtherPatientIDsSequence = DicomSequence([other])
        block = ds.private_block(0x0009, _PRIVATE_CREATOR, create=True)
        block.add_new(0x01, "LO", pv["Private"])
    ds.StudyInstanceUID = _uid(seed, "study", patient["key"])
    ds.SeriesInstanceUID = _uid(seed, "series", patient["key"], modality, series_no)
    ds.StudyID = "1"
    ds.SeriesNumber = series_no
    ds.InstanceNumber = instance_no
    ds.FrameOfReferenceUID = _uid(seed, "for", patient["key"])
    return ds


def _set_pixels(ds: Any, arr: np.ndarray, *, signed: bool, bits_stored: int, photometric: str) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    if arr.ndim == 3:
        ds.NumberOfFrames = arr.shape[0]
    ds.Rows, ds.Columns = int(arr.shape[-2]), int(arr.shape[-1])
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = arr.astype("<i2" if signed else "<u2").tobytes()


def _save(ds: Any, path: Path, variant: str, arr: np.ndarray) -> str:
    """Write ``ds`` with transfer-syntax ``variant``; return the UID used.

    Compressed variants fall back to explicit VR little endian (raising
    ``_Skipped``) when the encoder is unavailable or fails.
    """
    from pydicom import uid as U

    ts = {
        "explicit_le": U.ExplicitVRLittleEndian,
        "implicit_le": U.ImplicitVRLittleEndian,
        "big_endian": U.ExplicitVRBigEndian,
        "deflated": U.DeflatedExplicitVRLittleEndian,
        "rle": U.RLELossless,
        "jpeg2000": U.JPEG2000Lossless,
        "jpegls": U.JPEGLSLossless,
    }[variant]
    path.parent.mkdir(parents=True, exist_ok=True)
    skipped: str | None = None
    if ts.is_compressed:
        try:
            ds.compress(ts, arr, generate_instance_uid=False)
        except Exception as exc:  # noqa: BLE001 - any encoder problem: skip
            skipped = f"{type(exc).__name__}: {exc}"
            ts = U.ExplicitVRLittleEndian
    elif ts == U.ExplicitVRBigEndian:
        dtype = ">i2" if ds.PixelRepresentation else ">u2"
        ds.PixelData = arr.astype(dtype).tobytes()
    ds.file_meta.TransferSyntaxUID = ts
    ds.save_as(
        path,
        implicit_vr=ts.is_implicit_VR,
        little_endian=ts.is_little_endian,
        enforce_file_format=True,
    )
    if skipped is not None:
        raise _Skipped(str(ts), skipped)
    return str(ts)


class _Skipped(Exception):
    def __init__(self, ts: str, reason: str) -> None:
        self.ts, self.reason = ts, reason
        super().__init__(reason)


# variant of the instance with this index (if n is large enough)
_VARIANTS: dict[int, str] = {
    1: "rle",
    2: "jpeg2000",
    3: "jpegls",
    4: "multiframe",
    5: "big_endian",
    6: "deflated",
    7: "implicit_le",
    13: "rle",
    14: "jpeg2000",  # a compressed MONOCHROME1 CR (odd patient, CR) when n >= 15
}


# --------------------------------------------------------------------------
# photos, archives, hostile files
# --------------------------------------------------------------------------
def _skin_photo(rng: np.random.Generator, h: int, w: int, lesion: bool) -> np.ndarray:
    y, x = _grid(h, w)
    base = np.array([224.0, 172.0, 150.0]) + rng.normal(0, 4, 3)
    img = np.ones((h, w, 3)) * base
    img += rng.normal(0, 3.0, (h, w, 3))
    if lesion:
        g = _gauss(y, x, float(rng.uniform(-0.3, 0.3)), float(rng.uniform(-0.3, 0.3)), 0.18)
        img -= g[..., None] * np.array([120.0, 110.0, 100.0])
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _write_photos(out: Path, rng: np.random.Generator, phi: bool) -> list[dict[str, Any]]:
    from PIL import Image, PngImagePlugin

    photos: list[dict[str, Any]] = []
    (out / "photos").mkdir(parents=True, exist_ok=True)

    # PNG, upright, lesion
    arr = _skin_photo(rng, 80, 96, lesion=True)
    info = PngImagePlugin.PngInfo()
    if phi:
        info.add_text("Comment", "PHI-PNG-COMMENT-00")
    rel = "photos/derm_0000.png"
    Image.fromarray(arr, "RGB").save(out / rel, pnginfo=info)
    photos.append({"path": rel, "label": 1, "rows": 80, "columns": 96, "orientation": 1})

    # JPEG with EXIF Orientation=6: displayed image is 64 wide x 96 tall with a
    # red marker in its top-left corner; stored pixels are that rotated CCW.
    disp = _skin_photo(rng, 96, 64, lesion=False)
    disp[:12, :12] = (255, 0, 0)
    stored = Image.fromarray(disp, "RGB").transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    if phi:
        exif[0x013B] = "PHI^PHOTOGRAPHER^00"  # Artist
        exif[0x010E] = "PHI-PHOTO-DESCRIPTION-00"  # ImageDescription
    rel = "photos/derm_0001.jpg"
    stored.save(out / rel, quality=95, exif=exif.tobytes())
    photos.append(
        {
            "path": rel,
            "label": 0,
            "rows": 96,  # as displayed (after applying EXIF orientation)
            "columns": 64,
            "orientation": 6,
            "stored_size": [stored.width, stored.height],
            "marker": "red 12x12 square in the top-left corner once oriented",
        }
    )
    return photos


def _write_archives(out: Path, members: Sequence[tuple[str, str]], hostile: bool) -> dict[str, dict[str, Any]]:
    """``members``: (archive member name, source relative path)."""
    traversal = "../../etc/x"
    payload = b"path traversal payload\n"
    result: dict[str, dict[str, Any]] = {}

    zpath = out / "archive.zip"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, src in members:
            zi = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
            zi.compress_type = zipfile.ZIP_DEFLATED
            zi.external_attr = 0o644 << 16
            zf.writestr(zi, (out / src).read_bytes())
        if hostile:
            zi = zipfile.ZipInfo(traversal, date_time=_ZIP_DATE)
            zi.external_attr = 0o644 << 16
            zf.writestr(zi, payload)

    tpath = out / "archive.tar.gz"
    with open(tpath, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tf:
                for name, src in members:
                    data = (out / src).read_bytes()
                    ti = tarfile.TarInfo(name)
                    ti.size, ti.mtime, ti.mode = len(data), _TAR_MTIME, 0o644
                    tf.addfile(ti, io.BytesIO(data))
                if hostile:
                    ti = tarfile.TarInfo(traversal)
                    ti.size, ti.mtime, ti.mode = len(payload), _TAR_MTIME, 0o644
                    tf.addfile(ti, io.BytesIO(payload))

    for arch in ("archive.zip", "archive.tar.gz"):
        result[arch] = {
            "dicom_members": [name for name, _ in members],
            "sources": {name: src for name, src in members},
            "hostile_members": [traversal] if hostile else [],
        }
    return result


def _write_hostile(out: Path, rng: np.random.Generator, good_file: Path, seed: int) -> dict[str, str]:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        PYDICOM_IMPLEMENTATION_UID,
        UID,
        ExplicitVRLittleEndian,
        SecondaryCaptureImageStorage,
    )

    d = out / "hostile"
    d.mkdir(parents=True, exist_ok=True)
    files = {
        "not_dicom": "hostile/not_dicom.dcm",
        "truncated": "hostile/truncated.dcm",
        "bomb": "hostile/bomb.dcm",
        "empty": "hostile/empty.dcm",
    }
    # random bytes that do not even look like a preamble + "DICM"
    junk = bytearray(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    junk[128:132] = b"NOPE"
    (out / files["not_dicom"]).write_bytes(bytes(junk))

    good = good_file.read_bytes()
    (out / files["truncated"]).write_bytes(good[: len(good) // 2])

    (out / files["empty"]).write_bytes(b"")

    sop = _uid(seed, "hostile", "bomb")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop
    ds.Modality = "OT"
    ds.PatientID = "BOMB"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 65535
    ds.NumberOfFrames = 10000
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = b"\x00\x01" * 8  # 16 bytes instead of ~85 TB
    ds.save_as(out / files["bomb"], implicit_vr=False, little_endian=True, enforce_file_format=True)
    return files


# --------------------------------------------------------------------------
# manifest
# --------------------------------------------------------------------------
def _write_rows(out: Path, rows: Sequence[Mapping[str, Any]], name: str) -> dict[str, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    csv_path, pq_path = out / f"{name}.csv", out / f"{name}.parquet"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(MANIFEST_COLUMNS), lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({c: r[c] for c in MANIFEST_COLUMNS})
    int_cols = {"label", "age", "frames", "rows", "columns"}
    table = pa.table(
        {c: pa.array([r[c] for r in rows], type=pa.int64() if c in int_cols else pa.string()) for c in MANIFEST_COLUMNS}
    )
    pq.write_table(table, pq_path)
    return {"csv": csv_path.name, "parquet": pq_path.name}


def read_manifest(out_dir: str | os.PathLike[str], name: str = "manifest") -> list[dict[str, Any]]:
    """Read ``<name>.parquet`` from ``out_dir`` as a list of row dicts."""
    import pyarrow.parquet as pq

    return pq.read_table(Path(out_dir) / f"{name}.parquet").to_pylist()


def write_manifest(out_dir: str | os.PathLike[str], base_uri: str | None, *, name: str = "manifest") -> dict[str, str]:
    """Rewrite the manifest's ``uri`` column to ``<base_uri>/<path>``.

    Call after :func:`generate_samples` and before uploading ``out_dir``,
    e.g. ``write_manifest(out, "s3://bucket/samples")``. ``base_uri=None``
    resets ``uri`` to the relative ``path``. Idempotent.

    Args:
        out_dir: directory written by :func:`generate_samples`.
        base_uri: URI prefix where ``out_dir``'s content will live.
        name: manifest base name (``<name>.csv`` / ``<name>.parquet``); the
            source is always ``manifest.parquet``.

    Returns:
        File names written (``{"csv": ..., "parquet": ...}``) in ``out_dir``.
    """
    out = Path(out_dir)
    rows = read_manifest(out)
    prefix = None if base_uri is None else base_uri.rstrip("/")
    for r in rows:
        r["uri"] = r["path"] if prefix is None else f"{prefix}/{r['path']}"
    return _write_rows(out, rows, name)


# --------------------------------------------------------------------------
# main entry point
# --------------------------------------------------------------------------
def generate_samples(
    out_dir: str | os.PathLike[str],
    *,
    n: int = 24,
    seed: int = 0,
    hostile: bool = True,
    phi: bool = True,
) -> dict[str, Any]:
    """Write a synthetic, deterministic sample corpus into ``out_dir``.

    Args:
        out_dir: local directory (created if missing). Existing files with
            the same names are overwritten; others are left alone.
        n: number of labelled DICOM files (4 per patient: DX PA, DX AP, CR,
            CT). Index 4 is the multi-frame file; indices 1-7, 13, 14 use the
            special transfer syntaxes (so ``n >= 8`` covers all variants).
        seed: everything (pixels, labels, UIDs) is a function of the seed;
            the same seed gives byte-identical files.
        hostile: also write ``hostile/`` and the path-traversal archive members.
        phi: plant PHI sentinels (see module docstring); otherwise patients
            are ``ANON^pNN`` / ``pNN`` with no other identifiers.

    Returns:
        A JSON-serialisable dict (also saved as ``samples.json``) with keys
        ``out_dir``, ``seed``, ``n``, ``dicom`` (relative paths of the good
        DICOMs), ``compressed``, ``multiframe``, ``photos``, ``hostile``
        (name -> path, empty if not hostile), ``archives``, ``manifest``,
        ``labels`` (path -> 0/1, DICOMs and photos), ``lesions`` (path ->
        centre/sigma in pixels for positives), ``frames`` (path -> frames),
        ``transfer_syntax`` (path -> UID), ``patients`` (key -> info),
        ``phi`` (``enabled``, ``sentinels``, ``by_patient``, ...),
        ``skipped`` (variants without an encoder) and ``expected``
        (record counts).
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    from pydicom import uid as U

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    n_patients = math.ceil(n / _PER_PATIENT)
    labels_all = np.array([1] * (n // 2) + [0] * (n - n // 2))
    rng.shuffle(labels_all)
    patient_order = rng.permutation(n_patients)
    splits = {}
    for rank, k in enumerate(patient_order):
        frac = rank / n_patients
        splits[int(k)] = "train" if frac < 0.6 else ("val" if frac < 0.8 else "test")

    patients: dict[str, dict[str, Any]] = {}
    for k in range(n_patients):
        key = f"p{k:02d}"
        patients[key] = {
            "key": key,
            "index": k,
            "site": _SITES[k % len(_SITES)],
            "sex": "M" if rng.random() < 0.5 else "F",
            "age": int(rng.integers(20, 86)),
            "split": splits[k],
            "phi_values": _phi_for(k, key, phi),
        }

    rows: list[dict[str, Any]] = []
    dicom_paths: list[str] = []
    compressed: list[str] = []
    multiframe: list[str] = []
    labels: dict[str, int] = {}
    lesions: dict[str, dict[str, float]] = {}
    frames: dict[str, int] = {}
    tsyntax: dict[str, str] = {}
    skipped: list[dict[str, str]] = []
    raw_grep_unreliable: list[str] = []

    for i in range(n):
        k, j = divmod(i, _PER_PATIENT)
        p = patients[f"p{k:02d}"]
        label = int(labels_all[i])
        site_gain = {"site-A": 1.0, "site-B": 0.92, "site-C": 1.06}[p["site"]]
        variant = _VARIANTS.get(i, "explicit_le")
        lesion = _lesion_site(rng) if label else None
        modality = ("DX", "DX", "CR", "CT")[j]
        view = ("PA", "AP", "PA", "")[j]
        is_mf = variant == "multiframe"
        if is_mf:
            variant = "explicit_le"
        sop_uid = _uid(seed, "sop", i)

        if modality == "CT":
            size = int(rng.choice([64, 96]))
            rows_, cols_ = size, size
            hu = _ct(rng, size, lesion, z=float(j))
            arr = np.round(hu + 1024.0).astype(np.int16)
            ds = _base_dataset(
                seed=seed, patient=p, sop_class=U.CTImageStorage, sop_uid=sop_uid,
                modality="CT", series_no=2, instance_no=i + 1,
            )  # fmt: skip
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "HU"
            ds.PixelSpacing = [0.7, 0.7]
            ds.SliceThickness = 2.5
            ds.KVP = 120
            ds.ImagePositionPatient = [-size * 0.35, -size * 0.35, -100.0 + 2.5 * k]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.SliceLocation = -100.0 + 2.5 * k
            ds.BodyPartExamined = "CHEST"
            _set_pixels(ds, arr, signed=True, bits_stored=16, photometric="MONOCHROME2")
            photometric = "MONOCHROME2"
            n_frames = 1
        else:
            rows_ = 128
            cols_ = int(rng.choice([96, 112, 128]))
            mono1 = modality == "CR" and k % 2 == 1
            photometric = "MONOCHROME1" if mono1 else "MONOCHROME2"
            gain = site_gain * float(rng.uniform(0.95, 1.05))
            if is_mf:
                arr = np.stack([_xray(rng, rows_, cols_, lesion, gain, shift=0.03 * f) for f in range(3)])
                sop_class = U.MultiFrameGrayscaleWordSecondaryCaptureImageStorage
            else:
                arr = _xray(rng, rows_, cols_, lesion, gain)
                sop_class = (
                    U.DigitalXRayImageStorageForPresentation if modality == "DX" else U.ComputedRadiographyImageStorage
                )
            if mono1:
                arr = (4095 - arr).astype(np.uint16)
            n_frames = 3 if is_mf else 1
            ds = _base_dataset(
                seed=seed, patient=p, sop_class=sop_class, sop_uid=sop_uid,
                modality=modality, series_no=1 if modality == "DX" else 3, instance_no=i + 1,
            )  # fmt: skip
            ds.ImageType = ["ORIGINAL", "PRIMARY"]
            ds.ViewPosition = view
            ds.BodyPartExamined = "CHEST"
            ds.PixelSpacing = [0.2, 0.2]
            ds.ImagerPixelSpacing = [0.2, 0.2]
            ds.WindowCenter = 2048
            ds.WindowWidth = 4096
            ds.PresentationIntentType = "FOR PRESENTATION"
            _set_pixels(ds, arr, signed=False, bits_stored=12, photometric=photometric)
            if is_mf:
                ds.FrameIncrementPointer = 0x00181063  # FrameTime
                ds.FrameTime = 100.0

        rel = f"dicom/{p['key']}/{i:04d}_{modality.lower()}.dcm"
        try:
            ts = _save(ds, out / rel, variant, arr)
        except _Skipped as sk:
            ts = sk.ts
            skipped.append({"path": rel, "variant": variant, "reason": sk.reason})
        if U.UID(ts).is_compressed:
            compressed.append(rel)
        if ts == U.DeflatedExplicitVRLittleEndian:
            raw_grep_unreliable.append(rel)
        if is_mf:
            multiframe.append(rel)
        dicom_paths.append(rel)
        labels[rel] = label
        frames[rel] = n_frames
        tsyntax[rel] = ts
        if lesion is not None:
            cy, cx, sigma = lesion
            lesions[rel] = {
                "row": (cy + 1) / 2 * (rows_ - 1),
                "col": (cx + 1) / 2 * (cols_ - 1),
                "sigma_px": sigma / 2 * (rows_ - 1),
            }
        rows.append(
            {
                "uri": rel, "path": rel, "kind": "dicom", "label": label, "site": p["site"],
                "patient": p["key"], "split": p["split"], "modality": modality, "sex": p["sex"],
                "age": p["age"], "view": view, "frames": n_frames, "rows": rows_,
                "columns": cols_, "photometric": photometric, "transfer_syntax": ts,
                "sha256": hashlib.sha256((out / rel).read_bytes()).hexdigest(),
            }
        )  # fmt: skip

    # photos belong to the first patient (dermatology visit)
    photo_info = _write_photos(out, rng, phi)
    p0 = patients["p00"]
    for ph in photo_info:
        rel = ph["path"]
        labels[rel] = ph["label"]
        rows.append(
            {
                "uri": rel, "path": rel, "kind": "photo", "label": ph["label"], "site": p0["site"],
                "patient": p0["key"], "split": p0["split"], "modality": "XC", "sex": p0["sex"],
                "age": p0["age"], "view": "", "frames": 1, "rows": ph["rows"],
                "columns": ph["columns"], "photometric": "RGB", "transfer_syntax": "",
                "sha256": hashlib.sha256((out / rel).read_bytes()).hexdigest(),
            }
        )  # fmt: skip

    # archives: up to 3 uncompressed single-frame DICOMs, in subfolders
    plain = [
        d for d in dicom_paths
        if tsyntax[d] == U.ExplicitVRLittleEndian and frames[d] == 1
    ][:3]  # fmt: skip
    members = [(f"study{m + 1}/series1/{Path(src).name}", src) for m, src in enumerate(plain)]
    archives = _write_archives(out, members, hostile)
    for a in archives.values():
        a["labels"] = {name: labels[src] for name, src in members}

    hostile_files: dict[str, str] = {}
    if hostile:
        victim = out / (plain[0] if plain else dicom_paths[0])  # truncated copy of this
        hostile_files = _write_hostile(out, rng, victim, seed)

    manifest = _write_rows(out, rows, "manifest")

    sentinels: list[str] = []
    by_patient: dict[str, dict[str, str]] = {}
    if phi:
        for key, p in patients.items():
            by_patient[key] = dict(p["phi_values"])
            sentinels.extend(v for name, v in p["phi_values"].items() if name != "PatientBirthDate")
        sentinels += ["PHI-PNG-COMMENT-00", "PHI^PHOTOGRAPHER^00", "PHI-PHOTO-DESCRIPTION-00"]

    result: dict[str, Any] = {
        "out_dir": str(out),
        "seed": seed,
        "n": n,
        "dicom": dicom_paths,
        "compressed": compressed,
        "multiframe": multiframe,
        "photos": [ph["path"] for ph in photo_info],
        "photo_info": photo_info,
        "hostile": hostile_files,
        "archives": archives,
        "manifest": manifest,
        "labels": labels,
        "lesions": lesions,
        "frames": frames,
        "transfer_syntax": tsyntax,
        "patients": {
            key: {c: p[c] for c in ("site", "sex", "age", "split")}
            | {"dicom": [d for d in dicom_paths if d.startswith(f"dicom/{key}/")]}
            for key, p in patients.items()
        },  # fmt: skip
        "phi": {
            "enabled": phi,
            "sentinels": sentinels,  # every planted string (all contain "PHI")
            "birth_date": PHI_BIRTH_DATE if phi else None,
            "by_patient": by_patient,
            "private_creator": _PRIVATE_CREATOR if phi else None,
            "raw_grep_unreliable": raw_grep_unreliable,
        },
        "skipped": skipped,
        "expected": {
            "dicom_files": len(dicom_paths),
            "dicom_frames": sum(frames.values()),
            "photos": len(photo_info),
            "manifest_rows": len(rows),
            "positives": int(sum(labels[d] for d in dicom_paths)),
            "patients": n_patients,
            "archive_dicom_members": {a: len(v["dicom_members"]) for a, v in archives.items()},
            "hostile_files": len(hostile_files),
        },
    }
    (out / "samples.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    return result


# --------------------------------------------------------------------------
# CT / MR series (volumes)
# --------------------------------------------------------------------------
def ct_phantom(depth: int = 16, size: int = 32, seed: int = 0) -> np.ndarray:
    """An integer HU phantom ``(D, H, W)``: air, a body ellipse, lungs and a spine that move with z."""
    rng = np.random.default_rng(seed)
    vol = np.stack([_ct(rng, size, None, z=float(z) / max(1, depth - 1)) for z in range(depth)])
    vol += np.arange(depth, dtype=np.float64)[:, None, None] * 3.0  # every slice differs
    return np.clip(np.round(vol), -2048, 3000).astype(np.float32)


def ct_series(
    phantom: np.ndarray,
    *,
    spacing: Sequence[float] = (2.5, 0.8, 0.8),
    seed: int = 0,
    series: str = "1",
    modality: str = "CT",
    patient_id: str = "ANON-SERIES",
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    origin: Sequence[float] = (-12.5, -12.5, -100.0),
    tweak: Any = None,
) -> list[bytes]:
    """Part-10 bytes of one CT (or MR) series holding ``phantom`` (modality values, HU for CT).

    Slice ``k`` lies at ``origin + k * spacing[0] * normal`` with
    ``normal = row direction x column direction``, so the volume assembled in
    order along the normal equals ``phantom``. InstanceNumbers are a random
    permutation (they must not be trusted), and each slice has its own
    RescaleSlope (1 or 0.5) and RescaleIntercept, chosen so the stored
    integers decode back to ``phantom`` exactly. The list is in phantom order:
    shuffle it yourself.

    Args:
        phantom: ``(D, H, W)``; integer-valued (HU) so the rescale is exact.
        spacing: ``(z, y, x)`` mm: slice step and PixelSpacing.
        seed: InstanceNumbers, rescales, UIDs.
        series: distinguishes series (SeriesInstanceUID) with the same seed.
        modality: ``CT`` or ``MR``.
        patient_id: PatientID written in every slice.
        orientation: ImageOrientationPatient.
        origin: ImagePositionPatient of slice 0.
        tweak: optional ``fn(k, ds)`` called before each slice is written
            (to break a series on purpose).
    """
    from pydicom import uid as U

    rng = np.random.default_rng(seed)
    depth, rows, cols = phantom.shape
    iop = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    numbers = rng.permutation(depth) + 1 + int(rng.integers(0, 50))
    patient = {
        "site": "site-A",
        "key": patient_id,
        "sex": "O",
        "age": 50,
        "phi_values": {"PatientName": f"ANON^{patient_id}", "PatientID": patient_id},
    }
    sop_class = U.CTImageStorage if modality == "CT" else U.MRImageStorage
    out = []
    for k in range(depth):
        slope = (1.0, 0.5)[int(rng.integers(0, 2))]
        intercept = float((-1024, -1000, -2048, 0)[int(rng.integers(0, 4))])
        stored = np.round((phantom[k].astype(np.float64) - intercept) / slope)
        ds = _base_dataset(
            seed=seed,
            patient=patient,
            sop_class=sop_class,
            sop_uid=_uid(seed, "series-sop", series, k),
            modality=modality,
            series_no=int(rng.integers(1, 99)),
            instance_no=int(numbers[k]),
        )
        ds.SeriesInstanceUID = _uid(seed, "series-uid", series, patient_id)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        if modality == "CT":
            ds.RescaleType = "HU"
        ds.PixelSpacing = [float(spacing[1]), float(spacing[2])]
        ds.SliceThickness = float(spacing[0])
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.ImagePositionPatient = [
            float(v) for v in np.asarray(origin, dtype=np.float64) + k * float(spacing[0]) * normal
        ]
        ds.BodyPartExamined = "CHEST"
        _set_pixels(ds, stored.astype(np.int32), signed=True, bits_stored=16, photometric="MONOCHROME2")
        if tweak is not None:
            tweak(k, ds)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


def claiming_series_instance(frames: int = 10_000, size: int = 8, seed: int = 0) -> bytes:
    """A hostile CT instance whose header claims ``frames`` slices over a few bytes of pixel data."""
    files = ct_series(np.zeros((1, size, size), np.float32), seed=seed, series="claims")
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(files[0]))
    ds.NumberOfFrames = frames
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def ct_nifti(
    phantom: np.ndarray,
    *,
    spacing: Sequence[float] = (2.5, 0.8, 0.8),
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    origin: Sequence[float] = (-12.5, -12.5, -100.0),
    flip_columns: bool = False,
    compress: bool = False,
) -> bytes:
    """The volume :func:`ct_series` writes with the same arguments, as one NIfTI-1 file.

    Voxel ``(i, j, k)`` is column ``i``, row ``j`` of slice ``k``; the affine
    maps it to the same patient position as the DICOM slice (LPS there, RAS
    here). ``flip_columns`` stores the columns in reverse order with the
    affine saying so, as tools that write radiological-order NIfTI do: a reader
    that honours the affine sees the same volume.
    """
    dz, dy, dx = (float(v) for v in spacing)
    iop = np.asarray(orientation, dtype=np.float64)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    lps_to_ras = np.array([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, 0] = row * dx * lps_to_ras
    affine[:3, 1] = col * dy * lps_to_ras
    affine[:3, 2] = normal * dz * lps_to_ras
    affine[:3, 3] = np.asarray(origin, dtype=np.float64) * lps_to_ras
    data = np.transpose(np.asarray(phantom, dtype=np.float32), (2, 1, 0))  # (D, H, W) -> (i, j, k)
    if flip_columns:
        width = data.shape[0]
        data = data[::-1]
        affine[:3, 3] = affine[:3, 3] + affine[:3, 0] * (width - 1)
        affine[:3, 0] = -affine[:3, 0]
    return nifti_bytes(np.ascontiguousarray(data), affine, compress=compress)
