"""What image-text encoders (CLIP, SigLIP) share: two towers, one space, a logit scale.

An image-text encoder embeds images with its image tower and text with its
text tower into the same space, so a caption's embedding can be compared with
an image's. Its family registers with ``also=("text",)``: the pipeline routes
both image and text records to it, and :meth:`ImageTextEncoder.embed` tells
them apart by their input (pixels ``(N, C, H, W)`` or token ids and mask
``(N, 2, L)``).

The text tower sees one window of the checkpoint's context length, tokenized
exactly as the library's reference code does (truncation, the checkpoint's
own padding): image-text models are trained on captions and prompts, not on
long reports, so a longer document is embedded from its first tokens (its
``n_tokens`` metadata then exceeds ``token_end``).

The encoder also reports how its checkpoint turns a cosine similarity into a
logit: ``logit = cos * scale + bias``, with ``scale = exp(logit_scale)``.
CLIP-style checkpoints take a softmax over those logits; SigLIP-style ones a
sigmoid per class (:attr:`ImageTextEncoder.score`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from medray.encoders.hf_text import TextChunks
from medray.encoders.registry import Encoder, Preprocessor
from medray.platform.errors import EncodeError, PreprocessError

if TYPE_CHECKING:
    import torch

__all__ = ["SCORES", "ImageTextEncoder", "ImageTextPreprocessor"]

#: How a checkpoint's logits become scores: ``softmax`` over classes (CLIP) or ``sigmoid`` per class (SigLIP).
SCORES = ("softmax", "sigmoid")


class ImageTextPreprocessor(Preprocessor):
    """Image preprocessing plus the tokenizer of an image-text checkpoint.

    Subclasses set ``max_length`` and implement :meth:`preprocess`,
    :meth:`tokenize` and :meth:`count_tokens`.

    Attributes:
        max_length: the text tower's context length (tokens per text).
    """

    max_length: int = 0

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """Token ids and attention mask of each text, as the checkpoint's reference tokenizer makes them.

        Args:
            texts: the texts.

        Returns:
            int64 ``(N, 2, max_length)``: ids, then mask (ones where the tokenizer gives no mask).
        """
        raise NotImplementedError

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` without special tokens and without truncation."""
        raise NotImplementedError

    def chunk_text(self, text: str, overlap: int = 0) -> TextChunks:
        """One window: ``text`` tokenized and truncated to :attr:`max_length` (``overlap`` has no use here).

        Raises:
            PreprocessError: the text has no tokens at all.
        """
        inputs = self.tokenize([text])
        n_tokens = self.count_tokens(text)
        if n_tokens == 0:
            raise PreprocessError("the text has no tokens to embed")
        room = max(1, self.max_length - self.special_tokens)
        return TextChunks(inputs, [0], [min(n_tokens, room)], n_tokens)

    special_tokens: int = 0


class ImageTextEncoder(Encoder):
    """An encoder with an image tower and a text tower in one space.

    Subclasses implement :meth:`_image_forward` and :meth:`_text_forward`,
    set ``score``, ``logit_scale`` and ``logit_bias``, then call
    :meth:`_probe`.

    Attributes:
        score: ``softmax`` (CLIP) or ``sigmoid`` (SigLIP).
        logit_scale: the multiplier of a cosine similarity (``exp`` of the
            checkpoint's learnt log-scale).
        logit_bias: the learnt bias added to the logits (SigLIP), else ``None``.
    """

    preprocessor: ImageTextPreprocessor
    score: str = "softmax"
    logit_scale: float = 1.0
    logit_bias: float | None = None

    @property
    def max_length(self) -> int:
        """The text tower's context length."""
        return self.preprocessor.max_length

    def chunk_text(self, text: str, overlap: int = 0) -> TextChunks:
        """See :meth:`ImageTextPreprocessor.chunk_text`."""
        return self.preprocessor.chunk_text(text, overlap)

    def embed(self, pixel_values: np.ndarray) -> np.ndarray:
        """Embed pixels ``(N, C, H, W)`` with the image tower or token ids and mask ``(N, 2, L)`` with the text tower.

        Raises:
            EncodeError: the batch is neither.
        """
        batch = np.asarray(pixel_values)
        if batch.ndim == 3:
            if batch.shape[1] != 2:
                raise EncodeError(f"expected token ids and mask (N, 2, L), got shape {batch.shape}")
            batch = batch.astype(np.int64, copy=False)
        elif batch.ndim == 4:
            batch = batch.astype(np.float32, copy=False)
        else:
            raise EncodeError(f"expected pixel values (N, C, H, W) or token ids and mask (N, 2, L), got {batch.shape}")
        return self._run(batch)

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts with the text tower (prompts, captions).

        Returns:
            float32 ``(N, dim)``, not normalised (as the reference code returns them).
        """
        return self.embed(self.preprocessor.tokenize(list(texts)))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            return self._text_forward(x[:, 0], x[:, 1])
        return self._image_forward(x)

    def _image_forward(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _text_forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """:meth:`Encoder.describe` plus ``image_text``, ``score``, ``model_temperature`` and ``model_bias``.

        ``model_temperature`` is the multiplier of a cosine similarity
        (``exp(logit_scale)``), ``model_bias`` the learnt bias (SigLIP) or
        ``None``: ``logit = cos * model_temperature + model_bias``.
        """
        out = super().describe()
        out.update(
            image_text=True,
            score=self.score,
            model_temperature=float(self.logit_scale),
            model_bias=None if self.logit_bias is None else float(self.logit_bias),
        )
        return out
