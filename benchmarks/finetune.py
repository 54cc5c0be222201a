"""Ratio benchmark of ``medray finetune``'s training loop; writes JSON.

Measured side by side in one run (machines here are noisy):

* step time of medray's loop on Ray Train + DeepSpeed (1 worker, ZeRO-0 and
  ZeRO-2, the job's ``build_engine``, batches streamed from a Ray Data shard
  as the job does) vs a plain single-process torch loop (same model from the
  encoder registry, same batches, same loss, AdamW, clipping), with the same
  number of torch threads (1 and 2); start-up and the first steps are
  excluded; plain runs are interleaved with the Ray runs and their median is
  the reference;
* per-worker memory of model + gradients + optimizer states at ZeRO-0 and
  ZeRO-3 with 2 workers, counted tensor by tensor (each storage once), against
  the 16 bytes/parameter accounting of mixed-precision Adam (ZeRO-3 should
  divide it by the number of workers); process RSS alongside.

Usage::

    python benchmarks/finetune.py [--hidden 384] [--layers 6] [--image-size 112] [--batch 16] \\
        [--steps 14] [--skip 4] [--threads 1 2] [--out benchmarks/results/finetune.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


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
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(out)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(out)
    return str(out)


def _rows(n: int, shape: tuple[int, int, int], seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "x": rng.standard_normal(shape, dtype=np.float32).tobytes(),
            "y": [float(i % 2), float(i % 3 == 0)],
            "modality": "DX",
        }
        for i in range(n)
    ]


def _spec(ckpt: str) -> dict:
    from medray.encoders import get_spec, spec_to_dict

    return spec_to_dict(get_spec("hf_image", checkpoint=ckpt, pooling="cls"))


# --------------------------------------------------------------------------
# plain torch loop
# --------------------------------------------------------------------------
def plain_loop(spec: dict, rows: list[dict], shape: tuple, batch: int, skip: int, threads: int) -> dict:
    import torch

    from medray.jobs.finetune.model import build_classifier, stack_examples, task_loss

    torch.set_num_threads(threads)
    model, _, _ = build_classifier(spec, n_outputs=2, strategy="full", lora={}, seed=0, input_shape=shape)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for s in range(0, len(rows) - batch + 1, batch):
        chunk = rows[s : s + batch]
        t0 = time.perf_counter()
        x, y = stack_examples({"x": [r["x"] for r in chunk], "y": [r["y"] for r in chunk]}, shape)
        loss = task_loss("multilabel", model(torch.from_numpy(x)), torch.from_numpy(y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
    return _summary(times, skip)


def build_classifier_params(spec: dict, shape: tuple) -> list:
    """The trainable parameters of the benchmark's classifier (for counting)."""
    from medray.jobs.finetune.model import build_classifier

    model, _, _ = build_classifier(spec, n_outputs=2, strategy="full", lora={}, seed=0, input_shape=shape)
    return [p for p in model.parameters() if p.requires_grad]


def _summary(times: list[float], skip: int) -> dict:
    kept = times[skip:]
    return {
        "steps_timed": len(kept),
        "mean_s": statistics.fmean(kept),
        "median_s": statistics.median(kept),
        "min_s": min(kept),
        "first_step_s": times[0],
    }


# --------------------------------------------------------------------------
# Ray Train + DeepSpeed (the job's model, config builder, loss and ingest)
# --------------------------------------------------------------------------
def _tensor_bytes(engine) -> dict:
    """Bytes of params / grads / optimizer tensors this process holds, each storage counted once."""
    import torch

    seen: set = set()

    def add(t) -> int:
        if t is None or not isinstance(t, torch.Tensor) or t.numel() == 0:
            return 0
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen:
            return 0
        seen.add(key)
        return t.untyped_storage().nbytes()

    out = {"params": 0, "grads": 0, "optimizer": 0}
    for p in engine.module.parameters():
        out["params"] += add(getattr(p, "ds_tensor", None) if hasattr(p, "ds_tensor") else p.data)
        out["grads"] += add(p.grad)
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    for group in inner.param_groups:
        for p in group["params"]:
            out["optimizer"] += add(p.data)  # ZeRO's fp32 partitions (master weights)
            out["grads"] += add(p.grad)
    for state in inner.state.values():
        for v in state.values():
            out["optimizer"] += add(v)
    for name in (
        "averaged_gradients",
        "grad_partitions_flat_buffer",
        "fp32_partitioned_groups_flat",
        "single_partition_of_fp32_groups",
    ):
        value = getattr(opt, name, None)
        if value is None:
            continue
        items = [value] if isinstance(value, torch.Tensor) else (value.values() if isinstance(value, dict) else value)
        for t in items:
            for tt in t if isinstance(t, (list, tuple)) else [t]:
                out["grads" if "grad" in name else "optimizer"] += add(tt)
                out["grads"] += add(getattr(tt, "grad", None))
    out["total"] = sum(out.values())
    return out


