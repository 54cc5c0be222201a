"""``medray demo``: the embedded default of ``medray embed``.

Generates sample inputs locally (DICOMs in several transfer syntaxes, photos,
archives and a few hostile files, and a labelled set of chest phantoms of 48
patients), then runs the embed job on them with the tiny *untrained* demo
encoder, on a local Ray, writing under ``$MEDRAY_HOME`` (default ``.medray``).
Any embed key can be overridden. The phantoms' labels (``lesion``,
``effusion``; ``patient``, ``site``, ``sex``) are in ``demo/labels.csv``, for
``medray probe embeddings=.medray/demo/embeddings labels=.medray/demo/labels.csv``.
"""

from __future__ import annotations

import contextlib
import os
import shutil

from medray.jobs import JobInfo
from medray.jobs.embed import main as _embed_main
from medray.testing.samples import generate_samples
from medray.testing.samples_train import generate_training_samples, write_training_manifest

__all__ = ["JOB", "main", "prepare_argv"]

JOB = JobInfo(
    "demo",
    "generate sample DICOMs locally and embed them with the tiny (untrained) demo encoder",
    config_name="embed",
    order=11,
)


def prepare_argv(argv: list[str]) -> list[str]:
    """Generate the samples once and point ``input``/``output`` at them."""
    home = os.path.abspath(os.environ.get("MEDRAY_HOME", ".medray"))
    samples = os.path.join(home, "demo", "samples")
    output = os.path.join(home, "demo", "embeddings")
    if not os.path.exists(os.path.join(home, "demo", "samples.json")):
        info = generate_samples(samples)
        chest = os.path.join(samples, "chest")  # a labelled set for `medray probe`
        generate_training_samples(chest, n_patients=48, images_per_patient=3, size=64)
        write_training_manifest(chest, chest)  # uri = the path `medray embed` reads
        shutil.move(os.path.join(chest, "manifest.csv"), os.path.join(home, "demo", "labels.csv"))
        for name in ("samples.json", "manifest.parquet"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(chest, name))
        # The manifests and the index describe the samples; they are not inputs of the demo run.
        for name in ("samples.json", "manifest.csv", "manifest.parquet"):
            if os.path.exists(os.path.join(samples, name)):
                shutil.move(os.path.join(samples, name), os.path.join(home, "demo", name))
        exp = info.get("expected", {})
        print(
            f"medray demo: generated {exp.get('dicom_files', '?')} DICOMs, {exp.get('photos', '?')} photos, "
            f"2 archives, {exp.get('hostile_files', '?')} hostile files and 144 labelled chest phantoms "
            f"(labels: {os.path.join(home, 'demo', 'labels.csv')}) in {samples}",
            flush=True,
        )
    defaults = [f"input={samples}", f"output={output}", "encoder=demo_tiny_vit", "max_error_fraction=0.5"]
    given = {a.split("=", 1)[0].lstrip("+~") for a in argv if "=" in a}
    return [d for d in defaults if d.split("=", 1)[0] not in given] + list(argv)


main = _embed_main
