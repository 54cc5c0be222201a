"""Family ``hf_image``: transformers vision backbones (ViT, DINOv2, BEiT, Swin...).

The checkpoint directory is what ``save_pretrained`` writes: ``config.json``,
weights and ``preprocessor_config.json``. The model comes from
``AutoModel.from_pretrained`` and preprocessing from
``AutoImageProcessor.from_pretrained``, so inputs match the checkpoint's own
reference code exactly.

Pooling over ``last_hidden_state``:

* ``cls``: token 0 (what microsoft/rad-dino and owkin/phikon document);
* ``mean``: mean of the patch tokens, skipping CLS, DeiT's distillation token
  and DINOv2 register tokens (``config.num_register_tokens``); for models
  without prefix tokens (Swin) it is the mean of all tokens;
* ``pooler``: ``pooler_output``.

Options (``encoder.options``):

* ``image_size`` (int): model input side. Scales the resize and sets the
  crop; ViT-style models interpolate position embeddings.
* ``processor_kwargs`` / ``model_kwargs`` (dict): passed to the
  ``from_pretrained`` calls.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

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

__all__ = ["HFImageEncoder", "HFImagePreprocessor", "build_hf_image"]

_OPTIONS = ("image_size", "processor_kwargs", "model_kwargs")


class HFImagePreprocessor(Preprocessor):
    """The checkpoint's ``AutoImageProcessor``, without the model.

    Args:
        spec: Spec with ``family="hf_image"``.
        local_dir: Checkpoint directory (from ``resolve_checkpoint``).

    Raises:
        ConfigError: Unknown option or no processor config in the checkpoint.
    """

    def __init__(self, spec: EncoderSpec, local_dir: str) -> None:
        super().__init__(spec)
        from transformers import AutoImageProcessor

        opts = _options(spec.options)
        kwargs = dict(opts.get("processor_kwargs") or {})
        try:
            processor = AutoImageProcessor.from_pretrained(local_dir, **kwargs)
            if opts.get("image_size"):
                resize = _resize_kwargs(processor, opts["image_size"])
                processor = AutoImageProcessor.from_pretrained(local_dir, **{**resize, **kwargs})
        except (OSError, ValueError) as err:
            raise ConfigError(
                "encoder.checkpoint",
                f"{spec.checkpoint} has no usable image processor (preprocessor_config.json, "
                f"{type(err).__name__}); save it with the model: processor.save_pretrained(dir)",
            ) from err
        self._processor = processor
        self.preprocessing_hash = preprocessing_digest(processor.to_dict(), spec.pooling)
        self._probe_shape()

    def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Run the checkpoint's ``AutoImageProcessor``; see :meth:`Preprocessor.preprocess`."""
        arrays = self._check_images(images)
        if not arrays:
            return np.zeros((0, *self.input_shape), dtype=np.float32)
        out = self._processor(images=arrays, return_tensors="pt", input_data_format="channels_last")
        return out["pixel_values"].numpy().astype(np.float32, copy=False)


class HFImageEncoder(Encoder):
    """A transformers vision model plus its :class:`HFImagePreprocessor`.

    Args:
        spec: Spec with ``family="hf_image"``.
        local_dir: Checkpoint directory (from ``resolve_checkpoint``).
        device: torch device string.

    Raises:
        ConfigError: Unknown option, no processor config in the checkpoint,
            or a pooling the model cannot do.
    """

    def __init__(self, spec: EncoderSpec, local_dir: str, device: str = "cpu") -> None:
        super().__init__(spec, device=device, preprocessor=HFImagePreprocessor(spec, local_dir))
        import torch
        from transformers import AutoModel

        opts = spec.options
        kwargs = {dtype_kwarg(): torch.float32, **dict(opts.get("model_kwargs") or {})}
        with quiet_loading():  # float32 weights; half precision comes from autocast
            model = AutoModel.from_pretrained(local_dir, **kwargs)
        self._model = model.to(device).eval()
        self._forward_kwargs: dict[str, Any] = {}
        if opts.get("image_size") and "interpolate_pos_encoding" in inspect.signature(model.forward).parameters:
            self._forward_kwargs["interpolate_pos_encoding"] = True
        self._has_cls, self._num_prefix = _prefix_tokens(model)
        if spec.pooling == "cls" and not self._has_cls:
            raise ConfigError(
                "encoder.pooling",
                f"{type(model).__name__} has no CLS token; use pooling 'mean' or 'pooler'",
            )
        self._probe()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._model(pixel_values=x, **self._forward_kwargs)
        pooling = self.spec.pooling
        if pooling == "pooler":
            pooled = getattr(out, "pooler_output", None)
            if pooled is None:
                raise ConfigError(
                    "encoder.pooling",
                    f"{type(self._model).__name__} returns no pooler_output; use 'cls' or 'mean'",
                )
            return pooled.flatten(1)  # ResNet-style poolers are (N, C, 1, 1)
        hidden = out.last_hidden_state
        if hidden.ndim == 4:  # convolutional feature map (N, C, H, W)
            if pooling == "mean":
                return hidden.mean(dim=(2, 3))
            raise ConfigError(
                "encoder.pooling",
                f"{type(self._model).__name__} outputs a feature map; use 'mean' or 'pooler'",
            )
        if pooling == "cls":
            return hidden[:, 0]
        return hidden[:, self._num_prefix :].mean(dim=1)


def _build_preprocessor(spec: EncoderSpec, local_dir: str) -> Preprocessor:
    return HFImagePreprocessor(spec, local_dir)


@register_family("hf_image", preprocessor=_build_preprocessor)
def build_hf_image(spec: EncoderSpec, local_dir: str, device: str) -> Encoder:
    """Builder of family ``hf_image`` (see :class:`HFImageEncoder`)."""
    return HFImageEncoder(spec, local_dir, device)


def _options(options: dict) -> dict:
    """Check ``encoder.options`` keys for this family."""
    for key in options:
        if key not in _OPTIONS:
            raise ConfigError(f"encoder.options.{key}", f"not an hf_image option; valid: {list(_OPTIONS)}")
    size = options.get("image_size")
    if size is not None and (not isinstance(size, int) or size <= 0):
        raise ConfigError("encoder.options.image_size", f"expected a positive int, got {size!r}")
    return options


def _prefix_tokens(model: Any) -> tuple[bool, int]:
    """Return (has a CLS token, number of non-patch tokens in front)."""
    embeddings = getattr(model, "embeddings", None)
    has_cls = getattr(embeddings, "cls_token", None) is not None
    count = int(has_cls) + int(getattr(embeddings, "distillation_token", None) is not None)
    count += int(getattr(model.config, "num_register_tokens", 0) or 0)
    return has_cls, count


def _resize_kwargs(processor: Any, side: int) -> dict[str, Any]:
    """Processor overrides giving ``side`` x ``side`` inputs, keeping the crop ratio."""
    size = dict(getattr(processor, "size", None) or {})
    crop = getattr(processor, "crop_size", None)
    if getattr(processor, "do_center_crop", False) and crop:
        scale = side / crop["height"]
        if "shortest_edge" in size:
            resized = {"shortest_edge": round(size["shortest_edge"] * scale)}
        else:
            resized = {k: round(v * scale) for k, v in size.items()}
        return {"size": resized, "crop_size": {"height": side, "width": side}}
    return {"size": {"height": side, "width": side}}


def dtype_kwarg() -> str:
    """``from_pretrained``'s dtype argument: ``dtype`` since 4.56, ``torch_dtype`` before."""
    import transformers

    major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide transformers' weight-loading progress bars (noise in actor logs)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
