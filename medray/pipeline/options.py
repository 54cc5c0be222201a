"""What the CPU stages of the embedding path need to know, shipped to every task."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any

from medray.encoders import create_preprocessor, family_modalities, spec_from_dict, spec_to_dict
from medray.platform.decoders import DecodeLimits, DicomOptions

__all__ = ["StageOptions", "encoder_routes", "preprocessors", "decode_options"]


@dataclass
class StageOptions:
    """Everything the CPU stages need; picklable, shipped to every task."""

    storage_options: dict = field(default_factory=dict)
    max_bytes: int = 1 << 30
    max_pixels: int = 1_000_000_000
    frames: Any = "all"
    windows: dict = field(default_factory=dict)
    prefer_file_voi: bool = True
    allow_burned_in: bool = False
    dicomweb_in_flight: int = 4  # WADO-RS requests at a time per read task
    salt: str = ""
    encoder_spec: Any = None  # medray.encoders.EncoderSpec
    done: frozenset = frozenset()  # record ids already in the output (resume)
    encoder_specs: dict = field(default_factory=dict)  # modality -> EncoderSpec; {} = encoder_spec only
    audio: dict = field(default_factory=dict)  # AudioOptions fields
    text: dict = field(default_factory=dict)  # TextOptions fields
    text_column: str | None = None  # manifest column holding the document
    slide: dict = field(default_factory=dict)  # SlideOptions fields
    series: dict = field(default_factory=dict)  # SeriesOptions fields; {} or mode off: per instance
    format_options: dict = field(default_factory=dict)  # other formats' sections, e.g. {"nifti": {...}}


def encoder_routes(opts: StageOptions) -> dict[str, Any]:
    """Modality -> encoder spec: ``encoder_specs``, or ``encoder_spec`` under its family's modality.

    An image-text encoder also takes the text route (its text tower, same space) unless another
    encoder has it.
    """
    routes = dict(opts.encoder_specs) if opts.encoder_specs else {}
    if not routes:
        spec = opts.encoder_spec
        routes = {family_modalities(spec.family)[0]: spec}
    for spec in list(routes.values()):
        for modality in family_modalities(spec.family)[1:]:
            routes.setdefault(modality, spec)
    return routes


@functools.lru_cache(maxsize=4)
def _preprocessor(spec_json: str) -> Any:
    return create_preprocessor(spec_from_dict(json.loads(spec_json)))


def decode_options(opts: StageOptions) -> tuple[DicomOptions, DecodeLimits]:
    """The DICOM options and decode limits of ``opts``."""
    frames = opts.frames
    if isinstance(frames, (list, tuple)):
        frames = tuple(int(f) for f in frames)
    windows = {str(k): (float(v[0]), float(v[1])) for k, v in (opts.windows or {}).items()}
    return (
        DicomOptions(
            frames=frames,
            windows=windows,
            prefer_file_voi=opts.prefer_file_voi,
            allow_burned_in=opts.allow_burned_in,
        ),
        DecodeLimits(max_bytes=opts.max_bytes, max_pixels=opts.max_pixels),
    )


def preprocessors(opts: StageOptions) -> dict[str, Any]:
    """Modality -> the preprocessor of its encoder (built once per process and spec)."""
    return {
        m: _preprocessor(json.dumps(spec_to_dict(spec), sort_keys=True)) for m, spec in encoder_routes(opts).items()
    }
