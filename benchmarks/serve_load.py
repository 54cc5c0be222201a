"""Load benchmark of ``medray serve`` on loopback; writes JSON.

A bounded closed-loop client (C workers, each sending its next request when
the previous answer arrives) posts the same 224x224 PNG to
``/v1/embeddings`` for a fixed time at concurrency 1, 8 and 32, once with
dynamic batching on (``max_batch_size=32``) and once off
(``max_batch_size=1``, same code path, same replica), on one encoder replica
of a random ViT-Tiny-sized model (hidden 192, 12 layers, 224 px, patch 16).

Also measured, in the benchmark process itself and with the same functions
(decode + preprocess + embed, one request at a time): the in-process latency,
so that ``serve_added_ms_p50`` = HTTP p50 at concurrency 1 minus in-process
p50 is what the proxy, the ingress and the encoder deployment add.

Usage::

    python benchmarks/serve_load.py [--seconds 10] [--out benchmarks/results/serve_load.json]

The client shares the machine's cores with Serve; on a 2-core machine that
is a real part of the figures (written to the JSON with the hardware).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _checkpoint(root: Path) -> str:
    """A random ViT-Tiny-sized transformers checkpoint at 224 px (no download)."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=224, patch_size=16, hidden_size=192, num_hidden_layers=12, num_attention_heads=3,
                    intermediate_size=768)
    out = root / "vit_tiny_224"
    ViTModel(cfg).save_pretrained(out)
    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(out)
    (out / "MEDRAY_UNTRAINED").write_text("benchmark: random weights\n")
    return str(out)


