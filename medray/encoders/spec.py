"""What an encoder is: a family, a checkpoint and how to pool its output.

An :class:`EncoderSpec` is plain data. It is what Hydra presets in
``conf/encoder/*.yaml`` hold, what travels to Ray actors, and what
:func:`medray.encoders.create_encoder` turns into a loaded model. Building one
checks every field, so a wrong value fails on the driver, before Ray starts,
with a :class:`~medray.platform.errors.ConfigError` that names the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medray.platform.errors import ConfigError

__all__ = [
    "EncoderSpec",
    "MISSING",
    "POOLINGS",
    "default_cache_dir",
    "identity_key",
    "spec_from_dict",
    "spec_to_dict",
]

#: Accepted values of :attr:`EncoderSpec.pooling`.
POOLINGS: tuple[str, ...] = ("cls", "mean", "pooler")

#: Hydra's marker for a value that must be given (``checkpoint: ???``).
MISSING = "???"

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def default_cache_dir() -> str:
    """Return the node-local checkpoint cache directory.

    Returns:
        ``$MEDRAY_CACHE_DIR`` when set, else ``~/.cache/medray/checkpoints``.
    """
    env = os.environ.get("MEDRAY_CACHE_DIR")
    if env:
        return env
    return str(Path.home() / ".cache" / "medray" / "checkpoints")


@dataclass
class EncoderSpec:
    """Everything needed to build one encoder, with nothing loaded yet.

    Args:
        name: Preset or display name, e.g. ``"rad_dino"``.
        family: Registered family that builds it: ``"hf_image"`` or
            ``"timm_image"`` (see :func:`medray.encoders.list_encoders`).
        checkpoint: Hugging Face hub id (``"microsoft/rad-dino"``, timm ids as
            ``"hf-hub:timm/<name>"``), a local directory, or an fsspec URI
            (``"s3://models/my-vit"``, ``"file:///..."``).
        modality: Input modality; only ``"image"`` families exist so far.
        pooling: ``"cls"`` (first token), ``"mean"`` (mean of patch tokens,
            without CLS/register tokens) or ``"pooler"`` (the model's own
            pooled output).
        sha256: Expected checkpoint hash (see
            :func:`medray.encoders.checkpoint.hash_directory`); ``None`` skips
            the check.
        untrained: True for random demo weights. Set automatically when the
            checkpoint holds the ``MEDRAY_UNTRAINED`` marker.
        options: Family-specific settings, e.g. ``{"image_size": 518}``.
        storage_options: fsspec options for remote checkpoint URIs.
        cache_dir: Node-local cache for remote checkpoints; ``None`` means
            :func:`default_cache_dir`.
        license: The checkpoint's licence as its model card states it
            (``"Apache-2.0"``, ``"MSRLA"``); ``None``: unknown, read the card.
            Informational (``medray encoders``): it never changes an embedding.
        gated: Whether the checkpoint's hub page asks users to accept terms
            before downloading (then set ``HF_TOKEN``); ``None``: unknown.
        embedding_dim: The size of one embedding of this checkpoint, when
            known; informational (the loaded model decides).

    Raises:
        ConfigError: A field has a wrong type or value; the key is named.
    """

    name: str
    family: str
    checkpoint: str
    modality: str = "image"
    pooling: str = "cls"
    sha256: str | None = None
    untrained: bool = False
    options: dict = field(default_factory=dict)
    storage_options: dict = field(default_factory=dict)
    cache_dir: str | None = None
    license: str | None = None
    gated: bool | None = None
    embedding_dim: int | None = None

    def __post_init__(self) -> None:
        for key in ("name", "family", "checkpoint", "modality"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"encoder.{key}", f"expected a non-empty string, got {value!r}")
        if self.pooling not in POOLINGS:
            raise ConfigError("encoder.pooling", f"expected one of {list(POOLINGS)}, got {self.pooling!r}")
        if self.sha256 is not None:
            if not isinstance(self.sha256, str) or not _SHA256.match(self.sha256.lower()):
                raise ConfigError(
                    "encoder.sha256",
                    f"expected 64 hex digits or null, got {self.sha256!r}",
                )
            self.sha256 = self.sha256.lower()
        if not isinstance(self.untrained, bool):
            raise ConfigError("encoder.untrained", f"expected true/false, got {self.untrained!r}")
        for key in ("options", "storage_options"):
            value = getattr(self, key)
            if value is None:
                setattr(self, key, {})
            elif isinstance(value, Mapping):
                setattr(self, key, dict(value))
            else:
                raise ConfigError(f"encoder.{key}", f"expected a mapping, got {type(value).__name__}")
        if self.cache_dir is not None and not isinstance(self.cache_dir, str):
            raise ConfigError("encoder.cache_dir", f"expected a path or null, got {self.cache_dir!r}")
        if self.license is not None and not isinstance(self.license, str):
            raise ConfigError("encoder.license", f"expected a licence name or null, got {self.license!r}")
        if self.gated is not None and not isinstance(self.gated, bool):
            raise ConfigError("encoder.gated", f"expected true, false or null, got {self.gated!r}")
        if self.embedding_dim is not None and (
            isinstance(self.embedding_dim, bool) or not isinstance(self.embedding_dim, int) or self.embedding_dim < 1
        ):
            raise ConfigError(
                "encoder.embedding_dim", f"expected a positive integer or null, got {self.embedding_dim!r}"
            )

    @property
    def checkpoint_missing(self) -> bool:
        """True while ``checkpoint`` is still Hydra's ``???`` placeholder."""
        return self.checkpoint == MISSING

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EncoderSpec:
        """Build a spec from a plain mapping (a Hydra ``encoder`` group).

        Args:
            data: Field names to values; nested mappings must be plain dicts
                (``OmegaConf.to_container(cfg.encoder, resolve=True)``).

        Returns:
            The validated spec.

        Raises:
            ConfigError: Unknown key (closest field suggested), missing
                required key or invalid value.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in names]
        if unknown:
            key = unknown[0]
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {names}"
            raise ConfigError(f"encoder.{key}", f"unknown encoder field{hint}")
        for key in ("name", "family", "checkpoint"):
            if key not in data:
                raise ConfigError(f"encoder.{key}", "is required")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        """Return the spec as a plain, YAML/JSON friendly dict."""
        return dataclasses.asdict(self)


def spec_from_dict(data: Mapping[str, Any]) -> EncoderSpec:
    """Build a spec from a plain mapping; see :meth:`EncoderSpec.from_dict`."""
    return EncoderSpec.from_dict(data)


def spec_to_dict(spec: EncoderSpec) -> dict[str, Any]:
    """Return a spec as a plain dict (for Ray task arguments and JSON)."""
    return spec.to_dict()


#: Libraries whose version can change what a checkpoint's processor does to an input.
_PREPROCESSING_LIBRARIES = ("transformers", "timm", "torchvision", "open_clip_torch", "medray")


#: Spec fields that never change what a checkpoint's preprocessing does (credentials, cache, card facts).
_NOT_IN_IDENTITY = ("storage_options", "cache_dir", "license", "gated", "embedding_dim")


def identity_key(specs: Mapping[str, EncoderSpec], weights_hashes: Mapping[str, str]) -> str:
    """A digest of everything a run's preprocessing hashes depend on, computed without building them.

    The specs (minus credentials and cache location), each checkpoint's
    directory hash (which covers its processor config) and the versions of the
    libraries that implement the processors. Two runs with the same key build
    the same preprocessing hashes, so an output can remember them.
    """
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for name in _PREPROCESSING_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    body = {
        "specs": {
            m: {k: v for k, v in spec.to_dict().items() if k not in _NOT_IN_IDENTITY}
            for m, spec in sorted(specs.items())
        },
        "weights": dict(sorted(weights_hashes.items())),
        "versions": versions,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
