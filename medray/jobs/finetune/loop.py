"""The per-worker loop of ``medray finetune``; it runs inside Ray Train workers.

One epoch: stream this worker's shard of ``train`` (Ray Data, equal shards),
augment, forward/backward/step through the DeepSpeed engine (ZeRO stage,
accumulation, clipping from its config; the LR schedule steps with the
optimizer), then validate on ``val``, then checkpoint and report.

Checkpoints: every rank calls ``engine.save_checkpoint`` into a local
directory; rank 0 adds ``medray_state.json`` (epoch, step, history, attempts)
and the validation predictions; every rank hands its directory to
``ray.train.report``, which uploads and merges them and registers the
checkpoint only once every rank has reported, so a save torn by a dying
worker is never the one a restart resumes from. On (re)start the loop loads
``ray.train.get_checkpoint()`` if there is one, checks that it is complete,
and continues from the next epoch with DeepSpeed's step counter restored.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

from medray.jobs.finetune.model import (
    augment_batch,
    build_classifier,
    build_engine,
    stack_examples,
    task_loss,
    to_outputs,
    write_json,
)
from medray.pipeline.progress import format_epoch_line
from medray.platform.metrics import flatten_metrics, subgroup_metrics, task_metrics
from medray.platform.tracking import wandb_mode

__all__ = ["PREDICTIONS_FILE", "STATE_FILE", "check_complete", "train_loop"]

STATE_FILE = "medray_state.json"
PREDICTIONS_FILE = "val_predictions.npz"


def _numel(p: torch.Tensor) -> int:
    """Elements of a parameter, also when ZeRO-3 has partitioned it away (``ds_numel``)."""
    return int(getattr(p, "ds_numel", p.numel()))


def resolve_precision(precision: str, use_gpu: bool) -> str:
    """``auto``: bf16 on a GPU that has it, fp16 on an older GPU, fp32 on CPU."""
    if precision != "auto":
        return precision
    if use_gpu and torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def check_complete(directory: str, world_size: int) -> dict:
    """Read the medray state of a checkpoint and check every rank's shard is there.

    Raises:
        RuntimeError: the checkpoint is incomplete (it must never be resumed).
    """
    path = os.path.join(directory, STATE_FILE)
    if not os.path.isfile(path):
        raise RuntimeError(f"checkpoint has no {STATE_FILE}: it is incomplete and cannot be resumed")
    with open(path) as f:
        state = json.load(f)
    tag_dir = os.path.join(directory, state["tag"])
    if int(state["world_size"]) != int(world_size):
        raise RuntimeError(
            f"checkpoint was written by {state['world_size']} workers, this run has {world_size}; "
            "ZeRO shards are per worker: resume with the same scaling.num_workers"
        )
    stage = int(state["stage"])
    if stage == 0:
        expected = ["mp_rank_00_model_states.pt"]
    else:
        expected = [f"*zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world_size)]
        if stage == 3:
            expected += [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world_size)]
        else:
            expected += ["mp_rank_00_model_states.pt"]
    missing = [p for p in expected if not glob.glob(os.path.join(tag_dir, p))]
    if missing:
        raise RuntimeError(f"checkpoint {state['tag']} is incomplete (missing {missing[:3]}); not resuming from it")
    return state


def _wandb_run(config: dict, state: dict) -> Any:
    """Rank 0's W&B run (offline unless a key is set), resumed under the same id."""
    tracking = config["tracking"]
    if not tracking.get("enabled", True):
        return None
    try:
        import wandb

        mode = wandb_mode(tracking.get("mode", "auto"))
        if mode == "disabled":
            return None
        directory = (
            tracking.get("dir") or os.environ.get("WANDB_DIR") or os.path.join(os.environ.get("MEDRAY_HOME", ".medray"))
        )
        os.makedirs(directory, exist_ok=True)
        return wandb.init(
            project=tracking.get("project", "medray"),
            group=tracking.get("group"),
            name=tracking.get("name") or config["run_name"],
            id=config["run_id"],
            resume="allow",
            job_type="finetune",
            dir=directory,
            mode=mode,  # type: ignore[arg-type]  # tracking.mode as configured; wandb.init checks it
            config=config["resolved"],
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )
    except Exception as err:  # noqa: BLE001 - tracking never fails training
        print(f"medray finetune: W&B logging off ({type(err).__name__}: {err})", flush=True)
        return None


