"""Zero-shot: the math against numpy and each library's own logits, the job on a hand-made embed output, the route."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from medray.encoders import build_tiny_checkpoint, create_encoder, get_spec, hash_directory
from medray.jobs.zeroshot import ZeroShotConf, run_zeroshot
from medray.platform.errors import ConfigError
from medray.platform.records import record_id
from medray.platform.zeroshot import class_embeddings, expand_prompts, zero_shot_scores
from medray.serve.haidef import ParsedInstance, prediction
from medray.serve.zeroshot import ZeroShotRequestError, zero_shot_answer, zero_shot_request

LABELS = ["effusion", "pneumothorax", "no finding"]


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tiny_checkpoint("siglip", str(tmp_path_factory.mktemp("siglip")))


@pytest.fixture(scope="module")
def siglip(siglip_dir: str):
    return create_encoder(get_spec("siglip", checkpoint=siglip_dir))


def _images(n: int = 4) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, size=(32 + 8 * i, 40, 3), dtype=np.uint8) for i in range(n)]


def test_prompts_fill_every_template_and_refuse_bad_ones() -> None:
    assert expand_prompts(["a", "b"], ["{}", "x of {label}"]) == [["a", "x of a"], ["b", "x of b"]]
    for labels, templates, key in (
        ([], ["{}"], "labels"),
        (["a", "a"], ["{}"], "labels"),
        (["a"], ["no slot"], "prompts"),
    ):
        with pytest.raises(ConfigError) as info:
            expand_prompts(labels, templates)
        assert info.value.key == key


def test_scores_equal_numpy() -> None:
    rng = np.random.default_rng(0)
    text, images = rng.normal(size=(3 * 2, 8)), rng.normal(size=(5, 8))
    unit = text / np.linalg.norm(text, axis=1, keepdims=True)
    mean = unit.reshape(3, 2, 8).mean(axis=1)
    want_classes = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    classes = class_embeddings(text, 3)
    np.testing.assert_allclose(classes, want_classes, atol=1e-12)
    cos = (images / np.linalg.norm(images, axis=1, keepdims=True)) @ want_classes.T
    z = cos * 7.0
    soft = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(zero_shot_scores(images, classes, scale=7.0, score="softmax"), soft, atol=1e-12)
    sig = 1.0 / (1.0 + np.exp(-(cos * 10.0 - 10.0)))
    np.testing.assert_allclose(
        zero_shot_scores(images, classes, scale=10.0, bias=-10.0, score="sigmoid"), sig, atol=1e-12
    )
    huge = zero_shot_scores(images, classes, scale=1e6, bias=-1e6, score="sigmoid")
    assert np.isfinite(huge).all()


def test_siglip_scores_equal_the_models_own_sigmoid(siglip_dir: str, siglip) -> None:
    """One template per class: our score is SiglipModel's sigmoid(logits_per_image)."""
    import torch
    from transformers import AutoProcessor, SiglipModel

    model = SiglipModel.from_pretrained(siglip_dir).eval()
    processor = AutoProcessor.from_pretrained(siglip_dir)
    inputs = processor(text=LABELS, images=_images(), padding="max_length", return_tensors="pt")
    with torch.no_grad():
        want = torch.sigmoid(model(**inputs).logits_per_image).numpy()
    classes = class_embeddings(siglip.embed_text(LABELS), len(LABELS))
    got = zero_shot_scores(
        siglip.embed(siglip.preprocess(_images())), classes, scale=siglip.logit_scale, bias=siglip.logit_bias,
        score=siglip.score,
    )  # fmt: skip
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_open_clip_scores_equal_its_readme_softmax(tmp_path: Path) -> None:
    import open_clip
    import torch
    from PIL import Image

    path = build_tiny_checkpoint("open_clip", str(tmp_path / "oc"))
    enc = create_encoder(get_spec("open_clip", checkpoint=path))
    model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{path}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    model.eval()
    with torch.no_grad():  # open_clip's README recipe
        image = model.encode_image(torch.stack([transform(Image.fromarray(a)) for a in _images()]))
        text = model.encode_text(tokenizer(LABELS))
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        want = (model.logit_scale.exp() * image @ text.T).softmax(dim=-1).numpy()
    classes = class_embeddings(enc.embed_text(LABELS), len(LABELS))
    got = zero_shot_scores(enc.embed(enc.preprocess(_images())), classes, scale=enc.logit_scale, score=enc.score)
    np.testing.assert_allclose(got, want, atol=1e-5)


def _embed_output(root: Path, enc, weights_hash: str) -> list[str]:
    """A minimal `medray embed` output: four images and one text record."""
    images = enc.embed(enc.preprocess(_images()))
    text = enc.embed_text(["a chest x-ray"])
    uris = [f"/data/img{i}.png" for i in range(4)]
    rows = {
        "record_id": [record_id(u, "") for u in [*uris, "/data/r.txt"]],
        "uri": [*uris, "/data/r.txt"],
        "member": [""] * 5,
        "frame": [0, 0, 0, 0, -1],
        "segment": ["frame"] * 4 + ["pooled"],
        "embedding": [list(map(float, v)) for v in np.vstack([images, text])],
        "patient_key": ["p0", "p1", "p2", "p3", "p4"],
        "modality": ["photo"] * 4 + ["SR"],  # DICOM SR text keeps the DICOM modality; its token span marks it
        "token_end": [None] * 4 + [3],
    }
    (root / "embeddings").mkdir(parents=True)
    pq.write_table(pa.table(rows), root / "embeddings" / "part-0.parquet")
    marker = {"encoder": enc.spec.name, "checkpoint": enc.spec.checkpoint, "weights_hash": weights_hash,
              "preprocessing_hash": enc.preprocessing_hash}  # fmt: skip
    (root / "_medray.json").write_text(json.dumps(marker))
    return uris


