"""The format registry: how a record's bytes are recognised and turned into model input.

A file format is one module in :mod:`medray.platform.formats` that builds a
:class:`Format` and calls :func:`register_format`, the way pydicom's pixel
decoder plugins and MONAI's image readers are found by name. Everything that
routes a record (the batch pipeline, fine-tuning, the HTTP endpoints) asks the
registry: :func:`detect` sniffs bytes, :func:`prepare_record` decodes and
preprocesses them, :func:`media_types` tells the server which bodies it takes,
:func:`segment_columns` tells the sink which provenance columns rows carry.

Example:
    >>> from medray.platform.formats import get_format, list_formats
    >>> get_format("audio").modality, "dicom" in list_formats()
    ('audio', True)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medray.platform.decoders.base import Decoded, DecodeLimits, DicomOptions
from medray.platform.errors import ConfigError, PreprocessError, RecordError, UnsupportedFormat

__all__ = [
    "MODALITIES",
    "Format",
    "PrepareContext",
    "Prepared",
    "register_format",
    "get_format",
    "list_formats",
    "detect",
    "prepare_record",
    "media_types",
    "segment_columns",
    "extensions",
    "option_types",
    "build_options",
    "run_preprocess",
    "pooled_segment",
    "dicom_options",
]

#: Encoder modalities a record can be routed to (``other``: nothing to embed, skipped and counted).
MODALITIES = ("image", "audio", "text", "slide", "volume")

#: Sniff: ``(bytes, name) -> modality`` when the bytes are this format, else ``None``.
Sniff = Callable[[bytes, str], "str | None"]


@dataclass
class Prepared:
    """A record as model input plus what each item came from.

    Attributes:
        inputs: the model input, first axis = items (frames, windows, chunks,
            slices, or one volume).
        segments: one provenance dict per item (see :func:`segment_columns`), or
            ``None`` for plain image frames.
        pool: ``"mean"`` adds one pooled row per record; ``"none"`` does not.
        modality: what the record is (DICOM Modality, ``photo``, ``audio``, ...).
        metadata: allow-listed, JSON-serialisable metadata only.
        patient_key: salted patient hash, or ``None``.
        items: source index of each item (frame numbers); ``None``: ``0..n-1``.
        route: the encoder modality that embeds it, when the format decides
            (``None``: the route the record was sniffed with).
        decode_s: seconds spent decoding (the rest of the call was
            preprocessing); ``None`` when not measured apart.
    """

    inputs: np.ndarray
    segments: list[dict[str, Any]] | None
    pool: str
    modality: str
    metadata: dict[str, Any] = field(default_factory=dict)
    patient_key: str | None = None
    items: list[int] | None = None
    route: str | None = None
    decode_s: float | None = None


@dataclass(frozen=True)
class PrepareContext:
    """What :meth:`Format.prepare` may use besides the bytes.

    Attributes:
        name: the object's name or key (a hint only; never in messages).
        route: the encoder modality chosen for the record.
        preprocessors: encoder modality -> preprocessor (``preprocess``,
            ``preprocess_audio``, ``chunk_text``, ``preprocess_volume``...).
        options: options key -> the format's options object
            (:func:`build_options`).
        limits: size and pixel limits.
        salt: patient-key salt.
    """

    name: str = ""
    route: str = "image"
    preprocessors: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    salt: str = ""

    @property
    def preprocessor(self) -> Any:
        """The preprocessor of :attr:`route`."""
        return self.preprocessors.get(self.route)

    def options_of(self, fmt: Format) -> Any:
        """``fmt``'s options object (its defaults when none was configured)."""
        if fmt.options_key is None or fmt.options is None:
            return None
        found = self.options.get(fmt.options_key)
        return found if found is not None else fmt.options()


def _no_route(route: str, ctx: PrepareContext) -> str:
    return route


