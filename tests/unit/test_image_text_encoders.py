"""Image-text families (siglip, open_clip): parity with each library's reference code on tiny random checkpoints."""

from __future__ import annotations

import numpy as np
import pytest

from medray.encoders import (
    ImageTextEncoder,
    build_tiny_checkpoint,
    create_encoder,
    create_preprocessor,
    family_modalities,
    get_spec,
    list_encoders,
)

TEXTS = ["a chest x-ray showing effusion", "no finding", "pneumothorax"]


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in ((40, 56), (64, 48), (32, 32))]


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tiny_checkpoint("siglip", str(tmp_path_factory.mktemp("siglip")))


@pytest.fixture(scope="module")
def open_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tiny_checkpoint("open_clip", str(tmp_path_factory.mktemp("open_clip")))


def test_families_embed_image_and_text() -> None:
    assert family_modalities("siglip") == ("image", "text")
    assert family_modalities("open_clip") == ("image", "text")
    assert family_modalities("hf_text") == ("text",)
    for name in ("medsiglip_448", "siglip_base", "biomedclip"):
        assert name in list_encoders()
        spec = get_spec(name)
        assert spec.license and spec.gated is not None and spec.embedding_dim
    assert get_spec("medsiglip_448").gated is True


def test_siglip_parity_with_transformers(siglip_dir: str) -> None:
    import torch
    from transformers import AutoProcessor, SiglipModel

    enc = create_encoder(get_spec("siglip", checkpoint=siglip_dir))
    assert isinstance(enc, ImageTextEncoder) and enc.spec.untrained
    processor = AutoProcessor.from_pretrained(siglip_dir)
    model = SiglipModel.from_pretrained(siglip_dir).eval()
    images = _images()
    inputs = processor(text=TEXTS, images=images, padding="max_length", return_tensors="pt")
    with torch.no_grad():
        ref_img = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output.numpy()
        ref_txt = model.get_text_features(input_ids=inputs["input_ids"]).pooler_output.numpy()
    ours_img = enc.embed(enc.preprocess(images))
    ours_txt = enc.embed_text(TEXTS)
    np.testing.assert_allclose(ours_img, ref_img, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours_txt, ref_txt, atol=1e-5, rtol=0)
    # the pipeline's path for a text record: one chunk, the same embedding
    np.testing.assert_allclose(enc.embed(enc.chunk_text(TEXTS[0]).inputs)[0], ref_txt[0], atol=1e-5, rtol=0)
    info = enc.describe()
    assert info["score"] == "sigmoid"
    assert info["model_temperature"] == pytest.approx(float(model.logit_scale.detach().exp()))
    assert info["model_bias"] == pytest.approx(float(model.logit_bias.detach()))


def test_open_clip_parity_with_open_clip(open_clip_dir: str) -> None:
    import open_clip
    import torch
    from PIL import Image

    enc = create_encoder(get_spec("open_clip", checkpoint=open_clip_dir))
    model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{open_clip_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{open_clip_dir}")
    model.eval()
    images = _images()
    with torch.no_grad():
        ref_img = model.encode_image(torch.stack([transform(Image.fromarray(a)) for a in images])).numpy()
        ref_txt = model.encode_text(tokenizer(TEXTS)).numpy()
    np.testing.assert_allclose(enc.embed(enc.preprocess(images)), ref_img, atol=1e-5, rtol=0)
    np.testing.assert_allclose(enc.embed_text(TEXTS), ref_txt, atol=1e-5, rtol=0)
    info = enc.describe()
    assert info["score"] == "softmax" and info["model_bias"] is None
    assert info["model_temperature"] == pytest.approx(float(model.logit_scale.detach().exp()))


@pytest.mark.parametrize("family", ["siglip", "open_clip"])
def test_preprocessor_alone_matches_the_encoder(family: str, siglip_dir: str, open_clip_dir: str) -> None:
    path = siglip_dir if family == "siglip" else open_clip_dir
    spec = get_spec(family, checkpoint=path)
    pre = create_preprocessor(spec)
    enc = create_encoder(spec)
    assert pre.preprocessing_hash == enc.preprocessing_hash and pre.weights_hash == enc.weights_hash
    np.testing.assert_array_equal(pre.preprocess(_images()), enc.preprocess(_images()))
    long = "effusion " * 40
    chunks = pre.chunk_text(long)  # type: ignore[attr-defined]
    assert chunks.inputs.shape == (1, 2, enc.max_length)  # type: ignore[attr-defined]
    assert chunks.n_tokens == 40 and chunks.token_end == [enc.max_length - pre.special_tokens]  # type: ignore[attr-defined]


def test_served_text_and_images_share_one_image_text_encoder(siglip_dir: str) -> None:
    """``/v1/embeddings`` decodes a text body for the text tower and an image for the image tower."""
    import io

    from PIL import Image

    from medray.serve.encoder import DecodeSettings, decode_input

    enc = create_encoder(get_spec("siglip", checkpoint=siglip_dir))
    allowed = family_modalities("siglip")
    text = decode_input({"data": b"a chest x-ray showing effusion", "name": "q.txt"}, DecodeSettings(), enc,
                        modality=allowed)  # fmt: skip
    assert text.modality == "text"
    np.testing.assert_allclose(enc.embed(text.pixels)[0], enc.embed_text([TEXTS[0]])[0], atol=1e-6, rtol=0)
    buf = io.BytesIO()
    Image.fromarray(_images()[0]).save(buf, format="PNG")
    image = decode_input({"data": buf.getvalue(), "name": "x.png"}, DecodeSettings(), enc, modality=allowed)
    np.testing.assert_allclose(enc.embed(image.pixels), enc.embed(enc.preprocess([_images()[0]])), atol=1e-6, rtol=0)


def test_pipeline_routes_text_records_to_an_image_text_encoder(siglip_dir: str) -> None:
    from medray.pipeline import StageOptions, encoder_routes

    spec = get_spec("siglip", checkpoint=siglip_dir)
    assert encoder_routes(StageOptions(encoder_spec=spec)) == {"image": spec, "text": spec}
    bert = get_spec("hf_text", checkpoint="/nowhere")
    # a text encoder named explicitly keeps the text route
    assert encoder_routes(StageOptions(encoder_specs={"image": spec, "text": bert}))["text"] is bert


def test_demo_siglip_builds_offline(tmp_path) -> None:
    from medray.encoders import ensure_demo_checkpoint

    path = ensure_demo_checkpoint(str(tmp_path), name="tiny_siglip")
    spec = get_spec("demo_tiny_siglip", cache_dir=str(tmp_path))
    enc = create_encoder(spec)
    assert enc.spec.untrained and enc.dim == 32 and path.endswith("tiny_siglip")
    assert enc.embed_text(["effusion"]).shape == (1, 32)


@pytest.mark.parametrize("family", ["siglip", "open_clip"])
def test_tiny_text_towers_tell_texts_apart(family: str, siglip_dir: str, open_clip_dir: str) -> None:
    enc = create_encoder(get_spec(family, checkpoint=siglip_dir if family == "siglip" else open_clip_dir))
    a, b = enc.embed_text(["effusion", "no finding"])
    assert np.abs(a - b).max() > 1e-3  # zero-shot on a tiny checkpoint must not be a tie by construction
