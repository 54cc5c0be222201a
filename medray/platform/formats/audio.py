"""Recordings (WAV, FLAC, OGG; read with soundfile): fixed windows at the audio encoder's rate."""

from __future__ import annotations

from medray.platform.decoders.audio import AudioOptions, decode_audio, is_audio, split_windows
from medray.platform.errors import DecodeError
from medray.platform.formats.registry import Format, PrepareContext, Prepared, register_format, run_preprocess

__all__ = ["AUDIO", "prepare_audio"]


def prepare_audio(data: bytes, ctx: PrepareContext) -> Prepared:
    """Decode, mix down, resample and cut into windows; one item per window."""
    options = ctx.options_of(AUDIO)
    pre = ctx.preprocessor
    decoded = decode_audio(data, target_rate=pre.sampling_rate, options=options)
    windows = split_windows(decoded, window_s=options.window_s, hop_s=options.hop_s, last=options.last)
    if not windows:
        raise DecodeError(
            f"recording of {decoded.metadata['duration_s']} s is shorter than one window "
            f"(audio.window_s = {options.window_s}) and audio.last = drop"
        )
    inputs = run_preprocess(lambda: pre.preprocess_audio([w.samples for w in windows]))
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


def _sniff(data: bytes, name: str) -> str | None:
    return "audio" if is_audio(bytes(data[:132])) else None


AUDIO = register_format(
    Format(
        name="audio",
        modality="audio",
        sniff=_sniff,
        prepare=prepare_audio,
        priority=30,
        media_types={
            "audio/wav": "input.wav",
            "audio/x-wav": "input.wav",
            "audio/wave": "input.wav",
            "audio/vnd.wave": "input.wav",
            "audio/flac": "input.flac",
            "audio/x-flac": "input.flac",
            "audio/ogg": "input.ogg",
        },
        extensions=(".wav", ".flac", ".ogg"),
        options=AudioOptions,
        options_key="audio",
        columns=(("start_s", "float64"), ("end_s", "float64"), ("channel", "int32")),
        description="WAV/FLAC/OGG audio",
    )
)
