"""Find encoders by name and build them.

Two tables live here. *Families* map a name (``"hf_image"``) to a builder
that loads a checkpoint directory into an :class:`Encoder`. *Presets* map a
name (``"rad_dino"``) to a ready :class:`~medray.encoders.spec.EncoderSpec`.
Family modules register both at import time, in the manner of timm's
``@register_model``; both refuse duplicate names.

Example:
    >>> from medray.encoders import get_spec, list_encoders
    >>> "rad_dino" in list_encoders("rad*")
    True
    >>> get_spec("rad_dino").checkpoint
    'microsoft/rad-dino'
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import fnmatch
import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from medray.encoders.checkpoint import is_untrained, resolve_checkpoint
from medray.encoders.spec import EncoderSpec
from medray.platform.errors import ConfigError, EncodeError, PreprocessError

if TYPE_CHECKING:
    import torch

__all__ = [
    "Builder",
    "Encoder",
    "Preprocessor",
    "PreprocessorBuilder",
    "create_encoder",
    "create_preprocessor",
    "family_modalities",
    "family_modality",
    "get_spec",
    "list_encoders",
    "list_families",
    "preprocessing_digest",
    "register_family",
    "spec_from_entry",
    "register_preset",
]

_log = logging.getLogger(__name__)

#: A family builder: ``builder(spec, local_dir, device) -> Encoder``.
Builder = Callable[[EncoderSpec, str, str], "Encoder"]

#: Builds a family's preprocessing alone: ``fn(spec, local_dir) -> Preprocessor``.
PreprocessorBuilder = Callable[[EncoderSpec, str], "Preprocessor"]

_FAMILIES: dict[str, Builder] = {}
_PREPROCESSORS: dict[str, PreprocessorBuilder] = {}
_PRESETS: dict[str, EncoderSpec] = {}
#: The preset files: ``conf/encoder/<name>.yaml`` in the package, the same files Hydra composes for
#: ``encoder=<name>``, so a checkpoint is declared once.
PRESET_DIR = Path(__file__).resolve().parents[1] / "conf" / "encoder"
_PRESET_FILES_READ = False
_MODALITIES: dict[str, str] = {}
#: Families that embed more than their own modality in the same space (image-text: text too).
_ALSO: dict[str, tuple[str, ...]] = {}

_DTYPES = {
    None: None,
    "auto": "auto",
    "float32": None,
    "fp32": None,
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


class Preprocessor:
    """A checkpoint's own preprocessing, without the model weights.

    CPU decode tasks use it (:func:`create_preprocessor`); an
    :class:`Encoder` holds one and delegates :meth:`preprocess` to it, so
    both produce the same input and the same ``preprocessing_hash``.
    Subclasses set ``preprocessing_hash``, implement :meth:`preprocess` and
    call :meth:`_probe_shape` at the end of ``__init__``.

    Attributes:
        spec: The spec it was built from (``untrained`` resolved).
        input_shape: ``(C, H, W)`` that :meth:`preprocess` produces (other
            modalities: their own per-item shape, e.g. ``(C, D, H, W)``).
        preprocessing_hash: sha256 of the canonical JSON of the
            preprocessing config plus pooling.
        weights_hash: sha256 of the checkpoint directory content (set by
            :func:`create_preprocessor` / :func:`create_encoder`).
    """

    def __init__(self, spec: EncoderSpec) -> None:
        self.spec = spec
        self.input_shape: tuple[int, ...] = (0, 0, 0)
        self.preprocessing_hash = ""
        self.weights_hash = ""

    def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Turn RGB images into model input with the checkpoint's own processor.

        Args:
            images: uint8 arrays of shape ``(H, W, 3)``; sizes may differ.

        Returns:
            float32 array ``(N, C, H, W)``; ``(0, C, H, W)`` for no images.

        Raises:
            PreprocessError: An image is not a uint8 ``(H, W, 3)`` array.
        """
        raise NotImplementedError

    def _probe_shape(self) -> None:
        """Set ``input_shape`` by preprocessing one blank image."""
        pixels = self.preprocess([np.zeros((48, 64, 3), dtype=np.uint8)])
        self.input_shape = tuple(int(v) for v in pixels.shape[1:])

    @staticmethod
    def _check_images(images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Return the images as writable, C-contiguous uint8 ``(H, W, 3)`` arrays."""
        out = []
        for i, image in enumerate(images):
            arr = np.asarray(image)
            if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
                raise PreprocessError(
                    f"image {i}: expected uint8 RGB (H, W, 3), got {arr.dtype} {arr.shape}; "
                    "convert to 8-bit RGB before preprocess()"
                )
            if not (arr.flags.c_contiguous and arr.flags.writeable):
                arr = np.array(arr, order="C")  # torch warns on read-only buffers
            out.append(arr)
        return out


class Encoder(Preprocessor):
    """A loaded model with its own preprocessing; subclasses are families.

    Subclasses pass their :class:`Preprocessor` (or override
    :meth:`preprocess` and set ``preprocessing_hash``), implement
    :meth:`_forward`, then call :meth:`_probe` at the end of ``__init__``.
    :func:`create_encoder` fills in ``weights_hash`` and the autocast dtype.

    Args:
        spec: The spec (``untrained`` resolved).
        device: torch device string the model lives on.
        preprocessor: Preprocessing to delegate to.

    Attributes:
        dim: Embedding size.
        device: torch device string.
    """

    def __init__(self, spec: EncoderSpec, *, device: str = "cpu", preprocessor: Preprocessor | None = None) -> None:
        super().__init__(spec)
        self.device = device
        self.dim = 0
        self.preprocessor = preprocessor
        if preprocessor is not None:
            self.preprocessing_hash = preprocessor.preprocessing_hash
            self.input_shape = preprocessor.input_shape
        self._autocast_dtype: str | None = None

    def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Run the checkpoint's own preprocessing; see :meth:`Preprocessor.preprocess`."""
        if self.preprocessor is None:
            raise NotImplementedError(f"{type(self).__name__} has no preprocessor")
        return self.preprocessor.preprocess(images)

    #: What :meth:`embed` takes: numpy dtype, accepted ranks and a description for errors.
    #: Families of other inputs (audio features, token ids) override these three.
    input_dtype: Any = np.float32
    input_ndims: tuple = (4,)
    input_desc: str = "pixel values (N, C, H, W)"

    def _check_input(self, batch: np.ndarray) -> None:
        """Raise :class:`EncodeError` when ``batch`` is not what this family embeds."""
        if batch.ndim not in self.input_ndims:
            raise EncodeError(f"expected {self.input_desc}, got shape {batch.shape}")

    def embed(self, pixel_values: np.ndarray) -> np.ndarray:
        """Embed a preprocessed batch.

        Runs under ``torch.inference_mode``; autocasts to bf16/fp16 only on
        CUDA when ``create_encoder(dtype=...)`` asked for it.

        Args:
            pixel_values: what :meth:`preprocess` (or the family's own
                preparation) returns: float32 ``(N, C, H, W)`` for images.

        Returns:
            float32 array ``(N, dim)``.

        Raises:
            EncodeError: The batch does not have the expected shape.
        """
        batch = np.asarray(pixel_values, dtype=self.input_dtype)
        self._check_input(batch)
        return self._run(batch)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        """The model on a checked batch: ``(N, dim)`` float32, under inference mode (and autocast where asked)."""
        import torch

        if batch.shape[0] == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
        with torch.inference_mode(), self._autocast():
            out = self._forward(x)
        return out.float().cpu().numpy()

    @property
    def module(self) -> torch.nn.Module:
        """The underlying ``torch.nn.Module`` (fine-tuning trains and saves it).

        Raises:
            NotImplementedError: The family keeps no single torch module.
        """
        model = getattr(self, "_model", None)
        if model is None:
            raise NotImplementedError(f"{type(self).__name__} exposes no torch module")
        return model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embeddings ``(N, dim)`` of a float tensor, with autograd.

        The same computation as :meth:`embed` (same pooling), for training:
        no ``inference_mode``, no autocast, no numpy round trip.
        """
        return self._forward(x)

    def describe(self) -> dict[str, Any]:
        """Return what identifies this encoder's output, for run metadata.

        Returns:
            ``name, family, checkpoint`` (the URI as given, never a local
            cache path), ``modality, pooling, dim, weights_hash,
            preprocessing_hash, untrained``.
        """
        return {
            "name": self.spec.name,
            "family": self.spec.family,
            "checkpoint": self.spec.checkpoint,
            "modality": self.spec.modality,
            "pooling": self.spec.pooling,
            "dim": self.dim,
            "weights_hash": self.weights_hash,
            "preprocessing_hash": self.preprocessing_hash,
            "untrained": self.spec.untrained,
        }

    def __repr__(self) -> str:
        flag = ", UNTRAINED" if self.spec.untrained else ""
        return f"{type(self).__name__}({self.spec.name!r}, dim={self.dim}{flag})"

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a float tensor ``(N, C, H, W)`` on ``device`` to ``(N, dim)``."""
        raise NotImplementedError

    def _probe(self) -> None:
        """Set ``input_shape`` and ``dim`` by embedding one blank image.

        This also makes a pooling the model cannot do fail at load time.
        """
        pixels = self.preprocess([np.zeros((48, 64, 3), dtype=np.uint8)])
        self.input_shape = tuple(int(v) for v in pixels.shape[1:])
        self.dim = int(self.embed(pixels).shape[1])

    def _autocast(self) -> contextlib.AbstractContextManager:
        """Autocast context for CUDA half precision, else a no-op."""
        import torch

        if self._autocast_dtype and str(self.device).startswith("cuda"):
            return torch.autocast("cuda", dtype=getattr(torch, self._autocast_dtype))
        return contextlib.nullcontext()


def preprocessing_digest(config: Mapping[str, Any], pooling: str) -> str:
    """Return the sha256 of canonical JSON of a preprocessing config and pooling.

    Args:
        config: Processor / data config; values JSON cannot hold are
            written with ``str``.
        pooling: The spec's pooling.

    Returns:
        64 hex digits.
    """
    text = json.dumps(
        {"preprocessing": config, "pooling": pooling},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def register_family(
    name: str,
    *,
    preprocessor: PreprocessorBuilder | None = None,
    modality: str = "image",
    also: Sequence[str] = (),
) -> Callable[[Builder], Builder]:
    """Register a family builder under ``name`` (decorator).

    Args:
        name: Family name used in ``EncoderSpec.family``.
        preprocessor: Optional ``fn(spec, local_dir) -> Preprocessor`` that
            builds the preprocessing without loading weights; without it
            :func:`create_preprocessor` loads the whole encoder on the CPU.
        modality: What the family embeds: ``image``, ``audio`` or ``text``
            (the pipeline routes records of that modality to it).
        also: Further modalities the same encoder embeds into the same
            space (image-text families: ``("text",)``); records of those
            modalities go to it too, and its ``embed`` tells them apart by
            their input.

    Returns:
        A decorator that stores the builder and returns it unchanged.

    Raises:
        ValueError: ``name`` is already registered.
    """

    def _check() -> None:
        if name in _FAMILIES:
            owner = getattr(_FAMILIES[name], "__module__", "?")
            raise ValueError(f"encoder family {name!r} is already registered (by {owner}); pick another name")

    _check()

    def decorator(builder: Builder) -> Builder:
        _check()
        _FAMILIES[name] = builder
        _MODALITIES[name] = modality
        if also:
            _ALSO[name] = tuple(also)
        if preprocessor is not None:
            _PREPROCESSORS[name] = preprocessor
        return builder

    return decorator


def register_preset(spec: EncoderSpec) -> None:
    """Register a named preset.

    Args:
        spec: The preset; ``spec.name`` is its name.

    Raises:
        ValueError: A preset with this name already exists.
    """
    if spec.name in _PRESETS:
        raise ValueError(f"encoder preset {spec.name!r} is already registered; pick another name")
    _PRESETS[spec.name] = copy.deepcopy(spec)


def _read_preset_files() -> None:
    """Register every ``conf/encoder/*.yaml`` preset once (presets registered in code win)."""
    global _PRESET_FILES_READ
    if _PRESET_FILES_READ:
        return
    _PRESET_FILES_READ = True
    known = {f.name for f in dataclasses.fields(EncoderSpec)}
    for path in sorted(PRESET_DIR.glob("*.yaml")):
        values = yaml.safe_load(path.read_text()) or {}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"encoder.{unknown[0]}", f"unknown field in preset file {path.name}")
        name = str(values.get("name") or path.stem)
        if name not in _PRESETS:
            _PRESETS[name] = EncoderSpec(**values)


def list_encoders(pattern: str = "*") -> list[str]:
    """List preset and family names matching a shell-style pattern.

    Args:
        pattern: ``fnmatch`` pattern, e.g. ``"dino*"``.

    Returns:
        Sorted names.
    """
    _read_preset_files()
    names = set(_PRESETS) | set(_FAMILIES)
    return sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))


