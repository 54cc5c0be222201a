"""What every decoder shares: limits, DICOM display options, decoded frames, the size check."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medray.platform.errors import ConfigError, LimitExceeded, UnsupportedFormat

__all__ = ["DecodeLimits", "DicomOptions", "DecodedFrame", "Decoded", "check_size"]

_FRAME_CHOICES = ("all", "first", "middle")


@dataclass(frozen=True)
class DecodeLimits:
    """Limits checked before any pixel data is decoded.

    Args:
        max_bytes: largest accepted object (and inflated deflate dataset), in
            bytes.
        max_pixels: largest accepted ``Rows*Columns*Frames*SamplesPerPixel``
            (``width*height*bands`` for photos), read from the header.

    Raises:
        ConfigError: a limit is not a positive number.
    """

    max_bytes: int = 1 << 30
    max_pixels: int = 1_000_000_000

    def __post_init__(self) -> None:
        for key in ("max_bytes", "max_pixels"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"limits.{key}", f"expected a positive number, got {value!r}")


@dataclass(frozen=True)
class DicomOptions:
    """How DICOM pixel data becomes what a viewer shows.

    Args:
        frames: ``"all"``, ``"first"``, ``"middle"`` (index ``n // 2``) or a
            tuple of 0-based frame indices.
        windows: Modality -> ``(center, width)`` of a linear window in
            modality units (HU for CT); ``"*"``: any modality without its own. Used when the file has no VOI LUT or
            window, or first when ``prefer_file_voi`` is False.
        prefer_file_voi: use the file's VOI LUT/window before ``windows``.
        voi_index: which of the file's windows/VOI LUTs to use; files with
            fewer fall back to the first.
        allow_burned_in: decode objects that may show patient text in their
            pixels (``BurnedInAnnotation=YES``; secondary capture and
            ultrasound without an explicit ``NO``); by default they are skipped.

    Raises:
        ConfigError: a value has the wrong type or range.
    """

    frames: str | tuple[int, ...] = "all"
    windows: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    prefer_file_voi: bool = True
    voi_index: int = 0
    allow_burned_in: bool = False

    def __post_init__(self) -> None:
        frames = self.frames
        if isinstance(frames, str):
            if frames not in _FRAME_CHOICES:
                raise ConfigError("dicom.frames", f"expected one of {_FRAME_CHOICES} or a tuple of indices")
        else:
            try:
                indices = tuple(int(i) for i in frames)
            except (TypeError, ValueError):
                raise ConfigError("dicom.frames", "expected 'all', 'first', 'middle' or a tuple of ints") from None
            if not indices or min(indices) < 0:
                raise ConfigError("dicom.frames", "indices must be a non-empty tuple of ints >= 0")
            object.__setattr__(self, "frames", indices)
        windows: dict[str, tuple[float, float]] = {}
        for modality, window in dict(self.windows).items():
            try:
                center, width = (float(v) for v in window)
            except (TypeError, ValueError):
                raise ConfigError(f"dicom.windows.{modality}", "expected [center, width], e.g. [-600, 1500]") from None
            if width < 1:
                raise ConfigError(f"dicom.windows.{modality}", f"width must be >= 1, got {width}")
            windows[str(modality).strip().upper()] = (center, width)
        object.__setattr__(self, "windows", windows)
        if not isinstance(self.voi_index, int) or self.voi_index < 0:
            raise ConfigError("dicom.voi_index", f"expected an int >= 0, got {self.voi_index!r}")


@dataclass
class DecodedFrame:
    """One display-ready frame.

    Args:
        image: ``uint8`` array of shape ``(H, W, 3)``, RGB, as a viewer shows it.
        frame: 0-based frame index in the source (0 for single frames/photos).
    """

    image: np.ndarray
    frame: int


@dataclass
class Decoded:
    """A decoded object: frames plus what may leave the file.

    Args:
        kind: ``"dicom"`` or ``"image"``.
        modality: DICOM Modality (``"CT"``, ``"DX"``, ...; ``"OT"`` if absent)
            or ``"photo"``.
        frames: the selected frames, in selection order.
        metadata: allow-listed, JSON-serialisable metadata only.
        patient_key: salted hash of the patient identity, or ``None``.
    """

    kind: str
    modality: str
    frames: list[DecodedFrame]
    metadata: dict[str, Any]
    patient_key: str | None


def check_size(data: bytes, limits: DecodeLimits) -> None:
    """Reject empty and oversize inputs before anything parses them."""
    if len(data) == 0:
        raise UnsupportedFormat("empty input (0 bytes)")
    if len(data) > limits.max_bytes:
        raise LimitExceeded(
            f"object is {len(data)} bytes, over max_bytes = {limits.max_bytes}; "
            "raise DecodeLimits.max_bytes to accept it"
        )
