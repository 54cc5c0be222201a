"""``medray embed``: stream medical archives through an encoder into Parquet.

Usage::

    medray embed input=s3://bucket/cxr/ output=s3://bucket/emb/rad-dino encoder=rad_dino
    medray embed input=/data/manifest.parquet output=/data/emb encoder=hf_image encoder.checkpoint=s3://models/my-vit

Every check that can fail runs before Ray starts (config, input, output,
encoder checkpoint); then read → decode+preprocess (CPU tasks) → encode
(actor pool) → write (atomic Parquet parts). A rerun skips what is written.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, cast

import pyarrow as pa
import pyarrow.compute as pc
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

import medray
from medray.config import EmbedConf, format_options, patient_salt
from medray.encoders import (
    EncoderSpec,
    create_preprocessor,
    family_modalities,
    family_modality,
    get_spec,
    identity_key,
    is_untrained,
    list_families,
    resolve_checkpoint,
    spec_to_dict,
)
from medray.encoders.registry import spec_from_entry
from medray.jobs import JobInfo
from medray.pipeline import StageOptions, plan_dataset, plan_fused
from medray.pipeline.outcomes import format_outcomes, output_outcomes, run_outcomes
from medray.pipeline.progress import Progress, counts_of, start_counter
from medray.pipeline.resume import DoneIndex, anti_join_table, done_index, listing_table
from medray.pipeline.sink import aggregate_stats, make_sink, pool_slides
from medray.platform.decoders.audio import AudioOptions
from medray.platform.decoders.series import SeriesOptions
from medray.platform.decoders.slide import SLIDE_EXTENSIONS, SlideOptions
from medray.platform.dicomweb import CURSOR_FILE, FEEDS, FeedPoll, cursor_state, list_instances, open_feed, read_cursor
from medray.platform.errors import ConfigError
from medray.platform.formats import MODALITIES, TextOptions, build_options
from medray.platform.manifest import iter_manifest_batches, read_manifest
from medray.platform.report import Report, embed_report
from medray.platform.runtime import Background, Stopwatch, cluster_gpus, init_ray, process_start
from medray.platform.sources import ARCHIVE_MEMBER_PENDING, InputSpec, classify_input, list_objects
from medray.platform.storage import atomic_write_bytes, open_fs, redact_options
from medray.platform.tracking import RunArtifact, artifact_name, default_group, log_run

__all__ = ["JOB", "EmbedJob", "EmbedResult", "main"]

JOB = JobInfo(
    "embed",
    "stream DICOM/images from a prefix, manifest or archive into embeddings (Parquet)",
    config_name="embed",
    order=10,
    exit_fast=True,
)

log = logging.getLogger("medray.embed")


@dataclass
class EmbedResult:
    """What a run did; also written as ``runs/<run_id>.json`` and ``summary.json``."""

    run_id: str
    output: str
    encoder: str
    untrained: bool
    records_done_before: int
    records_read: int
    records_embedded: int
    rows_written: int
    quarantined: int
    error_fraction: float
    wall_s: float
    pipeline_s: float
    records_per_s: float
    steady_records_per_s: float | None
    stage_seconds: dict
    records_total_in_output: int
    config: dict
    skipped: int = 0
    skipped_by_modality: dict = None  # type: ignore[assignment]
    skipped_by_reason: dict = None  # type: ignore[assignment]  # NoEncoder, NonImageObject, BurnedInAnnotation, ...
    quarantined_by_class: dict = None  # type: ignore[assignment]  # DecodeError, LimitExceeded, ...
    encoders: dict = None  # type: ignore[assignment]  # modality -> encoder name
    slides: dict = None  # type: ignore[assignment]  # slides, pooled rows, tiles, background tiles
    driver_seconds: dict = None  # type: ignore[assignment]  # the driver's phases (checkpoint, listing, ray_init, ...)
    first_row_s: float | None = None  # from the process start to the first written embedding
    driver_peak_rss_mb: float | None = None  # the driver process's peak resident memory
    outcome_counts: list = None  # type: ignore[assignment]  # [outcome, reason, detail, records] of this run
    timeline: list = None  # type: ignore[assignment]  # [[s since the process started, records done], ...] (<= 200)
    report: str | None = None  # <output>/report/index.html, when one was written

    def outcomes_table(self) -> str:
        """The closing table: this run's records by outcome and reason."""
        outcomes = run_outcomes({"outcome_counts": self.outcome_counts or []})
        notes = []
        if self.records_done_before:
            notes.append(
                f"{self.records_done_before} records were done by earlier runs: "
                f"`medray embed output={self.output} show=outcomes` counts the whole output"
            )
        return format_outcomes(
            outcomes, self.output, title=f"outcomes of this run: {outcomes.total} records", notes=notes
        )

    def one_line(self) -> str:
        """The closing one-line summary: outcomes by reason."""
        tag = " [UNTRAINED demo weights]" if self.untrained else ""

        def by(counts: dict | None) -> str:
            return f" ({', '.join(f'{k} {v}' for k, v in sorted((counts or {}).items()))})" if counts else ""

        slides = ""
        if self.slides and self.slides.get("slides"):
            s = self.slides
            damaged = f"{s['damaged_tiles']} damaged tiles dropped, " if s.get("damaged_tiles") else ""
            slides = (
                f"{s['slides']} slides ({s['tiles']} tissue tiles, {s['background_tiles']} background "
                f"tiles skipped, {damaged}{s['pooled']} pooled rows added), "
            )
        return (
            f"medray embed: {self.records_embedded} records embedded ({self.rows_written} rows), "
            f"{self.quarantined} quarantined{by(self.quarantined_by_class)}, "
            f"{self.skipped} skipped{by(self.skipped_by_reason)}, {slides}{self.records_done_before} already done; "
            f"{self.records_per_s:.1f} records/s in {self.wall_s:.1f}s; encoder {self.encoder}{tag}; "
            f"output {self.output} (now {self.records_total_in_output} records)"
        )