def family_modality(family: str) -> str:
    """The modality a registered family embeds (``image``, ``audio``, ``text``)."""
    return _MODALITIES.get(family, "image")


def family_modalities(family: str) -> tuple[str, ...]:
    """Every modality a registered family embeds: its own first, then ``also`` (image-text: image, text)."""
    return (family_modality(family), *_ALSO.get(family, ()))


def list_families() -> list[str]:
    """Return the registered family names, sorted."""
    return sorted(_FAMILIES)


def get_spec(name_or_spec: str | EncoderSpec | Mapping[str, Any], **overrides: Any) -> EncoderSpec:
    """Resolve a preset name, spec or mapping into a checked spec.

    A family name with no preset of its own gives a generic spec whose
    ``checkpoint`` must be set (here via ``checkpoint=...``).

    Args:
        name_or_spec: Preset or family name, an :class:`EncoderSpec`, or a
            mapping of its fields (a Hydra ``encoder`` group as a dict).
        **overrides: Fields to replace, e.g. ``checkpoint="s3://..."``.

    Returns:
        A new spec (changing it does not change the registry).

    Raises:
        ConfigError: Unknown name (closest matches listed), unknown
            override field, unknown family or invalid value.
    """
    if isinstance(name_or_spec, EncoderSpec):
        spec = copy.deepcopy(name_or_spec)
    elif isinstance(name_or_spec, Mapping):
        spec = EncoderSpec.from_dict(name_or_spec)
    elif isinstance(name_or_spec, str):
        _read_preset_files()
        if name_or_spec in _PRESETS:
            spec = copy.deepcopy(_PRESETS[name_or_spec])
        elif name_or_spec in _FAMILIES:
            spec = EncoderSpec(name=name_or_spec, family=name_or_spec, checkpoint="???")
        else:
            raise ConfigError("encoder", _unknown(name_or_spec, list_encoders(), "encoder"))
    else:
        raise ConfigError("encoder", f"expected a name, EncoderSpec or mapping, got {type(name_or_spec).__name__}")
    if overrides:
        fields = [f.name for f in dataclasses.fields(EncoderSpec)]
        for key in overrides:
            if key not in fields:
                raise ConfigError(f"encoder.{key}", _unknown(key, fields, "encoder field"))
        spec = dataclasses.replace(spec, **overrides)
    if spec.family not in _FAMILIES:
        raise ConfigError("encoder.family", _unknown(spec.family, sorted(_FAMILIES), "family"))
    return spec