def _evaluate(engine: Any, val_it: Any, config: dict, device: Any, dtype: torch.dtype) -> dict | None:
    """Predictions on the whole validation set (rank 0; every rank under ZeRO-3).

    Returns:
        ``{"probs", "y", "record_id", "frame", "groups", "loss"}`` on ranks that evaluated.
    """
    task, shape = config["task"], config["input_shape"]
    subgroups = config["subgroups"]
    probs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    ids: list[str] = []
    frames: list[int] = []
    groups: dict[str, list] = {g: [] for g in subgroups}
    loss_sum, n = 0.0, 0
    engine.eval()
    with torch.no_grad():
        for batch in val_it.iter_batches(batch_size=config["eval_batch_size"], batch_format="numpy"):
            if len(batch["x"]) == 0:
                continue
            x, y = stack_examples(batch, shape)
            xt = torch.from_numpy(x).to(device=device, dtype=dtype)
            yt = torch.from_numpy(y).to(device)
            logits = engine(xt)
            loss_sum += float(task_loss(task, logits, yt)) * len(x)
            n += len(x)
            probs.append(to_outputs(task, logits).cpu().numpy())
            ys.append(y)
            ids.extend(str(v) for v in batch["record_id"])
            frames.extend(int(v) for v in batch["frame"])
            for g in subgroups:
                groups[g].extend(None if v is None else str(v) for v in batch[f"sg_{g}"])
    engine.train()
    k = config["n_outputs"]
    return {
        "probs": np.concatenate(probs) if probs else np.zeros((0, k), np.float32),
        "y": np.concatenate(ys) if ys else np.zeros((0, config["target_width"]), np.float32),
        "record_id": ids,
        "frame": frames,
        "groups": groups,
        "loss": loss_sum / max(1, n),
    }


def _metrics(config: dict, val: dict) -> dict:
    task, labels = config["task"], config["labels"]
    y = val["y"][:, 0] if task == "multiclass" else val["y"]
    overall = task_metrics(task, y, val["probs"], labels, n_bins=config["ece_bins"])
    overall["loss"] = val["loss"]
    groups = (
        subgroup_metrics(
            task,
            y,
            val["probs"],
            labels,
            val["groups"],
            n_bins=config["ece_bins"],
            min_size=config["min_subgroup_size"],
        )
        if val["groups"]
        else {}
    )
    return {"val": overall, "subgroups": groups}


def _epoch_line(config: dict, record: dict, left_s: float) -> str:
    """Rank 0's line for one epoch: step, loss, val AUROC and ECE (or MSE), learning rate, time left."""
    val = (record.get("metrics") or {}).get("val") or {}
    regression = config["task"] == "regression"
    return format_epoch_line(
        epoch=int(record["epoch"]) + 1,
        epochs=int(config["epochs"]),
        step=int(record["global_step"]),
        loss=float(record["train_loss"]),
        lr=float(record["lr"]),
        auroc=None if regression else val.get("auroc_macro"),
        ece=None if regression else val.get("ece"),
        mse=val.get("mse") if regression else None,
        left_s=left_s,
    )


