"""Build the medray Serve application from typed arguments.

One builder for every way of running it::

    medray serve encoder=rad_dino heads=[s3://b/runs/cxr-v1]        # the CLI calls build_app
    serve run medray.serve.app:build_app --args ...                  # or a YAML with args:
    serve deploy app.yaml        # app.yaml from `medray serve ... emit_config=app.yaml`
    # KubeRay: the same applications: block under RayService.spec.serveConfigV2

The graph: ``Ingress`` (FastAPI) -> ``Encoder`` (batched) and ``Heads``
(multiplexed, which asks ``Encoder`` for embeddings). With one encoder and no
heads or search, ``serve.topology=auto`` fuses them: one deployment, named
``Encoder``, whose replicas answer HTTP and run the encoder themselves (no
hop per request). Autoscaling, admission limits, graceful shutdown and
resources of each deployment come from ``args.serve``.
"""

# No `from __future__ import annotations` here: Ray Serve reads build_app's
# annotation at runtime to turn the config's `args:` into ServeArgs.

import dataclasses
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application, Deployment

from medray.config import DecodeConf, EncoderConf, StorageConf
from medray.encoders import family_modalities, family_modality
from medray.platform.decoders.audio import AudioOptions
from medray.platform.errors import ConfigError
from medray.platform.formats import TextOptions
from medray.serve.config import (
    DeploymentConf,
    ServeOptions,
    check_options,
    max_ongoing_for,
    resolve_heads,
)
from medray.serve.encoder import DecodeSettings, EncoderDeployment, InReplicaEncoder
from medray.serve.heads import HeadsDeployment
from medray.serve.ingress import Ingress, IngressSettings
from medray.serve.search import SearchDeployment

__all__ = ["ServeArgs", "build_app", "direct_ingress_urls"]


class ServeArgs(BaseModel):
    """The application's arguments: what ``args:`` holds in a Serve config file.

    Attributes:
        encoder: the encoder spec (as in ``conf/encoder/*.yaml``).
        encoders: more encoders, one per other modality (``{"audio": spec, "text": spec}``);
            each becomes its own batched deployment and inputs are routed by content.
        heads: ``{head id: artifact uri}``, or a list of artifact URIs whose
            model cards give the ids.
        serve: deployments, autoscaling, limits, inputs, auth.
        decode: DICOM windows, frame selection and size limits (as ``medray embed``).
        audio: windows of recordings (audio encoders; as ``medray embed``).
        text: chunking of reports (text encoders; as ``medray embed``).
        storage: fsspec options for ``uri`` inputs and artifacts.
    """

    model_config = ConfigDict(extra="forbid")

    encoder: EncoderConf
    encoders: dict[str, EncoderConf] = Field(default_factory=dict)
    heads: dict[str, str] | list = Field(default_factory=dict)
    serve: ServeOptions = Field(default_factory=ServeOptions)
    decode: DecodeConf = Field(default_factory=DecodeConf)
    audio: AudioOptions = Field(default_factory=AudioOptions)
    text: TextOptions = Field(default_factory=TextOptions)
    storage: StorageConf = Field(default_factory=StorageConf)


def _deployment_options(
    d: DeploymentConf, serve_opts: ServeOptions, *, max_ongoing: int, num_gpus: float = 0.0
) -> dict[str, Any]:
    a = d.autoscaling
    autoscaling = {k: v for k, v in dataclasses.asdict(a).items() if v is not None}
    actor: dict[str, Any] = {"num_cpus": float(d.num_cpus)}
    if num_gpus:
        actor["num_gpus"] = float(num_gpus)
    return {
        "ray_actor_options": actor,
        "max_ongoing_requests": int(max_ongoing),
        "max_queued_requests": int(d.max_queued_requests),
        "autoscaling_config": autoscaling,
        "graceful_shutdown_wait_loop_s": serve_opts.graceful_shutdown_wait_loop_s,
        "graceful_shutdown_timeout_s": serve_opts.graceful_shutdown_timeout_s,
        "health_check_period_s": serve_opts.health_check_period_s,
        "health_check_timeout_s": serve_opts.health_check_timeout_s,
    }


