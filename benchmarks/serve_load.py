"""Load benchmark of ``medray serve`` on loopback; writes JSON.

Measured side by side in one run, on one Ray:

* ``/on`` (dynamic batching, ``max_batch_size=32``) and ``/off`` (``max_batch_size=1``; same
  code path), each one encoder replica of a random ViT-Tiny-sized model (hidden 192, 12 layers,
  224 px, patch 16), posted the same 224x224 PNG; ``--topology`` (default ``auto``: one encoder,
  no heads, so the encoder runs inside the ingress's replica);
* ``/off`` over gRPC (``--grpc``, on by default): ``medray.v1.Embeddings/Embed`` at concurrency 1
  in the same rounds, beside the HTTP figures;
* ``/offsplit`` (``--split-baseline``, on unless ``--topology split``): ``/off`` as a split app
  (ingress and encoder deployments, one handle hop per request), at concurrency 1 in the same
  rounds, so the hop's share is measured side by side;
* the same work in this process (decode + preprocess + embed with the same functions), in
  alternating segments: the latency Serve adds is the HTTP p50 minus this one;
* a closed loop (C workers, each sending its next request when its answer arrives) at each
  ``--concurrency``, and an open loop (``--rates``: a fixed arrival rate, Poisson or uniform
  gaps, latency from each request's scheduled send time, so queueing shows);
* the per-stage breakdown of every answer's ``Server-Timing`` header (p50 per stage; ``proxy``
  is the client's latency minus the ingress's ``total``: proxy, loopback and the client);
* ``/audio`` and ``/text`` (``--modalities``): a tiny wav2vec2 and a tiny BERT, each its own app
  (one encoder, so fused as a user's would be; batched), WAV and report posts at every
  ``--concurrency`` and open-loop ``--av-rates``, beside their in-process figures;
* ``/as`` (``--autoscale``): the autoscaler's reaction time from a burst to a second ready
  replica.

The machines here are shared and noisy, so cases are interleaved: each round runs every case
for a few seconds (the idle copies cost nothing), and figures pool all rounds.

Usage::

    python benchmarks/serve_load.py                          # the full run
    python benchmarks/serve_load.py --quick --out /tmp/s.json  # a minute: c=1,8, one rate

The client shares the machine's cores with Serve; on a 2-core machine that is part of every
figure (the JSON records hardware and load averages).
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


def _wav() -> bytes:
    """2 s of a 16 kHz tone: two 1 s windows."""
    from medray.testing.media import encode, tone

    return encode(tone(16000, 2.0), 16000)


_REPORT = "Findings: small left pleural effusion, no pneumothorax. Heart size normal. " * 4


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _server_timing(header: str | None) -> dict[str, float]:
    """``Server-Timing`` -> ``{stage: ms}``."""
    out: dict[str, float] = {}
    for part in (header or "").split(","):
        name, _, dur = part.strip().partition(";dur=")
        if name and dur:
            try:
                out[name] = float(dur)
            except ValueError:
                pass
    return out


class InProcess:
    """The same work as one request, in this process: decode + preprocess + embed."""

    def __init__(self, family: str, ckpt: str, threads: int, name: str) -> None:
        import torch

        from medray.encoders import create_encoder, family_modality, get_spec
        from medray.serve.encoder import DecodeSettings

        torch.set_num_threads(threads)
        self.enc = create_encoder(get_spec(family, checkpoint=ckpt), device="cpu")
        self.modality = family_modality(family)
        self.settings = DecodeSettings(windows={"CT": (-600.0, 1500.0)}, audio={"window_s": 1.0})
        self.name = name
        self.forward: list[float] = []  # the model's share of each request (the replica's "forward")

    def request(self, data: bytes) -> None:
        from medray.serve.encoder import decode_input

        decoded = decode_input({"data": data, "name": self.name}, self.settings, self.enc, modality=self.modality)
        t0 = time.perf_counter()
        self.enc.embed(decoded.pixels)
        self.forward.append(time.perf_counter() - t0)

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


def _record(out: dict, status: int, body: bytes, timing: str | None, latency: float) -> None:
    out["codes"][status] = out["codes"].get(status, 0) + 1
    if status == 200:
        out["lat"].append(latency)
        out["batch"].append(int(json.loads(body).get("batch_size") or 0))
        stages = _server_timing(timing)
        if "total" in stages:
            stages["proxy"] = max(0.0, 1000 * latency - stages["total"])
        out["stages"].append(stages)


async def _closed_loop(url: str, req: dict, concurrency: int, seconds: float, warmup: float) -> dict:
    """One segment: C workers, each posting again as soon as its answer arrives; raw results.

    Counted: the answers that arrive inside the measured window (requests/s = those / seconds),
    whenever they were sent, so that a window shorter than one answer's latency at high
    concurrency still measures throughput instead of nothing.
    """
    import aiohttp

    out: dict = {"lat": [], "batch": [], "stages": [], "codes": {}, "seconds": seconds}
    t_measure = time.perf_counter() + warmup
    t_end = t_measure + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            async with session.post(url, **req) as resp:
                body = await resp.read()
            t1 = time.perf_counter()
            if t_measure <= t1 <= t_end:
                _record(out, resp.status, body, resp.headers.get("Server-Timing"), t1 - t0)

    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return out


async def _open_loop(url: str, req: dict, rate: float, seconds: float, arrival: str, seed: int) -> dict:
    """One segment at a fixed arrival rate: requests leave on schedule whatever the answers do.

    Latency runs from each request's scheduled send time (no coordinated omission: a slow
    server cannot slow the client down and hide its queue).
    """
    import aiohttp

    rng = np.random.default_rng(seed)
    n = max(1, int(rate * seconds))
    gaps = rng.exponential(1.0 / rate, n) if arrival == "poisson" else np.full(n, 1.0 / rate)
    offsets = np.cumsum(gaps) - gaps[0]
    out: dict = {"lat": [], "batch": [], "stages": [], "codes": {}, "seconds": seconds, "rate": rate}

    async def one(session: aiohttp.ClientSession, at: float) -> None:
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            async with session.post(url, **req) as resp:
                body = await resp.read()
            _record(out, resp.status, body, resp.headers.get("Server-Timing"), time.perf_counter() - at)
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:
            out["codes"][type(err).__name__] = out["codes"].get(type(err).__name__, 0) + 1

    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as session:
        t0 = time.perf_counter() + 0.2
        await asyncio.gather(*(one(session, t0 + float(o)) for o in offsets))
    out["seconds"] = max(seconds, float(offsets[-1]))
    return out


def _grpc_lat(target: str, app: str, data: bytes, seconds: float, warmup: float) -> list[float]:
    """Sequential ``medray.v1.Embeddings/Embed`` calls for ``seconds`` (after ``warmup``); their latencies."""
    import grpc

    from medray.serve.grpc_api import EmbeddingsStub
    from medray.serve.proto.embeddings_pb2 import EmbedRequest

    request, meta = EmbedRequest(data=data, name="x.png"), [("application", app)]
    lat: list[float] = []
    with grpc.insecure_channel(target) as channel:
        stub = EmbeddingsStub(channel)
        t_warm = time.perf_counter() + warmup
        while time.perf_counter() < t_warm:
            stub.Embed(request, metadata=meta, timeout=120)
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            stub.Embed(request, metadata=meta, timeout=120)
            lat.append(time.perf_counter() - t0)
    return lat


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


def _stage_p50(segments: list[dict]) -> dict[str, float]:
    """p50 (ms) of each Server-Timing stage over the answers of ``segments``."""
    per: dict[str, list[float]] = {}
    for seg in segments:
        for stages in seg["stages"]:
            for k, v in stages.items():
                per.setdefault(k, []).append(v)
    return {k: _pct(v, 50) for k, v in per.items()}


def _pool(segments: list[dict], key: str, value: float) -> dict:
    lat = [x for s in segments for x in s["lat"]]
    batch = [x for s in segments for x in s["batch"]]
    seconds = sum(s["seconds"] for s in segments)
    codes: dict = {}
    for s in segments:
        for k, v in s["codes"].items():
            codes[str(k)] = codes.get(str(k), 0) + v
    return {
        key: value,
        "seconds": seconds,
        "requests": len(lat),
        "rps": len(lat) / seconds if seconds else 0.0,
        "rps_per_round": [len(s["lat"]) / s["seconds"] for s in segments],
        "p50_ms": 1000 * _pct(lat, 50),
        "p99_ms": 1000 * _pct(lat, 99),
        "p99_over_p50": _pct(lat, 99) / _pct(lat, 50) if lat else float("nan"),
        "mean_batch_size": statistics.fmean(batch) if batch else 0.0,
        "max_batch_size": max(batch, default=0),
        "status_codes": codes,
        "stages_p50_ms": _stage_p50(segments),
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


#: serve.encoder.engine of every deployed encoder (--engine)
ENGINE = "auto"
#: serve.topology of every deployed app (--topology); the split baseline overrides it
TOPOLOGY = "auto"


def _args(name: str, encoder: dict, port: int, batch: int, wait_s: float, threads: int, **more) -> dict:
    fixed = {"min_replicas": 1, "max_replicas": 1}
    enc = {
        "num_cpus": threads,  # = torch threads: Ray sets OMP_NUM_THREADS from it, as a user's replica gets
        "num_gpus": 0,
        "torch_threads": threads,
        "engine": ENGINE,
        "decode_threads": 2,
        "max_batch_size": batch,
        "batch_wait_timeout_s": wait_s,
        "max_ongoing_requests": 64,
        "max_queued_requests": 512,
        "autoscaling": more.pop("autoscaling", fixed),
    }
    topology = more.pop("topology", TOPOLOGY)
    return {
        "encoder": encoder,
        **more,
        "serve": {
            "topology": topology,
            "name": name,
            "route_prefix": f"/{name}",
            "http": {"port": port},
            "ingress": {"num_cpus": 0.5, "max_ongoing_requests": 512, "autoscaling": fixed},
            "encoder": enc,
            "limits": {"request_timeout_s": 120},
        },
        "audio": {"window_s": 1.0},
    }


def _deploy(url: str, name: str, args: dict) -> None:
    from ray import serve

    from medray.serve.app import ServeArgs, build_app

    serve.run(build_app(ServeArgs.model_validate(args)), name=name, route_prefix=f"/{name}")
    _wait(f"{url}/{name}/readyz")


def _direct_url(app: str, fallback: str) -> str:
    """The ingress replica's own HTTP address (direct ingress, throughput-optimised mode), else ``fallback``."""
    from medray.serve.app import direct_ingress_urls

    host, port = fallback.rsplit(":", 1)
    urls = direct_ingress_urls(app, host.split("//", 1)[-1], int(port))
    if not urls:
        print(f"no direct ingress address for {app}; measuring through the proxy", flush=True)
    return urls[0] if urls else fallback