def create_encoder(spec: EncoderSpec | str, *, device: str = "cpu", dtype: str | None = None) -> Encoder:
    """Fetch, verify and load an encoder.

    Args:
        spec: Preset name or spec (see :func:`get_spec`).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        dtype: ``None``/``"float32"``, or ``"bfloat16"``/``"float16"`` to
            autocast on CUDA (ignored on CPU, where models run in float32);
            ``"auto"``: bfloat16 on CUDA (float16 where bf16 is missing).

    Returns:
        The loaded encoder, in eval mode on ``device``.

    Raises:
        ConfigError: Bad spec, dtype or device, or the checkpoint cannot be
            fetched or does not match ``encoder.sha256``.
    """
    device = str(device)
    if dtype not in _DTYPES:
        raise ConfigError("dtype", f"expected one of {sorted(k for k in _DTYPES if k)}, got {dtype!r}")
    _check_device(device)
    spec, local_dir, sha = _resolve(spec)
    if spec.untrained:
        _log.warning(
            "encoder %s has UNTRAINED random weights: its embeddings are meaningless (demo and tests only)",
            spec.name,
        )
    encoder = _FAMILIES[spec.family](spec, local_dir, device)
    encoder.weights_hash = sha
    encoder._autocast_dtype = _autocast_dtype(_DTYPES[dtype], device)
    return encoder