@dataclass(frozen=True)
class Format:
    """One file format, as a plugin.

    Attributes:
        name: registry name (``dicom``, ``audio``, ``nifti``...).
        modality: the encoder modality its records usually go to.
        sniff: ``(bytes, name) -> modality | None`` from the first bytes (the
            name is a hint only).
        prepare: ``(bytes, PrepareContext) -> Prepared``; ``None`` for formats
            that are only recognised (their records are skipped) or prepared
            elsewhere (whole slides are read lazily, tile by tile).
        priority: sniff order, lowest first (specific magic numbers before
            loose guesses such as UTF-8 text).
        media_types: HTTP ``Content-Type`` values taken as this format, with
            the name hint each gives.
        extensions: names that are this format (lower case, with the dot).
        options: the options dataclass (its fields are the config keys under
            ``options_key``, declared once here).
        options_key: the config section of :attr:`options` (``audio``, ``nifti``...).
        columns: ``(name, arrow type)`` provenance columns its rows add.
        resolve_route: ``(sniffed route, ctx) -> route``: pick among the
            configured encoders (e.g. a volume goes to a 3D encoder when there
            is one, else slice by slice to the image encoder).
        decode: ``(bytes, ctx) -> Decoded`` display-ready frames, for formats
            whose model input is their frames through the image preprocessing:
            the pipeline then preprocesses the frames of a whole batch of
            records in one call (``prepare`` does one record).
        description: one line for listings.
    """

    name: str
    modality: str
    sniff: Sniff
    prepare: Callable[[bytes, PrepareContext], Prepared] | None = None
    priority: int = 50
    media_types: Mapping[str, str] = field(default_factory=dict)
    extensions: tuple[str, ...] = ()
    options: type | None = None
    options_key: str | None = None
    columns: tuple[tuple[str, str], ...] = ()
    resolve_route: Callable[[str, PrepareContext], str] = _no_route
    decode: Callable[[bytes, PrepareContext], Decoded] | None = None
    description: str = ""


_FORMATS: dict[str, Format] = {}


def register_format(fmt: Format, *, replace: bool = False) -> Format:
    """Add ``fmt`` to the registry (a format module calls this at import).

    Raises:
        ValueError: the name is taken (pass ``replace=True`` to override a
            built-in format on purpose).
    """
    if fmt.name in _FORMATS and not replace:
        raise ValueError(f"format {fmt.name!r} is already registered; pass replace=True to override it")
    _FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> Format:
    """The registered format ``name``.

    Raises:
        ConfigError: unknown name (the message lists the known ones).
    """
    try:
        return _FORMATS[name]
    except KeyError:
        raise ConfigError("format", f"unknown format {name!r}; known: {', '.join(list_formats())}") from None


def list_formats() -> list[str]:
    """Registered format names, in sniff order."""
    return [f.name for f in _ordered()]


def _ordered() -> list[Format]:
    return sorted(_FORMATS.values(), key=lambda f: (f.priority, f.name))


def detect(data: bytes, name: str = "") -> tuple[Format, str]:
    """The format of ``data`` and the modality it routes to, by content.

    Raises:
        UnsupportedFormat: empty input or content no registered format claims.
    """
    if len(data) == 0:
        raise UnsupportedFormat("empty input (0 bytes)")
    for fmt in _ordered():
        modality = fmt.sniff(data, name)
        if modality is not None:
            return fmt, modality
    known = ", ".join(f.description or f.name for f in _ordered())
    raise UnsupportedFormat(f"content of {len(data)} bytes is none of: {known}")


def prepare_record(data: bytes, ctx: PrepareContext, fmt: Format | str | None = None) -> tuple[Format, Prepared]:
    """Decode a record and build its model input with ``ctx.route``'s preprocessor.

    The one implementation behind the batch pipeline, fine-tuning and the HTTP
    endpoints.

    Args:
        data: the object's bytes.
        ctx: route, preprocessors, options, limits and salt.
        fmt: the format when already known (a name or a :class:`Format`);
            ``None`` sniffs it.

    Raises:
        RecordError: the record cannot be used; the message has no PHI.
    """
    if fmt is None:
        fmt, _ = detect(data, ctx.name)
    elif isinstance(fmt, str):
        fmt = get_format(fmt)
    if fmt.prepare is None:
        raise UnsupportedFormat(f"{fmt.name} records are not prepared from bytes")
    return fmt, fmt.prepare(data, ctx)


