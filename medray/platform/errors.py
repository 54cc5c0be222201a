"""Error types shared by every medray job.

Two families:

* :class:`ConfigError` stops a job *before* any work starts and names the
  config key at fault and what to do about it.
* :class:`RecordError` marks one input record as unusable. The pipeline turns
  it into a quarantine row (record key, stage, error class, message) and goes
  on. Its message must never contain PHI: no header values, no patient names,
  only structural facts ("Rows*Columns*Frames = 4.3e13 exceeds max_pixels").
"""

from __future__ import annotations

__all__ = [
    "MedrayError",
    "ConfigError",
    "RecordError",
    "ReadError",
    "DecodeError",
    "LimitExceeded",
    "UnsupportedFormat",
    "PreprocessError",
    "EncodeError",
    "SkipRecord",
]


class MedrayError(Exception):
    """Base class of every error medray raises on purpose."""


class ConfigError(MedrayError):
    """A configuration value is wrong. The message names the key and the fix."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"config key '{key}': {message}")


class RecordError(MedrayError):
    """One record cannot go on; it becomes a quarantine row.

    Args:
        message: PHI-free description of what went wrong.
        stage: pipeline stage that failed (``read``, ``decode``,
            ``preprocess``, ``encode``). Subclasses set a default.
    """

    stage: str = "unknown"

    def __init__(self, message: str, *, stage: str | None = None) -> None:
        if stage is not None:
            self.stage = stage
        super().__init__(message)


class ReadError(RecordError):
    """The bytes could not be fetched (missing object, archive member, size)."""

    stage = "read"


class DecodeError(RecordError):
    """The bytes were read but are not a valid image/DICOM of a supported kind."""

    stage = "decode"


class LimitExceeded(DecodeError):
    """A configured limit (object size, pixel count) would be exceeded."""


class UnsupportedFormat(DecodeError):
    """No decoder recognises the content."""


class SkipRecord(RecordError):
    """A readable record that is deliberately not embedded; it becomes a ``skipped`` row with its reason.

    Args:
        reason: a short CamelCase code (``NoEncoder``, ``NonImageObject``,
            ``BurnedInAnnotation``, ...), counted in summaries.
        message: PHI-free explanation and, where there is one, the setting that changes it.
    """

    stage = "rule"

    def __init__(self, reason: str, message: str, *, stage: str | None = None) -> None:
        self.reason = reason
        super().__init__(message, stage=stage)


class PreprocessError(RecordError):
    """The encoder's processor rejected the decoded image."""

    stage = "preprocess"


class EncodeError(RecordError):
    """The model failed on this record."""

    stage = "encode"
