"""The embed config composes for every preset, and bad values name their key (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from medray.config import CONF_DIR, register_schemas
from medray.jobs.embed import EmbedJob
from medray.platform.errors import ConfigError

PRESETS = sorted(p.stem for p in Path(CONF_DIR, "encoder").glob("*.yaml"))


@pytest.fixture
def compose_embed(tmp_path):
    register_schemas()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.dcm").write_bytes(b"x")

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            return compose("embed", overrides=[f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}", *overrides])

    return _compose


def test_presets_exist():
    assert {"rad_dino", "phikon", "dinov2_base", "hf_image", "timm_image", "demo_tiny_vit"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_encoder_preset_composes_and_validates(compose_embed, preset):
    generic = ("hf_image", "timm_image", "hf_audio", "hf_text", "torchvision_video", "siglip", "open_clip")
    extra = ["encoder.checkpoint=/models/x"] if preset in generic else []
    cfg = compose_embed(f"encoder={preset}", *extra)
    job = EmbedJob(cfg)
    assert job.spec.family in generic
    assert OmegaConf.select(cfg, "compute.batch_size") >= 1


def test_generic_preset_requires_checkpoint(compose_embed):
    with pytest.raises(ConfigError, match="encoder.checkpoint"):
        EmbedJob(compose_embed("encoder=hf_image"))


@pytest.mark.parametrize(
    "override,key",
    [
        ("max_error_fraction=2", "max_error_fraction"),
        ("compute.batch_size=0", "compute.batch_size"),
        ("compute.dtype=int8", "compute.dtype"),
        ("decode.frames=some", "decode.frames"),
        ("decode.windows.CT=[40,-1]", "decode.windows.CT"),
        ("encoder.pooling=max", "encoder.pooling"),
        ("encoder.family=nope", "encoder.family"),
    ],
)
def test_bad_values_name_the_key(compose_embed, override, key):
    with pytest.raises(ConfigError) as err:
        EmbedJob(compose_embed(override))
    assert f"'{key}'" in str(err.value)


def test_misspelt_key_fails_at_composition(compose_embed):
    with pytest.raises(Exception, match="decod"):
        compose_embed("decod.max_bytes=3")


def test_missing_input_names_the_key(compose_embed, tmp_path):
    with pytest.raises(ConfigError, match="'input'"):
        EmbedJob(compose_embed(f"input={tmp_path / 'nothing-here'}"))


def test_watch_needs_a_dicomweb_input(compose_embed):
    with pytest.raises(ConfigError, match="'watch'"):
        EmbedJob(compose_embed("watch=true"))


@pytest.mark.parametrize(
    "override,key",
    [
        ("dicomweb.feed=rss", "dicomweb.feed"),
        ("dicomweb.interval_s=0", "dicomweb.interval_s"),
        ("dicomweb.max_rounds=0", "dicomweb.max_rounds"),
        ("dicomweb.idle_exit_s=-1", "dicomweb.idle_exit_s"),
        ("dicomweb.round_max_instances=0", "dicomweb.round_max_instances"),
    ],
)
def test_bad_watch_settings_name_their_key(compose_embed, override, key):
    web = "input=dicomweb+http://127.0.0.1:1/dicom-web"
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        EmbedJob(compose_embed(web, "watch=true", override))
    EmbedJob(compose_embed(web, "watch=true"))  # the defaults validate (nothing is contacted yet)


def test_an_image_text_encoder_embeds_text_itself(compose_embed):
    job = EmbedJob(compose_embed("encoder=medsiglip_448"))
    assert job.routes == {"image", "text"}
    with pytest.raises(ConfigError, match="already embeds text") as info:
        EmbedJob(compose_embed("encoder=medsiglip_448", "+encoders.text=biomedbert"))
    assert info.value.key == "encoders.text"
