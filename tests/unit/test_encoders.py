"""Encoder registry, families and checkpoints, on tiny random models (no Ray).

Parity tests compute the reference the way each model's own docs do (HF:
``AutoImageProcessor`` on PIL images + ``AutoModel``; timm:
``create_transform(**resolve_data_config(model=model))`` + forward_features /
forward_head) and compare with ``Encoder.embed(Encoder.preprocess(...))``.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from medray.encoders import (
    UNTRAINED_MARKER,
    EncoderSpec,
    build_tiny_checkpoint,
    checkpoint,
    create_encoder,
    create_preprocessor,
    get_spec,
    hash_directory,
    list_encoders,
    list_families,
    register_family,
    registry,
    resolve_checkpoint,
    spec_from_dict,
    spec_to_dict,
)
from medray.platform.errors import ConfigError, PreprocessError

CONF_ENCODER = Path(__file__).resolve().parents[2] / "medray" / "conf" / "encoder"
ATOL = 1e-5


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One tiny checkpoint per (family, arch), shared by the module."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for family, arch in [
        ("hf_image", "vit"),
        ("hf_image", "dinov2"),
        ("hf_image", "dinov2_reg"),
        ("timm_image", "vit"),
        ("timm_image", "vit_reg"),
    ]:
        out[f"{family}/{arch}"] = build_tiny_checkpoint(family, str(root / f"{family}-{arch}"), arch=arch)
    return out


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep every checkpoint cache (and the demo model) inside the test's tmp dir."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MEDRAY_CACHE_DIR", str(cache))
    return cache


def _images() -> list[np.ndarray]:
    """Non-square RGB uint8 images of different sizes."""
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(50, 70), (41, 33), (64, 48)]]


def _embed(spec: EncoderSpec) -> np.ndarray:
    encoder = create_encoder(spec)
    return encoder.embed(encoder.preprocess(_images()))


# --------------------------------------------------------------------------
# parity with each family's reference code
# --------------------------------------------------------------------------
def _hf_reference(path: str, pooling: str) -> np.ndarray:
    from transformers import AutoImageProcessor, AutoModel

    processor = AutoImageProcessor.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    pixels = processor(images=[Image.fromarray(a) for a in _images()], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(pixel_values=pixels)
    if pooling == "cls":
        return out.last_hidden_state[:, 0].numpy()
    if pooling == "pooler":
        return out.pooler_output.numpy()
    skip = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
    return out.last_hidden_state[:, skip:].mean(dim=1).numpy()


@pytest.mark.parametrize(
    ("arch", "pooling"),
    [("vit", "cls"), ("vit", "pooler"), ("dinov2", "cls"), ("dinov2", "mean"), ("dinov2_reg", "mean")],
)
def test_hf_image_matches_reference(ckpts: dict[str, str], arch: str, pooling: str) -> None:
    path = ckpts[f"hf_image/{arch}"]
    got = _embed(get_spec("hf_image", checkpoint=path, pooling=pooling))
    ref = _hf_reference(path, pooling)
    assert got.shape == (3, 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)


def test_hf_mean_pooling_skips_register_tokens(ckpts: dict[str, str]) -> None:
    encoder = create_encoder(get_spec("hf_image", checkpoint=ckpts["hf_image/dinov2_reg"], pooling="mean"))
    assert encoder._num_prefix == 5  # CLS + 4 registers


@pytest.mark.parametrize(("arch", "pooling"), [("vit", "pooler"), ("vit", "cls"), ("vit_reg", "mean")])
def test_timm_image_matches_reference(ckpts: dict[str, str], arch: str, pooling: str) -> None:
    import timm
    from timm.data import create_transform, resolve_data_config

    path = ckpts[f"timm_image/{arch}"]
    got = _embed(get_spec("timm_image", checkpoint=path, pooling=pooling))

    model = timm.create_model(f"local-dir:{path}", pretrained=True).eval()
    transform = create_transform(**resolve_data_config(model=model))
    x = torch.stack([transform(Image.fromarray(a)) for a in _images()])
    with torch.no_grad():
        feats = model.forward_features(x)
        ref = {
            "pooler": lambda: model.forward_head(feats, pre_logits=True),
            "cls": lambda: feats[:, 0],
            "mean": lambda: feats[:, model.num_prefix_tokens :].mean(dim=1),
        }[pooling]().numpy()
    assert got.shape == (3, 32)
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("key", ["hf_image/dinov2", "timm_image/vit"])
def test_preprocessor_alone_matches_encoder(ckpts: dict[str, str], key: str) -> None:
    spec = get_spec(key.split("/")[0], checkpoint=ckpts[key])
    pre, encoder = create_preprocessor(spec), create_encoder(spec)
    assert pre.preprocessing_hash == encoder.preprocessing_hash
    assert pre.weights_hash == encoder.weights_hash == hash_directory(ckpts[key])
    assert pre.input_shape == encoder.input_shape == (3, 32, 32)
    np.testing.assert_array_equal(pre.preprocess(_images()), encoder.preprocess(_images()))


def test_preprocessing_hash_depends_on_pooling_and_config(ckpts: dict[str, str]) -> None:
    path = ckpts["hf_image/dinov2"]
    hashes = {
        create_preprocessor(get_spec("hf_image", checkpoint=path, pooling=p)).preprocessing_hash
        for p in ("cls", "mean")
    }
    hashes.add(create_preprocessor(get_spec("hf_image", checkpoint=ckpts["hf_image/vit"])).preprocessing_hash)
    assert len(hashes) == 3


@pytest.mark.parametrize("key", ["hf_image/vit", "timm_image/vit"])
def test_image_size_option(ckpts: dict[str, str], key: str) -> None:
    encoder = create_encoder(get_spec(key.split("/")[0], checkpoint=ckpts[key], options={"image_size": 48}))
    pixels = encoder.preprocess(_images())
    assert pixels.shape == (3, 3, 48, 48)
    assert encoder.embed(pixels).shape == (3, 32)


def test_bad_inputs_and_empty_batches(ckpts: dict[str, str]) -> None:
    encoder = create_encoder(get_spec("hf_image", checkpoint=ckpts["hf_image/vit"]))
    with pytest.raises(PreprocessError, match="uint8 RGB"):
        encoder.preprocess([np.zeros((8, 8), dtype=np.uint8)])
    with pytest.raises(PreprocessError, match="image 1"):
        encoder.preprocess([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.float32)])
    read_only = _images()[0]
    read_only.flags.writeable = False  # e.g. np.frombuffer over decoder output
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert encoder.preprocess([read_only]).shape == (1, 3, 32, 32)
    assert encoder.preprocess([]).shape == (0, 3, 32, 32)
    assert encoder.embed(np.zeros((0, 3, 32, 32), np.float32)).shape == (0, 32)


def test_dtype_and_device_are_checked(ckpts: dict[str, str]) -> None:
    spec = get_spec("hf_image", checkpoint=ckpts["hf_image/vit"])
    with pytest.raises(ConfigError, match="dtype"):
        create_encoder(spec, dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            create_encoder(spec, device="cuda")
    # autocast is CUDA-only: on the CPU a bf16 request still gives float32 results
    half = create_encoder(spec, dtype="bfloat16")
    pixels = half.preprocess(_images())
    np.testing.assert_array_equal(half.embed(pixels), create_encoder(spec).embed(pixels))


def test_unknown_option_names_the_key(ckpts: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=r"encoder\.options\.img_size"):
        create_encoder(get_spec("timm_image", checkpoint=ckpts["timm_image/vit"], options={"img_size": 48}))


# --------------------------------------------------------------------------
# checkpoints: fsspec URIs, cache, hashes
# --------------------------------------------------------------------------
def _upload(local: str, uri: str) -> None:
    fs, root = fsspec.core.url_to_fs(uri)
    for path in Path(local).rglob("*"):
        if path.is_file():
            fs.pipe_file(f"{root}/{path.relative_to(local).as_posix()}", path.read_bytes())


def test_fsspec_checkpoint_is_cached_once_and_verified(ckpts: dict[str, str], _cache: Path) -> None:
    local = ckpts["hf_image/vit"]
    uri = "memory://models/tiny-vit-cache-test"
    _upload(local, uri)
    expected = hash_directory(local)

    first_dir, first_sha = resolve_checkpoint(uri, expected_sha256=expected)
    assert first_sha == expected and Path(first_dir).parent == _cache

    with pytest.raises(ConfigError, match=r"encoder\.sha256") as info:
        resolve_checkpoint(uri, expected_sha256="0" * 64)
    assert info.value.key == "encoder.sha256" and expected in str(info.value)

    fsspec.filesystem("memory").rm("/models/tiny-vit-cache-test", recursive=True)
    second_dir, second_sha = resolve_checkpoint(uri)  # source gone: must come from the cache
    assert (second_dir, second_sha) == (first_dir, first_sha)
    with pytest.raises(ConfigError, match=r"encoder\.sha256"):
        resolve_checkpoint(uri, expected_sha256="0" * 64)


def test_cached_copy_hash_comes_from_the_sidecar(ckpts: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    uri = "memory://models/tiny-vit-sidecar"
    _upload(ckpts["hf_image/vit"], uri)
    local, sha = resolve_checkpoint(uri)

    def _no_rehash(path: object) -> str:
        raise AssertionError("the cached copy was hashed again")

    monkeypatch.setattr(checkpoint, "hash_directory", _no_rehash)
    assert resolve_checkpoint(uri) == (local, sha)


def test_mismatching_download_is_not_cached(ckpts: dict[str, str], _cache: Path) -> None:
    uri = "memory://models/tiny-vit-mismatch"
    _upload(ckpts["hf_image/vit"], uri)
    with pytest.raises(ConfigError, match=r"encoder\.sha256"):
        resolve_checkpoint(uri, expected_sha256="1" * 64)
    assert not [p for p in _cache.iterdir() if p.is_dir() and not p.name.startswith(".")]


def test_concurrent_resolves_copy_once(ckpts: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    uri = "memory://models/tiny-vit-concurrent"
    _upload(ckpts["timm_image/vit"], uri)
    copies = []
    real_copy = checkpoint._copy_tree
    monkeypatch.setattr(checkpoint, "_copy_tree", lambda *a: (copies.append(1), real_copy(*a)))
    results: list[tuple[str, str]] = []
    threads = [threading.Thread(target=lambda: results.append(resolve_checkpoint(uri))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(copies) == 1 and len(set(results)) == 1


def test_file_uri_and_local_dir_hash_alike(ckpts: dict[str, str]) -> None:
    local = ckpts["hf_image/dinov2"]
    assert resolve_checkpoint(f"file://{local}") == resolve_checkpoint(local)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_checkpoint(f"{local}-missing")


def test_describe_never_shows_the_cache_path(ckpts: dict[str, str], _cache: Path) -> None:
    uri = "memory://models/tiny-vit-describe"
    _upload(ckpts["hf_image/vit"], uri)
    encoder = create_encoder(get_spec("hf_image", checkpoint=uri))
    info = encoder.describe()
    assert info["checkpoint"] == uri
    assert str(_cache) not in repr(info)
    assert info["weights_hash"] == hash_directory(ckpts["hf_image/vit"])
    assert set(info) >= {"name", "family", "dim", "pooling", "preprocessing_hash", "untrained"}


def test_hub_id_offline_error_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as info:
        resolve_checkpoint("medray-tests/definitely-not-a-model")
    message = str(info.value)
    assert info.value.key == "encoder.checkpoint"
    assert "cannot download" in message and "s3://" in message and "HF_HUB_OFFLINE" in message


def test_tiny_checkpoints_are_deterministic(tmp_path: Path) -> None:
    a = build_tiny_checkpoint("hf_image", str(tmp_path / "a"), arch="vit", seed=3)
    b = build_tiny_checkpoint("hf_image", str(tmp_path / "b"), arch="vit", seed=3)
    c = build_tiny_checkpoint("hf_image", str(tmp_path / "c"), arch="vit", seed=4)
    assert hash_directory(a) == hash_directory(b) != hash_directory(c)
    with pytest.raises(ValueError, match="arch"):
        build_tiny_checkpoint("timm_image", str(tmp_path / "d"), arch="dinov2")


# --------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------
def test_unknown_name_lists_close_matches() -> None:
    with pytest.raises(ConfigError, match="did you mean.*rad_dino") as info:
        get_spec("rad-dino")
    assert info.value.key == "encoder"
    with pytest.raises(ConfigError, match=r"encoder\.pooling"):
        get_spec("rad_dino", pooling="avg")
    with pytest.raises(ConfigError, match=r"encoder\.chekpoint.*checkpoint"):
        get_spec("rad_dino", chekpoint="x")
    with pytest.raises(ConfigError, match=r"encoder\.family.*hf_image"):
        get_spec(EncoderSpec(name="x", family="hf_imag", checkpoint="x"))


def test_list_encoders_and_families() -> None:
    assert list_encoders("dino*") == ["dinov2_base", "dinov2_small"]
    everything = list_encoders()
    for name in ("rad_dino", "phikon", "vit_base", "timm_vit_small", "demo_tiny_vit", "timm_image"):
        assert name in everything
    families = ["hf_audio", "hf_image", "hf_text", "open_clip", "siglip", "timm_image", "torchvision_video"]
    assert list_families() == families


def test_duplicate_family_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))
    with pytest.raises(ValueError, match="already registered"):
        register_family("hf_image")
    register_family("test_family")(lambda spec, local_dir, device: None)
    with pytest.raises(ValueError, match="already registered"):
        register_family("test_family")


def test_presets_and_specs() -> None:
    spec = get_spec("rad_dino")
    assert (spec.family, spec.checkpoint, spec.pooling) == ("hf_image", "microsoft/rad-dino", "cls")
    spec.options["image_size"] = 1  # a copy: the registry must not change
    assert get_spec("rad_dino").options == {}
    assert get_spec("timm_vit_small").checkpoint.startswith("hf-hub:timm/")
    assert spec_from_dict(spec_to_dict(spec)) == spec
    with pytest.raises(ConfigError, match=r"encoder\.checkpoint"):
        create_encoder("hf_image")  # checkpoint: ???


def test_untrained_flag_comes_from_the_marker(ckpts: dict[str, str], tmp_path: Path) -> None:
    import shutil

    marked = ckpts["hf_image/vit"]
    assert (Path(marked) / UNTRAINED_MARKER).is_file()
    assert create_encoder(get_spec("hf_image", checkpoint=marked)).describe()["untrained"] is True
    clean = shutil.copytree(marked, tmp_path / "clean")
    (clean / UNTRAINED_MARKER).unlink()
    encoder = create_encoder(get_spec("hf_image", checkpoint=str(clean)))
    assert encoder.spec.untrained is False and encoder.describe()["untrained"] is False


def test_demo_preset_builds_once_and_is_untrained(_cache: Path) -> None:
    encoder = create_encoder("demo_tiny_vit")
    info = encoder.describe()
    assert info["checkpoint"] == "medray-demo://tiny_vit" and info["untrained"] is True
    assert (_cache / "demo" / "tiny_vit" / UNTRAINED_MARKER).is_file()
    assert create_encoder("demo_tiny_vit").weights_hash == encoder.weights_hash


@pytest.mark.parametrize("path", sorted(CONF_ENCODER.glob("*.yaml")), ids=lambda p: p.stem)
def test_yaml_presets_match_python(path: Path) -> None:
    text = path.read_text()
    assert text.startswith("# medray "), "each preset opens with the command that uses it"
    data = yaml.safe_load(text)
    assert data["name"] == path.stem
    assert spec_from_dict(data) == get_spec(path.stem)


def test_every_python_preset_has_a_yaml() -> None:
    presets = set(registry._PRESETS)
    assert presets == {p.stem for p in CONF_ENCODER.glob("*.yaml")}
