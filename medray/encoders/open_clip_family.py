"""Family ``open_clip``: open_clip_torch image-text checkpoints (BiomedCLIP, CLIP, open_clip SigLIPs).

The checkpoint directory is what open_clip's hub layout holds:
``open_clip_config.json`` (``model_cfg`` and ``preprocess_cfg``) plus the
weights (``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``)
and, for text towers with a Hugging Face tokenizer, its files. It is loaded
with open_clip's own ``create_model_and_transforms("local-dir:<dir>")`` and
``get_tokenizer("local-dir:<dir>")``, so embeddings equal the reference
code's::

    model, _, preprocess = open_clip.create_model_and_transforms("hf-hub:microsoft/BiomedCLIP-...")
    tokenizer = open_clip.get_tokenizer("hf-hub:microsoft/BiomedCLIP-...")
    model.encode_image(torch.stack([preprocess(pil) for pil in images]))
    model.encode_text(tokenizer(texts))

A checkpoint whose text tower is a Hugging Face model (BiomedCLIP's
PubMedBERT) builds that tower from its hub config: the hub (or its local
cache, ``HF_HOME``) must be reachable on first load. When the directory holds
no tokenizer files, the tokenizer named by ``text_cfg.hf_tokenizer_name`` is
used.

Scores: softmax over classes with ``exp(logit_scale)`` (CLIP), or sigmoid
with the bias for checkpoints that learnt one (open_clip SigLIPs).

Options (``encoder.options``): ``model_kwargs`` (dict, extra
``create_model_and_transforms`` arguments).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medray.encoders.image_text import ImageTextEncoder, ImageTextPreprocessor
from medray.encoders.registry import Encoder, Preprocessor, preprocessing_digest, register_family
from medray.encoders.spec import EncoderSpec
from medray.platform.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["OpenClipEncoder", "OpenClipPreprocessor", "build_open_clip", "open_clip_parts"]

_OPTIONS = ("model_kwargs",)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def open_clip_parts(spec: EncoderSpec, local_dir: str, *, load_weights: bool = True) -> tuple[Any, Any, Any]:
    """``(model, eval transform, tokenizer)`` of a checkpoint directory, built by open_clip itself.

    Args:
        spec: Spec with ``family="open_clip"``.
        local_dir: Checkpoint directory (from ``resolve_checkpoint``).
        load_weights: ``False`` builds the architecture only (for the preprocessing).

    Raises:
        ConfigError: Unknown option, or not an open_clip checkpoint.
    """
    import open_clip

    for key in spec.options:
        if key not in _OPTIONS:
            raise ConfigError(f"encoder.options.{key}", f"not an open_clip option; valid: {list(_OPTIONS)}")
    config_path = Path(local_dir) / "open_clip_config.json"
    if not config_path.is_file():
        raise ConfigError(
            "encoder.checkpoint",
            f"{spec.checkpoint} holds no open_clip_config.json: not an open_clip checkpoint "
            "(hub ids look like 'hf-hub:org/name'; save with open_clip's push_to_hf_hub layout)",
        )
    kwargs = dict(spec.options.get("model_kwargs") or {})
    name = f"local-dir:{local_dir}"
    root = logging.getLogger()
    level = root.level
    if not load_weights:  # open_clip warns on the root logger that it built random weights: here that is the point
        root.setLevel(logging.ERROR)
    try:
        # pretrained_text=False: the checkpoint's own weights replace any hub text weights anyway
        model, _, transform = open_clip.create_model_and_transforms(
            name, load_weights=load_weights, pretrained_text=False, **kwargs
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise ConfigError(
            "encoder.checkpoint", f"open_clip could not build {spec.checkpoint} ({type(err).__name__}: {err})"
        ) from err
    finally:
        root.setLevel(level)
    if any((Path(local_dir) / f).is_file() for f in _TOKENIZER_FILES):
        tokenizer = open_clip.get_tokenizer(name)
    else:  # the tokenizer lives on the hub under the name the config gives
        text_cfg = json.loads(config_path.read_text())["model_cfg"].get("text_cfg", {})
        hub = text_cfg.get("hf_tokenizer_name")
        if hub:
            from open_clip.tokenizer import HFTokenizer

            tokenizer = HFTokenizer(
                hub,
                context_length=int(text_cfg.get("context_length", 77)),
                **dict(text_cfg.get("tokenizer_kwargs") or {}),
            )
        else:
            tokenizer = open_clip.get_tokenizer(name)
    return model, transform, tokenizer


class OpenClipPreprocessor(ImageTextPreprocessor):
    """open_clip's eval transform and tokenizer of a checkpoint, without its weights.

    Args:
        spec: Spec with ``family="open_clip"``.
        local_dir: Checkpoint directory.
        parts: ``(model, transform, tokenizer)`` already built (the encoder passes its own).

    Raises:
        ConfigError: see :func:`open_clip_parts`.
    """

    def __init__(self, spec: EncoderSpec, local_dir: str, parts: tuple[Any, Any, Any] | None = None) -> None:
        super().__init__(spec)
        model, transform, tokenizer = parts or open_clip_parts(spec, local_dir, load_weights=False)
        self._transform = transform
        self._tok = tokenizer
        self.max_length = int(tokenizer.context_length)
        self.special_tokens = 2  # start and end (CLIP's BPE) or [CLS] and [SEP] (BERT vocabularies)
        self.preprocessing_hash = preprocessing_digest(
            {
                "preprocess_cfg": dict(getattr(model.visual, "preprocess_cfg", {}) or {}),
                "transform": repr(transform),
                "tokenizer": type(tokenizer).__name__,
                "tokenizer_name": str(getattr(getattr(tokenizer, "tokenizer", None), "name_or_path", "")),
                "context_length": self.max_length,
            },
            spec.pooling,
        )
        self._probe_shape()

    def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Run open_clip's eval transform on each image; see :meth:`Preprocessor.preprocess`."""
        import torch
        from PIL import Image

        arrays = self._check_images(images)
        if not arrays:
            return np.zeros((0, *self.input_shape), dtype=np.float32)
        pixels = torch.stack([self._transform(Image.fromarray(a)) for a in arrays])
        return pixels.numpy().astype(np.float32, copy=False)

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """See :meth:`ImageTextPreprocessor.tokenize`: open_clip's tokenizer; the mask marks non-padding."""
        ids = np.asarray(self._tok(list(texts)), dtype=np.int64).reshape(len(texts), -1)
        return np.stack([ids, (ids != 0).astype(np.int64)], axis=1)

    def count_tokens(self, text: str) -> int:
        """See :meth:`ImageTextPreprocessor.count_tokens`."""
        hf = getattr(self._tok, "tokenizer", None)
        if hf is not None:
            return len(hf(text, add_special_tokens=False, verbose=False)["input_ids"])
        return len(self._tok.encode(text))


