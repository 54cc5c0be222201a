"""medray's gRPC API: ``medray.v1.Embeddings`` (``serve.grpc.enabled``).

The same inputs, limits, auth and answers as ``POST /v1/embeddings``, with protobuf in and out
(the vectors as packed float32, not JSON numbers). Ray Serve's gRPC proxy (or its HAProxy, with
``serve.proxy=haproxy``) takes the call and the ingress deployment's ``Embed`` method answers it::

    import grpc
    from medray.serve.grpc_api import EmbeddingsStub
    from medray.serve.proto.embeddings_pb2 import EmbedRequest

    stub = EmbeddingsStub(grpc.insecure_channel("localhost:9000"))
    answer = stub.Embed(EmbedRequest(data=open("chest.dcm", "rb").read()),
                        metadata=[("application", "medray"), ("authorization", f"Bearer {token}")])
    vectors = [list(e.values) for e in answer.embeddings]

Errors are gRPC status codes (:func:`grpc_status`); the details hold the HTTP answer's stable
``code`` and its PHI-free message (``"too_large: ..."``). ``application`` metadata names the
Serve application when a cluster serves several. The service definition is
``medray/serve/proto/embeddings.proto``.
"""

from __future__ import annotations

from typing import Any

import grpc

from medray.serve.proto import embeddings_pb2 as pb

__all__ = [
    "SERVICE",
    "SERVICER_FUNCTION",
    "EmbeddingsStub",
    "add_EmbeddingsServicer_to_server",
    "embed_response",
    "grpc_status",
]

#: The service's full name.
SERVICE = "medray.v1.Embeddings"
#: What ``serve.start(grpc_options=...)`` imports to register the service on Serve's gRPC proxy.
SERVICER_FUNCTION = "medray.serve.grpc_api.add_EmbeddingsServicer_to_server"

#: HTTP status of an answer -> gRPC status (google.rpc's mapping; 413 as gRPC's own too-large).
_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def grpc_status(http_status: int) -> grpc.StatusCode:
    """The gRPC status of an answer with this HTTP status."""
    if http_status in _STATUS:
        return _STATUS[http_status]
    return grpc.StatusCode.INVALID_ARGUMENT if 400 <= http_status < 500 else grpc.StatusCode.UNAVAILABLE


def add_EmbeddingsServicer_to_server(servicer: Any, server: Any) -> None:  # noqa: N802 - gRPC's naming
    """Register ``medray.v1.Embeddings`` on a gRPC server (what ``grpc_tools`` would generate)."""
    handlers = {
        "Embed": grpc.unary_unary_rpc_method_handler(
            servicer.Embed,
            request_deserializer=pb.EmbedRequest.FromString,
            response_serializer=pb.EmbedResponse.SerializeToString,
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


class EmbeddingsStub:
    """Client of ``medray.v1.Embeddings``: ``stub.Embed(EmbedRequest(...), metadata=[...])``."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.Embed = channel.unary_unary(  # noqa: N815 - the RPC's name
            f"/{SERVICE}/Embed",
            request_serializer=pb.EmbedRequest.SerializeToString,
            response_deserializer=pb.EmbedResponse.FromString,
        )


def embed_response(body: dict) -> pb.EmbedResponse:
    """The protobuf answer of an ``/v1/embeddings`` answer body (its JSON dict)."""
    out = pb.EmbedResponse(
        encoder=str(body.get("encoder") or ""),
        weights_hash=str(body.get("weights_hash") or ""),
        preprocessing_hash=str(body.get("preprocessing_hash") or ""),
        dim=int(body.get("dim") or 0),
        untrained=bool(body.get("untrained")),
        modality=str(body.get("modality") or ""),
        batch_size=int(body.get("batch_size") or 0),
        replica=str(body.get("replica") or ""),
    )
    for item in body["embeddings"]:
        emb = out.embeddings.add(frame=int(item["frame"]), values=item["embedding"])
        segment = {k: v for k, v in item.items() if k not in ("frame", "embedding")}
        if segment:
            emb.segment.update(segment)
    if body.get("ood") is not None:
        out.ood.update(body["ood"])
    return out