def run_preprocess(fn: Callable[[], Any]) -> Any:
    """Call a preprocessor; any failure but a :class:`RecordError` becomes a PHI-free ``PreprocessError``."""
    try:
        return fn()
    except RecordError:
        raise
    except Exception as err:  # noqa: BLE001 - processors raise anything; the class name is the message
        raise PreprocessError(f"preprocessing failed ({type(err).__name__})") from None


def media_types() -> dict[str, str]:
    """HTTP ``Content-Type`` -> name hint, over every registered format."""
    out: dict[str, str] = {}
    for fmt in _ordered():
        out.update(fmt.media_types)
    return out


def extensions() -> tuple[str, ...]:
    """Every extension some registered format claims."""
    return tuple(dict.fromkeys(e for f in _ordered() for e in f.extensions))


#: Provenance columns every embedding row has, whatever its format.
_CORE_SEGMENT = (("segment", "string"),)


def segment_columns() -> tuple[tuple[str, str], ...]:
    """``(name, arrow type)`` of the per-row provenance columns, in output order (first claim wins)."""
    seen: dict[str, str] = dict(_CORE_SEGMENT)
    for fmt in sorted(_FORMATS.values(), key=lambda f: _COLUMN_ORDER.get(f.name, 100)):
        for col, typ in fmt.columns:
            seen.setdefault(col, typ)
    return tuple(seen.items())


# Output order of the provenance columns: the order formats were added to medray, so files
# written before a format existed keep their column order.
_COLUMN_ORDER = {"audio": 0, "text": 1, "slide": 2, "dicom": 3}


def pooled_segment(segments: list[dict[str, Any]]) -> dict[str, Any]:
    """Provenance of a record's pooled row: the extent of all its items."""
    out: dict[str, Any] = {"segment": "pooled"}
    for lo, hi in (("start_s", "end_s"), ("token_start", "token_end"), ("slice_start", "slice_end")):
        starts = [s[lo] for s in segments if s.get(lo) is not None]
        ends = [s[hi] for s in segments if s.get(hi) is not None]
        if starts:
            out[lo], out[hi] = min(starts), max(ends)
    for key in ("series_key", "spacing_mm"):  # CT/MR series: the same for every slice
        if segments and segments[0].get(key) is not None:
            out[key] = segments[0][key]
    return out


def option_types() -> dict[str, type]:
    """Options key -> options dataclass, over every registered format (the config sections formats own)."""
    return {f.options_key: f.options for f in _ordered() if f.options_key and f.options is not None}


def build_options(sections: Mapping[str, Any]) -> dict[str, Any]:
    """Options objects from config sections (mappings), validated by each dataclass.

    Unknown keys are refused with the config key that is wrong.

    Raises:
        ConfigError: a section has a key its format does not know, or a bad value.
    """
    out: dict[str, Any] = {}
    types = option_types()
    for key, values in sections.items():
        cls = types.get(key)
        if cls is None or values is None:
            continue
        if isinstance(values, cls):
            out[key] = values
            continue
        known = {f.name for f in dataclasses.fields(cls)}
        for k in dict(values):
            if k not in known:
                raise ConfigError(f"{key}.{k}", f"unknown option; {key} takes {', '.join(sorted(known))}")
        out[key] = cls(**dict(values))
    return out


def dicom_options(ctx: PrepareContext) -> DicomOptions:
    """The DICOM display options of ``ctx`` (defaults when none)."""
    found = ctx.options.get("dicom")
    return found if isinstance(found, DicomOptions) else DicomOptions()
