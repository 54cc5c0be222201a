"""medray's gRPC API pieces that need no server: status mapping, the answer's protobuf, the config."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from medray.platform.errors import ConfigError
from medray.serve.config import GrpcConf, LimitsConf, ServeOptions, check_options, grpc_options, serve_env_flags
from medray.serve.grpc_api import SERVICER_FUNCTION, embed_response, grpc_status
from medray.serve.proto.embeddings_pb2 import EmbedResponse


def test_http_statuses_map_to_grpc_codes():
    assert grpc_status(401) == grpc.StatusCode.UNAUTHENTICATED
    assert grpc_status(403) == grpc.StatusCode.PERMISSION_DENIED
    assert grpc_status(413) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert grpc_status(415) == grpc_status(422) == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_status(503) == grpc.StatusCode.UNAVAILABLE
    assert grpc_status(504) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert grpc_status(418) == grpc.StatusCode.INVALID_ARGUMENT  # any other client error
    assert grpc_status(500) == grpc.StatusCode.UNAVAILABLE  # never INTERNAL with a trace


def test_embed_response_carries_vectors_segments_and_identity_through_the_wire():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(3, 8)).astype("f4")
    body = {
        "encoder": "hear",
        "weights_hash": "w" * 64,
        "preprocessing_hash": "p" * 64,
        "dim": 8,
        "untrained": False,
        "modality": "audio",
        "embeddings": [
            {"frame": 0, "embedding": vectors[0].tolist(), "segment": "window", "start_s": 0.0, "end_s": 2.0},
            {"frame": 1, "embedding": vectors[1].tolist(), "segment": "window", "start_s": 2.0, "end_s": 4.0},
            {"frame": -1, "embedding": vectors[2].tolist(), "segment": "pooled", "start_s": 0.0, "end_s": 4.0},
        ],
        "batch_size": 2,
        "replica": "abc",
        "ood": {"score": 0.25, "threshold": 0.5, "alarm": False},
    }
    back = EmbedResponse.FromString(embed_response(body).SerializeToString())
    assert (back.encoder, back.weights_hash, back.dim, back.modality, back.batch_size) == (
        "hear",
        "w" * 64,
        8,
        "audio",
        2,
    )
    assert [e.frame for e in back.embeddings] == [0, 1, -1]
    np.testing.assert_array_equal(np.asarray([list(e.values) for e in back.embeddings], "f4"), vectors)  # exact f32
    assert dict(back.embeddings[1].segment) == {"segment": "window", "start_s": 2.0, "end_s": 4.0}
    assert dict(back.ood) == {"score": 0.25, "threshold": 0.5, "alarm": False}
    plain = embed_response({**body, "ood": None, "embeddings": [{"frame": 0, "embedding": [1.0]}]})
    assert not plain.HasField("ood") and not plain.embeddings[0].HasField("segment")


def test_grpc_is_off_unless_enabled_and_then_registers_the_service_and_a_message_limit():
    assert grpc_options(ServeOptions()) is None
    assert "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE" not in serve_env_flags(ServeOptions())
    on = ServeOptions(grpc=GrpcConf(enabled=True, port=9100), limits=LimitsConf(max_body_bytes=1 << 20))
    assert grpc_options(on) == {"port": 9100, "grpc_servicer_functions": [SERVICER_FUNCTION]}
    assert serve_env_flags(on)["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"][0] == str(2 << 20)


@pytest.mark.parametrize("port", [0, 70000, 8000])
def test_a_bad_grpc_port_names_the_key(port):
    from medray.config import DecodeConf, EncoderConf

    with pytest.raises(ConfigError) as err:
        check_options(ServeOptions(grpc=GrpcConf(enabled=True, port=port)), DecodeConf(), EncoderConf())
    assert err.value.key == "serve.grpc.port"


def test_the_emitted_config_carries_grpc_options_serve_accepts():
    from ray.serve.schema import ServeDeploySchema

    from medray.serve.config import deploy_config

    config = deploy_config({"encoder": {}}, ServeOptions(grpc=GrpcConf(enabled=True, port=9100)))
    schema = ServeDeploySchema.model_validate(config)
    assert schema.grpc_options.port == 9100
    assert schema.grpc_options.grpc_servicer_functions == [SERVICER_FUNCTION]
    assert "grpc_options" not in deploy_config({"encoder": {}}, ServeOptions())