def _deployment(cls: type) -> Deployment:
    """``serve.deployment(cls)``: Ray annotates only the decorator-factory form, which returns a callable."""
    return cast(Deployment, serve.deployment(cls))


def _encoder_gpus(requested: Any) -> float:
    """``serve.encoder.num_gpus``, or 1 when it is null and the cluster has GPUs."""
    if requested is not None:
        return float(requested)
    import ray

    try:
        return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    except Exception:  # noqa: BLE001 - no cluster view: stay on CPU
        return 0.0


def _modality(spec: EncoderConf) -> str:
    return family_modality(spec.family)


def build_app(args: ServeArgs) -> Application:
    """Build the Serve application: ingress, encoder and (if any heads) the heads deployment.

    Args:
        args: :class:`ServeArgs` (or its dict, as a Serve config's ``args:``).

    Returns:
        The bound application, for ``serve.run`` / ``serve deploy``.

    Raises:
        ConfigError: a setting is wrong (the key is named).
    """
    if not isinstance(args, ServeArgs):
        args = ServeArgs.model_validate(args)
    s = args.serve
    check_options(s, args.decode, args.encoder)
    heads = resolve_heads(args.heads, args.storage.options)
    settings = DecodeSettings.from_conf(
        dataclasses.asdict(args.decode),
        max_frames=s.limits.max_frames,
        storage_options=args.storage.options,
        allowed_uri_prefixes=s.inputs.allowed_uri_prefixes,
        audio=dataclasses.asdict(args.audio),
        text=dataclasses.asdict(args.text),
    )
    enc = s.encoder
    gpus = _encoder_gpus(enc.num_gpus)
    primary = _modality(args.encoder)
    specs = {primary: args.encoder, **{m: e for m, e in args.encoders.items() if m != primary}}
    fused = _fused(s, specs, heads)
    user_config = {"max_batch_size": enc.max_batch_size, "batch_wait_timeout_s": enc.batch_wait_timeout_s}
    encoders: dict[str, Any] = {}
    for modality, spec in specs.items():
        encoder_args = (dataclasses.asdict(spec), settings)
        encoder_kwargs = {
            "device": enc.device,
            "dtype": enc.dtype,
            "torch_threads": enc.torch_threads,
            "engine": enc.engine,
            "decode_threads": enc.decode_threads,
            "num_cpus": enc.num_cpus,
            # the live OOD score: against a reference of the primary encoder's embeddings
            "ood": dataclasses.asdict(s.ood) if modality == primary and s.ood.reference else None,
        }
        if fused:  # built by the ingress in its own replicas (see _fused)
            encoders[modality] = InReplicaEncoder(*encoder_args, **encoder_kwargs)
            continue
        encoders[modality] = (
            _deployment(EncoderDeployment)
            .options(
                name="Encoder" if modality == primary else f"Encoder_{modality}",
                user_config=user_config,
                **_deployment_options(enc, s, max_ongoing=max_ongoing_for(enc), num_gpus=gpus),
            )
            .bind(*encoder_args, **encoder_kwargs)
        )
    for modality in family_modalities(args.encoder.family)[1:]:  # an image-text encoder answers text too
        encoders.setdefault(modality, encoders[primary])
    head_app = None
    if heads:
        h = s.heads
        head_app = (
            _deployment(HeadsDeployment)
            .options(
                name="Heads",
                **_deployment_options(h, s, max_ongoing=h.max_ongoing_requests or 32, num_gpus=h.num_gpus or 0.0),
            )
            .bind(
                heads,
                encoders,
                settings,
                max_loaded=h.max_loaded,
                storage_options=args.storage.options,
                cache_dir=args.encoder.cache_dir,
                device=enc.device,
            )
        )
    ing = s.ingress
    ingress_settings = IngressSettings(
        heads=sorted(heads),
        primary=primary,
        max_body_bytes=s.limits.max_body_bytes,
        request_timeout_s=s.limits.request_timeout_s,
        max_header_bytes=s.limits.max_header_bytes,
        max_json_depth=s.limits.max_json_depth,
        allowed_uri_prefixes=list(s.inputs.allowed_uri_prefixes),
        haidef_enabled=s.haidef.enabled,
        predict_route=s.haidef.predict_route,
        health_route=s.haidef.health_route,
        max_instances=s.haidef.max_instances,
        patch_size=s.haidef.patch_size,
        auth_enabled=s.auth.enabled,
        token_env=s.auth.token_env,
        token_file=s.auth.token_file,
    )
    search_app = None
    if s.search.index:
        search_app = (
            _deployment(SearchDeployment)
            .options(name="Search", **_deployment_options(s.search, s, max_ongoing=s.search.max_ongoing_requests or 32))
            .bind(
                s.search.index,
                encoders,
                ingress_settings,
                primary=primary,
                storage_options=args.storage.options,
                cache_dir=args.encoder.cache_dir,
                max_k=s.search.max_k,
                expansion_search=s.search.expansion_search,
            )
        )
    if fused:  # one deployment: the ingress's routes and the encoder, sized and scaled as the encoder
        ingress_options = {
            "name": "Encoder",
            "user_config": user_config,
            **_deployment_options(enc, s, max_ongoing=max_ongoing_for(enc), num_gpus=gpus),
        }
    else:
        ingress_options = {
            "name": "Ingress",
            **_deployment_options(ing, s, max_ongoing=ing.max_ongoing_requests or 256),
        }
    return _deployment(Ingress).options(**ingress_options).bind(encoders, head_app, ingress_settings, search_app)


