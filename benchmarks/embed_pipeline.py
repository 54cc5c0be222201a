"""Ratio benchmark of the embedding path; writes JSON.

Measured side by side in one run (machines here are noisy):

* per-record single-core times of read, decode, preprocess and model;
* throughput of a plain single-process loop doing the same work;
* throughput of ``medray embed``'s Ray Data pipeline on all cores, at steady state:
  records committed between the first and the last output part (Ray, actor and
  model start-up excluded; the figure including start-up is reported beside it);
* efficiency = pipeline throughput / (cores / per-record serial time);
* DICOM decode MB/s through medray vs a raw ``dcmread().pixel_array`` loop.

Usage::

    python benchmarks/embed_pipeline.py [--n 240] [--size 512] [--out benchmarks/results/embed_pipeline.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def _make_dicoms(root: Path, n: int, size: int, syntax: str) -> list[Path]:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "CR"
        ds.BurnedInAnnotation = "NO"  # synthetic: no text in the pixels (secondary capture is skipped without it)
        ds.PatientID = f"BENCH{i}"
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
        yy, xx = np.mgrid[:size, :size]
        img = 1500 + 800 * np.sin(xx / 17.0 + i) * np.cos(yy / 23.0) + rng.normal(0, 60, (size, size))
        ds.PixelData = np.clip(img, 0, 4095).astype(np.uint16).tobytes()
        if syntax == "rle":
            from pydicom.uid import RLELossless

            ds.compress(RLELossless)
        elif syntax == "j2k":
            from pydicom.uid import JPEG2000Lossless

            ds.compress(JPEG2000Lossless)
        p = root / f"img{i:05d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def _make_checkpoint(root: Path, image_size: int, hidden: int, layers: int) -> str:
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(
        image_size=image_size,
        patch_size=16,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=hidden * 4,
    )
    out = root / "ckpt"
    ViTModel(cfg).save_pretrained(out)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(out)
    (out / "MEDRAY_UNTRAINED").write_text("benchmark: random weights\n")
    return str(out)


def _serial(paths: list[Path], ckpt: str, batch: int) -> dict:
    """Single-core per-record stage times and the plain loop's throughput."""
    import torch

    torch.set_num_threads(1)
    from medray.encoders import create_encoder, create_preprocessor, get_spec
    from medray.platform.decoders import decode_bytes

    spec = get_spec("hf_image", checkpoint=ckpt)
    enc = create_encoder(spec)
    pre = create_preprocessor(spec)
    enc.embed(pre.preprocess([np.zeros((64, 64, 3), np.uint8)] * batch))  # warm-up
    t = {"read": 0.0, "decode": 0.0, "preprocess": 0.0, "model": 0.0}
    t0 = time.perf_counter()
    pending = []
    for p in paths:
        a = time.perf_counter()
        data = p.read_bytes()
        b = time.perf_counter()
        dec = decode_bytes(data, name=p.name)
        c = time.perf_counter()
        pending.append(pre.preprocess([f.image for f in dec.frames]))
        d = time.perf_counter()
        t["read"] += b - a
        t["decode"] += c - b
        t["preprocess"] += d - c
        if len(pending) == batch:
            e = time.perf_counter()
            enc.embed(np.concatenate(pending))
            t["model"] += time.perf_counter() - e
            pending = []
    if pending:
        e = time.perf_counter()
        enc.embed(np.concatenate(pending))
        t["model"] += time.perf_counter() - e
    wall = time.perf_counter() - t0
    n = len(paths)
    per = {k: v / n for k, v in t.items()}
    return {
        "per_record_s": per,
        "per_record_total_s": sum(per.values()),
        "plain_loop_records_per_s": n / wall,
        "plain_loop_wall_s": wall,
    }


