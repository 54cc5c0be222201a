"""``serve.topology``: which deployments ``build_app`` makes (no Ray cluster: the bound graph only)."""

from __future__ import annotations

import pickle

import pytest

from medray.platform.errors import ConfigError
from medray.serve.app import ServeArgs, build_app
from medray.serve.encoder import DecodeSettings, InReplicaEncoder

ENCODER = {"family": "hf_image", "checkpoint": "/models/x"}


def _bound(**args):
    """The ingress deployment of the app built from ``args`` (Ray's bound graph, nothing deployed)."""
    return build_app(ServeArgs.model_validate({"encoder": ENCODER, **args}))._bound_deployment


def _encoders(ingress) -> dict:
    encoders = ingress.init_args[0]
    return encoders if isinstance(encoders, dict) else {"image": encoders}


def test_one_encoder_without_heads_is_fused_into_the_ingress_and_sized_as_the_encoder():
    d = _bound(serve={"encoder": {"num_cpus": 2, "max_batch_size": 8, "autoscaling": {"max_replicas": 5}}})
    assert d.name == "Encoder"
    assert all(isinstance(e, InReplicaEncoder) for e in _encoders(d).values())
    cfg = d._deployment_config
    assert d.ray_actor_options["num_cpus"] == 2.0
    assert cfg.user_config == {"max_batch_size": 8, "batch_wait_timeout_s": 0.005}
    assert cfg.max_ongoing_requests == 16  # two batches, as the split encoder deployment has
    assert cfg.autoscaling_config.max_replicas == 5


def test_split_topology_keeps_an_ingress_that_calls_the_encoder_deployment():
    d = _bound(serve={"topology": "split", "ingress": {"num_cpus": 0.25}})
    assert d.name == "Ingress" and d.ray_actor_options["num_cpus"] == 0.25
    (enc,) = _encoders(d).values()
    assert not isinstance(enc, InReplicaEncoder)
    assert enc._bound_deployment.name == "Encoder"


def test_an_image_text_encoder_fuses_as_one_encoder_for_both_modalities():
    d = build_app(ServeArgs.model_validate({"encoder": {"family": "siglip", "checkpoint": "/m"}}))._bound_deployment
    encoders = _encoders(d)
    assert d.name == "Encoder" and set(encoders) == {"image", "text"}
    assert encoders["image"] is encoders["text"]


def test_auto_stays_split_with_several_encoders():
    d = _bound(encoders={"text": {"family": "hf_text", "checkpoint": "/t"}})
    assert d.name == "Ingress"
    assert {e._bound_deployment.name for e in _encoders(d).values()} == {"Encoder", "Encoder_text"}


@pytest.mark.parametrize(
    "args",
    [
        {"encoders": {"text": {"family": "hf_text", "checkpoint": "/t"}}},
        {"serve": {"search": {"index": "/emb/index"}}},
    ],
)
def test_fused_asked_for_an_app_it_cannot_fuse_names_the_key(args):
    serve = {**args.get("serve", {}), "topology": "fused"}
    with pytest.raises(ConfigError) as err:
        build_app(ServeArgs.model_validate({"encoder": ENCODER, **args, "serve": serve}))
    assert err.value.key == "serve.topology" and "split" in str(err.value)


def test_an_unknown_topology_names_the_key():
    with pytest.raises(ConfigError) as err:
        _bound(serve={"topology": "mesh"})
    assert err.value.key == "serve.topology"


def test_an_in_replica_encoder_travels_as_its_arguments_and_refuses_calls_before_start():
    enc = InReplicaEncoder(dict(ENCODER), DecodeSettings(), device="cpu", engine="thread")
    back = pickle.loads(pickle.dumps(enc))
    assert back._args == enc._args and back._kwargs == enc._kwargs and back._deployment is None
    with pytest.raises(RuntimeError, match="start"):
        back.embed.remote({"data": b""})