def _conf(**values) -> ZeroShotConf:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ZeroShotConf), values))  # type: ignore[return-value]


def test_job_scores_images_only_and_evaluates_with_labels(tmp_path: Path, siglip_dir: str, siglip) -> None:
    out = tmp_path / "emb"
    uris = _embed_output(out, siglip, hash_directory(siglip_dir))
    manifest = tmp_path / "labels.csv"
    manifest.write_text("uri,effusion,pneumothorax,no finding\n" + "".join(
        f"{u},{i % 2},{(i // 2) % 2},{int(i == 0)}\n" for i, u in enumerate(uris)))  # fmt: skip
    templates = ["a chest x-ray showing {}", "{}"]
    doc = run_zeroshot(_conf(embeddings=str(out), labels=LABELS, prompts=templates,
                             data={"labels": str(manifest)}, eval={"bootstrap": 20}))  # fmt: skip
    assert doc["counts"] == {"images": 4, "text_records_not_scored": 1}
    assert doc["encoder"]["score"] == "sigmoid" and doc["encoder"]["model_bias"] == pytest.approx(-10.0)
    assert set(doc["evaluation"]["metrics"]) == set(LABELS)
    pred = pq.read_table(next((out / "zeroshot" / "predictions").glob("*.parquet"))).to_pydict()
    prompts = [p for row in expand_prompts(LABELS, templates) for p in row]
    want = zero_shot_scores(
        siglip.embed(siglip.preprocess(_images())), class_embeddings(siglip.embed_text(prompts), 3),
        scale=siglip.logit_scale, bias=siglip.logit_bias, score="sigmoid",
    )  # fmt: skip
    order = [uris.index(u) for u in pred["uri"]]
    for j, label in enumerate(LABELS):
        np.testing.assert_allclose(pred[f"p_{label}"], want[order, j], atol=1e-5)
    assert pred["y_effusion"] == [float(order[k] % 2) for k in range(4)]
    assert (out / "zeroshot" / "report" / "index.html").is_file()
    assert json.loads((out / "zeroshot" / "zeroshot.json").read_text())["labels"] == LABELS


def test_job_refuses_other_weights_and_image_only_encoders(tmp_path: Path, siglip) -> None:
    out = tmp_path / "emb"
    _embed_output(out, siglip, "0" * 64)
    with pytest.raises(ConfigError, match="embeddings were made with 000000000000") as info:
        run_zeroshot(_conf(embeddings=str(out), labels=LABELS))
    assert info.value.key == "checkpoint"
    vit = build_tiny_checkpoint("hf_image", str(tmp_path / "vit"))
    with pytest.raises(ConfigError, match="no text tower"):
        run_zeroshot(_conf(embeddings=str(out), labels=LABELS, encoder="hf_image", checkpoint=vit))


def test_route_request_and_answer(siglip) -> None:
    assert zero_shot_request({"labels": ["effusion,pneumothorax"]}) == (["effusion", "pneumothorax"], ["{}"])
    assert zero_shot_request({"labels": ["x"]}, {"labels": ["a", "b"], "prompts": ["an {}"]}) == (
        ["a", "b"],
        ["an {}"],
    )
    with pytest.raises(ZeroShotRequestError, match="name the classes"):
        zero_shot_request({})
    with pytest.raises(ZeroShotRequestError, match="no '{}'"):
        zero_shot_request({"labels": ["a"], "prompts": ["plain"]})
    image = siglip.embed(siglip.preprocess(_images(1)))
    result = {"embeddings": image, "encoder": siglip.describe(), "modality": "photo"}
    answer = zero_shot_answer(result, siglip.embed_text(LABELS), LABELS, ["{}"])
    want = zero_shot_scores(image, class_embeddings(siglip.embed_text(LABELS), 3), scale=siglip.logit_scale,
                            bias=siglip.logit_bias, score="sigmoid")[0]  # fmt: skip
    assert [answer["scores"][k] for k in LABELS] == pytest.approx(list(want), abs=1e-9)
    assert answer["model_temperature"] == pytest.approx(10.0) and answer["model_bias"] == pytest.approx(-10.0)
    with pytest.raises(ZeroShotRequestError, match="no text tower"):
        zero_shot_answer({"embeddings": image, "encoder": {"name": "rad_dino"}}, image, ["a"], ["{}"])


def test_haidef_answer_carries_temperature_and_bias(siglip) -> None:
    result = {"embeddings": siglip.embed(siglip.preprocess(_images(1))), "encoder": siglip.describe()}
    out = prediction(result, ParsedInstance(payload={}, input_type="image", source="input_bytes"))
    assert out["model_temperature"] == pytest.approx(10.0) and out["model_bias"] == pytest.approx(-10.0)
