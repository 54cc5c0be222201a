"""Tiny random checkpoints for tests and the demo, in each family's real layout.

Nothing here downloads anything. :func:`build_tiny_checkpoint` writes a small
random model and its processor config the same way real checkpoints are
written (``save_pretrained`` / ``timm.models.save_for_hf``), plus the
``MEDRAY_UNTRAINED`` marker, so anything built from it is flagged untrained.
Output bytes depend only on the arguments and library versions.

Example (not a doctest: importing transformers may print to stdout)::

    from medray.encoders import build_tiny_checkpoint, create_encoder, get_spec

    path = build_tiny_checkpoint("hf_image", "/tmp/tiny-vit", arch="vit")
    encoder = create_encoder(get_spec("hf_image", checkpoint=path))
    assert encoder.dim == 32 and encoder.spec.untrained
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medray.encoders.checkpoint import DEMO_SCHEME, UNTRAINED_MARKER, node_lock, register_scheme
from medray.encoders.spec import default_cache_dir
from medray.platform.errors import ConfigError

if TYPE_CHECKING:
    from transformers import BaseImageProcessor, PreTrainedModel

__all__ = [
    "DEMO_CHECKPOINTS",
    "AUDIO_ARCHS",
    "HF_ARCHS",
    "IMAGE_TEXT_FAMILIES",
    "TEXT_ARCHS",
    "TIMM_ARCHS",
    "build_tiny_checkpoint",
    "ensure_demo_checkpoint",
]

#: Architectures :func:`build_tiny_checkpoint` can write, per family.
HF_ARCHS = ("vit", "dinov2", "dinov2_reg")
TIMM_ARCHS = ("vit", "vit_reg")
AUDIO_ARCHS = ("wav2vec2", "hubert")
TEXT_ARCHS = ("bert",)
#: Image-text families :func:`build_tiny_checkpoint` can write (one architecture each).
IMAGE_TEXT_FAMILIES = ("siglip", "open_clip")
#: Demo checkpoints served under ``medray-demo://<name>``.
DEMO_CHECKPOINTS = ("tiny_vit", "tiny_siglip")

_HIDDEN, _LAYERS, _HEADS, _PATCH = 32, 2, 2, 8
_IMAGENET_MEAN = [0.485, 0.456, 0.406]
_IMAGENET_STD = [0.229, 0.224, 0.225]
_MARKER_TEXT = "Random weights written by medray.encoders.tiny; embeddings are meaningless.\n"


def build_tiny_checkpoint(family: str, out_dir: str, *, arch: str = "vit", image_size: int = 32, seed: int = 0) -> str:
    """Write a tiny random checkpoint (hidden 32, 2 layers, patch 8).

    Args:
        family: ``"hf_image"``, ``"timm_image"``, ``"hf_audio"``, ``"hf_text"``,
            ``"siglip"`` (a ``SiglipModel`` with a word-level fast tokenizer,
            16 tokens, SigLIP's initial scale 10 and bias -10) or
            ``"open_clip"`` (an open_clip CLIP with a WordPiece tokenizer
            in the directory, 16 tokens, CLS pooling like BiomedCLIP).
        out_dir: Directory to write (created if needed).
        arch: ``hf_image``: ``"vit"`` (ViTImageProcessor, resize only),
            ``"dinov2"``, ``"dinov2_reg"`` (4 register tokens;
            BitImageProcessor with resize + center crop, bicubic, ImageNet
            mean/std). ``timm_image``: ``"vit"``, ``"vit_reg"`` (4 register
            tokens); crop_pct 0.875. ``hf_audio``: ``"wav2vec2"``,
            ``"hubert"`` (16 kHz feature extractor, normalised input).
            ``hf_text``: ``"bert"`` (a small WordPiece vocabulary, 64
            positions).
        image_size: Model input side; a multiple of 8, at least 16.
        seed: Seed of the random weights.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: Unknown family or arch, or a bad ``image_size``.
    """
    if family in ("hf_audio", "hf_text"):
        return _build_sequence(family, out_dir, arch, seed)
    if family in IMAGE_TEXT_FAMILIES:
        return _build_image_text(family, out_dir, image_size, seed)
    if image_size < 16 or image_size % _PATCH:
        raise ValueError(f"image_size must be a multiple of {_PATCH} and >= 16, got {image_size}")
    archs = {"hf_image": HF_ARCHS, "timm_image": TIMM_ARCHS}.get(family)
    if archs is None:
        raise ValueError(f"family must be 'hf_image' or 'timm_image', got {family!r}")
    if arch not in archs:
        raise ValueError(f"arch for {family} must be one of {archs}, got {arch!r}")
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG alone
        torch.manual_seed(seed)
        if family == "hf_image":
            _write_hf(arch, out, image_size)
        else:
            _write_timm(arch, out, image_size)
    (out / UNTRAINED_MARKER).write_text(_MARKER_TEXT)
    return str(out)


def _build_sequence(family: str, out_dir: str, arch: str, seed: int) -> str:
    """Tiny audio and text checkpoints (see :func:`build_tiny_checkpoint`)."""
    archs = AUDIO_ARCHS if family == "hf_audio" else TEXT_ARCHS
    if arch == "vit":  # the image default
        arch = archs[0]
    if arch not in archs:
        raise ValueError(f"arch for {family} must be one of {archs}, got {arch!r}")
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "hf_audio":
            model, processor = _tiny_audio(arch)
        else:
            model, processor = _tiny_text(out)
        _save_quietly(model, out)
        processor.save_pretrained(out)
    (out / UNTRAINED_MARKER).write_text(_MARKER_TEXT)
    return str(out)


def _build_image_text(family: str, out_dir: str, size: int, seed: int) -> str:
    """Tiny SigLIP and open_clip checkpoints (see :func:`build_tiny_checkpoint`)."""
    if size < 16 or size % _PATCH:
        raise ValueError(f"image_size must be a multiple of {_PATCH} and >= 16, got {size}")
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "siglip":
            _write_siglip(out, size)
        else:
            _write_open_clip(out, size)
    (out / UNTRAINED_MARKER).write_text(_MARKER_TEXT)
    return str(out)


#: Words of the tiny image-text vocabularies: enough for prompts such as "a chest x-ray showing effusion".
_CAPTION_WORDS = (
    "a an the of and no with without showing shows photo image chest x-ray xray ray x radiograph scan ct "
    "finding findings effusion pneumothorax pneumonia normal abnormal cardiomegaly nodule mass fracture "
    "left right lung heart there is are disease healthy tissue tumor benign malignant class"
).split()
_CONTEXT = 16


def _write_siglip(out: Path, size: int) -> None:
    """A ``SiglipModel`` and ``SiglipProcessor`` with a word-level fast tokenizer (no sentencepiece file)."""
    import math

    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in _CAPTION_WORDS + [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789-.,"):
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    # SigLIP's tokenizer gives ids only: the model was trained on padded text without an attention mask
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=_CONTEXT,
        model_input_names=["input_ids"],
    )
    tower = dict(hidden_size=_HIDDEN, intermediate_size=2 * _HIDDEN, num_hidden_layers=_LAYERS,
                 num_attention_heads=_HEADS)  # fmt: skip
    config = SiglipConfig(
        text_config=dict(
            vocab_size=len(vocab),
            max_position_embeddings=_CONTEXT,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=1,
            **tower,
        ),
        vision_config=dict(image_size=size, patch_size=_PATCH, **tower),
    )
    model = SiglipModel(config)
    with torch.no_grad():  # SigLIP's own initial values (the paper's t' = log 10, b = -10)
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
    processor = SiglipProcessor(
        image_processor=SiglipImageProcessor(size={"height": size, "width": size}), tokenizer=tokenizer
    )
    _save_quietly(model, out)
    processor.save_pretrained(out)


def _write_open_clip(out: Path, size: int) -> None:
    """An open_clip CLIP with a WordPiece tokenizer saved beside it (the BiomedCLIP layout, in miniature).

    The text tower pools its first token ([CLS]) without a causal mask, as BiomedCLIP's BERT does: with
    CLIP's causal mask the first token would see only itself and every text would embed alike.
    """
    import json

    import open_clip
    from safetensors.torch import save_file
    from transformers import BertTokenizerFast  # type: ignore[attr-defined]  # runtime-only alias in transformers 5

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789-.,")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars), *_CAPTION_WORDS]
    vocab = list(dict.fromkeys(vocab))
    tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True,
                                  model_max_length=_CONTEXT)  # fmt: skip
    tokenizer.save_pretrained(out)
    config = {
        "model_cfg": {
            "embed_dim": _HIDDEN,
            "vision_cfg": {"image_size": size, "layers": _LAYERS, "width": _HIDDEN, "head_width": _HIDDEN // _HEADS,
                           "patch_size": _PATCH, "mlp_ratio": 2.0},
            "text_cfg": {"context_length": _CONTEXT, "vocab_size": len(vocab), "width": _HIDDEN, "heads": _HEADS,
                         "layers": _LAYERS, "mlp_ratio": 2.0, "pool_type": "first", "no_causal_mask": True,
                         "hf_tokenizer_name": "tiny-wordpiece"},
        },
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
                           "interpolation": "bicubic", "resize_mode": "shortest"},
    }  # fmt: skip
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    model = open_clip.create_model(f"local-dir:{out}", load_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))


def _tiny_audio(arch: str) -> tuple:
    from transformers import HubertConfig, HubertModel, Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    common: dict[str, Any] = dict(
        hidden_size=_HIDDEN, num_hidden_layers=_LAYERS, num_attention_heads=_HEADS, intermediate_size=2 * _HIDDEN,
        conv_dim=(16, 16, 16), conv_stride=(5, 4, 4), conv_kernel=(10, 4, 4), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2, do_stable_layer_norm=False, feat_extract_norm="group",
    )  # fmt: skip
    model: PreTrainedModel
    if arch == "wav2vec2":
        model = Wav2Vec2Model(Wav2Vec2Config(**common))
    else:
        model = HubertModel(HubertConfig(**common))
    fe = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=False
    )
    return model, fe


_TEXT_WORDS = (
    "the of and no with without normal acute chest lung heart right left mild small large effusion "
    "pneumonia fracture findings impression patient history pain report study mass nodule opacity "
    "stable change is are was in on at to for a an"
).split()


def _tiny_text(out: Path) -> tuple:
    from transformers import (  # type: ignore[attr-defined]  # BertTokenizerFast: runtime-only alias in transformers 5
        BertConfig,
        BertModel,
        BertTokenizerFast,
    )

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)] + list(".,:;-/()%")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars), *_TEXT_WORDS]
    # transformers 5 takes the vocabulary as a mapping (``vocab=``); 4.x as ``vocab_file``.
    tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True, model_max_length=64)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=_HIDDEN,
        num_hidden_layers=_LAYERS,
        num_attention_heads=_HEADS,
        intermediate_size=2 * _HIDDEN,
        max_position_embeddings=64,
    )
    return BertModel(config), tokenizer


def _save_quietly(model, out: Path) -> None:
    from transformers import utils as hf_utils

    enabled = hf_utils.logging.is_progress_bar_enabled()
    hf_utils.logging.disable_progress_bar()
    try:
        model.save_pretrained(out)
    finally:
        if enabled:
            hf_utils.logging.enable_progress_bar()


def ensure_demo_checkpoint(cache_dir: str | None = None, *, name: str = "tiny_vit") -> str:
    """Build the demo checkpoint once per node and return its directory.

    Concurrent callers on one node wait on a lock; the checkpoint is written
    to a temp directory and renamed into place.

    Args:
        cache_dir: Cache root; ``None`` means ``$MEDRAY_CACHE_DIR`` or
            ``~/.cache/medray/checkpoints``.
        name: One of :data:`DEMO_CHECKPOINTS`.

    Returns:
        Directory of an untrained 32 px checkpoint: ``tiny_vit`` an ``hf_image``
        ViT, ``tiny_siglip`` a ``siglip`` image-text model.

    Raises:
        ValueError: Unknown demo name.
    """
    if name not in DEMO_CHECKPOINTS:
        raise ValueError(f"unknown demo checkpoint {name!r}; available: {DEMO_CHECKPOINTS}")
    root = Path(cache_dir or default_cache_dir()).expanduser() / "demo"
    target = root / name
    if target.is_dir():
        return str(target)
    with node_lock(root / f"{name}.lock"):
        if not target.is_dir():
            tmp = tempfile.mkdtemp(prefix=f".{name}.", dir=root)
            try:
                if name == "tiny_siglip":
                    build_tiny_checkpoint("siglip", tmp, image_size=32, seed=0)
                else:
                    build_tiny_checkpoint("hf_image", tmp, arch="vit", image_size=32, seed=0)
                os.rename(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _write_hf(arch: str, out: Path, size: int) -> None:
    """Save a tiny transformers model and its image processor."""

    common: dict[str, Any] = dict(
        hidden_size=_HIDDEN, num_hidden_layers=_LAYERS, num_attention_heads=_HEADS,
        image_size=size, patch_size=_PATCH,
    )  # fmt: skip
    model: PreTrainedModel
    processor: BaseImageProcessor
    if arch == "vit":
        from transformers import ViTConfig, ViTImageProcessor, ViTModel

        model = ViTModel(ViTConfig(intermediate_size=2 * _HIDDEN, **common))
        processor = ViTImageProcessor(size={"height": size, "width": size})
    else:
        from transformers import (
            BitImageProcessor,
            Dinov2Config,
            Dinov2Model,
            Dinov2WithRegistersConfig,
            Dinov2WithRegistersModel,
        )

        if arch == "dinov2":
            model = Dinov2Model(Dinov2Config(mlp_ratio=2, **common))
        else:
            config = Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=4, **common)
            model = Dinov2WithRegistersModel(config)
        # DINOv2's own recipe: resize shortest edge to 256/224 of the crop, bicubic.
        processor = BitImageProcessor(
            size={"shortest_edge": round(size * 256 / 224)},
            crop_size={"height": size, "width": size},
            do_center_crop=True,
            resample=3,
            image_mean=_IMAGENET_MEAN,
            image_std=_IMAGENET_STD,
        )
    _save_quietly(model, out)
    processor.save_pretrained(out)


def _write_timm(arch: str, out: Path, size: int) -> None:
    """Save a tiny timm ViT the way ``push_to_hf_hub`` lays it out."""
    import timm
    from timm.models import save_for_hf

    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=size,
        patch_size=_PATCH,
        embed_dim=_HIDDEN,
        depth=_LAYERS,
        num_heads=_HEADS,
        num_classes=5,
        reg_tokens=4 if arch == "vit_reg" else 0,
    )
    save_for_hf(model, str(out), safe_serialization=True, data_config={"crop_pct": 0.875})


def _demo(uri: str, root: Path) -> str:
    """Build (once) and return a built-in demo checkpoint."""
    name = uri[len(DEMO_SCHEME) :].strip("/")
    if name not in DEMO_CHECKPOINTS:
        raise ConfigError(
            "encoder.checkpoint",
            f"unknown demo checkpoint {uri}; available: " + ", ".join(DEMO_SCHEME + n for n in DEMO_CHECKPOINTS),
        )
    return ensure_demo_checkpoint(str(root), name=name)


register_scheme(DEMO_SCHEME, _demo)
