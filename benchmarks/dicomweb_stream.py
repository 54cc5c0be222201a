"""A large DICOMweb study streams with bounded driver memory; writes JSON.

Starts Orthanc (with its DICOMweb plugin, as the tests do), uploads two
studies of tiny generated CR instances (``--small`` and ``--large``
instances, one series each), embeds each study with ``medray embed
input=dicomweb+http://.../studies/<uid>`` (a tiny random ViT) and compares
the driver's peak resident memory (``driver_peak_rss_mb`` of the summary):
the driver holds each instance's UIDs and nothing of its pixels, so the
growth from the small study to the large one stays a few MiB while the
instance count grows tenfold.

Too slow for the test suite on a two-core machine (500 embeddings), hence a
benchmark. Usage::

    python benchmarks/dicomweb_stream.py [--small 50] [--large 500] [--out benchmarks/results/dicomweb_stream.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _study(root: Path, n: int, size: int = 16) -> tuple[str, list[Path]]:
    """``n`` tiny CR instances of one new study and series; (study UID, paths)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

    study, series = generate_uid(), generate_uid()
    folder = root / study
    folder.mkdir(parents=True)
    rng = np.random.default_rng(n)
    paths = []
    for i in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.PatientID, ds.InstanceNumber = "CR", "BENCH-WEB", i + 1
        ds.BurnedInAnnotation = "NO"
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
        p = folder / f"{i:05d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return study, paths


def _embed(medray: str, uri: str, out: Path, ckpt: str, env: dict) -> dict:
    args = [
        medray,
        "embed",
        f"input={uri}",
        f"output={out}",
        "encoder=hf_image",
        f"encoder.checkpoint={ckpt}",
        "tracking.enabled=false",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"medray embed failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {
        "instances": summary["records_read"],
        "embedded": summary["records_embedded"],
        "driver_peak_rss_mb": summary["driver_peak_rss_mb"],
        "wall_s": round(time.perf_counter() - t0, 2),
        "records_per_s": round(summary["records_per_s"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--small", type=int, default=50)
    parser.add_argument("--large", type=int, default=500)
    parser.add_argument("--out", default="benchmarks/results/dicomweb_stream.json")
    args = parser.parse_args()

    from medray.encoders import build_tiny_checkpoint
    from medray.testing.orthanc import OrthancServer

    medray = str(Path(sys.executable).parent / "medray")
    with tempfile.TemporaryDirectory(prefix="medray-bench-web-") as tmp, OrthancServer() as pacs:
        root = Path(tmp)
        ckpt = build_tiny_checkpoint("hf_image", str(root / "ckpt"), arch="vit", image_size=32)
        env = dict(os.environ, MEDRAY_HOME=str(root / "home"), MEDRAY_PROGRESS="0", **pacs.env())
        runs = {}
        for name, n in (("small", args.small), ("large", args.large)):
            study, paths = _study(root / "dicom", n)
            t0 = time.perf_counter()
            pacs.upload(paths)
            upload_s = time.perf_counter() - t0
            runs[name] = _embed(medray, f"{pacs.dicomweb_uri}/studies/{study}", root / f"out-{name}", ckpt, env)
            runs[name]["upload_s"] = round(upload_s, 2)
    growth = runs["large"]["driver_peak_rss_mb"] - runs["small"]["driver_peak_rss_mb"]
    result = {
        "benchmark": "dicomweb_stream",
        "runs": runs,
        "driver_rss_growth_mb": round(growth, 1),
        "driver_rss_growth_per_1000_instances_mb": round(1000 * growth / max(1, args.large - args.small), 2),
        "bounded": growth < 64,  # MiB: UIDs only on the driver, never pixels
        "hardware": {"machine": platform.machine(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()},
        "python": platform.python_version(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