class EmbedJob:
    """The embedding recipe: ``validate`` on construction, then ``run``.

    Args:
        cfg: the composed config (a DictConfig from Hydra or an EmbedConf).

    Raises:
        ConfigError: naming the key at fault, before any work starts.
    """

    def __init__(self, cfg: Any) -> None:
        self._watch_stop: threading.Event | None = None  # set while `watch=true` runs rounds
        if isinstance(cfg, DictConfig):
            missing = sorted(k for k in ("input", "output") if OmegaConf.is_missing(cfg, k))
            if missing:
                raise ConfigError(
                    missing[0], "is required, e.g. `medray embed input=s3://bucket/dicoms/ output=s3://bucket/emb`"
                )
            try:
                self.cfg: EmbedConf = OmegaConf.to_object(cfg)  # type: ignore[assignment]
            except MissingMandatoryValue as err:
                hint = " (a hub id, a local directory or an s3:// URI)" if err.full_key == "encoder.checkpoint" else ""
                raise ConfigError(str(err.full_key), f"is required{hint}") from None
            self.resolved: dict[str, Any] = cast("dict[str, Any]", OmegaConf.to_container(cfg, resolve=True))
        else:
            self.cfg = cfg
            self.resolved = asdict(cfg)
        self._validate()

    # ------------------------------------------------------------------ checks
    def _validate(self) -> None:
        c = self.cfg
        if not (0.0 <= c.max_error_fraction <= 1.0):
            raise ConfigError("max_error_fraction", f"must be within [0, 1], got {c.max_error_fraction}")
        for key in ("decode_num_cpus", "actor_num_cpus"):
            if getattr(c.compute, key) <= 0:
                raise ConfigError(f"compute.{key}", f"must be > 0, got {getattr(c.compute, key)}")
        for key in ("read_batch_size", "decode_batch_size", "batch_size", "min_actors", "max_actors"):
            if getattr(c.compute, key) < 1:
                raise ConfigError(f"compute.{key}", f"must be >= 1, got {getattr(c.compute, key)}")
        if c.compute.min_actors > c.compute.max_actors:
            raise ConfigError("compute.min_actors", "must not exceed compute.max_actors")
        if str(c.compute.fuse).lower() not in ("auto", "true", "false"):
            raise ConfigError("compute.fuse", f"must be auto, true or false, got {c.compute.fuse!r}")
        if c.compute.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError("compute.dtype", "must be auto, float32, bfloat16 or float16")
        if c.decode.max_bytes < 1 or c.decode.max_pixels < 1:
            raise ConfigError("decode.max_bytes", "limits must be positive")
        f = c.decode.frames
        if not (f in ("all", "first", "middle") or isinstance(f, (list, tuple))):
            raise ConfigError("decode.frames", f"must be all, first, middle or a list of indices, got {f!r}")
        for mod, win in c.decode.windows.items():
            if len(win) != 2 or float(win[1]) <= 0:
                raise ConfigError(f"decode.windows.{mod}", "must be [center, width] with width > 0")
        enc = c.encoder
        if enc.family not in list_families():
            raise ConfigError("encoder.family", f"unknown family '{enc.family}'; known: {', '.join(list_families())}")
        if not enc.checkpoint or enc.checkpoint == "???":
            raise ConfigError(
                "encoder.checkpoint",
                "is required for this encoder: a hub id, a local directory or an object-storage URI (s3://...)",
            )
        self.spec: EncoderSpec = get_spec(EncoderSpec(**asdict(enc)))
        self.primary = family_modality(self.spec.family)
        self.specs: dict[str, EncoderSpec] = {self.primary: self.spec}
        for modality, value in (c.encoders or {}).items():
            if value is None:
                continue
            key = f"encoders.{modality}"
            if modality not in MODALITIES:
                raise ConfigError(key, f"unknown modality '{modality}'; known: {', '.join(MODALITIES)}")
            if modality in family_modalities(self.spec.family):
                raise ConfigError(
                    key,
                    f"encoder={self.spec.name} already embeds {modality} records; "
                    f"drop {key} or pick an encoder of another modality",
                )
            spec = spec_from_entry(key, value)
            if family_modality(spec.family) != ("image" if modality == "slide" else modality):
                raise ConfigError(key, f"family {spec.family} embeds {family_modality(spec.family)}, not {modality}")
            self.specs[modality] = spec

        # what records this run embeds: each encoder's modality, plus text for an image-text encoder
        self.routes: set[str] = set(self.specs) | set(family_modalities(self.spec.family))
        self._validate_series()
        self.audio_opts = asdict(c.audio)
        self.text_opts = asdict(c.text)
        self.slide_opts = asdict(c.slide)
        AudioOptions(**self.audio_opts)
        TextOptions(**self.text_opts)
        SlideOptions(**self.slide_opts)
        self.format_opts = format_options(c)
        build_options(self.format_opts)  # each format checks its own section, naming the key at fault
        if os.path.abspath(c.output.rstrip("/")) == os.path.abspath(c.input.rstrip("/")):
            raise ConfigError("output", "must differ from input")
        self.input: InputSpec = classify_input(c.input, c.storage.options)
        if c.watch:
            self._validate_watch()
        if c.text_column is not None:
            if self.input.kind != "manifest":
                raise ConfigError("text_column", "needs a manifest input (.csv/.jsonl/.parquet) holding that column")
            if "text" not in self.routes:
                raise ConfigError("text_column", "no text encoder: set encoders.text=biomedbert (or encoder=...)")

    def _validate_watch(self) -> None:
        """``watch=true``: a DICOMweb input and sane poll settings."""
        w = self.cfg.dicomweb
        if self.input.kind != "dicomweb":
            raise ConfigError(
                "watch", "follows a DICOMweb server: input=dicomweb+http(s)://host/dicom-web[/studies/...]"
            )
        if w.feed not in FEEDS:
            raise ConfigError("dicomweb.feed", f"must be one of {', '.join(FEEDS)}, got {w.feed!r}")
        if w.interval_s <= 0:
            raise ConfigError("dicomweb.interval_s", f"must be > 0 seconds, got {w.interval_s}")
        if w.max_rounds is not None and w.max_rounds < 1:
            raise ConfigError("dicomweb.max_rounds", f"must be >= 1 (or null: until stopped), got {w.max_rounds}")
        if w.idle_exit_s is not None and w.idle_exit_s <= 0:
            raise ConfigError("dicomweb.idle_exit_s", f"must be > 0 (or null: never), got {w.idle_exit_s}")
        if w.round_max_instances < 1:
            raise ConfigError("dicomweb.round_max_instances", f"must be >= 1, got {w.round_max_instances}")

    def _validate_series(self) -> None:
        """``series:``: the mode needs its encoder (2D for slicewise, 3D for volume) and vice versa."""
        raw = asdict(self.cfg.series)
        if "volume" in self.specs and raw["mode"] == "off":
            raw["mode"] = "volume"  # a 3D encoder embeds nothing but series: its presence asks for them
        opts = SeriesOptions(
            **{
                **raw,
                "spacing": tuple(raw["spacing"]) if raw["spacing"] is not None else None,
                "modalities": tuple(raw["modalities"]),
                "channels": tuple(raw["channels"]) if raw.get("channels") is not None else None,
            }
        )
        # the chosen windows, in channel order, travel to the tasks
        self.series_opts = {**raw, "windows": {k: list(v) for k, v in opts.windows.items()}, "channels": None}
        if opts.mode == "slicewise":
            if "image" not in self.specs:
                raise ConfigError(
                    "series.mode",
                    "slicewise embeds each slice with an image encoder: set "
                    "encoder=<image preset> (e.g. rad_dino) or encoders.image=...",
                )
            if len(opts.windows) not in (1, 3):
                raise ConfigError(
                    "series.windows",
                    f"slicewise needs 1 or 3 windows (an image encoder takes RGB), got {len(opts.windows)}",
                )
        if opts.mode == "volume" and "volume" not in self.specs:
            raise ConfigError(
                "series.mode",
                "volume needs a 3D encoder: encoder=r3d_18_kinetics, "
                "encoder=torchvision_video encoder.checkpoint=..., or encoders.volume=...",
            )
        if "volume" in self.specs and opts.mode != "volume":
            raise ConfigError(
                "series.mode",
                f"a volume encoder embeds whole CT/MR series, not {opts.mode}: "
                "set series.mode=volume (or drop the volume encoder)",
            )

    # --------------------------------------------------------------- the run
    def _check_output(self, ident: dict) -> None:
        """Refuse to mix two encoders' embeddings in one output."""
        fs, root = open_fs(self.cfg.output, self.cfg.storage.options)
        marker = posixpath.join(root, "_medray.json")
        if fs.exists(marker):
            with fs.open(marker, "rb") as f:
                have = json.loads(f.read())
            for key in ("weights_hash", "preprocessing_hash"):
                if have.get(key) != ident[key]:
                    raise ConfigError(
                        "output",
                        f"already holds embeddings of encoder '{have.get('encoder')}' "
                        f"({key} differs); choose a new output location",
                    )
            extra, known = ident.get("encoders") or {}, dict(have.get("encoders") or {})
            for modality, mine in extra.items():
                theirs = known.get(modality)
                if theirs and any(theirs.get(k) != mine[k] for k in ("weights_hash", "preprocessing_hash")):
                    raise ConfigError(
                        f"encoders.{modality}",
                        f"output already holds {modality} embeddings of "
                        f"encoder '{theirs.get('encoder')}'; choose a new output location",
                    )
            if any(m not in known for m in extra) or have.get("identity_key") != ident.get("identity_key"):
                merged = {**have, "encoders": {**known, **extra}, "identity_key": ident.get("identity_key")}
                atomic_write_bytes(fs, marker, json.dumps(merged, indent=2).encode())
        else:
            atomic_write_bytes(fs, marker, json.dumps(ident, indent=2).encode())

    def _skip_applies(self, reason: str, modality: str | None) -> bool:
        """Whether a record an earlier run skipped would be skipped again (then it counts as done)."""
        if reason == "NoEncoder":
            routes = self.routes | ({"slide"} if "image" in self.specs else set())
            return modality not in routes
        if reason == "BurnedInAnnotation":
            return not self.cfg.decode.allow_burned_in
        return True

    def _check_weights(self, hashes: dict[str, str]) -> None:
        """Before Ray starts: refuse an output that holds another checkpoint's embeddings (by weights hash).

        :meth:`_check_output` checks the preprocessing hashes too, once they are built.
        """
        fs, root = open_fs(self.cfg.output, self.cfg.storage.options)
        try:
            with fs.open(posixpath.join(root, "_medray.json"), "rb") as f:
                have = json.loads(f.read())
        except (FileNotFoundError, ValueError):
            return
        known = {self.primary: have} | dict(have.get("encoders") or {})
        for modality, mine in hashes.items():
            theirs = known.get(modality) or {}
            if theirs.get("weights_hash") not in (None, mine):
                key = "output" if modality == self.primary else f"encoders.{modality}"
                what = "embeddings" if modality == self.primary else f"{modality} embeddings"
                raise ConfigError(
                    key,
                    f"already holds {what} of encoder '{theirs.get('encoder')}' "
                    "(weights_hash differs); choose a new output location",
                )

    def _known_identity(self, key: str) -> dict[str, Any] | None:
        """The output marker's identity when it was written for the same :func:`identity_key`, else None."""
        fs, root = open_fs(self.cfg.output, self.cfg.storage.options)
        try:
            with fs.open(posixpath.join(root, "_medray.json"), "rb") as f:
                have = json.loads(f.read())
        except (FileNotFoundError, ValueError):
            return None
        if have.get("identity_key") != key:
            return None
        extra = {m: e for m, e in (have.get("encoders") or {}).items() if m in self.specs}
        ident = {k: have[k] for k in ("encoder", "checkpoint", "weights_hash", "preprocessing_hash", "identity_key")}
        ident["medray_version"] = medray.__version__
        if extra:
            ident["encoders"] = extra
        return ident

    def _identify(self, hashes: dict[str, str], key: str) -> dict[str, Any]:
        """What the output marker records of this run's encoders: checkpoint, weights and preprocessing hashes."""
        ident: dict[str, Any] = {}
        for modality, spec in self.specs.items():
            entry = {
                "encoder": spec.name,
                "checkpoint": spec.checkpoint,
                "weights_hash": hashes[modality],
                "preprocessing_hash": create_preprocessor(spec).preprocessing_hash,
            }
            if modality == self.primary:
                ident.update(entry, medray_version=medray.__version__, identity_key=key)
            else:
                ident.setdefault("encoders", {})[modality] = entry
        return ident

    def _fuse(self, gpus: float) -> bool:
        """``compute.fuse``: one read-decode-embed-write actor per CPU (see :mod:`medray.pipeline.fused`)."""
        mode = str(self.cfg.compute.fuse).lower()
        if mode in ("true", "false"):
            return mode == "true"
        # the series and slide branches group and spread records before the encoder: they keep the staged plan
        return gpus == 0 and self.series_opts["mode"] == "off" and not self.slide_inputs

    def _listing(self, done: DoneIndex, instances: list[dict] | None = None) -> pa.Table | None:
        """The objects to do, listed on the driver (paths only) minus the finished ones; ``None`` for manifests.

        The listing is an Arrow table built in chunks (:func:`listing_table`): a million
        objects never sit on the driver as Python dicts. ``instances``: rows found by a
        watch round (:meth:`watch`), used instead of a listing.
        """
        c = self.cfg
        if instances is not None:
            self.slide_inputs = False
            return anti_join_table(listing_table(instances), done)
        if self.input.kind == "manifest":
            self.slide_inputs = _manifest_may_hold_slides(c.input, c.storage.options)
            return None
        if self.input.kind == "dicomweb":  # QIDO-RS on the driver: UIDs only
            table = listing_table(list_instances(c.input, dict(c.dicomweb.query)))
        else:
            table = listing_table(list_objects(c.input, c.storage.options))
        if not table.num_rows:
            raise ConfigError("input", f"no objects found under '{c.input}'")
        self.slide_inputs = _table_may_hold_slides(table)
        return anti_join_table(table, done)

    def _records(self, ray: Any, rows: pa.Table | None) -> Any:
        """The source dataset: one row per object / archive / manifest row (Ray Data streams the rest)."""
        c = self.cfg
        if rows is None:
            return read_manifest(ray, c.input, c.storage.options, text_column=c.text_column)
        blocks = max(1, min(rows.num_rows // 8, 200))
        step = -(-rows.num_rows // blocks)
        return ray.data.from_arrow([rows.slice(i, step) for i in range(0, rows.num_rows, step)])

    def run(self, instances: list[dict] | None = None) -> EmbedResult:
        """Run the pipeline and write embeddings, quarantine and the summary.

        Args:
            instances: the records to consider instead of listing the input
                (a watch round's new instances, ``{"uri", "member"}`` rows);
                those already in the output are skipped as in any rerun.
        """
        c = self.cfg
        t_start = time.perf_counter()
        clock = Stopwatch()
        run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        # Resolve (download once, verify) every checkpoint on the driver, so a wrong checkpoint
        # fails before Ray starts and provenance is known up front.
        hashes: dict[str, str] = {}
        untrained_by: dict[str, bool] = {}
        for modality, spec in self.specs.items():
            local, hashes[modality] = resolve_checkpoint(
                spec.checkpoint,
                storage_options=spec.storage_options,
                cache_dir=spec.cache_dir,
                expected_sha256=spec.sha256,
            )
            # the checkpoint's own MEDRAY_UNTRAINED marker counts too, not only encoder.untrained
            untrained_by[modality] = bool(spec.untrained or is_untrained(local))
        untrained = untrained_by[self.primary]
        self._check_weights(hashes)
        key = identity_key(self.specs, hashes)
        # The preprocessing hashes need each checkpoint's processor (transformers, torchvision: seconds
        # of imports). The output's marker remembers them under the same identity key; otherwise they
        # are built in a thread, beside the listing and Ray's start-up.
        ident = self._known_identity(key)
        pending = None if ident is not None else Background(self._identify, hashes, key)
        clock.lap("checkpoint")
        done = done_index(c.output, c.storage.options, self._skip_applies)
        clock.lap("done_index")
        rows = self._listing(done, instances)
        clock.lap("listing")
        if rows is not None and not rows.num_rows:
            # nothing left to do: no Ray, no encoder pool, no W&B run
            if pending is not None:
                ident = pending.result()
                self._check_output(ident)
            assert ident is not None
            return self._summarise(
                run_id, t_start, {}, ident, untrained, len(done), pipeline_s=0.0, total=len(done), clock=clock
            )

        ray = init_ray(
            c.ray.address,
            num_cpus=c.ray.num_cpus,
            include_dashboard=c.ray.include_dashboard,
            max_errored_blocks=c.compute.max_errored_blocks,
        )
        if self._watch_stop is not None:  # Ray's core worker installs its own SIGTERM handler: a watch keeps its own
            self._trap(self._watch_stop)
        clock.lap("ray_init")
        if pending is not None:
            ident = pending.result()
            self._check_output(ident)
            clock.lap("preprocessing_wait")
        assert ident is not None
        version = medray.__version__
        provenances: dict[str, dict] = {
            modality: {
                "encoder": extra["encoder"],
                "weights_hash": extra["weights_hash"],
                "preprocessing_hash": extra["preprocessing_hash"],
                "medray_version": version,
                "untrained": untrained_by[modality],
            }
            for modality, extra in (ident.get("encoders") or {}).items()
        }
        weights_hash, preprocessing_hash = ident["weights_hash"], ident["preprocessing_hash"]
        gpus = c.compute.num_gpus if c.compute.num_gpus is not None else (1.0 if cluster_gpus() > 0 else 0.0)
        device = c.compute.device
        if device == "auto":
            device = "cuda" if gpus > 0 else "cpu"
        opts = StageOptions(
            storage_options=dict(c.storage.options),
            max_bytes=c.decode.max_bytes,
            max_pixels=c.decode.max_pixels,
            frames=c.decode.frames,
            windows={k: list(v) for k, v in c.decode.windows.items()},
            prefer_file_voi=c.decode.prefer_file_voi,
            allow_burned_in=c.decode.allow_burned_in,
            dicomweb_in_flight=c.dicomweb.max_in_flight,
            salt=patient_salt(c.patient_salt),
            encoder_spec=self.spec,
            # finished ids: listed inputs were anti-joined on the driver, so none travel; a manifest is
            # read by the cluster, and series records (quarantined ones too) are keyed by series, so
            # there the tasks check against every finished id
            done=done.ids if rows is None or self.series_opts["mode"] != "off" else frozenset(),
            encoder_specs=dict(self.specs),
            audio=self.audio_opts,
            text=self.text_opts,
            text_column=c.text_column,
            slide=self.slide_opts,
            series=self.series_opts,
            format_options=self.format_opts,
        )
        provenance = {
            "encoder": self.spec.name,
            "weights_hash": weights_hash,
            "preprocessing_hash": preprocessing_hash,
            "medray_version": version,
            "untrained": untrained,
        }
        records = self._records(ray, rows)
        subdirs = {m: f"embeddings/{m}" for m in provenances}
        actor_kwargs: dict[str, Any] = {
            "spec": spec_to_dict(self.spec),
            "device": device,
            "dtype": c.compute.dtype,
            "batch_size": c.compute.batch_size,
            "provenance": provenance,
            "specs": {m: spec_to_dict(s) for m, s in self.specs.items()} if provenances else None,
            "provenances": {self.primary: provenance, **provenances} if provenances else None,
        }
        t_pipe = time.perf_counter()
        progress = Progress("embed", total=self._total(rows)).start()
        try:
            stats = self._execute(ray, gpus, records, opts, actor_kwargs, provenance, subdirs, progress)
        finally:
            progress.close()
        # Slide-level rows: after every tile is written, from the written tiles (idempotent).
        slide_route = "slide" if "slide" in self.specs else "image"
        slides = {"slides": 0, "pooled": 0, "tiles": 0, "background_tiles": 0}
        if slide_route in self.specs and stats.get("slide_rows"):
            slides = pool_slides(
                c.output,
                c.storage.options,
                "embeddings" if slide_route not in provenances else f"embeddings/{slide_route}",
            )
        pipeline_s = time.perf_counter() - t_pipe
        clock.lap("pipeline")
        done_before = len(done)
        return self._summarise(
            run_id, t_start, stats, ident, untrained, done_before, pipeline_s=pipeline_s, slides=slides, clock=clock
        )

    def _total(self, rows: pa.Table | None) -> int | None:
        """Records this run has to do, when the listing says (not for manifests, archives, series or slides)."""
        if rows is None or self.series_opts["mode"] != "off" or self.slide_inputs:
            return None
        if pc.any(pc.equal(rows.column("member"), ARCHIVE_MEMBER_PENDING)).as_py():
            return None  # an archive's members are counted as they are read
        return rows.num_rows

    def _execute(
        self,
        ray: Any,
        gpus: float,
        records: Any,
        opts: StageOptions,
        actor_kwargs: dict[str, Any],
        provenance: dict[str, Any],
        subdirs: dict[str, str],
        progress: Progress,
    ) -> dict[str, Any]:
        """Run the fused or the staged plan; return the summed write counters, reporting to ``progress``."""
        c = self.cfg
        if self._fuse(gpus):
            cpus = float(ray.cluster_resources().get("CPU", 1.0))
            ds = plan_fused(
                records,
                opts,
                actor_kwargs=actor_kwargs,
                output=c.output,
                storage_options=c.storage.options,
                version=medray.__version__,
                subdirs=subdirs,
                actors=max(1, int(cpus // c.compute.actor_num_cpus)),
                actor_num_cpus=c.compute.actor_num_cpus,
                # records per actor call (each call writes its own part): the read batch, at least a model batch
                batch_size=max(c.compute.read_batch_size, c.compute.batch_size),
                task_retries=c.compute.task_retries,
            )
            parts = []
            # batch_size=None: each actor call's counters as it arrives (one row each), for the progress line
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for s in batch.column("stats").to_pylist():
                    parts.append(json.loads(s))
                    progress.add(parts[-1])
            return aggregate_stats(parts)
        else:
            ds = plan_dataset(
                records,
                opts,
                encoder_spec=actor_kwargs["spec"],
                provenance=provenance,
                decode_concurrency=c.compute.decode_concurrency,
                read_batch_size=c.compute.read_batch_size,
                decode_batch_size=c.compute.decode_batch_size,
                encode_batch_size=c.compute.batch_size,
                actors=(c.compute.min_actors, c.compute.max_actors),
                num_gpus=gpus,
                device=actor_kwargs["device"],
                dtype=c.compute.dtype,
                task_retries=c.compute.task_retries,
                decode_num_cpus=c.compute.decode_num_cpus,
                actor_num_cpus=c.compute.actor_num_cpus,
                encoder_specs=actor_kwargs["specs"],
                provenances=actor_kwargs["provenances"],
                series_source=records if self.series_opts["mode"] != "off" else None,
                slide_branch=self.slide_inputs,
            )
            counter = start_counter(ray) if progress.enabled else None
            if counter is not None:
                progress.poll = lambda: ray.get(counter.counts.remote(), timeout=10)
            sink = make_sink(c.output, c.storage.options, medray.__version__, subdirs=subdirs, progress=counter)
            ds.write_datasink(sink)
            progress.poll = None
            stats = dict(sink.result)
            progress.set_counts(counts_of(stats))
            return stats

    def watch(self, stop: threading.Event | None = None) -> int:
        """``watch=true``: embed what the DICOMweb input holds, then follow new instances until stopped.

        The first round lists the input (QIDO-RS) unless the output holds a
        cursor (``_watch.json``) of the same server and feed; then each round
        polls the feed (:func:`~medray.platform.dicomweb.open_feed`) and runs
        the job on what is new. A round with nothing new starts no Ray work.
        The cursor is written after a round's rows are committed, so a job
        stopped at any point resumes where it was: instances embedded twice
        are skipped by record id (resume), none is missed. SIGTERM and
        SIGINT end the loop after the current round; ``dicomweb.max_rounds``
        and ``dicomweb.idle_exit_s`` end it too.

        Returns:
            The exit code: 0, or 3 when a round quarantined more than ``max_error_fraction``.
        """
        c, w = self.cfg, self.cfg.dicomweb
        stop = stop or threading.Event()
        fs, root = open_fs(c.output, c.storage.options)
        path = posixpath.join(root, CURSOR_FILE)
        feed = open_feed(
            c.input,
            w.feed,
            dict(w.query),
            changes_root=w.changes_root,
            stable_series=self.series_opts["mode"] != "off",
        )
        cursor = read_cursor(fs, path, feed)
        rounds, code, last_new, why = 0, 0, time.monotonic(), "stopped by a signal"
        self._watch_stop = stop
        self._trap(stop)
        log.info(
            "watching %s (%s feed, every %.0fs)",
            feed.loc.base.split("://", 1)[-1].split("/")[0],
            feed.kind,
            w.interval_s,
        )
        while not stop.is_set():
            try:
                if cursor is None:  # first round: everything the input holds (the cursor is taken first)
                    head = feed.head()
                    poll = FeedPoll(list(list_instances(c.input, dict(w.query))), head)
                else:
                    poll = feed.poll(cursor, w.round_max_instances)
            except Exception as err:
                if cursor is None:
                    raise  # the first listing fails fast (unreachable server, refused credentials)
                log.warning("watch: polling failed (%s); trying again in %.0fs", type(err).__name__, w.interval_s)
                stop.wait(w.interval_s)
                continue
            rounds += 1
            if poll.rows:
                result = self.run(instances=poll.rows)
                self._trap(stop)  # Ray may have installed its own handlers
                if result.records_read or result.skipped:
                    last_new = time.monotonic()
                    print(f"round {rounds}: {result.one_line()}", flush=True)
                    if result.error_fraction > c.max_error_fraction:
                        print(
                            f"error: round {rounds} quarantined {result.error_fraction:.1%} of its records",
                            file=sys.stderr,
                        )
                        code = 3
            if poll.cursor != cursor or rounds == 1:
                atomic_write_bytes(fs, path, cursor_state(feed, poll.cursor, rounds))
                cursor = poll.cursor
            if w.max_rounds is not None and rounds >= w.max_rounds:
                why = f"max_rounds={w.max_rounds}"
                break
            if w.idle_exit_s is not None and time.monotonic() - last_new >= w.idle_exit_s:
                why = f"nothing new for idle_exit_s={w.idle_exit_s:g}"
                break
            if not poll.more:
                stop.wait(w.interval_s)
        print(
            f"medray embed: watch ended after {rounds} round(s) ({why}); cursor {c.output.rstrip('/')}/{CURSOR_FILE}",
            flush=True,
        )
        return code

    @staticmethod
    def _trap(stop: threading.Event) -> None:
        """SIGTERM/SIGINT set ``stop`` (the current round finishes) instead of killing the job mid-write."""
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum: int, frame: Any) -> None:
            log.warning("watch: %s received; stopping after the current round", signal.Signals(signum).name)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)

    def _summarise(
        self,
        run_id: str,
        t_start: float,
        stats: dict,
        ident: dict[str, Any],
        untrained: bool,
        done_before: int,
        *,
        pipeline_s: float,
        slides: dict | None = None,
        total: int | None = None,
        clock: Stopwatch | None = None,
    ) -> EmbedResult:
        """The result: ``summary.json``, ``runs/<run_id>.json`` and a W&B run (none for a run that read nothing)."""
        c = self.cfg
        slides = slides or {"slides": 0, "pooled": 0, "tiles": 0, "background_tiles": 0}
        wall = time.perf_counter() - t_start
        embedded = int(stats.get("records", 0))
        quarantined = int(stats.get("quarantined", 0))
        read = embedded + quarantined
        if total is None:  # what the output holds now (a run that wrote nothing already knows)
            total = len(done_index(c.output, c.storage.options, self._skip_applies))
        steady = _steady_rate(stats.get("parts") or [])
        if clock is not None:
            clock.lap("output_count")
        started = process_start()
        first = (stats.get("parts") or [[None]])[0][0]
        config = dict(self.resolved)
        config["storage"] = {"options": redact_options(c.storage.options)}
        config.get("encoder", {}).pop("storage_options", None)
        result = EmbedResult(
            run_id=run_id,
            output=c.output,
            encoder=self.spec.name,
            untrained=untrained,
            records_done_before=done_before,
            records_read=read,
            records_embedded=embedded,
            rows_written=int(stats.get("rows", 0)) + slides["pooled"],
            quarantined=quarantined,
            error_fraction=(quarantined / read) if read else 0.0,
            wall_s=wall,
            pipeline_s=pipeline_s,
            records_per_s=(read / wall) if wall > 0 else 0.0,
            steady_records_per_s=steady,
            stage_seconds={
                k[2:]: round(float(stats.get(k, 0.0)), 4) for k in ("t_read", "t_decode", "t_preprocess", "t_encode")
            },
            records_total_in_output=total,
            config=config,
            skipped=int(stats.get("skipped", 0)),
            skipped_by_modality=_count_pairs(stats.get("skipped_by_modality") or []),
            skipped_by_reason=_count_pairs(stats.get("skipped_by_reason") or []),
            quarantined_by_class=_count_pairs(stats.get("quarantined_by_class") or []),
            encoders={m: s.name for m, s in self.specs.items()},
            slides=slides,
            driver_seconds=dict(clock.phases) if clock is not None else {},
            first_row_s=round(first - started, 3) if first is not None and started is not None else None,
            driver_peak_rss_mb=_peak_rss_mb(),
            outcome_counts=_count_triples(stats.get("outcome_counts") or []),
            timeline=_timeline(stats.get("parts") or [], started),
        )
        summary = json.dumps(asdict(result), indent=2, default=str).encode()
        fs, root = open_fs(c.output, c.storage.options)
        atomic_write_bytes(fs, posixpath.join(root, "runs", f"{run_id}.json"), summary)
        atomic_write_bytes(fs, posixpath.join(root, "summary.json"), summary)
        report = _write_report(c.output, c.storage.options) if read or result.skipped else None
        if report is not None:  # drawn from the durable summary; then the summary says where it is
            result.report = report.uri
            try:
                summary = json.dumps(asdict(result), indent=2, default=str).encode()
                atomic_write_bytes(fs, posixpath.join(root, "runs", f"{run_id}.json"), summary)
                atomic_write_bytes(fs, posixpath.join(root, "summary.json"), summary)
            except Exception as err:  # noqa: BLE001 - the summary without the report's address is still whole
                log.warning("summary.json not updated with the report: %s: %s", type(err).__name__, err)
        if c.tracking.enabled and read:
            log_run(
                job="embed",
                config=config,
                summary=asdict(result),
                project=c.tracking.project,
                mode=c.tracking.mode,
                group=c.tracking.group or default_group(),
                name=c.tracking.name or c.run_name,
                directory=c.tracking.dir,
                artifact=RunArtifact(  # the summary, not the embeddings: the output URI is metadata
                    artifact_name("embeddings", self.spec.name, c.output),
                    "embeddings",
                    files={"summary.json": summary},
                    metadata={**ident, "output": c.output, "run_id": run_id, "records_total_in_output": total},
                ),
                report=report,
            )
        return result


def _write_report(output: str, options: Any) -> Report | None:
    """Draw ``<output>/report/index.html`` from what the output holds; a failure is one log line, never the job's."""
    try:
        report = embed_report(output, options)
        report.write(output, options)
        return report
    except Exception as err:  # noqa: BLE001 - the embeddings are written; a missing report must not fail the run
        log.warning("report not written: %s: %s", type(err).__name__, err)
        return None


def _timeline(parts: list, started: float | None, points: int = 200) -> list:
    """``[[seconds since the process started, records finished], ...]`` from the sink's parts, at most ``points``."""
    if not parts:
        return []
    t0 = started if started is not None else parts[0][0]
    rows = sorted((float(t) - t0, int(n)) for t, n in parts)
    step = -(-len(rows) // points)  # merge neighbours so a long run stays small
    return [
        [round(rows[min(i + step, len(rows)) - 1][0], 3), sum(n for _, n in rows[i : i + step])]
        for i in range(0, len(rows), step)
    ]


def _peak_rss_mb() -> float | None:
    """This process's peak resident memory in MiB (None where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:  # not on this platform
        return None
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _count_pairs(pairs: list) -> dict:
    out: dict = {}
    for k, v in pairs:
        out[k] = out.get(k, 0) + int(v)
    return out


def _count_triples(rows: list) -> list:
    """Sum ``[outcome, reason, detail, n]`` rows over the run's writes."""
    out: dict[tuple, int] = {}
    for outcome, reason, detail, n in rows:
        out[(outcome, reason, detail)] = out.get((outcome, reason, detail), 0) + int(n)
    return [[*k, n] for k, n in sorted(out.items())]


def _steady_rate(parts: list) -> float | None:
    """Records/s between the first and the last committed part (start-up excluded)."""
    if len(parts) < 3:
        return None
    t0, t1 = parts[0][0], parts[-1][0]
    records = sum(n for _, n in parts[1:])
    return records / (t1 - t0) if t1 > t0 else None


#: Names that may be whole-slide images (lower case): the slide formats' extensions and TIFF.
_SLIDE_NAMES = tuple(e.lower() for e in (*SLIDE_EXTENSIONS, ".tif", ".tiff"))


def may_hold_slides(uris: Iterable[str]) -> bool:
    """Whether whole-slide images may be among the inputs, by name (TIFF and slide-format extensions).

    Only decides whether the pipeline adds its slide branch (tiles of one slide
    spread over many tasks); a slide with another name is still found by its
    content and tiled, by the task that reads it.
    """
    return any(str(u).lower().endswith(_SLIDE_NAMES) for u in uris)


def _table_may_hold_slides(table: pa.Table) -> bool:
    """:func:`may_hold_slides` over a listing table's ``uri`` column (vectorised)."""
    lower = pc.utf8_lower(table.column("uri"))
    return any(pc.any(pc.ends_with(lower, e)).as_py() for e in _SLIDE_NAMES)


def _manifest_may_hold_slides(uri: str, options: Any, rows: int = 10_000) -> bool:
    """:func:`may_hold_slides` over the first ``rows`` URIs of a manifest (read on the driver)."""
    try:
        batch = next(iter_manifest_batches(uri, ["uri"], options), None)
    except Exception:  # noqa: BLE001 - no uri column (documents) or unreadable: read_manifest reports it
        return False
    return batch is not None and may_hold_slides(u for u in batch.column(0).slice(0, rows).to_pylist() if u)


def _show(cfg: DictConfig, what: str) -> int:
    """``show=outcomes``: the outcome table of an existing output (no input, no Ray)."""
    if what != "outcomes":
        raise ConfigError("show", f"must be outcomes (or null), got {what!r}")
    if OmegaConf.is_missing(cfg, "output"):
        raise ConfigError("output", "is required: the output whose outcomes to show")
    options = cast("dict[str, Any]", OmegaConf.to_container(cfg.storage.options, resolve=True))
    fs, root = open_fs(cfg.output, options)
    if not fs.exists(root):
        raise ConfigError("output", f"nothing found at '{cfg.output}'")
    print(format_outcomes(output_outcomes(cfg.output, options), cfg.output), flush=True)
    return 0


def main(cfg: DictConfig) -> int:
    """Hydra entry point body; returns the process exit code."""
    show = OmegaConf.select(cfg, "show")
    if show is not None:
        return _show(cfg, str(show))
    job = EmbedJob(cfg)  # ConfigError names the key and the fix
    if job.cfg.watch:
        return job.watch()  # rounds until stopped (SIGTERM/SIGINT, max_rounds, idle_exit_s)
    result = job.run()  # first line that touches Ray
    print(result.one_line(), flush=True)
    if result.report:
        print(f"medray embed: report {result.report}", flush=True)
    print(result.outcomes_table(), file=sys.stderr, flush=True)
    if result.error_fraction > job.cfg.max_error_fraction:
        print(
            f"error: {result.quarantined} of {result.records_read} records quarantined "
            f"({result.error_fraction:.1%}) > max_error_fraction={job.cfg.max_error_fraction:.1%}; "
            f"see {posixpath.join(job.cfg.output, 'quarantine')}",
            file=sys.stderr,
        )
        return 3
    return 0
