"""Hydra glue shared by every job: where conf/ is, typed schemas, errors.

``conf/`` lives inside the package (``medray/conf``; the repository's top-level
``conf`` links to it), so a checkout and an installed wheel find the same
files. Each job registers a dataclass schema in Hydra's ConfigStore, so a
misspelt key fails during composition and Hydra names it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from medray.platform.decoders.audio import AudioOptions
from medray.platform.decoders.slide import SlideOptions
from medray.platform.formats import TextOptions, option_types

__all__ = [
    "CONF_DIR",
    "EncoderConf",
    "StorageConf",
    "RayConf",
    "TrackingConf",
    "DecodeConf",
    "ComputeConf",
    "SeriesConf",
    "EmbedConf",
    "format_options",
    "format_sections",
    "with_format_sections",
    "register_schemas",
]

#: Absolute path of the Hydra config directory (works from a wheel too).
CONF_DIR = str(Path(__file__).resolve().parent / "conf")


@dataclass
class EncoderConf:
    """Encoder spec as configured (``conf/encoder/<name>.yaml``)."""

    name: str = MISSING
    family: str = MISSING
    checkpoint: str = MISSING
    modality: str = "image"
    pooling: str = "cls"
    sha256: Optional[str] = None
    untrained: bool = False
    options: Dict[str, Any] = field(default_factory=dict)
    storage_options: Dict[str, Any] = field(default_factory=dict)
    cache_dir: Optional[str] = None
    license: Optional[str] = None  # informational: the checkpoint's licence (model card)
    gated: Optional[bool] = None  # informational: the hub asks users to accept terms first
    embedding_dim: Optional[int] = None  # informational: the size of one embedding


@dataclass
class StorageConf:
    """fsspec storage options, flat or keyed by protocol (``{s3: {...}}``).

    Secrets belong in the environment (``AWS_*``) or ``${oc.env:...}``.
    """

    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class RayConf:
    """Where the job runs: ``address: null`` starts a local Ray."""

    address: Optional[str] = None
    num_cpus: Optional[int] = None
    include_dashboard: bool = False


@dataclass
class TrackingConf:
    """Weights & Biases; offline unless ``WANDB_API_KEY`` is set or mode says so."""

    enabled: bool = True
    project: str = "medray"
    mode: str = "auto"  # auto | offline | online | disabled
    group: Optional[str] = None
    name: Optional[str] = None
    dir: Optional[str] = None
    log_model: bool = False  # finetune: the artifact's weights too (the model card and metrics always)


@dataclass
class DecodeConf:
    """Decoding limits and the viewer pipeline's choices."""

    max_bytes: int = 1 << 30
    max_pixels: int = 1_000_000_000
    frames: Any = "all"  # all | first | middle | [0, 2, ...]
    prefer_file_voi: bool = True
    windows: Dict[str, List[float]] = field(default_factory=lambda: {"CT": [-600.0, 1500.0]})
    allow_burned_in: bool = False  # embed objects that may show patient text in their pixels


@dataclass
class DicomWebConf:
    """A ``dicomweb+http(s)://`` input: QIDO-RS study filters and WADO-RS requests in flight per task.

    Credentials come from the environment, never from here (see :mod:`medray.platform.dicomweb`).
    """

    query: Dict[str, Any] = field(default_factory=dict)  # e.g. {ModalitiesInStudy: CR, StudyDate: 20240101-20241231}
    max_in_flight: int = 4
    # watch=true: how new instances are found, how often, and when to stop
    feed: str = "auto"  # auto | changes (Orthanc's /changes log) | qido (StudyDate since a stored date)
    changes_root: Optional[str] = None  # Orthanc's REST root; null: the DICOMweb root's parent
    interval_s: float = 10.0  # seconds between polls
    max_rounds: Optional[int] = None  # stop after this many polls (null: until SIGTERM/SIGINT)
    idle_exit_s: Optional[float] = None  # stop once nothing new arrived for this long (null: never)
    round_max_instances: int = 10_000  # instances per round at most (the rest in the next, at once)


@dataclass
class ComputeConf:
    """How the pipeline is sized: decode tasks and the encoder actor pool."""

    read_batch_size: int = 16
    decode_batch_size: int = 8
    decode_concurrency: Optional[int] = None
    decode_num_cpus: float = 1.0
    actor_num_cpus: float = 1.0
    batch_size: int = 32
    min_actors: int = 1
    max_actors: int = 1
    num_gpus: Optional[float] = None  # null: 1 per actor when the cluster has GPUs
    device: str = "auto"
    dtype: str = "auto"  # auto (bf16 on GPU) | float32 | bfloat16 | float16
    task_retries: int = 2
    max_errored_blocks: int = 0  # >0: a block whose task keeps crashing is dropped (rerun retries it)
    # auto: without GPUs, one actor per CPU reads, decodes, embeds and writes (no stage holds an idle core);
    # with GPUs (or series/slide branches), decode tasks feed an encoder actor pool. true | false force one.
    fuse: str = "auto"


