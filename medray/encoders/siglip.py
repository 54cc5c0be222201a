"""Family ``siglip``: transformers ``SiglipModel`` image-text checkpoints (MedSigLIP, SigLIP).

The checkpoint directory is what ``save_pretrained`` writes for the model and
its processor (``SiglipProcessor``: image processor plus tokenizer). Images go
through the checkpoint's image processor and ``get_image_features``; text
through its tokenizer with ``padding="max_length"`` (SigLIP was trained on
fixed-length, padded text) and ``get_text_features``, so both equal what the
model's reference code gives::

    inputs = processor(text=texts, images=images, padding="max_length", return_tensors="pt")
    model.get_image_features(pixel_values=inputs["pixel_values"])
    model.get_text_features(input_ids=inputs["input_ids"])

Scores are SigLIP's: ``sigmoid(cos * exp(logit_scale) + logit_bias)`` per
class (:mod:`medray.platform.zeroshot`).

Options (``encoder.options``): ``max_length`` (text tokens; default the
tokenizer's ``model_max_length``, else the text tower's positions),
``processor_kwargs`` / ``model_kwargs`` (dict, passed to ``from_pretrained``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from medray.encoders.hf import dtype_kwarg, quiet_loading
from medray.encoders.image_text import ImageTextEncoder, ImageTextPreprocessor
from medray.encoders.registry import Encoder, Preprocessor, preprocessing_digest, register_family
from medray.encoders.spec import EncoderSpec
from medray.platform.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["SiglipEncoder", "SiglipPreprocessor", "build_siglip"]

_OPTIONS = ("max_length", "processor_kwargs", "model_kwargs")


class SiglipPreprocessor(ImageTextPreprocessor):
    """The checkpoint's ``AutoProcessor`` (image processor and tokenizer), without the model.

    Raises:
        ConfigError: Unknown option, no processor or tokenizer in the checkpoint, or a bad ``max_length``.
    """

    def __init__(self, spec: EncoderSpec, local_dir: str) -> None:
        super().__init__(spec)
        from transformers import AutoConfig, AutoProcessor

        for key in spec.options:
            if key not in _OPTIONS:
                raise ConfigError(f"encoder.options.{key}", f"not a siglip option; valid: {list(_OPTIONS)}")
        try:
            processor = AutoProcessor.from_pretrained(local_dir, **dict(spec.options.get("processor_kwargs") or {}))
            config = AutoConfig.from_pretrained(local_dir)
        except (OSError, ValueError) as err:
            raise ConfigError(
                "encoder.checkpoint",
                f"{spec.checkpoint} has no usable SigLIP processor ({type(err).__name__}); save the processor "
                "(image processor and tokenizer) with the model: processor.save_pretrained(dir)",
            ) from err
        tok = getattr(processor, "tokenizer", None)
        images = getattr(processor, "image_processor", None)
        if tok is None or images is None:
            raise ConfigError("encoder.checkpoint", f"{spec.checkpoint}: the processor lacks a tokenizer or images")
        positions = int(getattr(getattr(config, "text_config", None), "max_position_embeddings", 64) or 64)
        limit = min(positions, int(tok.model_max_length) if tok.model_max_length < 1_000_000 else positions)
        max_length = spec.options.get("max_length") or limit
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length <= positions:
            raise ConfigError("encoder.options.max_length", f"expected an int in [1, {positions}], got {max_length!r}")
        self._images = images
        self._tok = tok
        self.max_length = max_length
        self.special_tokens = int(tok.num_special_tokens_to_add(pair=False))
        self._mask = "attention_mask" in (getattr(tok, "model_input_names", None) or [])
        self.preprocessing_hash = preprocessing_digest(
            {
                "image_processor": images.to_dict(),
                "tokenizer": tok.init_kwargs,
                "vocab_size": len(tok),
                "max_length": max_length,
                "class": type(tok).__name__,
            },
            spec.pooling,
        )
        self._probe_shape()

    def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Run the checkpoint's image processor; see :meth:`Preprocessor.preprocess`."""
        arrays = self._check_images(images)
        if not arrays:
            return np.zeros((0, *self.input_shape), dtype=np.float32)
        out = self._images(images=arrays, return_tensors="pt", input_data_format="channels_last")
        return out["pixel_values"].numpy().astype(np.float32, copy=False)

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """See :meth:`ImageTextPreprocessor.tokenize` (``padding="max_length"``, truncated to ``max_length``)."""
        enc = self._tok(
            list(texts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="np"
        )
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        mask = np.asarray(enc["attention_mask"], dtype=np.int64) if "attention_mask" in enc else np.ones_like(ids)
        return np.stack([ids, mask], axis=1)

    def count_tokens(self, text: str) -> int:
        """See :meth:`ImageTextPreprocessor.count_tokens`."""
        return len(self._tok(text, add_special_tokens=False, verbose=False)["input_ids"])

    @property
    def uses_mask(self) -> bool:
        """Whether the tokenizer hands the model an attention mask (SigLIP's own does not)."""
        return self._mask


class SiglipEncoder(ImageTextEncoder):
    """A transformers ``SiglipModel`` plus its :class:`SiglipPreprocessor`."""

    preprocessor: SiglipPreprocessor
    score = "sigmoid"

    def __init__(self, spec: EncoderSpec, local_dir: str, device: str = "cpu") -> None:
        super().__init__(spec, device=device, preprocessor=SiglipPreprocessor(spec, local_dir))
        import torch
        from transformers import AutoModel

        kwargs = {dtype_kwarg(): torch.float32, **dict(spec.options.get("model_kwargs") or {})}
        with quiet_loading():
            model = AutoModel.from_pretrained(local_dir, **kwargs)
        if not hasattr(model, "get_text_features") or getattr(model, "logit_bias", None) is None:
            raise ConfigError(
                "encoder.family",
                f"{spec.checkpoint} is a {type(model).__name__}, not a SigLIP image-text model; "
                "pick the family of its architecture (open_clip, hf_image...)",
            )
        self._model = model.to(device).eval()
        self.logit_scale = math.exp(float(model.logit_scale.detach().reshape(-1)[0]))
        self.logit_bias = float(model.logit_bias.detach().reshape(-1)[0])
        self._probe()

    def _image_forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return _features(self._model.get_image_features(pixel_values=pixels))

    def _text_forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = {"input_ids": ids}
        if self.preprocessor.uses_mask:
            kwargs["attention_mask"] = mask
        return _features(self._model.get_text_features(**kwargs))


def _features(out: Any) -> torch.Tensor:
    """The projected features: a tensor (transformers 4) or the output's ``pooler_output`` (transformers 5)."""
    pooled = getattr(out, "pooler_output", None)
    return out if pooled is None else pooled


def _build_preprocessor(spec: EncoderSpec, local_dir: str) -> Preprocessor:
    return SiglipPreprocessor(spec, local_dir)


@register_family("siglip", preprocessor=_build_preprocessor, modality="image", also=("text",))
def build_siglip(spec: EncoderSpec, local_dir: str, device: str) -> Encoder:
    """Builder of family ``siglip`` (see :class:`SiglipEncoder`)."""
    return SiglipEncoder(spec, local_dir, device)
