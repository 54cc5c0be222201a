"""PHI: the allow-list, the salted patient key and PHI-free errors and logs."""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from io import BytesIO

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)

from medray.platform.decoders import DecodeLimits, DicomOptions, decode_bytes
from medray.platform.deid import ALLOWED_FIELDS, extract_metadata, patient_key, safe_message
from medray.platform.errors import DecodeError, RecordError

PHI = {
    "PatientName": "Doe^Jane^Q",
    "PatientID": "MRN884422",
    "IssuerOfPatientID": "StElsewhereMRN",
    "PatientBirthDate": "19710203",
    "InstitutionName": "St Elsewhere General",
    "AccessionNumber": "ACC99887766",
    "ReferringPhysicianName": "House^Gregory",
    "StudyDate": "20190304",
}
# Fragments that must never leave the file (the year of StudyDate may).
NEEDLES = [
    "Doe",
    "Jane",
    "MRN884422",
    "884422",
    "19710203",
    "Elsewhere",
    "ACC99887766",
    "99887766",
    "House",
    "20190304",
    "0304",
]


def _assert_clean(text: str) -> None:
    for needle in NEEDLES:
        assert needle not in text, f"{needle!r} leaked into {text!r}"


def _dataset(**overrides) -> Dataset:
    """A small CT slice carrying every planted PHI value."""
    ds = Dataset()
    stored = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096
    ds.set_pixel_data(stored, "MONOCHROME2", 12)
    for keyword, value in {**PHI, **overrides}.items():
        setattr(ds, keyword, value)
    ds.Modality, ds.BodyPartExamined, ds.Manufacturer = "CT", "CHEST", "ACME"
    ds.ManufacturerModelName, ds.PixelSpacing, ds.SliceThickness = "Scan 9", [0.7, 0.8], "1.25"
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.StudyInstanceUID = generate_uid()  # not standard-rooted: must not leave
    return ds


def _to_bytes(ds: Dataset) -> bytes:
    ds.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_metadata_is_exactly_the_allow_list() -> None:
    out = decode_bytes(_to_bytes(_dataset()), salt="pepper")
    meta = out.metadata
    assert tuple(meta) == ALLOWED_FIELDS
    assert meta["modality"] == "CT" and meta["body_part"] == "CHEST"
    assert meta["pixel_spacing"] == [0.7, 0.8] and meta["slice_thickness"] == 1.25
    assert meta["rows"] == 64 and meta["columns"] == 64 and meta["bits_stored"] == 12
    assert meta["number_of_frames"] is None and meta["view_position"] is None
    assert meta["study_year"] == 2019
    assert meta["sop_class"] == CTImageStorage
    assert meta["transfer_syntax"] == ExplicitVRLittleEndian
    assert json.loads(json.dumps(meta)) == meta  # plain JSON types only
    _assert_clean(str(meta))
    _assert_clean(out.patient_key or "")


def test_metadata_fallbacks_and_odd_values() -> None:
    ds = Dataset()
    ds.ImagerPixelSpacing = [0.1, 0.1]
    ds.Laterality = "L"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid DA
        ds.StudyDate = "garbage"
    ds.SOPClassUID = "2.25.1234"  # a private UID could identify; dropped
    meta = extract_metadata(ds)
    assert meta["pixel_spacing"] == [0.1, 0.1] and meta["laterality"] == "L"
    assert meta["study_year"] is None and meta["sop_class"] is None
    assert meta["transfer_syntax"] is None


def test_patient_key() -> None:
    ds = _dataset()
    key = patient_key(ds, "pepper")
    want = hashlib.sha256(b"pepper\x00StElsewhereMRN\x00MRN884422").hexdigest()[:32]
    assert key == want and len(key) == 32
    assert patient_key(ds, "salt") != key  # the salt matters
    assert patient_key(_dataset(IssuerOfPatientID="Other"), "pepper") != key
    assert patient_key(_dataset(PatientID="  "), "pepper") is None
    assert decode_bytes(_to_bytes(_dataset()), salt="pepper").patient_key == key


def _broken_variants() -> dict[str, tuple[bytes, dict]]:
    """Damaged copies of the PHI file, each with the decode options that break it."""
    full = _to_bytes(_dataset())
    no_pixels = _dataset()
    del no_pixels.PixelData
    bomb = _dataset()
    bomb.Rows = bomb.Columns = 65535
    bomb.NumberOfFrames = 10000
    bad_frames = _dataset()
    bad_frames.NumberOfFrames = "12345678"  # becomes PHI in a numeric field below
    corrupt = _dataset()
    corrupt.PixelData = encapsulate([b"\xff\x4f\xff\x51Doe^Jane" + b"\x00" * 40])
    corrupt.file_meta = FileMetaDataset()
    corrupt.file_meta.TransferSyntaxUID = JPEG2000Lossless
    return {
        "truncated": (full[: len(full) // 2], {}),
        "header-only": (full[:600], {}),
        "no-pixels": (_to_bytes(no_pixels), {}),
        "bomb": (_to_bytes(bomb), {}),
        "max-bytes": (full, {"limits": DecodeLimits(max_bytes=1000)}),
        "frame-index": (full, {"dicom": DicomOptions(frames=(3,))}),
        "bad-frames": (_to_bytes(bad_frames).replace(b"12345678", b"Doe^Jane"), {}),
        "bad-photometric": (full.replace(b"MONOCHROME2 ", b"Doe^Jane^Q  "), {}),
        "bad-syntax": (full.replace(b"1.2.840.10008.1.2.1\x00", b"MRN884422_Doe^Jane\x00\x00", 1), {}),
        "corrupt-j2k": (_to_bytes(corrupt), {}),
    }


@pytest.mark.parametrize("variant", list(_broken_variants()))
def test_errors_logs_and_warnings_carry_no_phi(variant: str, caplog: pytest.LogCaptureFixture) -> None:
    data, kwargs = _broken_variants()[variant]
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RecordError) as info:
            decode_bytes(data, salt="pepper", **kwargs)
    _assert_clean(str(info.value))
    _assert_clean(safe_message(info.value))
    assert isinstance(info.value, DecodeError)
    for record in caplog.records:
        _assert_clean(record.getMessage())
        assert record.exc_info is None or not record.exc_info
    for warning in caught:
        _assert_clean(str(warning.message))


def test_safe_message_scrubs_library_messages() -> None:
    exc = ValueError(
        "Invalid value for VR PN: 'Doe^Jane^Q' in /data/Doe/MRN884422.dcm, "
        "born 1971-02-03, accession ACC99887766, study 1.3.6.1.4.1.5962.99.1.2, "
        "syntax 1.2.840.10008.1.2.4.90"
    )
    text = safe_message(exc)
    assert text.startswith("ValueError: ")
    _assert_clean(text)
    assert "1971-02-03" not in text and "5962" not in text
    assert "1.2.840.10008.1.2.4.90" in text  # standard UIDs are structural facts
    assert safe_message(DecodeError("pixel data is truncated: 10 bytes")) == (
        "DecodeError: pixel data is truncated: 10 bytes"
    )
    assert safe_message(KeyError()) == "KeyError"


def test_pydicom_reader_warnings_are_silenced_during_decode() -> None:
    ds = _dataset()
    ds.SliceThickness = "9.876543"
    # An invalid DS (pydicom's setter refuses it, so patch the bytes): reading
    # it makes pydicom warn, quoting the value.
    data = _to_bytes(ds).replace(b"9.876543", b"Doe^Jane")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = decode_bytes(data)
    assert out.metadata["slice_thickness"] is None
    for warning in caught:
        _assert_clean(str(warning.message))
