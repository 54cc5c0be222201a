"""``medray serve``: encoders and task heads as an autoscaling HTTP service (Ray Serve).

Usage::

    medray serve encoder=rad_dino heads=[s3://b/runs/cxr-v1] serve.encoder.autoscaling.max_replicas=8
    medray serve encoder=hf_image encoder.checkpoint=s3://models/my-vit serve=gpu
    medray serve ... emit_config=app.yaml     # or --emit-config app.yaml: write a Serve config and exit

Every check that can fail runs before Ray starts: the config, the encoder
checkpoint (fetched once, hashed), each head's model card (its id, and that
a linear probe was trained on these very encoder weights), the auth token.
Then the application from :func:`medray.serve.app.build_app` runs on the
local or configured Ray until Ctrl-C, which deletes it (in-flight requests
finish first: Serve's graceful shutdown).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from dataclasses import asdict
from typing import Any

from omegaconf import DictConfig, OmegaConf

from medray.config import EncoderConf, with_format_sections
from medray.encoders import (
    EncoderSpec,
    family_modalities,
    family_modality,
    get_spec,
    list_families,
    resolve_checkpoint,
    spec_to_dict,
)
from medray.encoders.registry import spec_from_entry
from medray.jobs import JobInfo
from medray.platform.errors import ConfigError
from medray.platform.runtime import init_ray
from medray.serve.config import (
    ServeJobConf,
    check_options,
    deploy_config,
    grpc_options,
    read_model_card,
    resolve_heads,
    serve_env_flags,
)

__all__ = ["JOB", "ServeJob", "main", "prepare_argv", "register"]


def register() -> None:
    """Register the ``serve`` schema with Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    # audio/text as the formats declare them, as mutable copies Hydra can override
    ConfigStore.instance().store(
        name="serve_schema", node=with_format_sections(ServeJobConf, "ServeJobConf", add=False)
    )


JOB = JobInfo(
    "serve",
    "serve an encoder and its task heads over HTTP with Ray Serve (autoscaling, batching)",
    config_name="serve",
    register=register,
    order=30,
)


def prepare_argv(argv: list[str]) -> list[str]:
    """Accept ``--emit-config PATH`` / ``--emit-config=PATH`` as ``emit_config=PATH``."""
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "--emit-config":
            path = next(it, None)
            if path is None:
                print("error: --emit-config needs a path, e.g. --emit-config app.yaml", file=sys.stderr)
                sys.exit(2)
            out.append(f"emit_config={path}")
        elif arg.startswith("--emit-config="):
            out.append("emit_config=" + arg.split("=", 1)[1])
        else:
            out.append(arg)
    return out


