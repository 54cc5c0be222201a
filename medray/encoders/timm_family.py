"""Family ``timm_image``: timm backbones saved in timm's Hugging Face layout.

The checkpoint directory is what ``timm.models.save_for_hf`` or
``push_to_hf_hub`` writes: ``config.json`` (``architecture``,
``num_classes``, ``model_args``, ``pretrained_cfg``) plus
``model.safetensors`` or ``pytorch_model.bin``. It is loaded with
``timm.create_model("local-dir:<dir>", pretrained=True)``, so the
checkpoint's own ``pretrained_cfg`` (mean, std, size, crop, interpolation)
drives preprocessing through ``resolve_data_config`` + ``create_transform``.

Pooling over ``forward_features``:

* ``pooler``: ``forward_head(features, pre_logits=True)``, the model's own
  pooled feature (default for timm presets; works for CNNs too);
* ``cls``: token 0, for token models with a class token;
* ``mean``: mean of the tokens after ``num_prefix_tokens`` (CLS, registers).

Options (``encoder.options``):

* ``image_size`` (int): model input side; ViT position embeddings are
  resampled on load.
* ``model_kwargs`` (dict): extra ``timm.create_model`` arguments.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np

from medray.encoders.registry import (
    Encoder,
    Preprocessor,
    preprocessing_digest,
    register_family,
)
from medray.encoders.spec import EncoderSpec
from medray.platform.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["TimmImageEncoder", "TimmImagePreprocessor", "build_timm_image"]

_OPTIONS = ("image_size", "model_kwargs")


class _TimmModel(Protocol):
    """What the encoder calls on a timm model (``timm.create_model`` is typed as returning a plain ``nn.Module``)."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor: ...


class TimmImagePreprocessor(Preprocessor):
    """timm's eval transform for the checkpoint's ``pretrained_cfg``.

    Args:
        spec: Spec with ``family="timm_image"``.
        local_dir: Checkpoint directory (from ``resolve_checkpoint``).
        model: The loaded model; when ``None`` the architecture is built on
            torch's ``meta`` device (no memory, no weights) to read its
            resolved ``pretrained_cfg``.

    Raises:
        ConfigError: Not a timm checkpoint or unknown option.
    """

    def __init__(self, spec: EncoderSpec, local_dir: str, model: Any = None) -> None:
        super().__init__(spec)
        from timm.data import create_transform, resolve_data_config

        opts = _options(spec.options)
        if model is None:
            model = _meta_model(spec, local_dir)
        data_config = resolve_data_config(model=model)
        if opts.get("image_size"):
            side = opts["image_size"]
            data_config["input_size"] = (data_config["input_size"][0], side, side)
        self.data_config = data_config
        self._transform = create_transform(**data_config)
        self.preprocessing_hash = preprocessing_digest(data_config, spec.pooling)
        self._probe_shape()

    def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Run timm's eval transform on each image; see :meth:`Preprocessor.preprocess`."""
        import torch
        from PIL import Image

        arrays = self._check_images(images)
        if not arrays:
            return np.zeros((0, *self.input_shape), dtype=np.float32)
        tensors = [self._transform(Image.fromarray(a)) for a in arrays]
        return torch.stack(tensors).numpy().astype(np.float32, copy=False)


class TimmImageEncoder(Encoder):
    """A timm model plus its :class:`TimmImagePreprocessor`.

    Args:
        spec: Spec with ``family="timm_image"``.
        local_dir: Checkpoint directory (from ``resolve_checkpoint``).
        device: torch device string.

    Raises:
        ConfigError: Not a timm checkpoint, unknown option, or a pooling
            the model cannot do.
    """

    def __init__(self, spec: EncoderSpec, local_dir: str, device: str = "cpu") -> None:
        import timm

        _options(spec.options)
        _check_layout(spec, Path(local_dir))
        model = timm.create_model(f"local-dir:{local_dir}", pretrained=True, **_model_kwargs(spec.options))
        super().__init__(spec, device=device, preprocessor=TimmImagePreprocessor(spec, local_dir, model))
        self._model = cast(_TimmModel, model.to(device).eval())
        self._has_cls = getattr(model, "cls_token", None) is not None
        self._num_prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
        if spec.pooling == "cls" and not self._has_cls:
            raise ConfigError("encoder.pooling", f"{type(model).__name__} has no class token; use 'pooler' or 'mean'")
        self._probe()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self._model.forward_features(x)
        if self.spec.pooling == "pooler":
            return self._model.forward_head(features, pre_logits=True).flatten(1)
        if features.ndim != 3:
            raise ConfigError(
                "encoder.pooling",
                f"{type(self._model).__name__} outputs a feature map, not tokens; use 'pooler'",
            )
        if self.spec.pooling == "cls":
            return features[:, 0]
        return features[:, self._num_prefix :].mean(dim=1)


def _build_preprocessor(spec: EncoderSpec, local_dir: str) -> Preprocessor:
    return TimmImagePreprocessor(spec, local_dir)


@register_family("timm_image", preprocessor=_build_preprocessor)
def build_timm_image(spec: EncoderSpec, local_dir: str, device: str) -> Encoder:
    """Builder of family ``timm_image`` (see :class:`TimmImageEncoder`)."""
    return TimmImageEncoder(spec, local_dir, device)


def _model_kwargs(options: dict) -> dict[str, Any]:
    """``timm.create_model`` keyword arguments from ``encoder.options``."""
    kwargs = dict(options.get("model_kwargs") or {})
    if options.get("image_size"):
        kwargs["img_size"] = options["image_size"]
    return kwargs


def _meta_model(spec: EncoderSpec, local_dir: str) -> Any:
    """Build the architecture without weights, to read its ``pretrained_cfg``."""
    import timm
    import torch

    _check_layout(spec, Path(local_dir))
    name, kwargs = f"local-dir:{local_dir}", _model_kwargs(spec.options)
    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, **kwargs)
    except Exception:  # noqa: BLE001 - a few architectures cannot init on meta
        return timm.create_model(name, pretrained=False, **kwargs)


def _options(options: dict) -> dict:
    """Check ``encoder.options`` keys for this family."""
    for key in options:
        if key not in _OPTIONS:
            raise ConfigError(f"encoder.options.{key}", f"not a timm_image option; valid: {list(_OPTIONS)}")
    size = options.get("image_size")
    if size is not None and (not isinstance(size, int) or size <= 0):
        raise ConfigError("encoder.options.image_size", f"expected a positive int, got {size!r}")
    return options


def _check_layout(spec: EncoderSpec, local_dir: Path) -> None:
    """Fail with the fix when the directory is not a timm HF-layout checkpoint."""
    config: Any = None
    try:
        config = json.loads((local_dir / "config.json").read_text())
    except (OSError, ValueError):
        pass
    if not isinstance(config, dict) or "architecture" not in config:
        raise ConfigError(
            "encoder.checkpoint",
            f"{spec.checkpoint} is not a timm checkpoint: expected config.json with "
            "'architecture' (as timm.models.save_for_hf writes); for transformers "
            "checkpoints set encoder.family=hf_image",
        )