def _running_replicas(app: str, deployment: str = "Encoder") -> int:
    from ray import serve

    try:
        states = serve.status().applications[app].deployments[deployment].replica_states
    except KeyError:
        return 0
    return int(states.get("RUNNING", 0))


def _autoscale_reaction(url: str, ckpt: str, port: int, threads: int, burst: int, timeout: float = 120) -> dict:
    """Deploy ``/as`` (1 to 2 replicas, no upscale delay), burst it and time the second ready replica."""
    import threading

    from ray import serve

    autoscaling = {
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 2,
        "upscale_delay_s": 0.0,
        "downscale_delay_s": 600.0,
        "metrics_interval_s": 0.5,
        "look_back_period_s": 2.0,
    }
    spec = {"name": "vit_tiny_224", "family": "hf_image", "checkpoint": ckpt, "untrained": True}
    _deploy(url, "as", _args("as", spec, port, 8, 0.005, threads, autoscaling=autoscaling))
    stop = threading.Event()
    box: dict = {}

    def load() -> None:
        async def run() -> None:
            import aiohttp

            req = {"data": _png(), "headers": {"Content-Type": "image/png"}}
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:

                async def worker() -> None:
                    while not stop.is_set():
                        async with session.post(f"{url}/as/v1/embeddings", **req) as resp:
                            await resp.read()

                await asyncio.gather(*(worker() for _ in range(burst)))

        asyncio.run(run())

    t0 = time.perf_counter()
    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    try:
        while time.perf_counter() - t0 < timeout:
            if _running_replicas("as") >= 2:
                box["reaction_s"] = time.perf_counter() - t0
                break
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join(timeout=130)
        serve.delete("as")
    return {
        "burst_concurrency": burst,
        "autoscaling": autoscaling,
        "seconds_to_second_running_replica": box.get("reaction_s"),
        "timeout_s": timeout,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds per case and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--concurrency", default="1,8,32,128", help="closed-loop levels")
    ap.add_argument("--rates", default="5,15,30", help="open-loop arrival rates, requests/s (empty: none)")
    ap.add_argument(
        "--av-rates", default="50,150,300", help="open-loop arrival rates of the audio and text apps, requests/s"
    )
    ap.add_argument("--arrival", choices=("poisson", "uniform"), default="poisson")
    ap.add_argument("--modalities", default="image,audio,text", help="image is always measured")
    ap.add_argument("--autoscale", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--burst", type=int, default=16, help="closed-loop concurrency of the autoscaling burst")
    ap.add_argument("--batch-wait-s", type=float, default=0.005)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of each encoder")
    ap.add_argument(
        "--engine",
        choices=("auto", "thread", "process"),
        default="auto",
        help="serve.encoder.engine: the model in a thread of the replica or in its child process",
    )
    ap.add_argument(
        "--topology",
        choices=("auto", "split", "fused"),
        default="auto",
        help="serve.topology of the measured apps (auto: fused, one encoder and no heads)",
    )
    ap.add_argument(
        "--split-baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure /off as a split app (ingress + encoder) at concurrency 1, interleaved",
    )
    ap.add_argument("--quick", action="store_true", help="1 s x 1 round, c=1,8, rate 5: a smoke run")
    ap.add_argument(
        "--throughput-optimized",
        action="store_true",
        help="RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (serve.throughput_optimized=true): direct ingress, "
        "gRPC between replicas, user code on the replica's event loop",
    )
    ap.add_argument(
        "--direct",
        action="store_true",
        help="with --throughput-optimized: send to the ingress replicas' own ports (direct ingress), not the proxy",
    )
    ap.add_argument(
        "--proxy",
        choices=("haproxy", "ray"),
        default="haproxy",
        help="serve.proxy: HAProxy on the HTTP port forwarding to the ingress replicas' own ports (default, "
        "as medray serve), or Ray Serve's Python proxy actor",
    )
    ap.add_argument(
        "--grpc",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure /off over gRPC (medray.v1.Embeddings/Embed) at concurrency 1, interleaved",
    )
    ap.add_argument("--out", default="benchmarks/results/serve_load.json")
    args = ap.parse_args()
    global ENGINE, TOPOLOGY
    ENGINE, TOPOLOGY = args.engine, args.topology
    split_baseline = args.split_baseline and args.topology != "split"
    if args.quick:
        args.seconds, args.rounds, args.warmup, args.concurrency, args.rates = 1.0, 1, 0.5, "1,8", "5"
        args.av_rates = "20"
    if args.throughput_optimized:  # read by every Serve process at import: set before Ray starts them
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    from medray.serve.config import ServeOptions, serve_env_flags

    for variable, (value, _) in serve_env_flags(ServeOptions(proxy=args.proxy)).items():
        os.environ[variable] = value  # as `medray serve` does for the Ray it starts
    levels = [int(c) for c in args.concurrency.split(",") if c]
    rates = [float(r) for r in args.rates.split(",") if r]
    av_rates = [float(r) for r in args.av_rates.split(",") if r]
    extra = [m for m in args.modalities.split(",") if m in ("audio", "text")]
    modes = {"batched": ("on", 32), "unbatched": ("off", 1)}
    av_batch = 32  # max_batch_size of the audio and text apps
    # logical CPUs: every replica gets what a user's would; the client and Serve share the real cores
    ray_cpus = (2 + len(extra) + (2 if args.autoscale else 0) + split_baseline) * args.threads + 3

    import ray
    from ray import serve

    from medray.encoders import build_tiny_checkpoint
    from medray.serve.engine import choose_engine

    t_all = time.perf_counter()
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="medray-serve-bench-") as tmp:
        ckpt = _checkpoint(Path(tmp))
        png = _png()
        inputs = {"image": (png, {"data": png, "headers": {"Content-Type": "image/png"}})}
        local = {"image": InProcess("hf_image", ckpt, args.threads, "x.png")}
        more: dict = {}
        if "audio" in extra:
            wav = _wav()
            inputs["audio"] = (wav, {"data": wav, "headers": {"Content-Type": "audio/wav"}})
            more["audio"] = build_tiny_checkpoint("hf_audio", f"{tmp}/audio", arch="wav2vec2")
            local["audio"] = InProcess("hf_audio", more["audio"], args.threads, "x.wav")
        if "text" in extra:
            inputs["text"] = (_REPORT.encode(), {"data": _REPORT.encode(), "headers": {"Content-Type": "text/plain"}})
            more["text"] = build_tiny_checkpoint("hf_text", f"{tmp}/text", arch="bert")
            local["text"] = InProcess("hf_text", more["text"], args.threads, "x.txt")
        for m, enc in local.items():
            enc.segment(inputs[m][0], 0.5)  # warm
            enc.forward.clear()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ray.init(num_cpus=ray_cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            grpc_port = s.getsockname()[1]
        grpc = {
            "port": grpc_port,
            "grpc_servicer_functions": ["medray.serve.grpc_api.add_EmbeddingsServicer_to_server"],
        }
        serve.start(
            http_options={"host": "127.0.0.1", "port": port},
            grpc_options=grpc if args.grpc else None,
            logging_config={"log_level": "WARNING"},
        )
        url = f"http://127.0.0.1:{port}"
        image_spec = {"name": "vit_tiny_224", "family": "hf_image", "checkpoint": ckpt, "untrained": True}
        base = {name: url for name in ("on", "off", "offsplit", *extra)}
        closed: dict = {(m, c): [] for m in modes for c in levels}
        opened: dict = {r: [] for r in rates}
        other: dict = {(m, c): [] for m in extra for c in levels}  # closed loop per modality and level
        other_open: dict = {(m, r): [] for m in extra for r in av_rates}
        inproc: dict = {m: [] for m in local}
        inproc_rounds: list[list[float]] = []
        split: list[dict] = []  # /offsplit at c=1
        grpc_rounds: list[list[float]] = []  # /off over gRPC at c=1
        model_rounds: list[dict] = []
        probes: dict = {"healthz (proxy + ingress)": [], "v1/models (proxy + ingress; encoder identity cached 5 s)": []}
        autoscale: dict = {}
        try:
            for name, batch in modes.values():
                _deploy(url, name, _args(name, image_spec, port, batch, args.batch_wait_s, args.threads))
            if split_baseline:
                split_args = _args("offsplit", image_spec, port, 1, args.batch_wait_s, args.threads, topology="split")
                _deploy(url, "offsplit", split_args)
            for m in extra:
                spec = {"family": f"hf_{m}", "name": f"tiny_{m}", "checkpoint": more[m]}
                _deploy(url, m, _args(m, spec, port, av_batch, args.batch_wait_s, args.threads))
            if args.direct and args.throughput_optimized:
                deployed = {"on", "off", *extra} | ({"offsplit"} if split_baseline else set())
                base = {name: _direct_url(name, url) if name in deployed else url for name in base}
                print(f"direct ingress: {base}", flush=True)
            for r in range(args.rounds):
                for c in levels:
                    if c == 1:
                        inproc_rounds.append(local["image"].segment(png, args.seconds))
                        inproc["image"] += inproc_rounds[-1]
                        for probe, path in zip(probes, ("/off/healthz", "/off/v1/models")):
                            probes[probe] += asyncio.run(_get_lat(base["off"] + path, 1.5))
                    for mode, (name, _) in modes.items():
                        seg = asyncio.run(
                            _closed_loop(
                                f"{base[name]}/{name}/v1/embeddings", inputs["image"][1], c, args.seconds, args.warmup
                            )
                        )
                        closed[(mode, c)].append(seg)
                        print(f"round {r} {mode} c={c}: {len(seg['lat']) / args.seconds:.1f} req/s", flush=True)
                    if c == 1 and args.grpc:
                        target = f"127.0.0.1:{grpc_port}"
                        grpc_rounds.append(_grpc_lat(target, "off", png, args.seconds, args.warmup))
                        print(
                            f"round {r} grpc unbatched c=1: p50 {1000 * _pct(grpc_rounds[-1], 50):.1f} ms", flush=True
                        )
                    if c == 1 and split_baseline:
                        split_url = f"{base['offsplit']}/offsplit/v1/embeddings"
                        seg = asyncio.run(_closed_loop(split_url, inputs["image"][1], 1, args.seconds, args.warmup))
                        split.append(seg)
                        print(f"round {r} split unbatched c=1: p50 {1000 * _pct(seg['lat'], 50):.1f} ms", flush=True)
                on_url = f"{base['on']}/on/v1/embeddings"
                for rate in rates:
                    seg = asyncio.run(_open_loop(on_url, inputs["image"][1], rate, args.seconds, args.arrival, r))
                    opened[rate].append(seg)
                    print(f"round {r} open loop {rate:g}/s: p50 {1000 * _pct(seg['lat'], 50):.0f} ms", flush=True)
                for m in extra:
                    inproc[m] += local[m].segment(inputs[m][0], args.seconds)
                    m_url = f"{base[m]}/{m}/v1/embeddings"
                    for c in levels:
                        seg = asyncio.run(_closed_loop(m_url, inputs[m][1], c, args.seconds, args.warmup))
                        other[(m, c)].append(seg)
                        print(f"round {r} {m} c={c}: {len(seg['lat']) / args.seconds:.1f} req/s", flush=True)
                    for rate in av_rates:
                        seg = asyncio.run(_open_loop(m_url, inputs[m][1], rate, args.seconds, args.arrival, r))
                        other_open[(m, rate)].append(seg)
                        m50 = 1000 * _pct(seg["lat"], 50)
                        print(f"round {r} {m} open loop {rate:g}/s: p50 {m50:.0f} ms", flush=True)
                model_rounds.append(local["image"].model_batching_speedup())
                loads.append(os.getloadavg()[0])
            if args.autoscale:
                # idle, but their replicas would hold the CPUs the new one needs
                for name in ("off", *extra, *(["offsplit"] if split_baseline else [])):
                    serve.delete(name)
                autoscale = _autoscale_reaction(url, ckpt, port, args.threads, args.burst)
                print(f"autoscale: {autoscale['seconds_to_second_running_replica']} s", flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()
        model = {k: statistics.median(m[k] for m in model_rounds) for k in model_rounds[0]} if model_rounds else {}

    results = {
        mode: {
            "max_batch_size": modes[mode][1],
            "batch_wait_timeout_s": args.batch_wait_s,
            "levels": [_pool(closed[(mode, c)], "concurrency", c) for c in levels],
        }
        for mode in modes
    }
    results["batched"]["open_loop"] = {
        "arrival": args.arrival,
        "rates": [_pool(opened[r], "rate", r) for r in rates],
    }

    def level(mode: str, c: int) -> dict:
        return next(p for p in results[mode]["levels"] if p["concurrency"] == c)

    summary: dict = {}
    if 32 in levels:
        summary["batched_over_unbatched_rps_at_32"] = level("batched", 32)["rps"] / level("unbatched", 32)["rps"]
        summary["per_round_ratio_at_32"] = [
            a / b if b else None
            for a, b in zip(level("batched", 32)["rps_per_round"], level("unbatched", 32)["rps_per_round"])
        ]
        summary["batched_p99_over_p50_at_32"] = level("batched", 32)["p99_over_p50"]
    if 1 in levels:
        p50 = 1000 * _pct(inproc["image"], 50)
        summary["in_process_p50_ms"] = p50
        summary["serve_added_ms_p50_unbatched"] = level("unbatched", 1)["p50_ms"] - p50
        summary["serve_added_ms_p50_batched"] = level("batched", 1)["p50_ms"] - p50
        # the same difference within each round (adjacent in time, so less exposed to load swings)
        http = [1000 * _pct(seg["lat"], 50) for seg in closed[("unbatched", 1)]]
        local_p50 = [1000 * _pct(lat, 50) for lat in inproc_rounds]
        summary["serve_added_ms_p50_unbatched_per_round"] = [h - i for h, i in zip(http, local_p50)]
        summary["serve_added_ms_p50_unbatched_median_of_rounds"] = statistics.median(
            summary["serve_added_ms_p50_unbatched_per_round"]
        )
        summary["probes_p50_ms"] = {k: 1000 * _pct(v, 50) for k, v in probes.items()}
        if grpc_rounds:  # the same unbatched request over gRPC (medray.v1.Embeddings/Embed)
            g50 = [1000 * _pct(lat, 50) for lat in grpc_rounds]
            summary["grpc_unbatched_c1"] = {
                "p50_ms": 1000 * _pct([x for lat in grpc_rounds for x in lat], 50),
                "p99_ms": 1000 * _pct([x for lat in grpc_rounds for x in lat], 99),
                "serve_added_ms_p50": 1000 * _pct([x for lat in grpc_rounds for x in lat], 50) - p50,
                "added_per_round_ms": [g - i for g, i in zip(g50, local_p50)],
            }
        if split:  # the same unbatched request through a split app (ingress -> encoder handle hop)
            pooled = _pool(split, "concurrency", 1)
            summary["split_unbatched_c1"] = {
                "p50_ms": pooled["p50_ms"],
                "serve_added_ms_p50": pooled["p50_ms"] - p50,
                "stages_p50_ms": pooled["stages_p50_ms"],
                "added_per_round_ms": [1000 * _pct(g["lat"], 50) - i for g, i in zip(split, local_p50)],
            }
        # where a request's time goes at concurrency 1 (Server-Timing, p50 of each stage)
        summary["stages_p50_ms_at_1"] = {mode: level(mode, 1)["stages_p50_ms"] for mode in modes}
        # the model alone in this process, beside the replica's "forward" stage (same input, same threads)
        summary["in_process_forward_p50_ms"] = 1000 * _pct(local["image"].forward, 50)
    summary["model_only_median_of_rounds"] = model
    modalities = {
        "image": {"in_process_p50_ms": 1000 * _pct(inproc["image"], 50)},
        **{
            m: {
                "in_process_p50_ms": 1000 * _pct(inproc[m], 50),
                "max_batch_size": av_batch,
                "levels": [_pool(other[(m, c)], "concurrency", c) for c in levels],
                "open_loop": {
                    "arrival": args.arrival,
                    "rates": [_pool(other_open[(m, r)], "rate", r) for r in av_rates],
                },
            }
            for m in extra
        },
    }
    for m in extra:
        if 1 in levels:
            c1 = next(p for p in modalities[m]["levels"] if p["concurrency"] == 1)
            modalities[m]["serve_added_ms_p50"] = c1["p50_ms"] - modalities[m]["in_process_p50_ms"]
    if 1 in levels:
        modalities["image"]["serve_added_ms_p50"] = summary["serve_added_ms_p50_batched"]
    result = {
        "benchmark": "serve_load",
        "inputs": {
            "model": "ViT (hidden 192, 12 layers, 3 heads, patch 16) random weights, 224 px",
            "image": "224x224 RGB PNG",
            "audio": "2 s 16 kHz WAV (two 1 s windows), tiny wav2vec2, its own app" if "audio" in extra else None,
            "text": f"{len(_REPORT)}-character report, tiny BERT, its own app" if "text" in extra else None,
            "payload_bytes": len(png),
            "route": "POST /v1/embeddings",
            "client": "aiohttp closed and open loop, same machine",
            "seconds_per_case_and_round": args.seconds,
            "rounds": args.rounds,
            "warmup_s": args.warmup,
            "encoder_replicas": 1,
            "torch_threads": args.threads,
            "engine": args.engine,
            "engine_resolved": choose_engine(args.engine, "cpu", args.threads),
            "topology": args.topology,
            "proxy": args.proxy,
            "grpc": bool(args.grpc),
            "split_baseline": split_baseline,
            "encoder_num_cpus": args.threads,
            "ray_num_cpus": ray_cpus,
            "throughput_optimized": bool(args.throughput_optimized),
            "direct_ingress": base["on"] != url,
            "quick": bool(args.quick),
        },
        "hardware": {
            "cores": os.cpu_count(),
            "machine": platform.machine(),
            "processor": _cpu_model(),
            "python": platform.python_version(),
            # other work on the machine skews every figure; the 1-min load average per round
            "loadavg_1m": loads,
        },
        "in_process": {
            "p50_ms": 1000 * _pct(inproc["image"], 50),
            "p99_ms": 1000 * _pct(inproc["image"], 99),
            "n": len(inproc["image"]),
        },
        "serve": results,
        "modalities": modalities,
        "autoscale": autoscale,
        "summary": summary,
        "targets": {
            "batched_over_unbatched_rps_at_32": ">= 3",
            "serve_added_ms_p50": "<= 5",
            "healthz_ms": "<= 2",
            "v1_models_ms": "<= 4",
            "batched_p99_over_p50_at_32": "<= 1.3",
        },
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
