"""Family ``hf_audio``: transformers speech/audio encoders (wav2vec2, HuBERT, AST).

The checkpoint directory is what ``save_pretrained`` writes: ``config.json``,
weights and ``preprocessor_config.json`` (the feature extractor). The model
comes from ``AutoModel.from_pretrained`` and features from
``AutoFeatureExtractor.from_pretrained``, so each window gets exactly the
checkpoint's own preprocessing (wav2vec2 normalisation, AST filter banks).

Pooling over ``last_hidden_state`` of one window:

* ``mean`` (default): mean over time frames;
* ``cls``: token 0 (AST);
* ``pooler``: ``pooler_output`` (AST's mean of CLS and distillation tokens).

Options (``encoder.options``): ``feature_extractor_kwargs`` /
``model_kwargs`` (dict), passed to the ``from_pretrained`` calls.
"""

from __future__ import annotations

from collections.abc import Sequence
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
from medray.platform.errors import ConfigError, PreprocessError

if TYPE_CHECKING:
    import torch

__all__ = ["HFAudioEncoder", "HFAudioPreprocessor", "build_hf_audio"]

_OPTIONS = ("feature_extractor_kwargs", "model_kwargs")


class HFAudioPreprocessor(Preprocessor):
    """The checkpoint's ``AutoFeatureExtractor``, without the model.

    Attributes:
        sampling_rate: the rate (Hz) the extractor expects; recordings are
            resampled to it before windowing.

    Raises:
        ConfigError: Unknown option or no feature extractor in the checkpoint.
    """

    def __init__(self, spec: EncoderSpec, local_dir: str) -> None:
        super().__init__(spec)
        from transformers import AutoFeatureExtractor

        for key in spec.options:
            if key not in _OPTIONS:
                raise ConfigError(f"encoder.options.{key}", f"not an hf_audio option; valid: {list(_OPTIONS)}")
        try:
            fe = AutoFeatureExtractor.from_pretrained(
                local_dir, **dict(spec.options.get("feature_extractor_kwargs") or {})
            )
        except (OSError, ValueError) as err:
            raise ConfigError(
                "encoder.checkpoint",
                f"{spec.checkpoint} has no usable feature extractor "
                f"(preprocessor_config.json, {type(err).__name__}); save it with the model",
            ) from err
        self._fe = fe
        self.sampling_rate = int(getattr(fe, "sampling_rate", 16000))
        self.preprocessing_hash = preprocessing_digest(fe.to_dict(), spec.pooling)
        self.input_shape = tuple(self.preprocess_audio([np.zeros(self.sampling_rate, np.float32)]).shape[1:])

    def preprocess_audio(self, windows: Sequence[np.ndarray]) -> np.ndarray:
        """Run the feature extractor on equal-length float32 windows.

        Args:
            windows: 1-D float32 arrays at :attr:`sampling_rate`, all the same length.

        Returns:
            float32 model input, first axis = windows (``(N, samples)`` for
            wav2vec2/HuBERT, ``(N, frames, mel)`` for AST).
        """
        if not windows:
            return np.zeros((0, *self.input_shape), dtype=np.float32)
        lengths = {len(w) for w in windows}
        if len(lengths) != 1:
            raise PreprocessError(f"windows must have one length, got {sorted(lengths)}")
        out = self._fe(
            [np.asarray(w, dtype=np.float32) for w in windows], sampling_rate=self.sampling_rate, return_tensors="np"
        )
        key = "input_values" if "input_values" in out else "input_features"
        return np.ascontiguousarray(out[key], dtype=np.float32)

    def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
        raise PreprocessError("hf_audio encoders take audio windows, not images")


class HFAudioEncoder(Encoder):
    """A transformers audio model plus its :class:`HFAudioPreprocessor`."""

    preprocessor: HFAudioPreprocessor  # always set by __init__

    def __init__(self, spec: EncoderSpec, local_dir: str, device: str = "cpu") -> None:
        pre = HFAudioPreprocessor(spec, local_dir)
        super().__init__(spec, device=device, preprocessor=pre)
        import torch
        from transformers import AutoModel

        self.sampling_rate = pre.sampling_rate
        kwargs = {dtype_kwarg(): torch.float32, **dict(spec.options.get("model_kwargs") or {})}
        with quiet_loading():
            model = AutoModel.from_pretrained(local_dir, **kwargs)
        self._model = model.to(device).eval()
        self._key = "input_features" if "input_features" in model.forward.__code__.co_varnames else "input_values"
        self.dim = int(self.embed(pre.preprocess_audio([np.zeros(self.sampling_rate, np.float32)])).shape[1])

    def preprocess_audio(self, windows: Sequence[np.ndarray]) -> np.ndarray:
        """See :meth:`HFAudioPreprocessor.preprocess_audio`."""
        return self.preprocessor.preprocess_audio(windows)

    input_ndims = (2, 3)
    input_desc = "audio features (N, samples) or (N, frames, bins)"

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._model(**{self._key: x})
        if self.spec.pooling == "pooler":
            pooled = getattr(out, "pooler_output", None)
            if pooled is None:
                raise ConfigError("encoder.pooling", f"{type(self._model).__name__} has no pooler_output; use 'mean'")
            return pooled
        hidden = out.last_hidden_state
        return hidden[:, 0] if self.spec.pooling == "cls" else hidden.mean(dim=1)


def _build_preprocessor(spec: EncoderSpec, local_dir: str) -> Preprocessor:
    return HFAudioPreprocessor(spec, local_dir)


@register_family("hf_audio", preprocessor=_build_preprocessor, modality="audio")
def build_hf_audio(spec: EncoderSpec, local_dir: str, device: str) -> Encoder:
    """Builder of family ``hf_audio`` (see :class:`HFAudioEncoder`)."""
    return HFAudioEncoder(spec, local_dir, device)