def train_loop(config: dict) -> None:
    """Ray Train ``train_loop_per_worker`` (see the module docstring)."""
    import deepspeed
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    t_loop = time.perf_counter()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config["threads"])))
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    precision = resolve_precision(config["precision"], config["use_gpu"])
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    stage = int(config["stage"])

    model, _tuner, _encoder = build_classifier(
        config["encoder"],
        n_outputs=config["n_outputs"],
        strategy=config["strategy"],
        lora=config["lora"],
        seed=config["seed"],
        input_shape=config["input_shape"],
        device=str(device),
        embedding_dim=config.get("embedding_dim"),
        embedding_stats=config.get("embedding_stats"),
    )
    if stage == 3 and hasattr(model, "backbone"):
        # Encoders may call methods of the backbone (timm's forward_features) rather than the
        # module itself; register its own parameters with the top module so ZeRO-3 gathers them.
        for p in model.backbone.parameters(recurse=False):
            deepspeed.zero.register_external_parameter(model, p)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    engine, schedule = build_engine(
        model,
        stage=stage,
        micro_batch=config["batch_size"],
        grad_accum=config["grad_accum"],
        clip=config["clip_grad_norm"],
        precision=precision,
        lr=config["lr"],
        weight_decay=config["weight_decay"],
        total_steps=config["total_steps"],
        warmup_steps=config["warmup_steps"],
        schedule=config["schedule"],
        offload_optimizer=config["offload_optimizer"],
        offload_params=config["offload_params"],
        extra=config["deepspeed_extra"],
    )

    state: dict[str, Any] = {"epoch": -1, "history": [], "attempts": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = check_complete(directory, world)
            engine.load_checkpoint(
                directory, tag=state["tag"], load_optimizer_states=True, load_lr_scheduler_states=True
            )
    start_epoch = int(state["epoch"]) + 1
    state["attempts"].append(
        {
            "start_epoch": start_epoch,
            "start_step": int(engine.global_steps),
            "resumed": checkpoint is not None,
            "time": time.time(),
            "setup_s": round(time.perf_counter() - t_loop, 2),
        }
    )
    state.update(
        {
            "trainable_parameters": [n for n, _ in trainable],
            "n_trainable": int(sum(_numel(p) for _, p in trainable)),
            "n_parameters": int(sum(_numel(p) for p in model.parameters())),
            "precision": precision,
        }
    )
    run = _wandb_run(config, state) if rank == 0 and start_epoch < config["epochs"] else None
    if checkpoint is None and config.get("baseline_eval", True):
        # The untrained model's validation metrics: what training improved on.
        val = (
            _evaluate(engine, ray.train.get_dataset_shard("val"), config, device, dtype)
            if (stage == 3 or rank == 0)
            else None
        )
        if rank == 0 and val is not None:
            state["baseline"] = _metrics(config, val)

    train_it = ray.train.get_dataset_shard("train")
    val_it = ray.train.get_dataset_shard("val")
    augment = config["augment"]
    t_epochs = time.perf_counter()
    for epoch in range(start_epoch, config["epochs"]):
        t0 = time.perf_counter()
        generator = torch.Generator().manual_seed(config["seed"] * 100003 + epoch * 1009 + rank)
        engine.train()
        loss_sum = torch.zeros(2, dtype=torch.float64)
        for batch in train_it.iter_batches(
            batch_size=config["batch_size"],
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=config["shuffle_buffer"] or None,
            local_shuffle_seed=config["seed"] + epoch if config["shuffle_buffer"] else None,
        ):
            x, y = stack_examples(batch, config["input_shape"])
            xt = augment_batch(torch.from_numpy(x), list(batch["modality"]), augment, generator)
            xt = xt.to(device=device, dtype=dtype)
            loss = task_loss(config["task"], engine(xt), torch.from_numpy(y).to(device))
            engine.backward(loss)
            engine.step()
            loss_sum += torch.tensor([float(loss.detach()) * len(x), len(x)], dtype=torch.float64)
        torch.distributed.all_reduce(loss_sum)
        train_s = time.perf_counter() - t0

        val = _evaluate(engine, val_it, config, device, dtype) if (stage == 3 or rank == 0) else None
        record: dict[str, Any] = {
            "epoch": epoch,
            "global_step": int(engine.global_steps),
            "train_loss": float(loss_sum[0] / max(1.0, float(loss_sum[1]))),
            "train_examples": int(loss_sum[1]),
            "lr": float(schedule.get_last_lr()[0]),
            "train_s": round(train_s, 3),
        }
        flat: dict[str, Any] = dict(record)
        if rank == 0 and val is not None:
            metrics = _metrics(config, val)
            record["metrics"] = metrics
            flat.update(flatten_metrics(metrics["val"], "val"))
            for column, values in metrics["subgroups"].items():
                for value, m in values.items():
                    flat.update(flatten_metrics(m, f"val/{column}={value}"))
        if run is not None:
            run.log({k: v for k, v in flat.items() if isinstance(v, (int, float))}, step=int(engine.global_steps))
        if rank == 0 and config.get("progress", True):
            per_epoch = (time.perf_counter() - t_epochs) / (epoch - start_epoch + 1)
            # sys.stdout, not print(): Ray Train patches print() to also log the line (it would show twice)
            sys.stdout.write(_epoch_line(config, record, per_epoch * (config["epochs"] - epoch - 1)) + "\n")
            sys.stdout.flush()

        tag = f"epoch{epoch:04d}"
        directory = tempfile.mkdtemp(prefix="medray-ckpt-")
        try:
            engine.save_checkpoint(directory, tag=tag)
            if rank == 0:
                state["history"].append(record)
                state.update(
                    {
                        "epoch": epoch,
                        "global_step": int(engine.global_steps),
                        "tag": tag,
                        "world_size": world,
                        "stage": stage,
                    }
                )
                if val is not None:
                    np.savez(
                        os.path.join(directory, PREDICTIONS_FILE),
                        probs=val["probs"],
                        y=val["y"],
                        record_id=np.array(val["record_id"], dtype=object).astype(str),
                        frame=np.array(val["frame"], dtype=np.int64),
                    )
                write_json(os.path.join(directory, STATE_FILE), state)  # last: marks the save complete
            ray.train.report(flat, checkpoint=Checkpoint.from_directory(directory))
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    if run is not None:
        try:
            run.finish()
        except Exception:  # noqa: BLE001
            pass