def create_preprocessor(spec: EncoderSpec | str) -> Preprocessor:
    """Build only the checkpoint's preprocessing (for CPU decode tasks).

    The result preprocesses exactly like ``create_encoder(spec)`` and has
    the same ``preprocessing_hash``, ``input_shape`` and ``weights_hash``.

    Args:
        spec: Preset name or spec (see :func:`get_spec`).

    Returns:
        The preprocessor.

    Raises:
        ConfigError: Bad spec, or the checkpoint cannot be fetched or does
            not match ``encoder.sha256``.
    """
    spec, local_dir, sha = _resolve(spec)
    build = _PREPROCESSORS.get(spec.family)
    pre = build(spec, local_dir) if build else _FAMILIES[spec.family](spec, local_dir, "cpu")
    pre.weights_hash = sha
    return pre


def _resolve(spec: EncoderSpec | str) -> tuple[EncoderSpec, str, str]:
    """Check the spec, fetch its checkpoint; return (spec, local_dir, sha256)."""
    spec = get_spec(spec)
    if spec.checkpoint_missing:
        raise ConfigError(
            "encoder.checkpoint",
            f"family {spec.family} needs a checkpoint: set encoder.checkpoint to a hub id, "
            "a local directory or an s3:// URI",
        )
    local_dir, sha = resolve_checkpoint(
        spec.checkpoint,
        storage_options=spec.storage_options,
        cache_dir=spec.cache_dir,
        expected_sha256=spec.sha256,
    )
    if is_untrained(local_dir) and not spec.untrained:
        spec = dataclasses.replace(spec, untrained=True)
    return spec, local_dir, sha


