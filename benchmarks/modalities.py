"""Ratio benchmark of ``medray embed`` per modality vs a plain loop; writes JSON.

For each modality (issue #7) the same records are embedded two ways, side by
side in one run, interleaved and repeated in rounds (the machines here are
shared and noisy, so only ratios taken in one run mean something):

* a **plain loop**: one process, one thread, plain library code doing the same
  decode and model call (no medray code in the timed path except where said);
* **medray's Ray Data pipeline** on all cores through the public job API
  (:class:`medray.jobs.embed.EmbedJob`), a fixed actor pool as in
  ``embed_pipeline.py``.

Units are what the model embeds: audio windows, text chunks, slide tiles, CT
series volumes. Reported per modality and round: plain units/s, pipeline units/s
at steady state (between the first and the last encoder batch, start-up
excluded) and including start-up, their ratio (speedup), and the efficiency
measure of ``embed_pipeline.py``: pipeline units/s divided by ideal core scaling
(cores / the plain loop's per-unit serial time). Target >= 0.8.
``os.getloadavg()`` is recorded around every measurement. Load-independent
diagnostics beside them: CPU-seconds per unit of the plain loop and of the whole
pipeline (driver + every Ray process) at steady state (their ratio is
``cpu_efficiency``: Ray overhead per unit) and the share of the cores the
pipeline got (``cpu_utilisation``). The plain loop runs at Ray's worker
niceness (15), so on a shared machine both sides get the CPU on equal terms. The
first record's embeddings from both sides are compared (``parity``).

Plain loops:

* ``audio``: soundfile read, channel mean, ``torchaudio.functional.resample``
  to 16 kHz, 2 s windows, the checkpoint's feature extractor, ``AutoModel``
  (mean over time);
* ``text``: UTF-8 decode, the tokenizer's own overflow chunking
  (``return_overflowing_tokens``, ``padding="max_length"``), ``AutoModel`` (CLS);
* ``slide``: ``tiffslide.TiffSlide`` + ``read_region`` of each tissue tile (the
  tile list from ``medray.platform.decoders.slide.plan_slide``, timed, so both
  sides embed the same tiles), the image processor, ``AutoModel`` (CLS);
* ``series`` (``series.mode=volume``, when the series modality exists): pydicom
  read of every file, group by SeriesInstanceUID, sort along the slice normal,
  rescale and stack, windows as channels, trilinear resize, normalise,
  torchvision ``r3d_18``. Its pipeline units/s is the **marginal** rate (the job
  on all series and on half of them, in the same round: extra volumes / extra
  seconds), which removes the per-job fixed cost and keeps every per-volume
  cost; the steady window does not apply behind the grouping barrier.

Usage::

    python benchmarks/modalities.py [--modalities audio,text,slide,series] [--rounds 2]
        [--audio-n 48] [--text-n 80] [--slides 2] [--series 16] [--out benchmarks/results/modalities.json] [--merge]

Each modality's plain loop and pipeline alternate within a round; ``--merge`` keeps the
other modalities' entries of an existing ``--out``, so modalities can be measured in
separate runs (each under ~10 minutes on a loaded 2-core machine).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed_pipeline import _make_checkpoint as make_vit_checkpoint  # noqa: E402  (same directory)

HIDDEN, LAYERS = 192, 6  # every model: ViT-Tiny-like width/depth, as embed_pipeline's ViT
AUDIO_RATE, AUDIO_SECONDS, WINDOW_S = 44100, 10.0, 2.0
TEXT_MAX_LENGTH, TEXT_CHUNKS = 128, 5
SLIDE_SIZE, TILE = 4096, 224
SERIES_DEPTH, SERIES_SIZE, VOLUME_INPUT = 48, 256, (16, 64, 64)
#: series.windows' default (CT Foundation's lung, mediastinum, bone), in channel order
SERIES_WINDOWS = {"lung": (-600.0, 1500.0), "mediastinum": (40.0, 400.0), "bone": (400.0, 1800.0)}

_WORDS = (
    "the of and no with without normal acute chest lung heart right left mild small large effusion "
    "pneumonia fracture findings impression patient history pain report study mass nodule opacity "
    "stable change is are was in on at to for a an"
).split()


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


@contextlib.contextmanager
def _niceness(value: int) -> Any:
    """Run the (single-threaded) plain loop at ``value``: Ray runs its workers at niceness 15
    (``RAY_worker_niceness``), so on a shared machine the two sides compete on equal terms."""
    before = os.getpriority(os.PRIO_PROCESS, 0)
    os.setpriority(os.PRIO_PROCESS, 0, value)
    try:
        yield
    finally:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, before)
        except PermissionError:  # lowering niceness needs privileges; the driver then stays niced
            pass


class _CpuSampler:
    """CPU seconds used by this process and all its descendants (Ray's GCS, raylet, workers, actors).

    A thread samples every process of the tree every ``period`` seconds and adds up each one's
    growth since its last sample (a process born meanwhile counts from zero), so workers and actors
    that exit keep what they used (up to the last ``period``). CPU time hardly depends on how
    loaded the machine is, unlike wall time. :meth:`at` interpolates the running total.
    """

    def __init__(self, period: float = 0.2) -> None:
        import threading

        import psutil

        self._me = psutil.Process()
        self._last: dict[tuple[int, float], float] = {}
        self.total = 0.0
        self._sample(first=True)
        self.samples: list[tuple[float, float]] = [(time.time(), 0.0)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)

    def _sample(self, first: bool = False) -> None:
        import psutil

        for proc in [self._me, *self._me.children(recursive=True)]:
            try:
                key = (proc.pid, proc.create_time())
                t = proc.cpu_times()
            except psutil.Error:
                continue
            cur = t.user + t.system
            if not first:
                self.total += cur - self._last.get(key, 0.0)
            self._last[key] = cur

    def _run(self, period: float) -> None:
        while not self._stop.wait(period):
            self._sample()
            self.samples.append((time.time(), self.total))

    def __enter__(self) -> _CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.samples.append((time.time(), self.total))

    def at(self, t: float) -> float:
        ts, cs = zip(*self.samples)
        return float(np.interp(t, ts, cs))


def _steady_cpu(out: Path, sampler: _CpuSampler) -> dict:
    """CPU-s per unit between the first and the last committed output part (start-up excluded)."""
    import pyarrow.parquet as pq

    parts = []
    for p in Path(out, "embeddings").rglob("part-*.parquet"):
        seg = pq.read_table(p, columns=["segment"]).column("segment").to_pylist()
        units = sum(1 for x in seg if x != "pooled")
        if units:
            parts.append((p.stat().st_mtime, units))
    parts.sort()
    if len(parts) < 3 or parts[-1][0] <= parts[0][0]:
        return {"steady_cpu_s_per_unit": None, "steady_parts": len(parts)}
    units = sum(n for _, n in parts[1:])
    cpu = sampler.at(parts[-1][0]) - sampler.at(parts[0][0])
    return {
        "steady_cpu_s_per_unit": cpu / units,
        "steady_parts": len(parts),
        "steady_cpu_utilisation": cpu / ((parts[-1][0] - parts[0][0]) * (os.cpu_count() or 1)),
    }


# --------------------------------------------------------------------------------- data + checkpoints
def _audio_data(root: Path, n: int) -> list[Path]:
    import soundfile as sf

    rng = np.random.default_rng(0)
    t = np.arange(int(AUDIO_RATE * AUDIO_SECONDS)) / AUDIO_RATE
    paths = []
    for i in range(n):
        f = 200 + 40 * i
        left = 0.3 * np.sin(2 * np.pi * f * t) + 0.05 * rng.standard_normal(t.size)
        right = 0.3 * np.sin(2 * np.pi * 1.5 * f * t) + 0.05 * rng.standard_normal(t.size)
        p = root / f"rec{i:04d}.wav"
        sf.write(p, np.stack([left, right], 1).astype(np.float32), AUDIO_RATE, subtype="PCM_16")
        paths.append(p)
    return paths


def _audio_ckpt(root: Path) -> str:
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(0)
    cfg = Wav2Vec2Config(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HIDDEN // 64,
        intermediate_size=4 * HIDDEN,
        conv_dim=(128,) * 7,
        feat_extract_norm="group",
        do_stable_layer_norm=False,
    )
    out = root / "audio-ckpt"
    Wav2Vec2Model(cfg).save_pretrained(out)
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=False
    ).save_pretrained(out)
    (out / "MEDRAY_UNTRAINED").write_text("benchmark: random weights\n")
    return str(out)


def _text_data(root: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    # words of 1-3 tokens: about TEXT_CHUNKS chunks of TEXT_MAX_LENGTH tokens per document
    paths = []
    for i in range(n):
        words = rng.choice(_WORDS, size=int(TEXT_CHUNKS * (TEXT_MAX_LENGTH - 2) * 0.97))
        sentences = [" ".join(words[k : k + 12]).capitalize() + "." for k in range(0, len(words), 12)]
        p = root / f"report{i:04d}.txt"
        p.write_text(" ".join(sentences) + "\n")
        paths.append(p)
    return paths


def _text_ckpt(root: Path) -> str:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)] + list(".,:;-/()%")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars), *_WORDS]
    tok = BertTokenizerFast(
        vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True, model_max_length=TEXT_MAX_LENGTH
    )
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HIDDEN // 64,
        intermediate_size=4 * HIDDEN,
        max_position_embeddings=TEXT_MAX_LENGTH,
    )
    out = root / "text-ckpt"
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    (out / "MEDRAY_UNTRAINED").write_text("benchmark: random weights\n")
    return str(out)


def _slide_data(root: Path, n: int) -> list[Path]:
    from medray.testing.media import slide_tiff

    paths = []
    for i in range(n):
        p = root / f"slide{i:02d}.tif"
        # level 0 at 0.5 um/px = the target: 224-px tiles read at level 0, no resize
        p.write_bytes(slide_tiff(size=SLIDE_SIZE, mpp=0.5, levels=4, seed=i, blob=(0.5, 0.5, 0.45)))
        paths.append(p)
    return paths


def _series_data(root: Path, n: int) -> list[Path]:
    import random

    from medray.testing.samples import ct_phantom, ct_series

    rng = random.Random(0)
    paths = []
    for i in range(n):
        for data in ct_series(
            ct_phantom(SERIES_DEPTH, SERIES_SIZE, seed=i), seed=i, series=f"bench{i}", patient_id=f"BENCH{i}"
        ):
            p = root / f"{rng.getrandbits(48):012x}.dcm"  # shuffled names: order comes from the headers
            p.write_bytes(data)
            paths.append(p)
    return sorted(paths)


def _half_series(root: Path, n: int) -> Path:
    root.mkdir(parents=True)
    _series_data(root, n)  # the first n series of the full set (same seeds), under other file names
    return root


def _series_ckpt(root: Path) -> str:
    from medray.encoders.video import build_video_checkpoint

    return build_video_checkpoint(str(root / "video-ckpt"), arch="r3d_18", input_size=list(VOLUME_INPUT))


# --------------------------------------------------------------------------------------- plain loops
class _Batcher:
    """Feeds model inputs to ``fn`` in batches of ``batch`` items, timing the calls."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], batch: int) -> None:
        self.fn, self.batch, self.pending, self.model_s, self.first = fn, batch, [], 0.0, None

    def add(self, x: np.ndarray) -> None:
        self.pending.extend(x)
        while len(self.pending) >= self.batch:
            self._run(self.pending[: self.batch])
            self.pending = self.pending[self.batch :]

    def _run(self, items: list) -> None:
        t = time.perf_counter()
        emb = self.fn(np.stack(items))
        self.model_s += time.perf_counter() - t
        if self.first is None:
            self.first = emb

    def flush(self) -> None:
        if self.pending:
            self._run(self.pending)
            self.pending = []


def _torch_model(ckpt: str, key: str, pool: str) -> Callable[[np.ndarray], np.ndarray]:
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(ckpt).eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            if key == "text":
                t = torch.from_numpy(x)
                hidden = model(input_ids=t[:, 0], attention_mask=t[:, 1]).last_hidden_state
            else:
                hidden = model(**{key: torch.from_numpy(x)}).last_hidden_state
            return (hidden.mean(dim=1) if pool == "mean" else hidden[:, 0]).numpy()

    return run


def _plain_audio(paths: list[Path], ckpt: str, batch: int) -> dict:
    import soundfile as sf
    import torch
    import torchaudio.functional as AF
    from transformers import AutoFeatureExtractor

    fe = AutoFeatureExtractor.from_pretrained(ckpt)
    rate = int(fe.sampling_rate)
    size = int(WINDOW_S * rate)
    model = _Batcher(_torch_model(ckpt, "input_values", "mean"), batch)
    model.fn(np.zeros((batch, size), np.float32))  # warm-up
    t = {"read": 0.0, "decode": 0.0, "preprocess": 0.0}
    units = 0
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for p in paths:
        a = time.perf_counter()
        data = p.read_bytes()
        b = time.perf_counter()
        samples, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        wave = samples.mean(axis=1)
        wave = AF.resample(torch.from_numpy(wave), sr, rate).numpy()
        c = time.perf_counter()
        windows = [wave[s : s + size] for s in range(0, len(wave), size)]
        windows[-1] = np.pad(windows[-1], (0, size - len(windows[-1])))
        feats = fe(windows, sampling_rate=rate, return_tensors="np")["input_values"].astype(np.float32)
        d = time.perf_counter()
        t["read"] += b - a
        t["decode"] += c - b
        t["preprocess"] += d - c
        units += len(windows)
        model.add(feats)
    model.flush()
    return _plain_result(t, model, units, time.perf_counter() - t0, time.process_time() - cpu0)


def _plain_text(paths: list[Path], ckpt: str, batch: int) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    model = _Batcher(_torch_model(ckpt, "text", "cls"), batch)
    model.fn(np.ones((batch, 2, TEXT_MAX_LENGTH), np.int64))
    t = {"read": 0.0, "decode": 0.0, "preprocess": 0.0}
    units = 0
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for p in paths:
        a = time.perf_counter()
        data = p.read_bytes()
        b = time.perf_counter()
        text = data.decode("utf-8")
        c = time.perf_counter()
        enc = tok(
            text,
            truncation=True,
            max_length=TEXT_MAX_LENGTH,
            stride=0,
            return_overflowing_tokens=True,
            padding="max_length",
            return_attention_mask=True,
        )
        x = np.stack([np.asarray(enc["input_ids"], np.int64), np.asarray(enc["attention_mask"], np.int64)], 1)
        d = time.perf_counter()
        t["read"] += b - a
        t["decode"] += c - b
        t["preprocess"] += d - c
        units += len(x)
        model.add(x)
    model.flush()
    return _plain_result(t, model, units, time.perf_counter() - t0, time.process_time() - cpu0)


def _plain_slide(paths: list[Path], ckpt: str, batch: int) -> dict:
    import tiffslide
    from transformers import AutoImageProcessor

    from medray.platform.decoders.slide import SlideOptions, plan_slide

    proc = AutoImageProcessor.from_pretrained(ckpt)
    model = _Batcher(_torch_model(ckpt, "pixel_values", "cls"), batch)
    model.fn(np.zeros((batch, 3, TILE, TILE), np.float32))
    t = {"open_plan": 0.0, "read_region": 0.0, "preprocess": 0.0}
    units = 0
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for p in paths:
        a = time.perf_counter()
        slide = tiffslide.TiffSlide(str(p))
        plan = plan_slide(slide, SlideOptions(target_mpp=0.5, tile_size=TILE))
        t["open_plan"] += time.perf_counter() - a
        for tile in plan.tiles:
            b = time.perf_counter()
            region = slide.read_region((tile.x, tile.y), tile.level, (tile.read_size, tile.read_size)).convert("RGB")
            rgb = np.asarray(region)
            c = time.perf_counter()
            px = proc(images=[rgb], return_tensors="np")["pixel_values"].astype(np.float32)
            d = time.perf_counter()
            t["read_region"] += c - b
            t["preprocess"] += d - c
            units += 1
            model.add(px)
        slide.close()
    model.flush()
    return _plain_result(t, model, units, time.perf_counter() - t0, time.process_time() - cpu0)


def _plain_series(paths: list[Path], ckpt: str, batch: int) -> dict:
    """pydicom read, group by SeriesInstanceUID, sort along the slice normal, rescale and stack,
    windows as channels, trilinear resize, normalise, torchvision r3d_18 (fc removed)."""
    import pydicom
    import torch
    import torch.nn.functional as F
    import torchvision.models.video as tvv
    from safetensors.torch import load_file

    cfg = json.loads((Path(ckpt) / "config.json").read_text())
    net = getattr(tvv, cfg["architecture"])(weights=None)
    net.load_state_dict(load_file(str(Path(ckpt) / "model.safetensors")), strict=False)
    net.fc = torch.nn.Identity()
    net.eval()
    mean = torch.tensor(cfg["mean"])[:, None, None, None]
    std = torch.tensor(cfg["std"])[:, None, None, None]

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return net(torch.from_numpy(x)).numpy()

    model = _Batcher(run, batch)
    model.fn(np.zeros((batch, 3, *VOLUME_INPUT), np.float32))
    t = {"read_group": 0.0, "sort_stack": 0.0, "preprocess": 0.0}
    units = 0
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    a = time.perf_counter()
    groups: dict[str, list] = {}
    for p in paths:
        ds = pydicom.dcmread(p)
        groups.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    t["read_group"] += time.perf_counter() - a
    for uid in sorted(groups):
        b = time.perf_counter()
        dss = groups[uid]
        iop = np.asarray(dss[0].ImageOrientationPatient, np.float64)
        normal = np.cross(iop[:3], iop[3:])
        dss.sort(key=lambda ds: float(np.dot(np.asarray(ds.ImagePositionPatient, np.float64), normal)))
        vol = np.stack(
            [ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in dss]
        )
        c = time.perf_counter()
        chans = np.stack([np.clip((vol - (cen - wid / 2.0)) / wid, 0.0, 1.0) for cen, wid in SERIES_WINDOWS.values()])
        x = F.interpolate(
            torch.from_numpy(chans.astype(np.float32))[None], size=VOLUME_INPUT, mode="trilinear", align_corners=False
        )
        x = ((x - mean) / std).numpy()
        d = time.perf_counter()
        t["sort_stack"] += c - b
        t["preprocess"] += d - c
        units += 1
        model.add(x)
    model.flush()
    return _plain_result(t, model, units, time.perf_counter() - t0, time.process_time() - cpu0)


def _plain_result(t: dict, model: _Batcher, units: int, wall: float, cpu: float) -> dict:
    t = dict(t, model=model.model_s)
    per = {k: v / units for k, v in t.items()}
    return {
        "units": units,
        "per_unit_s": per,
        "per_unit_total_s": sum(per.values()),
        "plain_units_per_s": units / wall,
        "plain_wall_s": wall,
        "cpu_s_per_unit": cpu / units,
        "_first": model.first,
    }


# ------------------------------------------------------------------------------------------ pipeline
def _job(inp: Path, outp: Path, family: str, ckpt: str, pooling: str, batch: int, cores: int, overrides: dict) -> Any:
    from omegaconf import OmegaConf

    from medray.config import EmbedConf
    from medray.jobs.embed import EmbedJob

    cfg = OmegaConf.structured(EmbedConf)
    cfg.input, cfg.output = str(inp), str(outp)
    cfg.encoder.name, cfg.encoder.family, cfg.encoder.checkpoint = f"bench_{family}", family, ckpt
    cfg.encoder.pooling = pooling
    cfg.tracking.enabled = False
    cfg.compute.batch_size = batch
    # read/decode tasks take at least 16 records (the job's read default) even when the encoder batch
    # is smaller (series volumes): tiny read tasks would measure Ray's per-task cost, not the pipeline
    cfg.compute.decode_batch_size = max(batch, 16)
    cfg.compute.read_batch_size = max(batch, 16)
    cfg.compute.min_actors = cfg.compute.max_actors = cores  # fixed pool: no autoscaling lag in the timing
    cfg.compute.actor_num_cpus = 0.5
    cfg.compute.decode_num_cpus = 0.5
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return EmbedJob(cfg).run()


def _pipeline(inp: Path, outp: Path, case: dict, batch: int, cores: int) -> dict:
    half = None
    if case.get("marginal_dir"):
        # the same job on half the inputs first: the difference between the two runs is the marginal rate
        half = _job(
            case["marginal_dir"],
            outp.with_name(outp.name + "_half"),
            case["family"],
            case["ckpt"],
            case["pooling"],
            batch,
            cores,
            case["overrides"],
        )
    with _CpuSampler() as sampler:
        res = _job(inp, outp, case["family"], case["ckpt"], case["pooling"], batch, cores, case["overrides"])
    cpu = sampler.total
    steady_cpu = _steady_cpu(outp, sampler)
    if case["name"] == "slide":
        units = rows = int(res.slides["tiles"])  # one record per tile; the pooled slide row is written after
        records = units
    elif case["name"] == "series":
        units = rows = records = int(res.records_embedded)  # series.mode=volume: one row per series
    else:
        records = int(res.records_embedded)
        rows = int(res.rows_written)
        units = rows - records  # minus one pooled row per recording/document
    per_record = units / max(1, records)
    steady = res.steady_records_per_s * per_record if res.steady_records_per_s else None
    marginal = None
    if half is not None:
        extra_units = units - int(half.records_embedded)
        extra_s = res.pipeline_s - half.pipeline_s
        marginal = {
            "half_units": int(half.records_embedded),
            "half_pipeline_s": half.pipeline_s,
            "marginal_units_per_s": extra_units / extra_s if extra_s > 0 else None,
        }
        steady = marginal["marginal_units_per_s"]
    # stage_seconds sums per-row columns, and a record's t_read/t_decode repeat on each of its rows
    st = res.stage_seconds
    stage = {k: st[k] / max(1, rows) * records / max(1, units) for k in ("read", "decode", "preprocess")}
    stage["encode"] = st["encode"] / max(1, units)  # per item already; pooled rows carry 0
    return {
        "units": units,
        "records": records,
        "quarantined": res.quarantined,
        "pipeline_wall_s": res.pipeline_s,
        "pipeline_units_per_s": steady,
        "pipeline_units_per_s_including_startup": units / res.pipeline_s,
        "stage_s_per_unit_in_workers": stage,
        "cpu_s_per_unit": cpu / max(1, units),
        "cpu_utilisation": cpu / (res.wall_s * cores),
        **steady_cpu,
        **(marginal or {}),
        "output": str(outp),
    }


def _parity(out: str, first_record: str, plain_first: np.ndarray, segment: str) -> float:
    import pyarrow.parquet as pq

    tables = [pq.read_table(p) for p in sorted(Path(out, "embeddings").glob("part-*.parquet"))]
    rows = [
        r
        for t in tables
        for r in t.select(["uri", "segment", "frame", "embedding"]).to_pylist()
        if r["uri"].endswith(first_record) and r["segment"] == segment
    ]
    rows.sort(key=lambda r: r["frame"])
    got = np.asarray([r["embedding"] for r in rows[: len(plain_first)]], np.float32)
    return float(np.abs(got - plain_first[: len(got)]).max())


def _parity_by_content(out: str, plain_first: np.ndarray) -> float:
    """Series rows are keyed by series, not file: match each plain embedding to its nearest row."""
    import pyarrow.parquet as pq

    rows = np.asarray(
        [
            e
            for p in sorted(Path(out, "embeddings").glob("part-*.parquet"))
            for e in pq.read_table(p, columns=["embedding"]).column("embedding").to_pylist()
        ],
        np.float32,
    )
    return float(max(np.abs(rows - e).max(axis=1).min() for e in plain_first))


# ---------------------------------------------------------------------------------------------- main
def _series_status() -> str | None:
    """``None`` when the series modality is there to measure, else why not."""
    root = Path(__file__).resolve().parents[1] / "medray"
    for rel in ("platform/decoders/series.py", "pipeline/series.py", "encoders/video.py"):
        if not (root / rel).exists():
            return f"not measured: medray/{rel} does not exist in this checkout"
    try:
        from medray.config import EmbedConf

        EmbedConf().series  # noqa: B018 - the config section the job reads
    except Exception as err:  # noqa: BLE001
        return f"not measured: the embed config has no series section ({type(err).__name__})"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modalities", default="audio,text,slide,series")
    ap.add_argument("--audio-n", type=int, default=48, help=f"recordings of {AUDIO_SECONDS:g} s")
    ap.add_argument("--text-n", type=int, default=80, help=f"documents of ~{TEXT_CHUNKS} chunks")
    ap.add_argument("--slides", type=int, default=2, help=f"{SLIDE_SIZE}^2 slides of ~165 tissue tiles")
    ap.add_argument("--series", type=int, default=16, help=f"CT series of {SERIES_DEPTH} slices")
    ap.add_argument("--series-batch", type=int, default=2, help="volumes per encoder batch")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--plain-niceness",
        type=int,
        default=int(os.environ.get("RAY_worker_niceness", 15)),
        help="niceness of the plain loop; default: Ray's worker niceness (15)",
    )
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default="benchmarks/results/modalities.json")
    ap.add_argument(
        "--merge",
        action="store_true",
        help="keep the other modalities' entries of an existing --out (measure modalities in separate runs)",
    )
    args = ap.parse_args()
    wanted = [m.strip() for m in args.modalities.split(",") if m.strip()]
    unknown = set(wanted) - {"audio", "text", "slide", "series"}
    if unknown:
        ap.error(f"unknown modalities: {sorted(unknown)}")

    import torch

    torch.set_num_threads(1)  # the plain loop is single-core; the driver does no model work in the pipeline
    os.environ.setdefault("MEDRAY_PATIENT_SALT", "benchmark")
    os.environ["MEDRAY_PROGRESS"] = "0"
    tmp = Path(tempfile.mkdtemp(prefix="medray-bench-mod-"))
    result: dict = {
        "benchmark": "modalities",
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "hardware": {"cores": args.cores, "machine": platform.machine(), "python": platform.python_version()},
        "method": {
            "rounds": args.rounds,
            "order": "plain then pipeline in odd rounds, reversed in even",
            "efficiency": "pipeline units/s (steady state) / (cores / plain per-unit serial time)",
            "figures": "median over rounds; per-round values beside them",
            "plain_loop_niceness": args.plain_niceness,
            "niceness": "Ray runs its workers at niceness 15; the plain loop runs at the same "
            "niceness so that, on a shared machine, both get the CPU on equal terms",
            "cpu_efficiency": "plain CPU-s per unit / pipeline CPU-s per unit (driver + every "
            "Ray process, sampled every 0.2 s) between the first and the last "
            "output part: the efficiency if the pipeline had the cores to "
            "itself and kept them busy; little affected by other load",
            "cpu_utilisation": "pipeline CPU-s / (wall-s x cores): the share of the machine "
            "the pipeline got; 1.0 = both cores all the time",
        },
        "efficiency_target": 0.8,
        "load_avg_start": _load(),
        "modalities": {},
    }
    try:
        cases = []
        for name in wanted:
            if name == "series":
                why = _series_status()
                if why:
                    result["modalities"]["series"] = {"skipped": why}
                    print(why, flush=True)
                    continue
            d = tmp / name / "in"
            d.mkdir(parents=True)
            if name == "audio":
                paths = _audio_data(d, args.audio_n)
                case = {
                    "family": "hf_audio",
                    "ckpt": _audio_ckpt(tmp),
                    "pooling": "mean",
                    "plain": _plain_audio,
                    "unit": "windows",
                    "segment": "window",
                    "overrides": {"audio.window_s": WINDOW_S},
                    "inputs": f"{args.audio_n} WAV, {AUDIO_SECONDS:g} s, {AUDIO_RATE} Hz stereo PCM16 -> 16 kHz mono, "
                    f"{WINDOW_S:g} s windows",
                    "model": f"wav2vec2 hidden={HIDDEN} layers={LAYERS} conv=7x128 (random), mean pooling",
                }
            elif name == "text":
                paths = _text_data(d, args.text_n)
                case = {
                    "family": "hf_text",
                    "ckpt": _text_ckpt(tmp),
                    "pooling": "cls",
                    "plain": _plain_text,
                    "unit": "chunks",
                    "segment": "chunk",
                    "overrides": {},
                    "inputs": f"{args.text_n} UTF-8 reports of ~{TEXT_CHUNKS} chunks of {TEXT_MAX_LENGTH} tokens",
                    "model": f"BERT hidden={HIDDEN} layers={LAYERS} max_length={TEXT_MAX_LENGTH} (random), CLS",
                }
            elif name == "slide":
                paths = _slide_data(d, args.slides)
                case = {
                    "family": "hf_image",
                    "ckpt": make_vit_checkpoint(tmp / "slide", TILE, HIDDEN, LAYERS),
                    "pooling": "cls",
                    "plain": _plain_slide,
                    "unit": "tiles",
                    "segment": "tile",
                    "overrides": {"slide.target_mpp": 0.5, "slide.tile_size": TILE},
                    "inputs": f"{args.slides} pyramidal TIFF {SLIDE_SIZE}^2 at 0.5 um/px, 4 levels, zlib tiles; "
                    f"{TILE}-px tissue tiles at 0.5 um/px",
                    "model": f"ViT hidden={HIDDEN} layers={LAYERS} image={TILE} (random), CLS",
                }
            else:
                paths = _series_data(d, args.series)
                case = {
                    "family": "torchvision_video",
                    "ckpt": _series_ckpt(tmp),
                    "pooling": "cls",
                    "plain": _plain_series,
                    "unit": "volumes",
                    "segment": "volume",
                    "batch": args.series_batch,
                    "overrides": {"series.mode": "volume"},
                    "marginal_dir": _half_series(tmp / name / "half", args.series // 2),
                    "note": "pipeline units/s here is the MARGINAL rate: (volumes of the full run - volumes of "
                    "a run on half the series) / (difference of their pipeline seconds), which removes "
                    "the fixed per-job cost (actor start, header pass barrier) and keeps every per-"
                    "volume cost (header read, group-by rows, read, sort-stack, resample, model). The "
                    "steady window (first to last encoder batch) does not apply: the header pass and "
                    "group-by are a barrier, after which assembled volumes reach the encoder in a burst",
                    "inputs": f"{args.series} CT series of {SERIES_DEPTH} slices {SERIES_SIZE}^2 (uint16 + "
                    f"per-slice rescale, shuffled file names), 3 windows as channels",
                    "model": f"torchvision r3d_18 (random), input {list(VOLUME_INPUT)}",
                }
            (tmp / name / "warm").mkdir()
            for p in paths[:2] if name != "series" else _series_data(tmp / name / "warm", 1)[:0]:
                shutil.copy(p, tmp / name / "warm" / p.name)
            cases.append(dict(case, name=name, paths=paths, dir=d))

        from medray.config import register_schemas
        from medray.platform.runtime import init_ray

        register_schemas()
        init_ray(num_cpus=args.cores)  # started before timing: Ray start-up is not the pipeline
        for case in cases:  # workers, imports and checkpoint hashing warm, once per modality
            _job(
                tmp / case["name"] / "warm",
                tmp / case["name"] / "warm_out",
                case["family"],
                case["ckpt"],
                case["pooling"],
                case.get("batch", args.batch),
                args.cores,
                case["overrides"],
            )

        rounds: dict[str, list] = {c["name"]: [] for c in cases}
        for r in range(args.rounds):
            for case in cases:
                rec: dict = {"round": r}
                order = ("plain", "pipeline") if r % 2 == 0 else ("pipeline", "plain")
                for which in order:
                    load0 = _load()
                    if which == "plain":
                        with _niceness(args.plain_niceness):
                            plain = case["plain"](case["paths"], case["ckpt"], case.get("batch", args.batch))
                        first = plain.pop("_first")
                        rec["plain"] = dict(plain, load_avg=[load0, _load()])
                    else:
                        out = tmp / case["name"] / f"out{r}"
                        rec["pipeline"] = dict(
                            _pipeline(case["dir"], out, case, case.get("batch", args.batch), args.cores),
                            load_avg=[load0, _load()],
                        )
                pipe, plain = rec["pipeline"], rec["plain"]
                ideal = args.cores / plain["per_unit_total_s"]
                rec["ideal_units_per_s"] = ideal
                rec["efficiency"] = (pipe["pipeline_units_per_s"] or 0.0) / ideal
                rec["efficiency_including_startup"] = pipe["pipeline_units_per_s_including_startup"] / ideal
                rec["pipeline_vs_plain"] = (pipe["pipeline_units_per_s"] or 0.0) / plain["plain_units_per_s"]
                rec["pipeline_vs_plain_including_startup"] = (
                    pipe["pipeline_units_per_s_including_startup"] / plain["plain_units_per_s"]
                )
                rec["cpu_efficiency_including_startup"] = plain["cpu_s_per_unit"] / pipe["cpu_s_per_unit"]
                rec["cpu_efficiency"] = (
                    plain["cpu_s_per_unit"] / pipe["steady_cpu_s_per_unit"]
                    if pipe.get("steady_cpu_s_per_unit")
                    else None
                )
                rec["units_match"] = pipe["units"] == plain["units"]
                rec["parity_max_abs_diff_first_record"] = (
                    _parity_by_content(pipe["output"], first)
                    if case["name"] == "series"
                    else _parity(pipe["output"], case["paths"][0].name, first, case["segment"])
                )
                rounds[case["name"]].append(rec)
                print(
                    json.dumps({case["name"]: {k: rec[k] for k in ("round", "efficiency", "pipeline_vs_plain")}}),
                    flush=True,
                )
        for case in cases:
            recs = rounds[case["name"]]

            def med(f: Callable[[dict], float], recs: list = recs) -> float:
                return statistics.median(f(x) for x in recs)

            def med_or_none(f: Callable[[dict], float | None], recs: list = recs) -> float | None:
                values = [f(x) for x in recs]  # None: fewer than 3 output parts, no steady window
                return None if any(v is None for v in values) else statistics.median(values)

            basis = "efficiency" if case.get("steady_state", True) else "efficiency_including_startup"
            result["modalities"][case["name"]] = {
                "unit": case["unit"],
                "inputs": case["inputs"],
                "model": case["model"],
                "batch_size": case.get("batch", args.batch),
                "units": recs[-1]["plain"]["units"],
                "plain_units_per_s": med(lambda x: x["plain"]["plain_units_per_s"]),
                "pipeline_units_per_s": med(lambda x: x["pipeline"]["pipeline_units_per_s"] or 0.0),
                "pipeline_units_per_s_including_startup": med(
                    lambda x: x["pipeline"]["pipeline_units_per_s_including_startup"]
                ),
                "pipeline_vs_plain": med(lambda x: x["pipeline_vs_plain"]),
                "pipeline_vs_plain_including_startup": med(lambda x: x["pipeline_vs_plain_including_startup"]),
                "ideal_units_per_s": med(lambda x: x["ideal_units_per_s"]),
                "efficiency": med(lambda x: x["efficiency"]),
                "efficiency_including_startup": med(lambda x: x["efficiency_including_startup"]),
                "meets_target": med(lambda x, basis=basis: x[basis]) >= 0.8,
                "target_measured_on": basis,
                "parity_max_abs_diff": max(x["parity_max_abs_diff_first_record"] for x in recs),
                "parity_ok": max(x["parity_max_abs_diff_first_record"] for x in recs) < 1e-3,
                "plain_cpu_s_per_unit": med(lambda x: x["plain"]["cpu_s_per_unit"]),
                "pipeline_cpu_s_per_unit": med(lambda x: x["pipeline"]["cpu_s_per_unit"]),
                "pipeline_steady_cpu_s_per_unit": med_or_none(lambda x: x["pipeline"].get("steady_cpu_s_per_unit")),
                "cpu_efficiency": med_or_none(lambda x: x["cpu_efficiency"]),
                "cpu_efficiency_including_startup": med(lambda x: x["cpu_efficiency_including_startup"]),
                "pipeline_steady_cpu_utilisation": med_or_none(lambda x: x["pipeline"].get("steady_cpu_utilisation")),
                "pipeline_cpu_utilisation_including_startup": med(lambda x: x["pipeline"]["cpu_utilisation"]),
                "load_avg_1min": [x[w]["load_avg"][0][0] for x in recs for w in ("plain", "pipeline")],
                **({"note": case["note"]} if case.get("note") else {}),
                "rounds": [{k: v for k, v in x.items()} for x in recs],
            }
            for x in result["modalities"][case["name"]]["rounds"]:
                x["pipeline"].pop("output", None)
        result["load_avg_end"] = _load()
        if args.merge and Path(args.out).exists():
            old = json.loads(Path(args.out).read_text())
            runs = old.get("runs") or [{k: old.get(k) for k in ("started_utc", "load_avg_start", "load_avg_end")}]
            result["runs"] = runs + [
                {
                    "started_utc": result["started_utc"],
                    "modalities": wanted,
                    "load_avg_start": result["load_avg_start"],
                    "load_avg_end": result["load_avg_end"],
                }
            ]
            result["modalities"] = {**old.get("modalities", {}), **result["modalities"]}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(
            json.dumps(
                {m: {k: v for k, v in r.items() if k != "rounds"} for m, r in result["modalities"].items()}, indent=2
            )
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