class OpenClipEncoder(ImageTextEncoder):
    """An open_clip model plus its :class:`OpenClipPreprocessor`."""

    def __init__(self, spec: EncoderSpec, local_dir: str, device: str = "cpu") -> None:
        parts = open_clip_parts(spec, local_dir)
        super().__init__(spec, device=device, preprocessor=OpenClipPreprocessor(spec, local_dir, parts))
        model = parts[0]
        self._model = model.to(device).eval()
        self.logit_scale = math.exp(float(model.logit_scale.detach().reshape(-1)[0]))
        bias = getattr(model, "logit_bias", None)
        self.logit_bias = None if bias is None else float(bias.detach().reshape(-1)[0])
        self.score = "softmax" if bias is None else "sigmoid"
        self._probe()

    def _image_forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._model.encode_image(pixels)

    def _text_forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self._model.encode_text(ids)


def _build_preprocessor(spec: EncoderSpec, local_dir: str) -> Preprocessor:
    return OpenClipPreprocessor(spec, local_dir)


@register_family("open_clip", preprocessor=_build_preprocessor, modality="image", also=("text",))
def build_open_clip(spec: EncoderSpec, local_dir: str, device: str) -> Encoder:
    """Builder of family ``open_clip`` (see :class:`OpenClipEncoder`)."""
    return OpenClipEncoder(spec, local_dir, device)
