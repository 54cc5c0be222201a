"""Route a record to its modality and turn it into model input with provenance.

Pure Python, no Ray: :func:`prepare_record` is what the decode stage runs for
audio and text records (images keep their own path in
:func:`medray.pipeline.stages.decode_batch`). It returns a
:class:`Prepared`: the model input (first axis = items: windows or chunks),
one provenance dict per item, and whether a pooled row is wanted.

Provenance columns written next to every embedding (null where they do not
apply; see :data:`SEGMENT_FIELDS`):

* ``segment``: ``frame`` | ``window`` | ``chunk`` | ``pooled``;
* ``start_s`` / ``end_s``: seconds into the recording (windows, pooled audio);
* ``channel``: source channel when ``audio.mixdown=all``;
* ``token_start`` / ``token_end``: document token offsets (chunks, pooled text);
* ``tile_x`` / ``tile_y`` / ``level`` / ``mpp`` / ``tissue_fraction``: slide tiles
  (level-0 origin, pyramid level read, tile mpp, share of tissue);
* ``series_key`` / ``slice_start`` / ``slice_end`` / ``spacing_mm``: CT/MR series
  (salted series hash, sorted source slices covered, voxel spacing ``[z, y, x]``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medray.platform.errors import DecodeError, LimitExceeded, RecordError

__all__ = ["Prepared", "TextOptions", "SEGMENT_FIELDS", "prepare_record", "pooled_segment"]

#: Per-row provenance columns, in output order, with their Arrow type names.
SEGMENT_FIELDS = (
    ("segment", "string"),
    ("start_s", "float64"),
    ("end_s", "float64"),
    ("channel", "int32"),
    ("token_start", "int32"),
    ("token_end", "int32"),
    ("tile_x", "int64"),
    ("tile_y", "int64"),
    ("level", "int32"),
    ("mpp", "float64"),
    ("tissue_fraction", "float64"),
    ("series_key", "string"),
    ("slice_start", "int32"),
    ("slice_end", "int32"),
    ("spacing_mm", "list<float64>"),
)


@dataclass(frozen=True)
class TextOptions:
    """How documents are chunked.

    Args:
        overlap_tokens: tokens shared by consecutive chunks.
        max_chars: longest accepted document (characters).
        pool: ``"mean"`` adds one pooled row per document; ``"none"`` does not.
    """

    overlap_tokens: int = 0
    max_chars: int = 10_000_000
    pool: str = "mean"

    def __post_init__(self) -> None:
        from medray.platform.errors import ConfigError

        if isinstance(self.overlap_tokens, bool) or not isinstance(self.overlap_tokens, int) or self.overlap_tokens < 0:
            raise ConfigError("text.overlap_tokens", f"expected an int >= 0, got {self.overlap_tokens!r}")
        if isinstance(self.max_chars, bool) or not isinstance(self.max_chars, int) or self.max_chars < 1:
            raise ConfigError("text.max_chars", f"expected a positive int, got {self.max_chars!r}")
        if self.pool not in ("mean", "none"):
            raise ConfigError("text.pool", f"expected 'mean' or 'none', got {self.pool!r}")


@dataclass
class Prepared:
    """A record as model input plus what each item came from."""

    inputs: np.ndarray
    segments: list[dict[str, Any]]
    pool: str
    modality: str
    metadata: dict[str, Any] = field(default_factory=dict)
    patient_key: str | None = None


def pooled_segment(segments: list[dict[str, Any]]) -> dict[str, Any]:
    """Provenance of the pooled row: the extent of all items."""
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


def prepare_record(
    data: bytes, fmt: str, pre: Any, *, audio: Any = None, text: TextOptions = TextOptions(), salt: str = ""
) -> Prepared:
    """Decode an audio or text record and build its model input.

    Args:
        data: the object's bytes.
        fmt: the format from :func:`~medray.platform.decoders.detect_modality`
            (``audio``, ``text`` or ``sr``).
        pre: the modality's preprocessor (``hf_audio`` or ``hf_text``).
        audio: :class:`~medray.platform.decoders.audio.AudioOptions`.
        text: :class:`TextOptions`.
        salt: patient-key salt (DICOM SR).

    Raises:
        RecordError: the record cannot be used; the message has no PHI.
    """
    if fmt == "audio":
        return _prepare_audio(data, pre, audio)
    if fmt in ("text", "sr"):
        return _prepare_text(data, fmt, pre, text, salt)
    raise DecodeError(f"no preparation for format {fmt!r}")


def _prepare_audio(data: bytes, pre: Any, options: Any) -> Prepared:
    from medray.platform.decoders.audio import AudioOptions, decode_audio, split_windows

    options = options or AudioOptions()
    decoded = decode_audio(data, target_rate=pre.sampling_rate, options=options)
    windows = split_windows(decoded, window_s=options.window_s, hop_s=options.hop_s, last=options.last)
    if not windows:
        raise DecodeError(
            f"recording of {decoded.metadata['duration_s']} s is shorter than one window "
            f"(audio.window_s = {options.window_s}) and audio.last = drop"
        )
    inputs = _preprocess(lambda: pre.preprocess_audio([w.samples for w in windows]))
    segments = [
        {"segment": "window", "start_s": round(w.start_s, 6), "end_s": round(w.end_s, 6), "channel": w.channel}
        for w in windows
    ]
    meta = dict(
        decoded.metadata,
        sample_rate=decoded.sample_rate,
        window_s=options.window_s,
        hop_s=options.hop_s or options.window_s,
    )
    return Prepared(inputs, segments, options.pool, "audio", meta)


def _prepare_text(data: bytes, fmt: str, pre: Any, options: TextOptions, salt: str) -> Prepared:
    from medray.platform.decoders.text import decode_text, text_facts

    modality, key, meta = "text", None, {}
    if fmt == "sr":
        text, modality, key, meta = _sr(data, salt)
    else:
        text = decode_text(data, max_chars=options.max_chars)
    if len(text) > options.max_chars:
        raise LimitExceeded(f"text has {len(text)} characters, over text.max_chars = {options.max_chars}")
    chunks = _preprocess(lambda: pre.chunk_text(text, options.overlap_tokens))
    segments = [
        {"segment": "chunk", "token_start": s, "token_end": e} for s, e in zip(chunks.token_start, chunks.token_end)
    ]
    meta = dict(
        meta,
        **text_facts(text),
        n_tokens=chunks.n_tokens,
        max_length=pre.max_length,
        overlap_tokens=options.overlap_tokens,
    )
    return Prepared(chunks.inputs, segments, options.pool, modality, meta, key)


def _sr(data: bytes, salt: str) -> tuple[str, str, str | None, dict]:
    """Text, modality, patient key and allow-listed metadata of a DICOM SR."""
    import pydicom

    from medray.platform.decoders.text import sr_text
    from medray.platform.deid import extract_metadata, patient_key

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=bytes(data[128:132]) != b"DICM")
        text = sr_text(ds)
        meta = extract_metadata(ds)
        key = patient_key(ds, salt)
    except RecordError:
        raise
    except Exception as err:  # noqa: BLE001 - pydicom messages may quote values
        raise DecodeError(f"unreadable DICOM structured report ({type(err).__name__})") from None
    return text, str(meta.get("modality") or "SR"), key, meta


def _preprocess(fn: Any) -> Any:
    from medray.platform.errors import PreprocessError

    try:
        return fn()
    except RecordError:
        raise
    except Exception as err:  # noqa: BLE001
        raise PreprocessError(f"preprocessing failed ({type(err).__name__})") from None