def _fused(s: ServeOptions, specs: dict[str, EncoderConf], heads: dict) -> bool:
    """Whether the encoder runs inside the ingress's replicas (``serve.topology``).

    ``fused`` takes the ingress -> encoder hop out of every request: the ingress's replicas
    build the encoder themselves and the app scales as the encoder does (its resources,
    ``max_ongoing_requests`` and autoscaling; ``serve.ingress.*`` is not used). It needs one
    encoder and no heads or search (those deployments call the encoder through its handle).
    ``auto`` picks it exactly then.

    Raises:
        ConfigError: ``fused`` was asked for an app that cannot be fused.
    """
    fusable = len(specs) == 1 and not heads and not s.search.index
    if s.topology == "fused" and not fusable:
        raise ConfigError(
            "serve.topology",
            "fused runs one encoder inside the ingress and needs no heads, no serve.search.index and no "
            "encoders.<modality>; set serve.topology=split (or auto) for this app",
        )
    return s.topology == "fused" or (s.topology == "auto" and fusable)


def direct_ingress_urls(app_name: str, host: str, proxy_port: int) -> list[str]:
    """The ingress replicas' own HTTP addresses of an application, under Ray Serve's direct ingress.

    With ``serve.throughput_optimized=true`` (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``) each ingress
    replica also serves HTTP on its own port (30000-31000): a client or load balancer sending
    there skips the proxy and its body call back (about 10 ms of a request on a 2-core machine;
    docs/serve.md "Where the time goes"). The proxy's port keeps answering too.

    Args:
        app_name: the application (``serve.name``).
        host: the host clients use for this node (Serve's HTTP host).
        proxy_port: the proxy's port, which is not a direct address.

    Returns:
        ``["http://host:port", ...]`` (add the route prefix), or ``[]`` when direct ingress is off
        or this Ray does not tell.
    """
    import ray

    try:
        from ray.serve.context import _get_global_client  # Ray's own client: no public getter in 2.60

        client = _get_global_client()
        if client is None:
            return []
        groups = ray.get(client._controller.get_target_groups.remote(app_name), timeout=10)
    except Exception:  # noqa: BLE001 - another Ray version, or no such app: the proxy is the address
        return []
    return [
        f"http://{host}:{t.port}"
        for g in groups
        if str(g.protocol).upper().endswith("HTTP")
        for t in g.targets
        if t.port != proxy_port
    ]
