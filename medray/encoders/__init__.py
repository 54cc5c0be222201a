"""Encoder registry and model families.

Find an encoder by name, check its spec on the driver, then load it once per
actor::

    from medray.encoders import create_encoder, get_spec

    spec = get_spec("rad_dino", checkpoint="s3://models/rad-dino")  # no torch yet
    encoder = create_encoder(spec, device="cuda", dtype="bfloat16")
    vectors = encoder.embed(encoder.preprocess(rgb_uint8_images))
    metadata = encoder.describe()

    # CPU decode tasks: the same preprocessing without loading weights
    pixels = create_preprocessor(spec).preprocess(rgb_uint8_images)

Importing this package registers the ``hf_image``, ``timm_image``, ``hf_audio``,
``hf_text``, ``torchvision_video`` and the image-text ``siglip`` and ``open_clip``
families; presets (a named checkpoint of a
family) are the files ``conf/encoder/<name>.yaml``, read once, the same files Hydra
composes for ``encoder=<name>``. torch, transformers and timm are imported only
when an encoder is built.
"""

from medray.encoders import hf as _hf  # noqa: F401  (registers hf_image)
from medray.encoders import hf_audio as _hf_audio  # noqa: F401  (registers hf_audio)
from medray.encoders import hf_text as _hf_text  # noqa: F401  (registers hf_text)
from medray.encoders import open_clip_family as _open_clip  # noqa: F401  (registers open_clip: image-text)
from medray.encoders import siglip as _siglip  # noqa: F401  (registers siglip: image-text)
from medray.encoders import timm_family as _timm_family  # noqa: F401  (registers timm_image)
from medray.encoders import video as _video  # noqa: F401  (registers torchvision_video: CT/MR volumes)
from medray.encoders.checkpoint import UNTRAINED_MARKER, hash_directory, is_untrained, resolve_checkpoint
from medray.encoders.image_text import ImageTextEncoder
from medray.encoders.registry import (
    Encoder,
    Preprocessor,
    create_encoder,
    create_preprocessor,
    family_modalities,
    family_modality,
    get_spec,
    list_encoders,
    list_families,
    register_family,
    register_preset,
)
from medray.encoders.spec import EncoderSpec, identity_key, spec_from_dict, spec_to_dict
from medray.encoders.tiny import build_tiny_checkpoint, ensure_demo_checkpoint

__all__ = [
    "UNTRAINED_MARKER",
    "Encoder",
    "EncoderSpec",
    "ImageTextEncoder",
    "Preprocessor",
    "build_tiny_checkpoint",
    "create_encoder",
    "create_preprocessor",
    "ensure_demo_checkpoint",
    "family_modalities",
    "family_modality",
    "get_spec",
    "hash_directory",
    "identity_key",
    "is_untrained",
    "list_encoders",
    "list_families",
    "register_family",
    "register_preset",
    "resolve_checkpoint",
    "spec_from_dict",
    "spec_to_dict",
]