def ray_loop(config: dict) -> None:
    """The job's step (``build_engine``, ``task_loss``, Ray Data shard) with per-step timing and memory."""
    import psutil
    import ray.train
    import torch

    from medray.jobs.finetune.model import build_classifier, build_engine, stack_examples, task_loss

    torch.set_num_threads(config["threads"])
    shape = tuple(config["shape"])
    model, _, _ = build_classifier(config["spec"], n_outputs=2, strategy="full", lora={}, seed=0, input_shape=shape)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    engine, _ = build_engine(
        model,
        stage=config["stage"],
        micro_batch=config["batch"],
        grad_accum=1,
        clip=1.0,
        precision="fp32",
        lr=1e-4,
        weight_decay=0.01,
        total_steps=1000,
        warmup_steps=0,
        schedule="constant",
    )
    times, grads = [], {}
    it = ray.train.get_dataset_shard("train")
    t0 = time.perf_counter()
    for batch in it.iter_batches(batch_size=config["batch"], batch_format="numpy", drop_last=True):
        x, y = stack_examples(batch, shape)
        loss = task_loss("multilabel", engine(torch.from_numpy(x)), torch.from_numpy(y))
        engine.backward(loss)
        if config.get("measure"):
            grads = _tensor_bytes(engine)  # gradients exist between backward and step
        engine.step()
        t1 = time.perf_counter()
        times.append(t1 - t0)
        t0 = t1
    held = _tensor_bytes(engine)  # parameters and optimizer states after the step
    metrics = {
        "n_params": n_params,
        "times": times,
        "rss": psutil.Process().memory_info().rss,
        "bytes_params": held["params"],
        "bytes_optimizer": held["optimizer"],
        "bytes_grads": grads.get("grads", 0),
    }
    metrics["bytes_total"] = metrics["bytes_params"] + metrics["bytes_optimizer"] + metrics["bytes_grads"]
    ray.train.report(metrics)
    if ray.train.get_context().get_world_rank() == 0:
        Path(config["result"]).write_text(json.dumps(metrics))


