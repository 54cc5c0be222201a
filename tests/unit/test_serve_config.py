"""``medray serve`` config: composition, validation before Ray, the emitted Serve config (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from hydra import compose, initialize_config_dir

from medray.config import CONF_DIR, register_schemas
from medray.encoders import build_tiny_checkpoint, hash_directory
from medray.encoders.heads import LinearHead, ModelCard, save_artifact
from medray.jobs.serve import ServeJob, prepare_argv, register
from medray.platform.errors import ConfigError
from medray.serve.config import (
    EncoderDeploymentConf,
    ServeOptions,
    deploy_config,
    max_ongoing_for,
    resolve_heads,
    serve_env_flags,
    uri_allowed,
)


@pytest.fixture
def compose_serve(tmp_path, monkeypatch):
    register_schemas()
    register()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("MEDRAY_CACHE_DIR", str(tmp_path / "cache"))

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            return compose(
                "serve",
                overrides=["encoder=hf_image", "encoder.checkpoint=/models/x", "check_artifacts=false", *overrides],
            )

    return _compose


def _head(uri: str, head_id: str, weights_hash: str, *, dim: int = 32) -> str:
    card = ModelCard(
        id=head_id,
        task="binary",
        labels=["y"],
        encoder={"name": "hf_image", "family": "hf_image", "weights_hash": weights_hash, "dim": dim},
    )
    return save_artifact(uri, head=LinearHead(np.zeros((1, dim), "f4"), np.zeros(1, "f4"), "binary"), card=card)


@pytest.mark.parametrize("preset", ["default", "gpu"])
def test_serve_presets_compose_and_validate(compose_serve, preset):
    job = ServeJob(compose_serve(f"serve={preset}"))
    enc = job.cfg.serve.encoder
    assert max_ongoing_for(enc) >= enc.max_batch_size
    assert job.heads == {}
    if preset == "gpu":
        assert enc.num_gpus == 1 and enc.max_batch_size == 64
    else:
        assert enc.num_gpus is None  # one GPU per replica when the cluster has GPUs


@pytest.mark.parametrize(
    "override,key",
    [
        ("serve.encoder.max_batch_size=0", "serve.encoder.max_batch_size"),
        ("serve.encoder.max_ongoing_requests=4", "serve.encoder.max_ongoing_requests"),  # < max_batch_size 16
        ("serve.encoder.max_queued_requests=0", "serve.encoder.max_queued_requests"),
        ("serve.encoder.autoscaling.max_replicas=0", "serve.encoder.autoscaling.max_replicas"),
        ("serve.heads.autoscaling.target_ongoing_requests=0", "serve.heads.autoscaling.target_ongoing_requests"),
        ("serve.encoder.dtype=int8", "serve.encoder.dtype"),
        ("serve.limits.max_body_bytes=0", "serve.limits.max_body_bytes"),
        ("serve.inputs.allowed_uri_prefixes=[/data/]", "serve.inputs.allowed_uri_prefixes"),
        ("serve.route_prefix=v1", "serve.route_prefix"),
        ("serve.name=a.b", "serve.name"),
        ("decode.frames=some", "decode.frames"),
        ("encoder.family=nope", "encoder.family"),
        ("heads=3", "heads"),
        ("encoder.modality=text", "encoder.modality"),  # hf_image embeds images
        ("encoder.modality=slide", "encoder"),
        ("serve.proxy=nginx", "serve.proxy"),
        ("serve.topology=mesh", "serve.topology"),
        ("serve.drain_period_s=-1", "serve.drain_period_s"),
    ],
)
def test_bad_values_name_the_key(compose_serve, override, key):
    with pytest.raises(ConfigError) as err:
        ServeJob(compose_serve(override))
    assert err.value.key == key


def test_autoscaling_shorthand_sets_the_encoder(compose_serve):
    job = ServeJob(compose_serve("serve.autoscaling.max_replicas=8", "serve.autoscaling.min_replicas=2"))
    a = job.cfg.serve.encoder.autoscaling
    assert (a.min_replicas, a.max_replicas) == (2, 8)
    assert a.target_ongoing_requests == 8  # untouched fields keep the encoder's values
    assert job.cfg.serve.heads.autoscaling.max_replicas == 2  # only the encoder scales by the shorthand
    with pytest.raises(ConfigError) as err:
        ServeJob(compose_serve("serve.autoscaling.max_replicas=0"))
    assert err.value.key == "serve.encoder.autoscaling.max_replicas"
    with pytest.raises(Exception, match="max_replica"):  # a misspelt key fails in composition, named
        compose_serve("serve.autoscaling.max_replica=3")


def test_generic_encoder_requires_checkpoint(compose_serve):
    register_schemas()
    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("serve", overrides=["encoder=hf_image"])
    with pytest.raises(ConfigError, match="encoder.checkpoint"):
        ServeJob(cfg)


def test_auth_without_a_token_fails_before_ray(compose_serve, monkeypatch, tmp_path):
    monkeypatch.delenv("MEDRAY_SERVE_TOKEN", raising=False)
    with pytest.raises(ConfigError) as err:
        ServeJob(compose_serve("serve.auth.enabled=true"))
    assert err.value.key == "serve.auth.token_env"
    monkeypatch.setenv("MEDRAY_SERVE_TOKEN", "s3cret")
    ServeJob(compose_serve("serve.auth.enabled=true"))
    with pytest.raises(ConfigError, match="token_file"):
        ServeJob(compose_serve("serve.auth.enabled=true", f"serve.auth.token_file={tmp_path / 'missing'}"))


def test_heads_ids_from_cards_and_weights_checked_before_ray(compose_serve, tmp_path):
    ckpt = build_tiny_checkpoint("hf_image", str(tmp_path / "ckpt"), arch="vit", image_size=16)
    good = _head(str(tmp_path / "h" / "good"), "cxr-v1", hash_directory(ckpt))
    other = _head(str(tmp_path / "h" / "other"), "other", "0" * 64)
    base = [f"encoder.checkpoint={ckpt}", "check_artifacts=true"]
    job = ServeJob(compose_serve(*base, f"heads=[{good}]"))
    assert job.heads == {"cxr-v1": good} and job.weights_hash == hash_directory(ckpt)
    with pytest.raises(ConfigError, match="trained on encoder weights") as err:
        ServeJob(compose_serve(*base, f"heads=[{good},{other}]"))
    assert err.value.key == "heads"
    job = ServeJob(compose_serve(f"heads={{mine: {good}}}"))  # explicit ids
    assert job.heads == {"mine": good}


def test_resolve_heads_refuses_duplicates_bad_ids_and_non_artifacts(tmp_path):
    a = _head(str(tmp_path / "a"), "same", "0" * 64)
    b = _head(str(tmp_path / "b"), "same", "0" * 64)
    with pytest.raises(ConfigError, match="two heads"):
        resolve_heads([a, b])
    assert resolve_heads({"x": a, "y": b}) == {"x": a, "y": b}
    with pytest.raises(ConfigError, match="must match"):
        resolve_heads({"no/slash": a})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="model_card.json"):
        resolve_heads([str(tmp_path / "empty")])


def test_emitted_config_is_a_valid_serve_deploy_config(compose_serve, tmp_path, monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    from medray.jobs.serve import main
    from medray.serve.app import ServeArgs

    path = tmp_path / "deploy" / "app.yaml"
    cfg = compose_serve(
        f"emit_config={path}",
        "serve.http.host=0.0.0.0",
        "serve.name=cxr",
        "serve.encoder.autoscaling.max_replicas=8",
        "+storage.options.s3.secret_access_key=hunter2",
        "+storage.options.s3.endpoint_url=http://x",
    )
    assert main(cfg) == 0
    text = path.read_text()
    assert "hunter2" not in text and text.startswith("# Ray Serve config for medray")
    # the default proxy needs a flag in the cluster's environment: the file says so
    assert "RAY_SERVE_ENABLE_HA_PROXY=1 (serve.proxy=haproxy)" in text.split("\nproxy_location")[0]
    assert "RAY_SERVE_HAPROXY_TUNE_BUFSIZE=32768" in text.split("\nproxy_location")[0]
    config = yaml.safe_load(text)
    schema = ServeDeploySchema.model_validate(config)
    app = schema.applications[0]
    assert app.name == "cxr" and app.import_path == "medray.serve.app:build_app"
    assert config["http_options"]["host"] == "0.0.0.0"
    args = ServeArgs.model_validate(app.args)  # what build_app receives on the cluster
    assert args.serve.encoder.autoscaling.max_replicas == 8
    assert args.storage.options == {"s3": {"endpoint_url": "http://x"}}


def test_deploy_config_leaves_out_secrets():
    config = deploy_config(
        {
            "encoder": {"storage_options": {"key": "K", "region": "r"}},
            "storage": {"options": {"token": "T", "anon": False}},
        },
        ServeOptions(),
    )
    args = config["applications"][0]["args"]
    assert args["encoder"]["storage_options"] == {"region": "r"} and args["storage"]["options"] == {"anon": False}


def test_prepare_argv_accepts_emit_config_flag():
    assert prepare_argv(["--emit-config", "a.yaml", "x=1"]) == ["emit_config=a.yaml", "x=1"]
    assert prepare_argv(["--emit-config=b.yaml"]) == ["emit_config=b.yaml"]


@pytest.mark.parametrize(
    "uri,ok",
    [
        ("s3://b/cxr/a.dcm", True),
        ("s3://b/cxr/sub/a.dcm", True),
        ("s3://b/cxr", True),
        ("s3://b/cxrx/a.dcm", False),
        ("s3://b/cxr/../secret/a", False),
        ("s3://other/cxr/a.dcm", False),
        ("/etc/passwd", False),
        ("file:///etc/passwd", False),
        ("gs://b/cxr/a.dcm", False),
        (None, False),
    ],
)
def test_uri_allow_list(uri, ok):
    assert uri_allowed(uri, ["s3://b/cxr/"]) is ok


def test_max_ongoing_defaults_to_two_batches():
    assert max_ongoing_for(EncoderDeploymentConf(max_batch_size=8)) == 16
    assert max_ongoing_for(EncoderDeploymentConf(max_batch_size=8, max_ongoing_requests=10)) == 10


def test_job_module_imports_stay_light():
    import subprocess
    import sys

    code = (
        "import sys, medray.jobs.serve as s; s.register(); "
        "print(sorted(m for m in ('ray', 'torch', 'fastapi', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_serve_env_flags_follow_the_proxy_and_throughput_settings():
    from medray.serve.config import LimitsConf

    flags = serve_env_flags(ServeOptions())
    assert flags["RAY_SERVE_ENABLE_HA_PROXY"][0] == "1"
    assert flags["RAY_SERVE_HAPROXY_TUNE_BUFSIZE"][0] == "32768"  # room for the 16 KiB header limit
    big = serve_env_flags(ServeOptions(limits=LimitsConf(max_header_bytes=65536)))
    assert big["RAY_SERVE_HAPROXY_TUNE_BUFSIZE"][0] == "131072"
    assert serve_env_flags(ServeOptions(proxy="ray")) == {}
    assert flags["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"][0] == "3"
    assert set(serve_env_flags(ServeOptions(proxy="ray", throughput_optimized=True))) == {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED"
    }