@dataclass
class SeriesConf:
    """CT/MR series as volumes: ``off`` keeps one record per instance (as before)."""

    mode: str = "off"  # off | slicewise (2D encoder per slice + pooled row) | volume (3D encoder)
    spacing: Optional[List[Optional[float]]] = None  # [z, y, x] mm to resample to; null: the series' own
    windows: Dict[str, List[float]] = field(
        default_factory=lambda: {"lung": [-600.0, 1500.0], "mediastinum": [40.0, 400.0], "bone": [400.0, 1800.0]}
    )  # channels, in order
    max_slices: int = 2000  # a series with more slices is quarantined before any pixel is read
    min_slices: int = 1
    max_voxels: int = 268_435_456  # of the resampled volume
    pool: str = "mean"  # mean | none: one pooled row per series (slicewise)
    modalities: List[str] = field(default_factory=lambda: ["CT", "MR"])
    spacing_tolerance: float = 0.1  # relative spread of slice gaps accepted as one spacing
    channels: Optional[List[str]] = None  # windows to use, in order; null: all of series.windows


@dataclass
class EmbedConf:
    """``medray embed``: archives in, embeddings + quarantine + summary out."""

    input: str = MISSING
    output: str = MISSING
    encoder: EncoderConf = field(default_factory=EncoderConf)
    # modality -> preset name or spec mapping, for modalities other than encoder's own
    encoders: Dict[str, Any] = field(default_factory=dict)
    decode: DecodeConf = field(default_factory=DecodeConf)
    # the formats' own options, declared once in their modules (Hydra composes mutable copies)
    audio: AudioOptions = field(default_factory=AudioOptions)
    text: TextOptions = field(default_factory=TextOptions)
    slide: SlideOptions = field(default_factory=SlideOptions)
    series: SeriesConf = field(default_factory=SeriesConf)
    text_column: Optional[str] = None
    compute: ComputeConf = field(default_factory=ComputeConf)
    storage: StorageConf = field(default_factory=StorageConf)
    ray: RayConf = field(default_factory=RayConf)
    tracking: TrackingConf = field(default_factory=TrackingConf)
    max_error_fraction: float = 0.05
    patient_salt: Optional[str] = None
    run_name: Optional[str] = None
    show: Optional[str] = None  # outcomes: print what became of every record of `output`, then stop
    watch: bool = False  # a dicomweb+ input: keep following new instances (see DicomWebConf)
    dicomweb: DicomWebConf = field(default_factory=lambda: DicomWebConf())


def _schema_of(options: type) -> type:
    """A mutable copy of a format's (frozen) options dataclass, for Hydra to compose and override."""
    hints = typing.get_type_hints(options)
    fields = []
    for f in dataclasses.fields(options):
        default: Any = (
            field(default=f.default)
            if f.default is not dataclasses.MISSING
            else field(default_factory=f.default_factory)
        )
        fields.append((f.name, hints[f.name], default))
    schema = dataclasses.make_dataclass(f"{options.__name__}Conf", fields)
    schema.__module__ = __name__
    schema.__doc__ = options.__doc__
    return schema


@functools.lru_cache(maxsize=1)
def format_sections() -> dict[str, type]:
    """Config section -> schema, for every registered format option not declared in this module (e.g. ``nifti``).

    A format declares its options once, as a dataclass in its own module
    (:attr:`medray.platform.formats.Format.options`); this is what Hydra composes.
    """
    return {key: _schema_of(cls) for key, cls in option_types().items()}


@functools.lru_cache(maxsize=8)
def with_format_sections(conf: type, name: str, add: bool = True) -> type:
    """``conf`` with a field per :func:`format_sections` entry, for Hydra to compose.

    A section ``conf`` declares (typed with the format's frozen options class) is
    replaced by its mutable copy, so overrides such as ``audio.window_s=1`` apply;
    with ``add`` the formats' other sections (e.g. ``nifti``) are added too.
    """
    own = {f.name for f in dataclasses.fields(conf)}
    extra = [
        (key, schema, field(default_factory=schema)) for key, schema in format_sections().items() if add or key in own
    ]
    schema = dataclasses.make_dataclass(name, extra, bases=(conf,))
    schema.__module__, schema.__doc__ = conf.__module__, conf.__doc__
    return schema


def format_options(cfg: Any) -> dict[str, dict[str, Any]]:
    """Section -> values of the registry's format options in a composed config (for ``StageOptions``)."""
    out: dict[str, dict[str, Any]] = {}
    for key in format_sections():
        value = getattr(cfg, key, None)
        if value is not None:
            is_instance = dataclasses.is_dataclass(value) and not isinstance(value, type)
            out[key] = dataclasses.asdict(value) if is_instance else dict(value)
    return out


def register_schemas() -> None:
    """Register the job schemas with Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    # the declared sections plus every registered format's options (e.g. nifti), composed by Hydra
    cs.store(name="embed_schema", node=with_format_sections(EmbedConf, "EmbedConf"))


def patient_salt(configured: Optional[str]) -> str:
    """The salt for patient keys: config, ``MEDRAY_PATIENT_SALT``, or a
    per-installation random salt kept in ``~/.config/medray/patient_salt``.

    The salt is never written next to the hashes it protects.
    """
    if configured:
        return configured
    env = os.environ.get("MEDRAY_PATIENT_SALT")
    if env:
        return env
    path = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "medray" / "patient_salt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        import secrets

        tmp = path.with_suffix(".tmp")
        tmp.write_text(secrets.token_hex(32))
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    return path.read_text().strip()
