"""Clinical text: plain UTF-8 reports and the text of DICOM Structured Reports.

Pure Python, no Ray. The text itself never leaves these functions in an
error message or a log line; callers keep only :func:`text_facts` (its
SHA-256 and length) next to the embeddings.

Example:
    >>> is_text(b"Findings: no acute abnormality.\\n")
    True
    >>> decode_text("Impression: normal.".encode())
    'Impression: normal.'
    >>> text_facts("abc")["text_chars"]
    3
"""

from __future__ import annotations

import hashlib
import unicodedata
from typing import Any

from medray.platform.errors import DecodeError, LimitExceeded, UnsupportedFormat

__all__ = [
    "MAX_BYTES_PER_CHAR",
    "is_text",
    "decode_text",
    "check_text_size",
    "text_facts",
    "sr_text",
    "is_structured_report",
]

_BOM = b"\xef\xbb\xbf"
#: A UTF-8 character takes at most 4 bytes: over ``4 * max_chars`` bytes is over ``max_chars`` characters.
MAX_BYTES_PER_CHAR = 4
#: Share of characters that must be printable or whitespace for content to count as text.
_PRINTABLE_SHARE = 0.95
#: Whitespace that counts as printable text: deleted before the fast ``str.isprintable`` check.
_WHITESPACE_OK = str.maketrans("", "", "\t\r\n\f")


def is_text(head: bytes) -> bool:
    """True when ``head`` (the first bytes of an object) looks like UTF-8 text.

    No NUL bytes, valid UTF-8 (a sequence cut at the end of ``head`` is
    allowed) and at least 95 % printable or whitespace characters.
    """
    if not head or b"\x00" in head:
        return False
    if head.startswith(_BOM):
        head = head[3:]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:  # not just a character cut by the slice
            return False
        text = head[: err.start].decode("utf-8")
    if not text:
        return False
    if text.translate(_WHITESPACE_OK).isprintable():  # the common case, checked in C
        return True
    good = sum(1 for ch in text if ch.isprintable() or ch in "\t\r\n\f")
    return good / len(text) >= _PRINTABLE_SHARE


def check_text_size(size: int, head: bytes, max_chars: int) -> None:
    """Refuse a text object too large to hold at most ``max_chars`` characters, from its size and head.

    Lets the read stage refuse, say, a 500 MB one-line report after reading
    its first bytes only, instead of reading and decoding it whole.

    Raises:
        LimitExceeded: ``head`` is text and ``size`` is over ``4 * max_chars`` bytes.
    """
    if size > MAX_BYTES_PER_CHAR * max_chars and is_text(head):
        raise LimitExceeded(
            f"a text object of {size} bytes holds more than text.max_chars = {max_chars} characters (refused unread)",
            stage="read",
        )


def decode_text(data: bytes, *, max_chars: int = 10_000_000) -> str:
    """Decode UTF-8 text (a BOM is dropped, line ends normalised to ``\\n``).

    Raises:
        UnsupportedFormat: not UTF-8 text.
        LimitExceeded: more than ``max_chars`` characters (over ``4 * max_chars``
            bytes is refused before decoding).
        DecodeError: no text left after stripping whitespace.
    """
    if len(data) > MAX_BYTES_PER_CHAR * max_chars:
        raise LimitExceeded(f"text of {len(data)} bytes holds more than text.max_chars = {max_chars} characters")
    if data.startswith(_BOM):
        data = data[3:]
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as err:
        raise UnsupportedFormat(f"not UTF-8 text (invalid byte at offset {err.start})") from None
    if len(text) > max_chars:
        raise LimitExceeded(f"text has {len(text)} characters, over text.max_chars = {max_chars}")
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    if not text.strip():
        raise DecodeError("document holds no text")
    return text


def text_facts(text: str) -> dict[str, Any]:
    """What may be written about a text: its SHA-256 and length, never the text."""
    return {"text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "text_chars": len(text)}


_SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


def is_structured_report(ds: Any) -> bool:
    """True for a DICOM Structured Report (modality SR or an SR SOP class)."""
    modality = str(ds.get("Modality") or "").strip().upper()
    sop = str(ds.get("SOPClassUID") or "")
    return modality == "SR" or sop.startswith(_SR_CLASS_PREFIX)


def sr_text(ds: Any, *, max_items: int = 100_000) -> str:
    """The text of an SR content tree, depth first, one line per item.

    TEXT items give ``"<concept>: <text>"``; CODE items their code meaning;
    NUM items value and unit; CONTAINER items their concept as a heading.

    Raises:
        DecodeError: the content tree holds no text, or more than
            ``max_items`` items.
    """
    lines: list[str] = []
    count = 0

    def concept(item: Any) -> str:
        seq = item.get("ConceptNameCodeSequence")
        return str(seq[0].get("CodeMeaning") or "") if seq else ""

    def walk(items: Any) -> None:
        nonlocal count
        for item in items or []:
            count += 1
            if count > max_items:
                raise DecodeError(f"SR content tree has more than {max_items} items")
            kind = str(item.get("ValueType") or "").upper()
            name = concept(item)
            value = ""
            if kind == "TEXT":
                value = str(item.get("TextValue") or "")
            elif kind == "CODE" and item.get("ConceptCodeSequence"):
                value = str(item.ConceptCodeSequence[0].get("CodeMeaning") or "")
            elif kind == "NUM" and item.get("MeasuredValueSequence"):
                mv = item.MeasuredValueSequence[0]
                unit = mv.get("MeasurementUnitsCodeSequence")
                value = f"{mv.get('NumericValue', '')} {unit[0].get('CodeValue', '') if unit else ''}".strip()
            if value:
                lines.append(f"{name}: {value}" if name else value)
            elif kind == "CONTAINER" and name:
                lines.append(name)
            walk(item.get("ContentSequence"))

    root = concept(ds)
    if root:
        lines.append(root)
    walk(ds.get("ContentSequence"))
    text = "\n".join(lines)
    if not any(ch.isalnum() for ch in text):
        raise DecodeError("structured report has no text content")
    return text
