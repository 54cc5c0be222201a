"""Family ``torchvision_video``: torchvision's 3D video backbones as volume encoders.

A CT/MR series assembled into a volume (``series.mode=volume``) is a clip:
its windows are the channels (CT Foundation's lung/mediastinum/bone as RGB)
and its slices the frames, so the model input is ``(N, C, D, H, W)``. The
classifier is replaced by the identity, so the embedding is the backbone's
pooled feature (512 for the ResNet-3D family).

The checkpoint directory holds ``config.json``::

    {"architecture": "r3d_18", "input_size": [16, 112, 112] or null,
     "mean": [0.43216, 0.394666, 0.37645], "std": [0.22803, 0.22145, 0.216989]}

and ``model.safetensors``, the torchvision model's ``state_dict`` (the
classifier's weights may be there or not). :func:`build_video_checkpoint`
writes one with random weights (tests, offline demos); the
``r3d_18_kinetics`` preset (``torchvision://r3d_18/KINETICS400_V1``) has
torchvision download the Kinetics-400 weights once, which needs network
access. A directory of your own (local or ``s3://``) works the same way.

Options (``encoder.options``):

* ``input_size`` (``[D, H, W]``): resize every volume to this size
  (trilinear); default: the checkpoint's, ``null`` keeps the volume's size
  (the ResNet-3D family pools adaptively; MViT and Swin3D need a fixed size).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medray.encoders.checkpoint import UNTRAINED_MARKER, node_lock, register_scheme
from medray.encoders.registry import Encoder, Preprocessor, preprocessing_digest, register_family
from medray.encoders.spec import EncoderSpec
from medray.platform.errors import ConfigError, PreprocessError

if TYPE_CHECKING:
    import torch

__all__ = ["VIDEO_ARCHS", "VolumePreprocessor", "VideoEncoder", "build_video_checkpoint", "build_torchvision_video"]

#: torchvision.models.video builders this family loads; the value is the classifier attribute.
VIDEO_ARCHS = {
    "r3d_18": "fc",
    "mc3_18": "fc",
    "r2plus1d_18": "fc",
    "s3d": "classifier",
    "mvit_v1_b": "head",
    "mvit_v2_s": "head",
    "swin3d_t": "head",
    "swin3d_s": "head",
    "swin3d_b": "head",
}
_KINETICS_MEAN = [0.43216, 0.394666, 0.37645]
_KINETICS_STD = [0.22803, 0.22145, 0.216989]
_OPTIONS = ("input_size",)


def _read_config(spec: EncoderSpec, local_dir: str) -> dict[str, Any]:
    try:
        config = json.loads((Path(local_dir) / "config.json").read_text())
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict) or config.get("architecture") not in VIDEO_ARCHS:
        raise ConfigError(
            "encoder.checkpoint",
            f"{spec.checkpoint} is not a torchvision_video checkpoint: expected "
            f"config.json with 'architecture' one of {sorted(VIDEO_ARCHS)} and model.safetensors "
            "(medray.encoders.video.build_video_checkpoint writes one)",
        )
    for key in spec.options:
        if key not in _OPTIONS:
            raise ConfigError(f"encoder.options.{key}", f"not a torchvision_video option; valid: {list(_OPTIONS)}")
    size = spec.options.get("input_size", config.get("input_size"))
    if size is not None:
        try:
            size = [int(v) for v in size]
        except (TypeError, ValueError):
            size = []
        if len(size) != 3 or min(size) < 1:
            raise ConfigError("encoder.options.input_size", "expected [D, H, W] of positive ints, or null")
    config["input_size"] = size
    config.setdefault("mean", _KINETICS_MEAN)
    config.setdefault("std", _KINETICS_STD)
    return config


class VolumePreprocessor(Preprocessor):
    """Windows-as-channels volume ``(C, D, H, W)`` in ``[0, 1]`` -> normalised model input.

    Args:
        spec: Spec with ``family="torchvision_video"``.
        local_dir: Checkpoint directory.
    """

    def __init__(self, spec: EncoderSpec, local_dir: str) -> None:
        super().__init__(spec)
        config = _read_config(spec, local_dir)
        self.architecture = config["architecture"]
        self.size = config["input_size"]
        self.mean = np.asarray(config["mean"], dtype=np.float32)
        self.std = np.asarray(config["std"], dtype=np.float32)
        self.channels = len(self.mean)
        self.preprocessing_hash = preprocessing_digest(
            {
                "architecture": self.architecture,
                "input_size": self.size,
                "mean": config["mean"],
                "std": config["std"],
                "layout": "NCDHW",
                "resize": "trilinear",
            },
            spec.pooling,
        )
        self._probe_shape()

    def _probe_shape(self) -> None:
        out = self.preprocess_volume(np.zeros((self.channels, 8, 32, 32), np.float32))
        self.input_shape = tuple(int(v) for v in out.shape[1:])

    def preprocess_volume(self, volume: np.ndarray) -> np.ndarray:
        """``(C, D, H, W)`` in ``[0, 1]`` -> float32 ``(1, C, D', H', W')`` (resized, normalised).

        One channel is repeated to the model's channel count.

        Raises:
            PreprocessError: not 4-D, or a channel count the model cannot take.
        """
        import torch
        import torch.nn.functional as F

        vol = np.asarray(volume, dtype=np.float32)
        if vol.ndim != 4:
            raise PreprocessError(f"expected a volume (C, D, H, W), got shape {vol.shape}")
        if vol.shape[0] == 1 and self.channels != 1:
            vol = np.repeat(vol, self.channels, axis=0)
        if vol.shape[0] != self.channels:
            raise PreprocessError(
                f"{self.architecture} takes {self.channels} channels, the volume has "
                f"{vol.shape[0]}; configure {self.channels} series.windows (or one)"
            )
        x = torch.from_numpy(np.ascontiguousarray(vol))[None]
        if self.size is not None and tuple(x.shape[2:]) != tuple(self.size):
            x = F.interpolate(x, size=tuple(self.size), mode="trilinear", align_corners=False)
        x = (x - torch.from_numpy(self.mean)[:, None, None, None]) / torch.from_numpy(self.std)[:, None, None, None]
        return x.numpy().astype(np.float32, copy=False)

    def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Treat uint8 RGB images ``(H, W, 3)`` as the slices of one volume -> ``(1, 3, D, H, W)``."""
        arrays = self._check_images(images)
        if not arrays:
            return np.zeros((0, *self.input_shape), dtype=np.float32)
        if len({a.shape for a in arrays}) > 1:
            raise PreprocessError("the slices of one volume must share one size")
        vol = np.stack(arrays).astype(np.float32).transpose(3, 0, 1, 2) / 255.0
        return self.preprocess_volume(vol)


class VideoEncoder(Encoder):
    """A torchvision video backbone (classifier removed) plus its :class:`VolumePreprocessor`."""

    preprocessor: VolumePreprocessor  # always set by __init__

    def __init__(self, spec: EncoderSpec, local_dir: str, device: str = "cpu") -> None:
        import torch
        import torchvision.models.video as tvv
        from safetensors.torch import load_file

        pre = VolumePreprocessor(spec, local_dir)
        super().__init__(spec, device=device, preprocessor=pre)
        model = getattr(tvv, pre.architecture)(weights=None)
        weights = Path(local_dir) / "model.safetensors"
        if not weights.is_file():
            raise ConfigError("encoder.checkpoint", f"{spec.checkpoint} has no model.safetensors")
        state = load_file(str(weights))
        head = VIDEO_ARCHS[pre.architecture]
        missing, unexpected = model.load_state_dict(state, strict=False)
        bad = [k for k in (*missing, *unexpected) if not k.startswith(head + ".")]
        if bad:
            raise ConfigError(
                "encoder.checkpoint",
                f"{spec.checkpoint} does not match {pre.architecture}: {len(bad)} mismatched tensors (e.g. {bad[0]})",
            )
        setattr(model, head, torch.nn.Identity())
        self._model = model.to(device).eval()
        self._probe()

    def _probe(self) -> None:
        pixels = self.preprocessor.preprocess_volume(np.zeros((self.preprocessor.channels, 8, 32, 32), np.float32))
        self.input_shape = tuple(int(v) for v in pixels.shape[1:])
        self.dim = int(self.embed(pixels).shape[1])

    input_ndims = (5,)
    input_desc = "volumes (N, C, D, H, W)"

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._model(x)
        if out.ndim > 2:  # s3d: the classifier was a 1x1x1 conv before its spatio-temporal mean
            out = out.flatten(2).mean(dim=2)
        return out


def _build_preprocessor(spec: EncoderSpec, local_dir: str) -> Preprocessor:
    return VolumePreprocessor(spec, local_dir)


@register_family("torchvision_video", preprocessor=_build_preprocessor, modality="volume")
def build_torchvision_video(spec: EncoderSpec, local_dir: str, device: str) -> Encoder:
    """Builder of family ``torchvision_video`` (see :class:`VideoEncoder`)."""
    return VideoEncoder(spec, local_dir, device)


def build_video_checkpoint(
    out_dir: str,
    *,
    arch: str = "r3d_18",
    weights: str | None = None,
    input_size: Sequence[int] | None = None,
    seed: int = 0,
) -> str:
    """Write a ``torchvision_video`` checkpoint directory and return its path.

    Args:
        out_dir: directory to write.
        arch: a key of :data:`VIDEO_ARCHS`.
        weights: a torchvision weights name (e.g. ``KINETICS400_V1``; downloads,
            needs network access); ``None`` writes random weights and marks the
            checkpoint untrained.
        input_size: ``[D, H, W]`` to resize volumes to, or ``None``.
        seed: torch seed for random weights.
    """
    import torch
    import torchvision.models.video as tvv
    from safetensors.torch import save_file

    if arch not in VIDEO_ARCHS:
        raise ConfigError(
            "encoder.checkpoint", f"unknown torchvision video architecture {arch!r}; known: {sorted(VIDEO_ARCHS)}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mean, std = _KINETICS_MEAN, _KINETICS_STD
    if weights:
        from torchvision.models import get_model_weights

        enum = get_model_weights(arch)[weights]
        model = getattr(tvv, arch)(weights=enum)
        tf = enum.transforms()
        mean, std = [float(v) for v in tf.mean], [float(v) for v in tf.std]
    else:
        torch.manual_seed(seed)
        model = getattr(tvv, arch)(weights=None)
        (out / UNTRAINED_MARKER).write_text(
            "Random weights written by medray.encoders.video; embeddings are meaningless.\n"
        )
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(
        json.dumps(
            {
                "architecture": arch,
                "weights": weights,
                "input_size": list(input_size) if input_size else None,
                "mean": mean,
                "std": std,
            },
            indent=1,
        )
    )
    return str(out)


#: torchvision video weights (``torchvision://r3d_18/KINETICS400_V1``), saved once in the cache.
TORCHVISION_SCHEME = "torchvision://"


def _torchvision(uri: str, root: Path) -> str:
    """Download (once per node) torchvision video weights and save them as a ``torchvision_video`` checkpoint."""
    arch, _, weights = uri[len(TORCHVISION_SCHEME) :].strip("/").partition("/")
    if arch not in VIDEO_ARCHS or not weights:
        raise ConfigError(
            "encoder.checkpoint",
            f"expected torchvision://<arch>/<weights> with arch one of "
            f"{sorted(VIDEO_ARCHS)}, e.g. torchvision://r3d_18/KINETICS400_V1",
        )
    target = root / "torchvision" / f"{arch}-{weights}"
    with node_lock(root / "torchvision" / f".{arch}-{weights}.lock"):
        if not (target / "model.safetensors").is_file():
            tmp = Path(tempfile.mkdtemp(prefix=".tv-", dir=str(target.parent)))
            try:
                build_video_checkpoint(str(tmp), arch=arch, weights=weights)
            except ConfigError:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            except Exception as err:  # noqa: BLE001 - no network, unknown weights name
                shutil.rmtree(tmp, ignore_errors=True)
                raise ConfigError(
                    "encoder.checkpoint",
                    f"cannot fetch torchvision weights {arch}/{weights} "
                    f"({type(err).__name__}); this needs network access, or copy a checkpoint "
                    "directory to a bucket and set encoder.checkpoint=s3://...",
                ) from None
            os.replace(tmp, target)
    return str(target)


register_scheme(TORCHVISION_SCHEME, _torchvision)
