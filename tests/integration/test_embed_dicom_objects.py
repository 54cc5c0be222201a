"""The DICOM objects archives hold, through ``medray embed``: real Ray, the CLI, local files.

One CT phantom is written three times: as an axial classic series, as a
sagittal classic series of the same patient-space voxels, and as one Enhanced
CT object (frames shuffled, each with its own rescale) built from the axial
series. In ``series.mode=volume`` all three reach the 3D encoder as the same
volume on the patient axes, so their embeddings agree.
"""

from __future__ import annotations

import json
import random

import fsspec
import numpy as np
import pytest
from test_embed_cli import read_parts, run_medray  # same directory (pytest rootdir-relative import)

from medray.encoders.video import build_video_checkpoint
from medray.testing.dicom_objects import enhanced_from_series, phantom_acquisition
from medray.testing.samples import ct_phantom, ct_series

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_an_enhanced_ct_and_a_sagittal_series_embed_as_the_axial_series_volume(tmp_path):
    phantom = ct_phantom(12, 32, seed=21)
    rng = random.Random(0)
    axial = ct_series(phantom, seed=21, series="axial", patient_id="PHIID-OBJECTS-1")
    sagittal_args = phantom_acquisition(phantom, "sagittal")
    sagittal = ct_series(
        sagittal_args.pop("phantom"), seed=22, series="sagittal", patient_id="PHIID-OBJECTS-1", **sagittal_args
    )
    inputs = tmp_path / "in"
    for name, files in (("axial", axial), ("sagittal", sagittal)):
        (inputs / name).mkdir(parents=True)
        for data in files:
            (inputs / name / f"{rng.randrange(10**6):06d}.dcm").write_bytes(data)
    (inputs / "enhanced.dcm").write_bytes(enhanced_from_series(axial, seed=3))
    home = tmp_path / "home"
    home.mkdir()
    corpus = {"home": home}
    out = tmp_path / "out"
    proc = run_medray(
        corpus,
        "embed",
        f"input={inputs}",
        f"output={out}",
        "encoder=torchvision_video",
        f"encoder.checkpoint={build_video_checkpoint(str(tmp_path / 'r3d'), arch='r3d_18')}",
        "series.mode=volume",
        "ray.num_cpus=2",
        "tracking.enabled=false",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records_embedded"] == 3 and summary["quarantined"] == 0, summary
    rows = read_parts(fsspec.filesystem("file"), str(out / "embeddings")).to_pylist()
    by_source = {r["uri"].rsplit("/", 2)[-2] if not r["uri"].endswith("enhanced.dcm") else "enhanced": r for r in rows}
    assert set(by_source) == {"axial", "sagittal", "enhanced"} and len(rows) == 3
    want = np.asarray(by_source["axial"]["embedding"])
    for source in ("sagittal", "enhanced"):
        got = by_source[source]
        diff = float(np.abs(np.asarray(got["embedding"]) - want).max())
        assert diff <= 1e-5, (source, diff)
        assert (got["segment"], got["slice_start"], got["slice_end"]) == ("volume", 0, 11)
        assert got["spacing_mm"] == pytest.approx([2.5, 0.8, 0.8]) and got["modality"] == "CT"
    assert by_source["enhanced"]["patient_key"] == by_source["axial"]["patient_key"]
    for path in out.rglob("*"):
        if path.is_file():
            assert b"PHIID-OBJECTS" not in path.read_bytes()