def _pipeline(input_dir: Path, out: Path, ckpt: str, batch: int, cores: int) -> dict:
    from omegaconf import OmegaConf

    from medray.config import EmbedConf, register_schemas
    from medray.jobs.embed import EmbedJob
    from medray.platform.runtime import init_ray

    register_schemas()
    init_ray(num_cpus=cores)  # started before timing: Ray start-up is not the pipeline

    def job(inp: Path, outp: Path):
        cfg = OmegaConf.structured(EmbedConf)
        cfg.input, cfg.output = str(inp), str(outp)
        cfg.encoder.name, cfg.encoder.family, cfg.encoder.checkpoint = "bench_vit", "hf_image", ckpt
        cfg.tracking.enabled = False
        cfg.compute.batch_size = batch
        cfg.compute.decode_batch_size = batch
        cfg.compute.read_batch_size = batch
        cfg.compute.min_actors = cfg.compute.max_actors = cores  # fixed pool: no autoscaling lag in the timing
        cfg.compute.actor_num_cpus = 0.5
        cfg.compute.decode_num_cpus = 0.5
        return EmbedJob(cfg).run()

    warm = out.parent / "warm_in"
    warm.mkdir(exist_ok=True)
    for p in sorted(input_dir.iterdir())[:8]:
        shutil.copy(p, warm / p.name)
    job(warm, out.parent / "warm_out")  # workers and imports warm, checkpoint hashed
    res = job(input_dir, out)
    return {
        "records": res.records_embedded,
        "pipeline_wall_s": res.pipeline_s,
        "pipeline_records_per_s_including_startup": res.records_embedded / res.pipeline_s,
        "pipeline_records_per_s": res.steady_records_per_s,
        "quarantined": res.quarantined,
    }


def _decode_mbps(paths: list[Path]) -> dict:
    import pydicom

    from medray.platform.decoders import decode_bytes

    blobs = [p.read_bytes() for p in paths]
    mb = sum(len(b) for b in blobs) / 1e6
    for b in blobs[:4]:
        decode_bytes(b)
        _ = pydicom.dcmread(io.BytesIO(b)).pixel_array
    t0 = time.perf_counter()
    for b in blobs:
        _ = pydicom.dcmread(io.BytesIO(b)).pixel_array
    raw = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b in blobs:
        decode_bytes(b)
    med = time.perf_counter() - t0
    return {"raw_pixel_array_MBps": mb / raw, "medray_decode_MBps": mb / med, "ratio": raw / med}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=240)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default="benchmarks/results/embed_pipeline.json")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="medray-bench-"))
    try:
        data = tmp / "in"
        data.mkdir()
        paths = _make_dicoms(data, args.n, args.size, "explicit")
        rle_dir = tmp / "rle"
        rle_dir.mkdir()
        rle = _make_dicoms(rle_dir, min(args.n, 60), args.size, "rle")
        ckpt = _make_checkpoint(tmp, args.image_size, args.hidden, args.layers)
        os.environ.setdefault("MEDRAY_PATIENT_SALT", "benchmark")
        os.environ["MEDRAY_PROGRESS"] = "0"
        serial = _serial(paths, ckpt, args.batch)
        j2k_dir = tmp / "j2k"
        j2k_dir.mkdir()
        j2k = _make_dicoms(j2k_dir, min(args.n, 30), args.size, "j2k")
        decode = {
            "explicit_vr_le": _decode_mbps(paths),
            "rle_lossless": _decode_mbps(rle),
            "jpeg2000_lossless": _decode_mbps(j2k),
        }
        pipe = _pipeline(data, tmp / "out", ckpt, args.batch, args.cores)
        ideal = args.cores / serial["per_record_total_s"]
        result = {
            "benchmark": "embed_pipeline",
            "inputs": {
                "records": args.n,
                "dicom": f"{args.size}x{args.size} uint16 CR",
                "model": f"ViT hidden={args.hidden} layers={args.layers} image={args.image_size} (random)",
                "batch_size": args.batch,
            },
            "hardware": {"cores": args.cores, "machine": platform.machine(), "python": platform.python_version()},
            "serial": serial,
            "pipeline": pipe,
            "ideal_records_per_s": ideal,
            "efficiency": pipe["pipeline_records_per_s"] / ideal,
            "efficiency_including_startup": pipe["pipeline_records_per_s_including_startup"] / ideal,
            "efficiency_target": 0.8,
            "pipeline_vs_plain_loop": pipe["pipeline_records_per_s"] / serial["plain_loop_records_per_s"],
            "decode": decode,
            "decode_ratio_target": 0.9,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
