"""Load benchmark of ``medray serve`` on loopback; writes JSON.

A bounded closed-loop client (C workers, each sending its next request when
the previous answer arrives) posts the same 224x224 PNG to
``/v1/embeddings`` at concurrency 1, 8 and 32 against two copies of the
application served side by side on one Ray: ``/on`` with dynamic batching
(``max_batch_size=32``) and ``/off`` without (``max_batch_size=1``; same
code path), each with one encoder replica of a random ViT-Tiny-sized model
(hidden 192, 12 layers, 224 px, patch 16).

The machines here are shared and noisy, so the cases are interleaved: each
round runs every case for a few seconds (the idle copy costs nothing), and
figures pool all rounds. The latency Serve adds at concurrency 1 is the HTTP
p50 minus the p50 of the same work in this process (decode + preprocess +
embed with the same functions), measured in alternating segments too.

Usage::

    python benchmarks/serve_load.py [--seconds 5] [--rounds 3] [--out benchmarks/results/serve_load.json]

The client shares the machine's cores with Serve; on a 2-core machine that
is part of every figure (the JSON records hardware and load averages).
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
    cfg = ViTConfig(
        image_size=224,
        patch_size=16,
        hidden_size=192,
        num_hidden_layers=12,
        num_attention_heads=3,
        intermediate_size=768,
    )
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


class InProcess:
    """The same work as one request, in this process: decode + preprocess + embed."""

    def __init__(self, ckpt: str, threads: int) -> None:
        import torch

        from medray.encoders import create_encoder, get_spec
        from medray.serve.encoder import DecodeSettings

        torch.set_num_threads(threads)
        self.enc = create_encoder(get_spec("hf_image", checkpoint=ckpt), device="cpu")
        self.settings = DecodeSettings(windows={"CT": (-600.0, 1500.0)})

    def request(self, data: bytes) -> None:
        from medray.serve.encoder import decode_input

        self.enc.embed(decode_input({"data": data, "name": "x.png"}, self.settings, self.enc).pixels)

    def segment(self, data: bytes, seconds: float) -> list[float]:
        """Sequential requests for ``seconds``; their latencies."""
        lat = []
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            self.request(data)
            lat.append(time.perf_counter() - t0)
        return lat

    def model_batching_speedup(self) -> dict:
        """Per-image model time at batch 1 vs batch 32: what batching can give here at most."""
        x1 = self.enc.preprocess([np.zeros((224, 224, 3), np.uint8)])
        x32 = np.repeat(x1, 32, axis=0)
        self.enc.embed(x32)
        t0 = time.perf_counter()
        for _ in range(32):
            self.enc.embed(x1)
        b1 = (time.perf_counter() - t0) / 32
        t0 = time.perf_counter()
        for _ in range(2):
            self.enc.embed(x32)
        b32 = (time.perf_counter() - t0) / 64
        return {
            "model_ms_per_image_batch1": 1000 * b1,
            "model_ms_per_image_batch32": 1000 * b32,
            "model_batching_speedup": b1 / b32,
        }


async def _closed_loop(url: str, data: bytes, concurrency: int, seconds: float, warmup: float) -> dict:
    """One segment: C workers, each posting again as soon as its answer arrives; raw results."""
    import aiohttp

    out: dict = {"lat": [], "batch": [], "codes": {}, "seconds": seconds}
    t_measure = time.perf_counter() + warmup
    t_end = t_measure + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            async with session.post(url, data=data, headers={"Content-Type": "image/png"}) as resp:
                body = await resp.read()
            t1 = time.perf_counter()
            if t0 >= t_measure and t1 <= t_end:
                out["codes"][resp.status] = out["codes"].get(resp.status, 0) + 1
                if resp.status == 200:
                    out["lat"].append(t1 - t0)
                    out["batch"].append(int(json.loads(body).get("batch_size") or 0))

    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return out


async def _get_lat(url: str, seconds: float) -> list[float]:
    """Sequential GETs for ``seconds``; their latencies."""
    import aiohttp

    lat: list[float] = []
    async with aiohttp.ClientSession() as session:
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            async with session.get(url) as resp:
                await resp.read()
            lat.append(time.perf_counter() - t0)
    return lat[3:]


def _pool(segments: list[dict], concurrency: int) -> dict:
    lat = [x for s in segments for x in s["lat"]]
    batch = [x for s in segments for x in s["batch"]]
    seconds = sum(s["seconds"] for s in segments)
    codes: dict = {}
    for s in segments:
        for k, v in s["codes"].items():
            codes[str(k)] = codes.get(str(k), 0) + v
    return {
        "concurrency": concurrency,
        "seconds": seconds,
        "requests": len(lat),
        "rps": len(lat) / seconds,
        "rps_per_round": [len(s["lat"]) / s["seconds"] for s in segments],
        "p50_ms": 1000 * _pct(lat, 50),
        "p99_ms": 1000 * _pct(lat, 99),
        "mean_batch_size": statistics.fmean(batch) if batch else 0.0,
        "max_batch_size": max(batch, default=0),
        "status_codes": codes,
    }


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


def _args(name: str, ckpt: str, port: int, batch: int, wait_s: float, threads: int) -> dict:
    fixed = {"min_replicas": 1, "max_replicas": 1}
    return {
        "encoder": {"name": "vit_tiny_224", "family": "hf_image", "checkpoint": ckpt, "untrained": True},
        "serve": {
            "name": name,
            "route_prefix": f"/{name}",
            "http": {"port": port},
            "ingress": {"num_cpus": 0.5, "max_ongoing_requests": 256, "autoscaling": fixed},
            # num_cpus = torch threads: Ray sets OMP_NUM_THREADS from it, as a user's replica gets
            "encoder": {
                "num_cpus": threads,
                "num_gpus": 0,
                "torch_threads": threads,
                "decode_threads": 2,
                "max_batch_size": batch,
                "batch_wait_timeout_s": wait_s,
                "max_ongoing_requests": 64,
                "max_queued_requests": 256,
                "autoscaling": fixed,
            },
            "limits": {"request_timeout_s": 120},
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds per case and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--batch-wait-s", type=float, default=0.005)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of each encoder")
    ap.add_argument(
        "--throughput-optimized",
        action="store_true",
        help="RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (serve.throughput_optimized=true): direct ingress, "
        "gRPC between replicas, user code on the replica's event loop",
    )
    ap.add_argument("--out", default="benchmarks/results/serve_load.json")
    args = ap.parse_args()
    if args.throughput_optimized:  # read by every Serve process at import: set before Ray starts them
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    ray_cpus = 2 * args.threads + 2
    levels = [int(c) for c in args.concurrency.split(",")]
    modes = {"batched": ("on", 32), "unbatched": ("off", 1)}

    import ray
    from ray import serve

    from medray.serve.app import ServeArgs, build_app

    t_all = time.perf_counter()
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="medray-serve-bench-") as tmp:
        ckpt = _checkpoint(Path(tmp))
        data = _png()
        local = InProcess(ckpt, args.threads)
        local.segment(data, 1.0)  # warm
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ray.init(num_cpus=ray_cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
        url = f"http://127.0.0.1:{port}"
        segments: dict = {(m, c): [] for m in modes for c in levels}
        inproc: list[float] = []
        inproc_rounds: list[list[float]] = []
        model_rounds: list[dict] = []
        probes: dict = {"healthz (proxy + ingress)": [], "v1/models (proxy + ingress + encoder call)": []}
        try:
            for name, batch in modes.values():
                serve.run(
                    build_app(
                        ServeArgs.model_validate(_args(name, ckpt, port, batch, args.batch_wait_s, args.threads))
                    ),
                    name=name,
                    route_prefix=f"/{name}",
                )
                _wait(f"{url}/{name}/readyz")
            for r in range(args.rounds):
                for c in levels:
                    if c == 1:
                        inproc_rounds.append(local.segment(data, args.seconds))
                        inproc += inproc_rounds[-1]
                        for probe, path in zip(probes, ("/off/healthz", "/off/v1/models")):
                            probes[probe] += asyncio.run(_get_lat(url + path, 1.5))
                    for mode, (name, _) in modes.items():
                        seg = asyncio.run(
                            _closed_loop(f"{url}/{name}/v1/embeddings", data, c, args.seconds, args.warmup)
                        )
                        segments[(mode, c)].append(seg)
                        print(f"round {r} {mode} c={c}: {len(seg['lat']) / args.seconds:.1f} req/s", flush=True)
                model_rounds.append(local.model_batching_speedup())
                loads.append(os.getloadavg()[0])
        finally:
            serve.shutdown()
            ray.shutdown()
        model = {k: statistics.median(m[k] for m in model_rounds) for k in model_rounds[0]} if model_rounds else {}

    results = {
        mode: {
            "max_batch_size": modes[mode][1],
            "batch_wait_timeout_s": args.batch_wait_s,
            "levels": [_pool(segments[(mode, c)], c) for c in levels],
        }
        for mode in modes
    }

    def level(mode: str, c: int) -> dict:
        return next(p for p in results[mode]["levels"] if p["concurrency"] == c)

    summary: dict = {}
    if 32 in levels:
        summary["batched_over_unbatched_rps_at_32"] = level("batched", 32)["rps"] / level("unbatched", 32)["rps"]
        summary["per_round_ratio_at_32"] = [
            a / b for a, b in zip(level("batched", 32)["rps_per_round"], level("unbatched", 32)["rps_per_round"])
        ]
    if 1 in levels:
        p50 = 1000 * _pct(inproc, 50)
        summary["in_process_p50_ms"] = p50
        summary["serve_added_ms_p50_unbatched"] = level("unbatched", 1)["p50_ms"] - p50
        summary["serve_added_ms_p50_batched"] = level("batched", 1)["p50_ms"] - p50
        # the same difference within each round (adjacent in time, so less exposed to load swings)
        http = [1000 * _pct(seg["lat"], 50) for seg in segments[("unbatched", 1)]]
        local_p50 = [1000 * _pct(lat, 50) for lat in inproc_rounds]
        summary["serve_added_ms_p50_unbatched_per_round"] = [h - i for h, i in zip(http, local_p50)]
        summary["serve_added_ms_p50_unbatched_median_of_rounds"] = statistics.median(
            summary["serve_added_ms_p50_unbatched_per_round"]
        )
        summary["breakdown_p50_ms"] = {k: 1000 * _pct(v, 50) for k, v in probes.items()}
    summary["model_only_median_of_rounds"] = model
    result = {
        "benchmark": "serve_load",
        "inputs": {
            "model": "ViT (hidden 192, 12 layers, 3 heads, patch 16) random weights, 224 px",
            "image": "224x224 RGB PNG",
            "payload_bytes": len(data),
            "route": "POST /v1/embeddings",
            "client": "aiohttp closed loop, same machine",
            "seconds_per_case_and_round": args.seconds,
            "rounds": args.rounds,
            "warmup_s": args.warmup,
            "encoder_replicas": 1,
            "torch_threads": args.threads,
            "encoder_num_cpus": args.threads,
            "ray_num_cpus": ray_cpus,
            "throughput_optimized": bool(args.throughput_optimized),
        },
        "hardware": {
            "cores": os.cpu_count(),
            "machine": platform.machine(),
            "processor": _cpu_model(),
            "python": platform.python_version(),
            # other work on the machine skews every figure; the 1-min load average per round
            "loadavg_1m": loads,
        },
        "in_process": {"p50_ms": 1000 * _pct(inproc, 50), "p99_ms": 1000 * _pct(inproc, 99), "n": len(inproc)},
        "serve": results,
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
