"""Family ``hf_text``: transformers text encoders (BERT-style: BiomedBERT, ClinicalBERT).

The checkpoint directory is what ``save_pretrained`` writes for the model and
its tokenizer. A document is tokenized once without special tokens and cut
into chunks of the model's maximum length (minus the special tokens) that
overlap by ``overlap`` tokens; each chunk is the tokenizer's own encoding of
those tokens (``tokenizer(text, truncation=True, max_length=L, stride=overlap,
return_overflowing_tokens=True, padding="max_length")``), so a chunk's
embedding equals what the model's reference code gives for it.

Pooling over ``last_hidden_state``:

* ``cls`` (default): token 0;
* ``mean``: mean over the attention mask;
* ``pooler``: ``pooler_output``.

Options (``encoder.options``): ``max_length`` (int, at most the model's
position limit), ``tokenizer_kwargs`` / ``model_kwargs`` (dict).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from medray.encoders.hf import dtype_kwarg, quiet_loading
from medray.encoders.registry import (
    Encoder,
    Preprocessor,
    preprocessing_digest,
    register_family,
)
from medray.encoders.spec import EncoderSpec
from medray.platform.errors import ConfigError, EncodeError, PreprocessError

if TYPE_CHECKING:
    import torch

__all__ = ["HFTextEncoder", "HFTextPreprocessor", "TextChunks", "build_hf_text"]

_OPTIONS = ("max_length", "tokenizer_kwargs", "model_kwargs")


@dataclass
class TextChunks:
    """A document as model input.

    Args:
        inputs: int64 ``(N, 2, L)``: input ids and attention mask per chunk.
        token_start: first document token (no special tokens) of each chunk.
        token_end: one past the last document token of each chunk.
        n_tokens: tokens in the whole document.
    """

    inputs: np.ndarray
    token_start: list[int]
    token_end: list[int]
    n_tokens: int


class HFTextPreprocessor(Preprocessor):
    """The checkpoint's tokenizer plus overlap chunking, without the model.

    Attributes:
        max_length: tokens per chunk, special tokens included.

    Raises:
        ConfigError: Unknown option, no tokenizer, or a bad ``max_length``.
    """

    def __init__(self, spec: EncoderSpec, local_dir: str) -> None:
        super().__init__(spec)
        from transformers import AutoConfig, AutoTokenizer

        for key in spec.options:
            if key not in _OPTIONS:
                raise ConfigError(f"encoder.options.{key}", f"not an hf_text option; valid: {list(_OPTIONS)}")
        try:
            tok = AutoTokenizer.from_pretrained(local_dir, **dict(spec.options.get("tokenizer_kwargs") or {}))
            config = AutoConfig.from_pretrained(local_dir)
        except (OSError, ValueError) as err:
            raise ConfigError(
                "encoder.checkpoint",
                f"{spec.checkpoint} has no usable tokenizer ({type(err).__name__}); save it with the model",
            ) from err
        if not getattr(tok, "is_fast", False):
            raise ConfigError("encoder.checkpoint", "hf_text needs a fast (Rust) tokenizer: tokenizer.json")
        limit = min(
            int(getattr(config, "max_position_embeddings", 512) or 512),
            int(tok.model_max_length) if tok.model_max_length < 1_000_000 else 1 << 30,
        )
        max_length = spec.options.get("max_length") or limit
        if not isinstance(max_length, int) or not 8 <= max_length <= limit:
            raise ConfigError("encoder.options.max_length", f"expected an int in [8, {limit}], got {max_length!r}")
        self._tok = tok
        self.max_length = max_length
        self.special_tokens = int(tok.num_special_tokens_to_add(pair=False))
        self.preprocessing_hash = preprocessing_digest(
            {
                "tokenizer": tok.init_kwargs,
                "vocab_size": len(tok),
                "max_length": max_length,
                "class": type(tok).__name__,
            },
            spec.pooling,
        )
        self.input_shape = (2, max_length)

    def chunk_text(self, text: str, overlap: int = 0) -> TextChunks:
        """Tokenize ``text`` into overlapping chunks of :attr:`max_length`.

        Args:
            text: the document.
            overlap: tokens shared by consecutive chunks (``text.overlap_tokens``).

        Raises:
            PreprocessError: ``overlap`` leaves no room for new tokens.
        """
        room = self.max_length - self.special_tokens
        if not 0 <= overlap < room:
            raise PreprocessError(
                f"text.overlap_tokens must be in [0, {room - 1}] for max length {self.max_length}, got {overlap}"
            )
        enc = self._tok(
            text,
            truncation=True,
            max_length=self.max_length,
            stride=overlap,
            return_overflowing_tokens=True,
            padding="max_length",
            return_attention_mask=True,
            return_special_tokens_mask=True,
        )
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        mask = np.asarray(enc["attention_mask"], dtype=np.int64)
        special = np.asarray(enc["special_tokens_mask"], dtype=np.int64)
        content = ((mask == 1) & (special == 0)).sum(axis=1)
        step = room - overlap
        starts = [k * step for k in range(len(ids))]
        ends = [s + int(c) for s, c in zip(starts, content)]
        # the last chunk ends where the document does: no second tokenization just to count tokens
        n_tokens = ends[-1] if ends else 0
        return TextChunks(np.stack([ids, mask], axis=1), starts, ends, n_tokens)

    def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
        raise PreprocessError("hf_text encoders take text, not images")


class HFTextEncoder(Encoder):
    """A transformers text model plus its :class:`HFTextPreprocessor`."""

    preprocessor: HFTextPreprocessor  # always set by __init__

    def __init__(self, spec: EncoderSpec, local_dir: str, device: str = "cpu") -> None:
        pre = HFTextPreprocessor(spec, local_dir)
        super().__init__(spec, device=device, preprocessor=pre)
        import torch
        from transformers import AutoModel

        kwargs = {dtype_kwarg(): torch.float32, **dict(spec.options.get("model_kwargs") or {})}
        with quiet_loading():
            model = AutoModel.from_pretrained(local_dir, **kwargs)
        self._model = model.to(device).eval()
        self.max_length = pre.max_length
        self.dim = int(self.embed(pre.chunk_text("probe").inputs).shape[1])

    def chunk_text(self, text: str, overlap: int = 0) -> TextChunks:
        """See :meth:`HFTextPreprocessor.chunk_text`."""
        return self.preprocessor.chunk_text(text, overlap)

    input_dtype = np.int64
    input_ndims = (3,)
    input_desc = "token ids and mask (N, 2, L)"

    def _check_input(self, batch: np.ndarray) -> None:
        super()._check_input(batch)
        if batch.shape[1] != 2:
            raise EncodeError(f"expected {self.input_desc}, got shape {batch.shape}")

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask = x[:, 0], x[:, 1]
        out = self._model(input_ids=ids, attention_mask=mask)
        if self.spec.pooling == "pooler":
            if getattr(out, "pooler_output", None) is None:
                raise ConfigError("encoder.pooling", f"{type(self._model).__name__} has no pooler; use cls or mean")
            return out.pooler_output
        hidden = out.last_hidden_state
        if self.spec.pooling == "cls":
            return hidden[:, 0]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def _build_preprocessor(spec: EncoderSpec, local_dir: str) -> Preprocessor:
    return HFTextPreprocessor(spec, local_dir)


@register_family("hf_text", preprocessor=_build_preprocessor, modality="text")
def build_hf_text(spec: EncoderSpec, local_dir: str, device: str) -> Encoder:
    """Builder of family ``hf_text`` (see :class:`HFTextEncoder`)."""
    return HFTextEncoder(spec, local_dir, device)
