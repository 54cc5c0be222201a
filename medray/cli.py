"""``medray <job> [hydra overrides]``: the one console entry point.

Each job is a Hydra app (``conf/<job>.yaml``); ``medray <job> --help`` and
``--cfg job`` show its composed config, and any key can be overridden as
``key=value``.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

__all__ = ["main", "JOBS"]

#: job name -> (config name or None, one-line description)
JOBS: dict[str, tuple[str | None, str]] = {
    "embed": ("embed", "stream DICOM/images from a prefix, manifest or archive into embeddings (Parquet)"),
    "demo": ("embed", "generate sample DICOMs locally and embed them with the tiny (untrained) demo encoder"),
    "samples": (None, "write synthetic sample DICOMs, photos, archives and a manifest: medray samples <dir>"),
    "encoders": (None, "list registered encoder presets and families: medray encoders [pattern]"),
}

_USAGE = """usage: medray <job> [key=value ...] [--help] [--cfg job]

medray: a distributed platform for healthcare foundation models on Ray.

jobs:
{jobs}

examples:
  medray embed input=s3://bucket/cxr/ output=s3://bucket/emb/rad-dino encoder=rad_dino
  medray embed input=/data/manifest.parquet output=/data/emb encoder=hf_image encoder.checkpoint=s3://models/my-vit
  medray embed --cfg job          # show the composed config
  medray demo                     # the embedded default: local Ray, local files, generated samples
"""


def _usage() -> str:
    width = max(len(j) for j in JOBS)
    return _USAGE.format(jobs="\n".join(f"  {j.ljust(width)}  {d}" for j, (_, d) in JOBS.items()))


def _run_hydra(job: str, config_name: str, body: Callable, argv: Sequence[str]) -> None:
    import hydra
    from omegaconf import DictConfig

    from medray.config import CONF_DIR, register_schemas
    from medray.platform.errors import ConfigError

    register_schemas()

    @hydra.main(config_path=CONF_DIR, config_name=config_name, version_base=None)
    def _app(cfg: DictConfig) -> None:
        try:
            code = body(cfg)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted: rerun the same command to resume; finished parts are kept", file=sys.stderr)
            sys.exit(130)
        if code:
            sys.exit(code)

    sys.argv = [f"medray {job}", *argv]
    _app()


def _embed(cfg: object) -> int:
    from medray.jobs.embed import main as embed_main

    return embed_main(cfg)  # type: ignore[arg-type]


def _demo(argv: list[str]) -> None:
    import shutil

    from medray.platform.samples import generate_samples

    home = os.path.abspath(os.environ.get("MEDRAY_HOME", ".medray"))
    samples = os.path.join(home, "demo", "samples")
    output = os.path.join(home, "demo", "embeddings")
    if not os.path.exists(os.path.join(home, "demo", "samples.json")):
        info = generate_samples(samples)
        # The manifests and the index describe the samples; they are not inputs of the demo run.
        for name in ("samples.json", "manifest.csv", "manifest.parquet"):
            if os.path.exists(os.path.join(samples, name)):
                shutil.move(os.path.join(samples, name), os.path.join(home, "demo", name))
        exp = info.get("expected", {})
        print(f"medray demo: generated {exp.get('dicom_files', '?')} DICOMs, {exp.get('photos', '?')} photos, "
              f"2 archives and {exp.get('hostile_files', '?')} hostile files in {samples}", flush=True)
    defaults = [f"input={samples}", f"output={output}", "encoder=demo_tiny_vit", "max_error_fraction=0.5"]
    given = {a.split("=", 1)[0].lstrip("+~") for a in argv if "=" in a}
    argv = [d for d in defaults if d.split("=", 1)[0] not in given] + list(argv)
    _run_hydra("demo", "embed", _embed, argv)


def _samples(argv: list[str]) -> None:
    from medray.platform.samples import generate_samples

    if not argv or argv[0] in ("-h", "--help"):
        print("usage: medray samples <out_dir> [n]")
        return
    n = int(argv[1]) if len(argv) > 1 else 24
    info = generate_samples(argv[0], n=n)
    print(f"wrote samples to {argv[0]}: {', '.join(sorted(info))}")


def _encoders(argv: list[str]) -> None:
    from medray.encoders import list_encoders

    for name in list_encoders(argv[0] if argv else "*"):
        print(name)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: dispatch to a job."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    job, rest = argv[0], argv[1:]
    if job not in JOBS:
        print(f"error: unknown job '{job}'\n\n{_usage()}", file=sys.stderr)
        sys.exit(2)
    if job == "embed":
        _run_hydra("embed", "embed", _embed, rest)
    elif job == "demo":
        _demo(rest)
    elif job == "samples":
        _samples(rest)
    elif job == "encoders":
        _encoders(rest)


if __name__ == "__main__":
    main()
