"""What may leave a DICOM file: the metadata allow-list, a salted patient key
and PHI-free error messages.

Nothing in a decoded record comes from the header unless it is listed in
:data:`ALLOWED_FIELDS`. Free-text and identifying elements (names, IDs, dates,
institution, accession, UIDs of studies and series) never leave the file; the
study date leaves only as a year. The patient identity leaves only as a salted
hash, so rows of one patient can be grouped without storing who they are.

Example:
    >>> from pydicom import Dataset
    >>> ds = Dataset()
    >>> ds.Modality, ds.PatientID, ds.StudyDate = "CT", "12345", "20190304"
    >>> meta = extract_metadata(ds)
    >>> meta["modality"], meta["study_year"], meta["rows"]
    ('CT', 2019, None)
    >>> len(patient_key(ds, salt="s3cret"))
    32
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any

from pydicom.dataset import Dataset

from medray.platform.errors import RecordError

__all__ = [
    "ALLOWED_FIELDS",
    "extract_metadata",
    "patient_key",
    "safe_message",
    "safe_uid",
]

#: Keys of :func:`extract_metadata`, in order. Nothing else leaves a file.
ALLOWED_FIELDS: tuple[str, ...] = (
    "modality",
    "body_part",
    "view_position",
    "laterality",
    "manufacturer",
    "manufacturer_model",
    "pixel_spacing",
    "slice_thickness",
    "photometric",
    "rows",
    "columns",
    "number_of_frames",
    "bits_stored",
    "transfer_syntax",
    "study_year",
    "sop_class",
)

# Short coded strings: a value longer than this is not a code and is dropped.
_MAX_CODE_LEN = 64
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# UIDs under the DICOM root name standard things (transfer syntaxes, SOP
# classes), never a patient, study or instance.
_STANDARD_UID_ROOT = "1.2.840.10008."


def safe_uid(value: object) -> str | None:
    """Return `value` as a UID string if it is a *standard* DICOM UID.

    Transfer syntax and SOP class UIDs live under ``1.2.840.10008.`` and are
    structural facts; any other UID (study, series, instance, private roots)
    may identify a patient's exam and is refused.

    Args:
        value: an element value, usually a :class:`pydicom.uid.UID`.

    Returns:
        The UID as a plain ``str``, or ``None`` when it is empty, malformed or
        not under the DICOM root.
    """
    if value is None:
        return None
    uid = str(value).strip().rstrip("\x00")
    if len(uid) > 64 or not _UID_RE.match(uid) or not uid.startswith(_STANDARD_UID_ROOT):
        return None
    return uid


def _get(ds: Dataset, keyword: str) -> Any:
    """``ds.get(keyword)``, or None when a damaged element cannot be converted.

    pydicom converts values lazily, so reading one bad element may raise
    anything; one bad element must not cost the other fields.
    """
    try:
        return ds.get(keyword)
    except Exception:  # noqa: BLE001 - a damaged element is as good as absent
        return None


def _first(ds: Dataset, *keywords: str) -> Any:
    """Return the first present, non-empty value among `keywords` (or None)."""
    for keyword in keywords:
        value = _get(ds, keyword)
        if value not in (None, "", b""):
            return value
    return None


def _code(value: Any) -> str | None:
    """A short coded string (CS/LO), whitespace-trimmed; None if absent/odd."""
    if value is None:
        return None
    if not isinstance(value, str):  # multi-valued CS: keep the first value
        try:
            value = list(value)[0]
        except (TypeError, IndexError):
            return None
    text = str(value).strip()
    if not text or len(text) > _MAX_CODE_LEN:
        return None
    return text


def _number(value: Any, kind: type[int] | type[float]) -> int | float | None:
    """`value` as `kind` (first value if multi-valued), or None if not numeric."""
    if value is None:
        return None
    if not isinstance(value, (str, bytes, int, float)):
        try:
            value = list(value)[0]
        except (TypeError, IndexError):
            return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number):
        return None
    return int(number) if kind is int else number


def _floats(value: Any) -> list[float] | None:
    """A multi-valued DS as a list of floats, or None."""
    if value is None:
        return None
    items = [value] if isinstance(value, (str, int, float)) else list(value)
    try:
        out = [float(v) for v in items]
    except (TypeError, ValueError):
        return None
    return out if out and all(math.isfinite(v) for v in out) else None


def _study_year(value: Any) -> int | None:
    """The year of a DA value (``YYYYMMDD``); nothing finer ever leaves."""
    text = str(value or "").strip()
    if len(text) < 4 or not text[:4].isdigit():
        return None
    year = int(text[:4])
    return year if 1800 <= year <= 2200 else None


def _functional_group_value(ds: Dataset, macro: str, keyword: str) -> Any:
    """`keyword` from the shared functional groups of an enhanced multi-frame."""
    try:
        shared = ds.get("SharedFunctionalGroupsSequence")
        if shared:
            inner = shared[0].get(macro)
            if inner:
                return inner[0].get(keyword)
    except Exception:  # noqa: BLE001 - damaged sequence: as for _get
        pass
    return None


def extract_metadata(ds: Dataset) -> dict[str, Any]:
    """Return the allow-listed, JSON-serialisable metadata of `ds`.

    Args:
        ds: a DICOM dataset (the pixel data need not be decoded).

    Returns:
        A dict with exactly the keys of :data:`ALLOWED_FIELDS`; a value is
        ``None`` when the element is absent or malformed. Values are plain
        ``str``, ``int``, ``float`` or ``list[float]``.
    """
    file_meta = getattr(ds, "file_meta", None)
    transfer_syntax = _get(file_meta, "TransferSyntaxUID") if file_meta is not None else None
    spacing = _first(ds, "PixelSpacing", "ImagerPixelSpacing")
    if spacing is None:
        spacing = _functional_group_value(ds, "PixelMeasuresSequence", "PixelSpacing")
    thickness = _get(ds, "SliceThickness")
    if thickness in (None, ""):
        thickness = _functional_group_value(ds, "PixelMeasuresSequence", "SliceThickness")
    sop_class = _get(ds, "SOPClassUID")
    if sop_class is None and file_meta is not None:
        sop_class = _get(file_meta, "MediaStorageSOPClassUID")

    meta: dict[str, Any] = {
        "modality": _code(_get(ds, "Modality")),
        "body_part": _code(_get(ds, "BodyPartExamined")),
        "view_position": _code(_get(ds, "ViewPosition")),
        "laterality": _code(_first(ds, "ImageLaterality", "Laterality")),
        "manufacturer": _code(_get(ds, "Manufacturer")),
        "manufacturer_model": _code(_get(ds, "ManufacturerModelName")),
        "pixel_spacing": _floats(spacing),
        "slice_thickness": _number(thickness, float),
        "photometric": _code(_get(ds, "PhotometricInterpretation")),
        "rows": _number(_get(ds, "Rows"), int),
        "columns": _number(_get(ds, "Columns"), int),
        "number_of_frames": _number(_get(ds, "NumberOfFrames"), int),
        "bits_stored": _number(_get(ds, "BitsStored"), int),
        "transfer_syntax": safe_uid(transfer_syntax),
        "study_year": _study_year(_get(ds, "StudyDate")),
        "sop_class": safe_uid(sop_class),
    }
    assert tuple(meta) == ALLOWED_FIELDS  # the allow-list is the contract
    return meta


def patient_key(ds: Dataset, salt: str) -> str | None:
    """Return a salted hash that groups records of one patient.

    The key is the first 32 hex characters of
    ``sha256(salt + "\\x00" + IssuerOfPatientID + "\\x00" + PatientID)``.
    Without the salt the key cannot be linked back to an ID by hashing
    candidate IDs, so keep the salt secret and constant across a corpus.

    Args:
        ds: a DICOM dataset.
        salt: secret salt shared by every job that must produce equal keys.

    Returns:
        32 lowercase hex characters, or ``None`` when PatientID is empty.
    """
    patient_id = str(_get(ds, "PatientID") or "").strip()
    if not patient_id:
        return None
    issuer = str(_get(ds, "IssuerOfPatientID") or "").strip()
    digest = hashlib.sha256(f"{salt}\x00{issuer}\x00{patient_id}".encode())
    return digest.hexdigest()[:32]


# Things in a library's message that may be PHI. Order matters: quoted text
# first (pydicom quotes element values), then names, dates and long IDs.
_PHI_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"'[^']*'|\"[^\"]*\"|`[^`]*`"), "<redacted>"),
    (re.compile(r"\S*[\^@\\/]\S*"), "<redacted>"),  # PN (A^B), e-mail, paths
    (re.compile(r"\b\d{4}[-/.]?\d{2}[-/.]?\d{2}\b"), "<date>"),
    (re.compile(r"\b[0-9]+(?:\.[0-9]+){3,}\b"), "<uid>"),
    (re.compile(r"\b\w*\d\w*\b"), "<n>"),
)
_MAX_MESSAGE_LEN = 300


def _scrub(text: str) -> str:
    """Remove anything in `text` that could be a header value."""
    standard: list[str] = []

    def keep_standard_uid(match: re.Match[str]) -> str:
        standard.append(match.group(0))
        # A digit-free placeholder, so the patterns below leave it alone.
        return f"\x01{chr(0xE000 + len(standard) - 1)}\x01"

    # Standard DICOM UIDs (transfer syntaxes) are useful and safe: park them.
    text = re.sub(r"1\.2\.840\.10008(?:\.[0-9]+)+", keep_standard_uid, text)
    for pattern, replacement in _PHI_PATTERNS:
        text = pattern.sub(replacement, text)
    text = re.sub("\x01(.)\x01", lambda m: standard[ord(m.group(1)) - 0xE000], text)
    text = " ".join(text.split())
    return text[:_MAX_MESSAGE_LEN]


def safe_message(exc: BaseException) -> str:
    """Return ``"ClassName: message"`` for `exc` with nothing PHI-like in it.

    medray's own :class:`~medray.platform.errors.RecordError` messages are
    PHI-free by contract and pass through. Messages of other exceptions (from
    pydicom, Pillow, numpy) may quote header values, so quoted text, person
    names, paths, dates, UIDs outside the DICOM root and any token containing
    a digit are replaced by placeholders.

    Args:
        exc: any exception.

    Returns:
        A one-line message of at most a few hundred characters.
    """
    name = type(exc).__name__
    message = str(exc)
    if not isinstance(exc, RecordError):
        message = _scrub(message)
    else:
        message = " ".join(message.split())
    return f"{name}: {message}" if message else name