class ServeJob:
    """The serving recipe: validate on construction, then ``emit`` or ``run``.

    Args:
        cfg: the composed config (DictConfig from Hydra, or a ServeJobConf).

    Raises:
        ConfigError: naming the key at fault, before Ray starts.
    """

    def __init__(self, cfg: Any) -> None:
        if isinstance(cfg, DictConfig):
            from omegaconf.errors import MissingMandatoryValue

            try:
                self.cfg: ServeJobConf = OmegaConf.to_object(cfg)  # type: ignore[assignment]
            except MissingMandatoryValue as err:
                hint = " (a hub id, a local directory or an s3:// URI)" if err.full_key == "encoder.checkpoint" else ""
                raise ConfigError(str(err.full_key), f"is required{hint}") from None
        else:
            self.cfg = cfg
        self._validate()

    def _validate(self) -> None:
        c = self.cfg
        check_options(c.serve, c.decode, c.encoder)
        if c.encoder.family not in list_families():
            raise ConfigError(
                "encoder.family", f"unknown family '{c.encoder.family}'; known: {', '.join(list_families())}"
            )

        embeds = family_modality(c.encoder.family)
        if c.encoder.modality != embeds:
            raise ConfigError(
                "encoder.modality",
                f"'{c.encoder.modality}' does not match family "
                f"'{c.encoder.family}', which embeds {embeds} inputs; set encoder.modality={embeds} "
                "or choose an encoder of that modality",
            )
        self.spec: EncoderSpec = get_spec(EncoderSpec(**asdict(c.encoder)))
        self.specs: dict = {embeds: self.spec}
        for modality, value in (c.encoders or {}).items():
            if value is None:
                continue
            key = f"encoders.{modality}"
            if modality not in ("image", "audio", "text"):
                raise ConfigError(key, f"medray serve routes image, audio and text inputs; got '{modality}'")
            if modality in family_modalities(c.encoder.family):
                raise ConfigError(
                    key,
                    f"encoder={self.spec.name} already embeds {modality} inputs; drop {key} "
                    "or pick an encoder of another modality",
                )

            spec = spec_from_entry(key, value)
            if family_modality(spec.family) != modality:
                raise ConfigError(key, f"family {spec.family} embeds {family_modality(spec.family)}, not {modality}")
            self.specs[modality] = spec
        heads = c.heads
        if heads is not None and not isinstance(heads, (list, tuple, dict)):
            raise ConfigError(
                "heads", "must be a list of artifact URIs, e.g. heads=[s3://b/runs/cxr-v1], or a mapping {id: uri}"
            )
        self.heads = resolve_heads(heads, c.storage.options)
        self.weights_hash: str | None = None
        if c.check_artifacts:
            self._check_artifacts()
        local = c.ray.address is None and not os.environ.get("RAY_ADDRESS")
        if c.serve.auth.enabled and local and c.emit_config is None:
            from medray.serve.ingress import IngressSettings, load_token  # lazy: imports ray

            try:
                load_token(
                    IngressSettings(
                        auth_enabled=True, token_env=c.serve.auth.token_env, token_file=c.serve.auth.token_file
                    )
                )
            except RuntimeError:
                key = "serve.auth.token_file" if c.serve.auth.token_file else "serve.auth.token_env"
                raise ConfigError(
                    key,
                    "auth is enabled but no token was found: set "
                    f"${c.serve.auth.token_env} or serve.auth.token_file to a readable file",
                ) from None

    def _check_artifacts(self) -> None:
        """Fetch the encoder once (its hash) and refuse heads trained on other weights."""
        hashes = {}
        for spec in self.specs.values():
            _, hashes[spec.name] = resolve_checkpoint(
                spec.checkpoint,
                storage_options=spec.storage_options,
                cache_dir=spec.cache_dir,
                expected_sha256=spec.sha256,
            )
        self.weights_hash = hashes[self.spec.name]
        for head_id, uri in self.heads.items():
            card = read_model_card(uri, self.cfg.storage.options)
            if card.get("backbone_included"):
                continue  # served with its own fine-tuned backbone
            want = (card.get("encoder") or {}).get("weights_hash")
            if want not in hashes.values():
                served = ", ".join(f"'{n}' {h[:12]}..." for n, h in hashes.items())
                raise ConfigError(
                    "heads",
                    f"head '{head_id}' ({uri}) was trained on encoder weights "
                    f"{str(want)[:12]}..., but the served encoders have weights {served}; serve it "
                    "with the encoder it was trained on",
                )
        if self.cfg.serve.search.index:
            from medray.platform.vectorindex import read_index_manifest

            manifest = read_index_manifest(self.cfg.serve.search.index, self.cfg.storage.options)
            have = (manifest.get("encoder") or {}).get("weights_hash")
            if have != self.weights_hash:
                raise ConfigError(
                    "serve.search.index",
                    f"the index holds embeddings of weights {str(have)[:12]}..., the encoder's weights are "
                    f"{str(self.weights_hash)[:12]}...; build the index with `medray index` on embeddings of "
                    "this encoder",
                )

    def args(self) -> dict:
        """The application's arguments (:class:`medray.serve.app.ServeArgs`) as JSON-ready data."""
        c = self.cfg

        fields = set(EncoderConf.__dataclass_fields__)
        extra = {}
        for modality, spec in self.specs.items():
            if spec is not self.spec:
                d = {k: v for k, v in spec_to_dict(spec).items() if k in fields}
                extra[modality] = dict(d, modality=family_modality(spec.family))
        return {
            "encoder": asdict(c.encoder),
            "encoders": extra,
            "heads": dict(self.heads),
            "serve": asdict(c.serve),
            "decode": asdict(c.decode),
            "audio": asdict(c.audio),
            "text": asdict(c.text),
            "storage": asdict(c.storage),
        }

    def emit(self, path: str) -> dict:
        """Write the Serve deploy config (``serve deploy`` / RayService ``serveConfigV2``) to ``path``."""
        import yaml
        from ray.serve.schema import ServeDeploySchema

        config = deploy_config(self.args(), self.cfg.serve)
        ServeDeploySchema.model_validate(config)  # what `serve deploy` will check
        head = (
            f"# Ray Serve config for medray (written by `medray serve ... emit_config={path}`).\n"
            "#   serve deploy " + os.path.basename(path) + "\n"
            "# or paste it under RayService.spec.serveConfigV2. Credentials are not written:\n"
            "# give them to the cluster (AWS_* env, IAM role, Kubernetes secret).\n"
        )
        flags = serve_env_flags(self.cfg.serve)
        if flags:
            head += (
                "# The cluster's nodes need in their environment (Serve reads it at start): "
                + ", ".join(f"{var}={value} ({why})" for var, (value, why) in flags.items())
                + "\n"
            )
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(head + yaml.safe_dump(config, sort_keys=False))
        os.replace(tmp, path)
        return config

    def run(self) -> int:
        """Start the application on Ray and block until Ctrl-C / SIGTERM."""
        from ray import serve

        from medray.serve.app import ServeArgs, build_app, direct_ingress_urls  # lazy: imports ray

        c, s = self.cfg, self.cfg.serve
        local = c.ray.address is None and not os.environ.get("RAY_ADDRESS")
        for variable, (value, why) in serve_env_flags(s).items():
            if local:  # read by every Serve process at import: set before Ray starts them
                os.environ[variable] = value
            elif os.environ.get(variable) != value:
                print(
                    f"medray serve: {why} needs {variable}={value} in the cluster's environment "
                    "(RayCluster/RayService container env); it is not set here",
                    file=sys.stderr,
                    flush=True,
                )
        ray = init_ray(c.ray.address, num_cpus=c.ray.num_cpus, include_dashboard=c.ray.include_dashboard)
        stop = threading.Event()
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            http = {"host": s.http.host, "port": s.http.port, "keep_alive_timeout_s": s.http.keep_alive_timeout_s}
            if s.http.request_timeout_s is not None:
                http["request_timeout_s"] = s.http.request_timeout_s
            logging_config = {"encoding": s.log_encoding.upper(), "log_level": s.log_level.upper()}
            serve.start(http_options=http, grpc_options=grpc_options(s), logging_config=logging_config)
            app = build_app(ServeArgs.model_validate(self.args()))
            serve.run(app, name=s.name, route_prefix=s.route_prefix, logging_config=logging_config)
            url = f"http://{s.http.host}:{s.http.port}{s.route_prefix.rstrip('/')}"
            tag = " [UNTRAINED demo weights]" if self.spec.untrained else ""
            more = "".join(f", {m}: {sp.name}" for m, sp in self.specs.items() if sp is not self.spec)
            print(
                f"medray serve: application '{s.name}' ready at {url} (docs {url}/docs); encoder "
                f"{self.spec.name}{tag}{more}; heads: {', '.join(sorted(self.heads)) or 'none'}; "
                f"ray {ray.get_runtime_context().gcs_address}; Ctrl-C stops",
                flush=True,
            )
            if s.grpc.enabled:
                print(
                    f"medray serve: gRPC medray.v1.Embeddings at {s.http.host}:{s.grpc.port} "
                    f"(metadata application={s.name})",
                    flush=True,
                )
            direct = direct_ingress_urls(s.name, s.http.host, s.http.port) if s.throughput_optimized else []
            if direct:  # the faster path: no proxy hop (docs/serve.md, "Where the time goes")
                prefix = s.route_prefix.rstrip("/")
                print(f"medray serve: direct ingress at {', '.join(u + prefix for u in direct)}", flush=True)
            while not stop.wait(1.0):
                pass
            print("medray serve: stopping (in-flight requests finish first)", flush=True)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            try:
                serve.delete(s.name)
                if local:
                    serve.shutdown()
            finally:
                if local:
                    ray.shutdown()
        return 0


def main(cfg: DictConfig) -> int:
    """Hydra entry point body; returns the process exit code."""
    job = ServeJob(cfg)  # ConfigError names the key and the fix
    if job.cfg.emit_config:
        config = job.emit(job.cfg.emit_config)
        app = config["applications"][0]
        print(
            f"medray serve: wrote {job.cfg.emit_config} (application '{app['name']}', import_path "
            f"{app['import_path']}); deploy it with `serve deploy {job.cfg.emit_config}` or as a RayService's "
            "serveConfigV2",
            flush=True,
        )
        return 0
    return job.run()  # first line that touches Ray
