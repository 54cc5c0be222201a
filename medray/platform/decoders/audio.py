"""Decode WAV, FLAC and OGG recordings into float waveforms and fixed windows.

Pure Python, no Ray. :func:`audio_header` reads only the header (duration,
sample rate, channels) so limits are enforced before any sample is decoded:
a WAV whose ``data`` chunk claims ten hours is refused from its first bytes.
:func:`decode_audio` reads the samples with ``soundfile`` (libsndfile; no
FFmpeg needed), mixes channels down and resamples with
``torchaudio.functional.resample``. :func:`split_windows` cuts fixed windows
(HeAR uses 2 s at 16 kHz).

Example:
    >>> import io, numpy as np, soundfile as sf
    >>> buf = io.BytesIO()
    >>> sf.write(buf, np.zeros(8000, np.float32), 8000, format="WAV")
    >>> audio = decode_audio(buf.getvalue(), target_rate=16000)
    >>> audio.waveform.shape, audio.sample_rate
    ((1, 16000), 16000)
    >>> [(w.start_s, w.end_s) for w in split_windows(audio, window_s=0.5)]
    [(0.0, 0.5), (0.5, 1.0)]
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medray.platform.errors import ConfigError, DecodeError, LimitExceeded, UnsupportedFormat

__all__ = [
    "AudioOptions",
    "AudioHeader",
    "DecodedAudio",
    "AudioWindow",
    "is_audio",
    "audio_header",
    "decode_audio",
    "split_windows",
]

_MIXDOWN = ("mean", "first", "all")
_LAST = ("pad", "drop")


@dataclass(frozen=True)
class AudioOptions:
    """How recordings are read and cut.

    Args:
        max_duration_s: longest accepted recording, read from the header.
        max_sample_rate: highest accepted sample rate (Hz), from the header.
        mixdown: ``"mean"`` (average the channels), ``"first"`` (channel 0)
            or ``"all"`` (every channel windowed on its own).
        window_s: window length in seconds.
        hop_s: window start-to-start distance; ``None`` means ``window_s``.
        last: ``"pad"`` the last partial window with zeros, or ``"drop"`` it.
        pool: ``"mean"`` adds one pooled row per recording; ``"none"`` does not.

    Raises:
        ConfigError: naming the ``audio.*`` key at fault.
    """

    max_duration_s: float = 3600.0
    max_sample_rate: int = 192_000
    mixdown: str = "mean"
    window_s: float = 2.0
    hop_s: float | None = None
    last: str = "pad"
    pool: str = "mean"

    def __post_init__(self) -> None:
        for key in ("max_duration_s", "max_sample_rate", "window_s"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"audio.{key}", f"expected a positive number, got {value!r}")
        if self.hop_s is not None and not (isinstance(self.hop_s, (int, float)) and self.hop_s > 0):
            raise ConfigError("audio.hop_s", f"expected a positive number or null, got {self.hop_s!r}")
        if self.mixdown not in _MIXDOWN:
            raise ConfigError("audio.mixdown", f"expected one of {_MIXDOWN}, got {self.mixdown!r}")
        if self.last not in _LAST:
            raise ConfigError("audio.last", f"expected one of {_LAST}, got {self.last!r}")
        if self.pool not in ("mean", "none"):
            raise ConfigError("audio.pool", f"expected 'mean' or 'none', got {self.pool!r}")


@dataclass(frozen=True)
class AudioHeader:
    """What the header claims, before any sample is read."""

    format: str
    sample_rate: int
    channels: int
    frames: int

    @property
    def duration_s(self) -> float:
        """Claimed duration in seconds."""
        return self.frames / self.sample_rate if self.sample_rate else 0.0


@dataclass
class DecodedAudio:
    """A decoded recording.

    Args:
        waveform: float32 ``(channels, samples)`` in ``[-1, 1]`` after mix-down
            (one row unless ``mixdown="all"``), at ``sample_rate``.
        sample_rate: rate of ``waveform`` (the target rate when resampled).
        metadata: PHI-free facts (format, source rate, channels, duration).
    """

    waveform: np.ndarray
    sample_rate: int
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class AudioWindow:
    """One fixed-length window: samples plus where it came from."""

    samples: np.ndarray
    channel: int | None
    start_s: float
    end_s: float
    padded: bool


def is_audio(head: bytes) -> bool:
    """True when ``head`` starts with a RIFF/WAVE, fLaC or OggS signature."""
    return (head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE") or head[:4] in (b"fLaC", b"OggS")


def _wav_header(data: bytes) -> AudioHeader:
    """Parse the RIFF chunks ourselves: libsndfile clamps a lying ``data`` size to the file."""
    rate = channels = block = 0
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        if cid == b"fmt ":
            if size < 16 or pos + 24 > len(data):
                raise DecodeError("WAV 'fmt ' chunk is truncated")
            channels, rate = struct.unpack_from("<HI", data, pos + 10)
            block = struct.unpack_from("<H", data, pos + 20)[0]
        elif cid == b"data":
            if not (rate and channels and block):
                raise DecodeError("WAV has a 'data' chunk before a valid 'fmt ' chunk")
            return AudioHeader("WAV", int(rate), int(channels), int(size // block))
        pos += 8 + size + (size & 1)
    raise DecodeError("WAV has no 'data' chunk; the file may be truncated")


def audio_header(data: bytes) -> AudioHeader:
    """Read format, sample rate, channels and length from the header only.

    Raises:
        UnsupportedFormat: not WAV, FLAC or OGG.
        DecodeError: a damaged header.
    """
    head = bytes(data[:12])
    if not is_audio(head):
        raise UnsupportedFormat("not a WAV, FLAC or OGG recording")
    if head[:4] == b"RIFF":
        return _wav_header(data)
    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(data))
    except Exception as err:  # noqa: BLE001 - libsndfile messages are generic, no PHI
        raise DecodeError(f"unreadable {head[:4].decode('latin-1')} header ({type(err).__name__})") from None
    return AudioHeader(str(info.format), int(info.samplerate), int(info.channels), int(info.frames))


def decode_audio(
    data: bytes, *, target_rate: int | None = None, options: AudioOptions = AudioOptions()
) -> DecodedAudio:
    """Decode a recording, mix channels down and resample to ``target_rate``.

    Args:
        data: the object's bytes.
        target_rate: the encoder's sample rate; ``None`` keeps the source rate.
        options: limits and mix-down.

    Returns:
        The :class:`DecodedAudio`.

    Raises:
        LimitExceeded: the header claims more than ``max_duration_s`` or
            ``max_sample_rate`` (nothing else is read).
        UnsupportedFormat: not WAV, FLAC or OGG.
        DecodeError: damaged or truncated content.
    """
    header = audio_header(data)
    if header.sample_rate <= 0 or header.channels <= 0:
        raise DecodeError(f"header claims {header.sample_rate} Hz and {header.channels} channels")
    if header.sample_rate > options.max_sample_rate:
        raise LimitExceeded(
            f"sample rate {header.sample_rate} Hz is over audio.max_sample_rate = "
            f"{options.max_sample_rate}; raise it to accept the file"
        )
    if header.duration_s > options.max_duration_s:
        raise LimitExceeded(
            f"header claims {header.duration_s:.0f} s, over audio.max_duration_s = "
            f"{options.max_duration_s:g}; raise it to accept the file"
        )
    import soundfile as sf

    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as err:  # noqa: BLE001
        raise DecodeError(f"could not decode {header.format} samples ({type(err).__name__})") from None
    if samples.shape[0] == 0:
        raise DecodeError(f"{header.format} recording has no samples; the file may be truncated")
    if header.format == "WAV" and samples.shape[0] < header.frames:
        raise DecodeError(f"WAV is truncated: header claims {header.frames} frames, {samples.shape[0]} present")
    wave = samples.T  # (channels, samples)
    if options.mixdown == "mean":
        # a contiguous copy first: numpy reduces a transposed (strided) view about 5x slower
        wave = np.ascontiguousarray(wave).mean(axis=0, keepdims=True) if wave.shape[0] > 1 else wave
    elif options.mixdown == "first":
        wave = wave[:1]
    rate = int(rate)
    if target_rate and target_rate != rate:
        import torch
        import torchaudio.functional as AF

        wave = AF.resample(torch.from_numpy(np.ascontiguousarray(wave)), rate, int(target_rate)).numpy()
        rate = int(target_rate)
    meta = {
        "audio_format": header.format,
        "source_sample_rate": header.sample_rate,
        "channels": header.channels,
        "duration_s": round(samples.shape[0] / header.sample_rate, 6),
    }
    return DecodedAudio(np.ascontiguousarray(wave, dtype=np.float32), rate, meta)


def split_windows(
    audio: DecodedAudio, *, window_s: float = 2.0, hop_s: float | None = None, last: str = "pad"
) -> list[AudioWindow]:
    """Cut fixed windows of ``window_s`` every ``hop_s`` seconds, per channel.

    A recording shorter than one window gives one padded window (or none
    with ``last="drop"``). ``end_s`` is where the real samples end, so a
    padded window reports its true extent.
    """
    rate = audio.sample_rate
    size = int(round(window_s * rate))
    hop = int(round((hop_s or window_s) * rate))
    if size < 1 or hop < 1:
        raise ConfigError("audio.window_s", f"window of {window_s} s at {rate} Hz has no samples")
    out: list[AudioWindow] = []
    channels = audio.waveform.shape[0]
    for ch in range(channels):
        wave = audio.waveform[ch]
        n = wave.shape[0]
        start = 0
        while start < n:
            piece = wave[start : start + size]
            padded = piece.shape[0] < size
            if padded:
                if last == "drop":
                    break
                piece = np.pad(piece, (0, size - piece.shape[0]))
            out.append(
                AudioWindow(
                    np.ascontiguousarray(piece, dtype=np.float32),
                    ch if channels > 1 else None,
                    start / rate,
                    min(start + size, n) / rate,
                    padded,
                )
            )
            if start + size >= n:
                break
            start += hop
    return out