def _autocast_dtype(dtype: str | None, device: str) -> str | None:
    """Resolve ``"auto"``; autocast only ever applies on CUDA."""
    if not device.startswith("cuda") or dtype is None:
        return None
    if dtype == "auto":
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return dtype


def _check_device(device: str) -> None:
    """Fail early, with the fix, on a device this node does not have."""
    if not isinstance(device, str) or not (device == "cpu" or device.startswith("cuda")):
        raise ConfigError("device", f"expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("device", "CUDA is not available on this node; use device='cpu' or request GPUs")


def _unknown(name: str, candidates: Sequence[str], what: str) -> str:
    """Message for an unknown name, with the closest candidates."""
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.5)
    if close:
        return f"unknown {what} {name!r}; did you mean {', '.join(close)}?"
    return f"unknown {what} {name!r}; available: {', '.join(candidates)}"


def spec_from_entry(key: str, value: Any) -> EncoderSpec:
    """The spec of a config entry such as ``encoders.audio``: a preset name, or a mapping.

    A mapping names its base with ``preset`` (or ``name``/``family``) and
    overrides fields on it.

    Args:
        key: the config key, for errors (``encoders.audio``).
        value: a preset name or a mapping of spec fields.

    Raises:
        ConfigError: unknown preset or field, or a required checkpoint missing (named by ``key``).
    """
    if isinstance(value, str):
        spec = get_spec(value)
    elif isinstance(value, dict):
        fields = dict(value)
        # an untyped config value (None when no key names it): get_spec rejects a non-name with a ConfigError
        base: Any = fields.pop("preset", None) or fields.get("name") or fields.get("family")
        try:
            spec = get_spec(base, **{k: v for k, v in fields.items() if k != "name"})
        except ConfigError as err:
            raise ConfigError(f"{key}.{err.key.split('.', 1)[-1]}", str(err).split(": ", 1)[-1]) from None
        if "name" in fields:
            spec.name = str(fields["name"])
    else:
        raise ConfigError(key, f"expected a preset name or a spec mapping, got {type(value).__name__}")
    if spec.checkpoint_missing:
        raise ConfigError(
            f"{key}.checkpoint",
            "is required for this encoder: a hub id, a local directory or an object-storage URI (s3://...)",
        )
    return spec