def ray_run(
    spec: dict,
    rows: list[dict],
    shape: tuple,
    *,
    stage: int,
    workers: int,
    threads: int,
    batch: int,
    storage: str,
    measure: bool = False,
) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    result = os.path.join(storage, f"result-{stage}-{workers}-{threads}.json")
    ds = ray.data.from_items(rows).materialize()
    trainer = TorchTrainer(
        ray_loop,
        train_loop_config={
            "spec": spec,
            "shape": list(shape),
            "stage": stage,
            "batch": batch,
            "threads": threads,
            "result": result,
            "measure": measure,
        },
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": threads}),
        datasets={"train": ds},
        run_config=RunConfig(storage_path=storage, name=f"bench-{stage}-{workers}-{threads}"),
    )
    t0 = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - t0
    out = json.loads(Path(result).read_text())
    out["wall_s"] = wall
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--skip", type=int, default=4, help="steps excluded as warm-up")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads (plain and per worker)")
    ap.add_argument(
        "--parts",
        nargs="+",
        default=["step", "memory"],
        choices=["step", "memory"],
        help="what to measure; parts not measured are kept from an existing --out file",
    )
    ap.add_argument("--out", default="benchmarks/results/finetune.json")
    args = ap.parse_args()

    import ray
    import torch

    os.environ.setdefault("MEDRAY_PROGRESS", "0")
    tmp = Path(tempfile.mkdtemp(prefix="medray-bench-ft-"))
    ckpt = _make_checkpoint(tmp, args.image_size, args.hidden, args.layers)
    spec = _spec(ckpt)
    shape = (3, args.image_size, args.image_size)
    rows = _rows(args.steps * args.batch, shape)
    t_start = time.perf_counter()
    ray.init(num_cpus=max(args.threads) + 1, include_dashboard=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False

    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else {}
    step_time = previous.get("step_time", {})
    for threads in args.threads if "step" in args.parts else []:
        # plain and Ray runs interleaved, the plain loop in this (Ray driver) process: same machine state
        plain = [plain_loop(spec, rows, shape, args.batch, args.skip, threads)]
        ray_steps = {}
        for stage in (0, 2):
            r = ray_run(
                spec, rows, shape, stage=stage, workers=1, threads=threads, batch=args.batch, storage=str(tmp / "runs")
            )
            ray_steps[f"zero{stage}"] = {**_summary(r["times"], args.skip), "wall_s": r["wall_s"]}
            plain.append(plain_loop(spec, rows, shape, args.batch, args.skip, threads))
        ref = statistics.median(p["median_s"] for p in plain)
        overhead = {k: v["median_s"] / ref - 1.0 for k, v in ray_steps.items()}
        step_time[f"threads_{threads}"] = {
            "plain_runs": plain,
            "plain_median_s": ref,
            "ray_train_deepspeed_1_worker": ray_steps,
            "overhead": overhead,
            "meets_10pct_target": {k: v <= 0.10 for k, v in overhead.items()},
        }

    memory = previous.get("memory_2_workers", {})
    for stage in (0, 3) if "memory" in args.parts else ():
        r = ray_run(
            spec,
            rows[: 6 * args.batch],
            shape,
            stage=stage,
            workers=2,
            threads=1,
            batch=args.batch // 2,
            storage=str(tmp / "runs"),
            measure=True,
        )
        p = r["n_params"]
        expected = 16 * p / (2 if stage == 3 else 1)
        memory[f"zero{stage}"] = {
            "n_params": p,
            "params_bytes": r["bytes_params"],
            "grads_bytes": r["bytes_grads"],
            "optimizer_bytes": r["bytes_optimizer"],
            "total_bytes": r["bytes_total"],
            "bytes_per_param": r["bytes_total"] / p,
            "rss_bytes": r["rss"],
            "accounting_16B_per_param_bytes": 16 * p,
            "expected_bytes": expected,
            "ratio_to_expected": r["bytes_total"] / expected,
        }
    ray.shutdown()

    n_params = sum(p.numel() for p in build_classifier_params(spec, shape))
    result = {
        "benchmark": "finetune",
        "inputs": {
            "model": f"ViT hidden {args.hidden} x {args.layers} layers, {args.image_size}px, patch 16",
            "n_params": n_params,
            "batch": args.batch,
            "steps": args.steps,
            "skip": args.skip,
            "threads": args.threads,
            "precision": "fp32",
            "optimizer": "torch AdamW",
            "data": "Ray Data shard of a materialized dataset (Ray) / the same rows in memory (plain)",
        },
        "hardware": {
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "ray": ray.__version__,
            "python": platform.python_version(),
            "load_avg_1m_at_end": os.getloadavg()[0],
        },
        "step_time": step_time,
        "target_overhead": 0.10,
        "memory_2_workers": memory,
        "memory_zero3_vs_zero0": memory["zero3"]["total_bytes"] / memory["zero0"]["total_bytes"] if memory else None,
        "wall_s": {
            **(previous.get("wall_s") if isinstance(previous.get("wall_s"), dict) else {}),
            "+".join(args.parts): time.perf_counter() - t_start,
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(
        json.dumps(
            {
                "overhead": {k: v["overhead"] for k, v in step_time.items()},
                "plain_median_s": {k: v["plain_median_s"] for k, v in step_time.items()},
                "memory_MB": {k: round(v["total_bytes"] / 1e6, 1) for k, v in memory.items()},
                "bytes_per_param": {k: round(v["bytes_per_param"], 2) for k, v in memory.items()},
                "zero3_vs_zero0": result["memory_zero3_vs_zero0"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