def _png() -> bytes:
    from PIL import Image

    yy, xx = np.mgrid[:224, :224]
    rgb = np.stack([(xx + yy) % 256, (2 * xx) % 256, (3 * yy) % 256], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _in_process(ckpt: str, data: bytes, threads: int, n: int) -> dict:
    """Decode + preprocess + embed one request at a time, in this process (the floor Serve is compared to)."""
    import torch

    from medray.encoders import create_encoder, get_spec
    from medray.serve.encoder import DecodeSettings, decode_input

    torch.set_num_threads(threads)
    enc = create_encoder(get_spec("hf_image", checkpoint=ckpt), device="cpu")
    settings = DecodeSettings(windows={"CT": (-600.0, 1500.0)})
    lat = []
    for i in range(n + 5):
        t0 = time.perf_counter()
        enc.embed(decode_input({"data": data, "name": "x.png"}, settings, enc).pixels)
        if i >= 5:
            lat.append(time.perf_counter() - t0)
    x1 = enc.preprocess([np.zeros((224, 224, 3), np.uint8)])
    x32 = np.repeat(x1, 32, axis=0)
    enc.embed(x32)
    t0 = time.perf_counter()
    for _ in range(3):
        enc.embed(x32)
    per_img_b32 = (time.perf_counter() - t0) / 96
    t0 = time.perf_counter()
    for _ in range(32):
        enc.embed(x1)
    per_img_b1 = (time.perf_counter() - t0) / 32
    del enc
    return {"p50_ms": 1000 * _pct(lat, 50), "p99_ms": 1000 * _pct(lat, 99), "n": n,
            "model_ms_per_image_batch1": 1000 * per_img_b1, "model_ms_per_image_batch32": 1000 * per_img_b32,
            "model_batching_speedup": per_img_b1 / per_img_b32}


async def _closed_loop(url: str, data: bytes, concurrency: int, seconds: float, warmup: float) -> dict:
    import aiohttp

    lat: list[float] = []
    batch: list[int] = []
    codes: dict[int, int] = {}
    t_start = time.perf_counter()
    t_measure = t_start + warmup
    t_end = t_measure + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            async with session.post(url, data=data, headers={"Content-Type": "image/png"}) as resp:
                body = await resp.read()
            t1 = time.perf_counter()
            if t0 >= t_measure and t1 <= t_end:
                codes[resp.status] = codes.get(resp.status, 0) + 1
                if resp.status == 200:
                    lat.append(t1 - t0)
                    batch.append(int(json.loads(body).get("batch_size") or 0))

    conn = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return {"concurrency": concurrency, "seconds": seconds, "requests": len(lat), "rps": len(lat) / seconds,
            "p50_ms": 1000 * _pct(lat, 50), "p99_ms": 1000 * _pct(lat, 99),
            "mean_batch_size": statistics.fmean(batch) if batch else 0.0, "max_batch_size": max(batch, default=0),
            "status_codes": {str(k): v for k, v in codes.items()}}


def _wait(url: str, timeout: float = 180) -> None:
    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready")


def _args(ckpt: str, port: int, batch: int, wait_s: float, threads: int) -> dict:
    fixed = {"min_replicas": 1, "max_replicas": 1}
    return {
        "encoder": {"name": "vit_tiny_224", "family": "hf_image", "checkpoint": ckpt, "untrained": True},
        "serve": {"name": "bench", "http": {"port": port},
                  "ingress": {"num_cpus": 0.5, "max_ongoing_requests": 256, "autoscaling": fixed},
                  "encoder": {"num_cpus": 1, "num_gpus": 0, "torch_threads": threads, "decode_threads": 2,
                              "max_batch_size": batch, "batch_wait_timeout_s": wait_s, "max_ongoing_requests": 64,
                              "max_queued_requests": 256, "autoscaling": fixed},
                  "limits": {"request_timeout_s": 120}},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="measured seconds per point")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--batch-wait-s", type=float, default=0.005)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the encoder")
    ap.add_argument("--out", default="benchmarks/results/serve_load.json")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    import ray
    from ray import serve

    from medray.serve.app import ServeArgs, build_app

    t_all = time.perf_counter()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="medray-serve-bench-") as tmp:
        ckpt = _checkpoint(Path(tmp))
        data = _png()
        inproc_before = _in_process(ckpt, data, args.threads, 60)
        print("in-process:", json.dumps(inproc_before), flush=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
        url = f"http://127.0.0.1:{port}"
        modes: dict = {}
        try:
            for mode, batch in (("batched", 32), ("unbatched", 1)):
                serve.run(build_app(ServeArgs.model_validate(_args(ckpt, port, batch, args.batch_wait_s,
                                                                   args.threads))),
                          name="bench", route_prefix="/")
                _wait(url + "/readyz")
                modes[mode] = {"max_batch_size": batch, "batch_wait_timeout_s": args.batch_wait_s, "levels": []}
                for c in levels:
                    point = asyncio.run(_closed_loop(url + "/v1/embeddings", data, c, args.seconds, args.warmup))
                    modes[mode]["levels"].append(point)
                    print(mode, json.dumps(point), flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()
        inproc_after = _in_process(ckpt, data, args.threads, 60)
        print("in-process (after):", json.dumps(inproc_after), flush=True)

    def level(mode: str, c: int) -> dict:
        return next(p for p in modes[mode]["levels"] if p["concurrency"] == c)

    inproc_p50 = min(inproc_before["p50_ms"], inproc_after["p50_ms"])
    summary: dict = {}
    if 32 in levels:
        summary["batched_over_unbatched_rps_at_32"] = level("batched", 32)["rps"] / level("unbatched", 32)["rps"]
    if 1 in levels:
        summary["in_process_p50_ms"] = inproc_p50
        summary["serve_added_ms_p50_unbatched"] = level("unbatched", 1)["p50_ms"] - inproc_p50
        summary["serve_added_ms_p50_batched"] = level("batched", 1)["p50_ms"] - inproc_p50
    result = {
        "benchmark": "serve_load",
        "inputs": {"model": "ViT (hidden 192, 12 layers, 3 heads, patch 16) random weights, 224 px",
                   "image": "224x224 RGB PNG", "payload_bytes": len(data), "route": "POST /v1/embeddings",
                   "client": "aiohttp closed loop, same machine", "seconds_per_point": args.seconds,
                   "warmup_s": args.warmup, "encoder_replicas": 1, "torch_threads": args.threads},
        "hardware": {"cores": os.cpu_count(), "machine": platform.machine(), "processor": _cpu_model(),
                     "python": platform.python_version(),
                     # other work on the machine during the run skews every figure; it is recorded here
                     "loadavg_1m_before": load_before[0], "loadavg_1m_after": os.getloadavg()[0]},
        "in_process": {"before": inproc_before, "after": inproc_after},
        "serve": modes,
        "summary": summary,
        "targets": {"batched_over_unbatched_rps_at_32": ">= 3", "serve_added_ms_p50": "<= 5"},
        "wall_s": time.perf_counter() - t_all,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(summary, indent=2))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
