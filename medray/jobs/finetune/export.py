"""Export of ``medray finetune``: last checkpoint -> one servable artifact, checked.

1. The last checkpoint (all ranks' DeepSpeed files, merged by Ray Train) is
   consolidated into full fp32 weights (``zero_to_fp32`` for ZeRO 1-3).
2. The classifier is rebuilt on the driver exactly as the workers built it,
   the weights loaded (every trained weight must be present), LoRA adapters
   merged into the backbone.
3. The artifact is written with :func:`medray.encoders.heads.save_artifact`:
   model card, ``head.safetensors`` and, unless the backbone was frozen, the
   backbone in its family's own layout (``encoder.checkpoint=<artifact>``
   loads it in ``embed`` and ``serve``).
4. The validation predictions the model made at the end of training are
   written to ``predictions/val.parquet``, and the artifact, loaded the way
   ``embed`` and ``serve`` load it, is run on ``eval.verify_records`` of
   those records: the largest difference is reported. A head over pooled record
   embeddings (``data.features=embeddings``) has no backbone: its card
   references the base encoder, and the check re-embeds validation records
   with that encoder through ``embed``'s stages.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import tempfile
from typing import Any

import numpy as np

from medray.encoders import create_encoder, family_modality, get_spec, resolve_checkpoint, spec_to_dict
from medray.encoders.heads import LinearHead, ModelCard, load_artifact, save_artifact
from medray.encoders.lora import merge_lora
from medray.jobs.finetune.features import embedding_examples_batch
from medray.jobs.finetune.loop import PREDICTIONS_FILE, STATE_FILE
from medray.jobs.finetune.model import build_classifier, consolidated_state_dict, stack_examples, write_backbone
from medray.pipeline import EncoderActor, decode_batch, read_batch
from medray.platform.metrics import json_safe
from medray.platform.storage import open_fs

__all__ = ["export_run"]


def _load_trained(job: Any, state_dict: dict, input_shape: list[int]) -> tuple[Any, Any]:
    """The classifier rebuilt on the CPU with the trained weights loaded."""
    import torch

    c = job.cfg
    model, tuner, _ = build_classifier(
        spec_to_dict(job.spec),
        n_outputs=job.example_spec.n_outputs,
        strategy=c.train.strategy,
        lora=dataclasses.asdict(c.train.lora),
        seed=c.train.seed,
        input_shape=input_shape,
        device="cpu",
        embedding_dim=job.embedding_dim if job.features == "embeddings" else None,
        embedding_stats=job.embedding_stats if job.features == "embeddings" else None,
    )
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(trained - set(state_dict))
    if missing:
        raise RuntimeError(f"consolidated checkpoint lacks trained weights {missing[:3]}")
    own = model.state_dict()
    loadable = {k: v for k, v in state_dict.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    with torch.no_grad():
        model.load_state_dict(loadable, strict=False)
    model.eval()
    return model, tuner


def export_run(
    job: Any,
    ray: Any,
    checkpoint: Any,
    *,
    weights_hash: str,
    pre: Any,
    data_sha: str,
    run_name: str,
    config: dict,
    counts: dict,
    datasets: dict,
) -> dict:
    """Consolidate, export and check the artifact (see the module docstring).

    Returns:
        ``{"artifact", "artifact_sha256", "state", "metrics", "max_abs_diff", "checked"}``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    c = job.cfg
    spec = job.spec
    with checkpoint.as_directory() as directory:
        with open(os.path.join(directory, STATE_FILE)) as f:
            state = json.load(f)
        with np.load(os.path.join(directory, PREDICTIONS_FILE)) as npz:
            preds = {k: npz[k] for k in npz.files}
        state_dict = consolidated_state_dict(directory, state["tag"], int(state["stage"]))
    model, tuner = _load_trained(job, state_dict, job.input_shape(pre))
    if hasattr(model, "linear_weights"):  # a head over standardised embeddings: one linear map on raw ones
        weight, bias = model.linear_weights()
        head = LinearHead(weight, bias, c.task.type)
    else:
        head = LinearHead(model.head.weight.detach().cpu().numpy(), model.head.bias.detach().cpu().numpy(), c.task.type)
    last = (state.get("history") or [{}])[-1]
    metrics = dict(last.get("metrics") or {})
    metrics["epoch"] = last.get("epoch")
    metrics["baseline"] = (state.get("baseline") or {}).get("val")
    metrics["history"] = [
        {k: h.get(k) for k in ("epoch", "global_step", "train_loss")}
        | {
            "val_loss": (h.get("metrics") or {}).get("val", {}).get("loss"),
            "val_auroc_macro": (h.get("metrics") or {}).get("val", {}).get("auroc_macro"),
        }
        for h in state.get("history", [])
    ]
    metrics["splits"] = {s: {k: v for k, v in counts.get(s, {}).items()} for s in ("train", "val", "test")}
    artifact = c.output.rstrip("/") + "/model"
    card = ModelCard(
        id=run_name,
        task=c.task.type,
        labels=list(job.example_spec.labels),
        encoder={
            "name": spec.name,
            "family": spec.family,
            "checkpoint": spec.checkpoint,
            "weights_hash": weights_hash,
            "preprocessing_hash": pre.preprocessing_hash,
            "pooling": spec.pooling,
            "dim": int(head.dim),
            "options": dict(spec.options),
            **_record_embedding_info(job),
        },
        strategy=c.train.strategy,
        metrics=json_safe(metrics),
        data_manifest_sha256=data_sha,
        config=json_safe(config),
    )
    base_dir, _ = resolve_checkpoint(spec.checkpoint, storage_options=spec.storage_options, cache_dir=spec.cache_dir)
    with tempfile.TemporaryDirectory(prefix="medray-export-") as tmp:
        backbone_dir = None
        if c.train.strategy != "linear_probe":
            module = merge_lora(tuner) if tuner is not None else model.backbone
            backbone_dir = os.path.join(tmp, "backbone")
            write_backbone(module, family=spec.family, base_dir=base_dir, out_dir=backbone_dir)
        save_artifact(artifact, head=head, card=card, backbone_dir=backbone_dir, storage_options=c.storage.options)

    # The model's own predictions at the end of training.
    fs, root = open_fs(c.output, c.storage.options)
    table = pa.table(
        {
            "record_id": pa.array([str(v) for v in preds["record_id"]], pa.string()),
            "frame": pa.array(preds["frame"].astype(np.int32)),
            "prediction": pa.array([row.tolist() for row in preds["probs"].astype(np.float32)], pa.list_(pa.float32())),
            "target": pa.array([row.tolist() for row in preds["y"].astype(np.float32)], pa.list_(pa.float32())),
        }
    )
    fs.makedirs(posixpath.join(root, "predictions"), exist_ok=True)
    with fs.open(posixpath.join(root, "predictions", "val.parquet"), "wb") as f:
        pq.write_table(table, f)

    # Fetched into a private cache: the node cache is keyed by URI, and a run written to an output
    # used before may find an older copy there. Its hash lets embed/serve pin this very artifact.
    max_diff, checked = None, 0
    with tempfile.TemporaryDirectory(prefix="medray-verify-") as fresh:
        head2, card2, _, artifact_sha = load_artifact(artifact, storage_options=c.storage.options, cache_dir=fresh)
        if c.eval.verify_records > 0 and job.features == "embeddings":
            max_diff, checked = _verify_embeddings(job, head2, preds, datasets)
        elif c.eval.verify_records > 0:
            max_diff, checked = _verify(c, spec, head2, card2, artifact, artifact_sha, fresh, preds, datasets, pre)
    return {
        "artifact": artifact,
        "artifact_sha256": artifact_sha,
        "state": state,
        "metrics": metrics,
        "max_abs_diff": max_diff,
        "checked": checked,
    }


def _verify(
    c: Any,
    spec: Any,
    head: Any,
    card: Any,
    artifact: str,
    sha: str,
    cache_dir: str,
    preds: dict,
    datasets: dict,
    pre: Any,
) -> tuple[float | None, int]:
    """The artifact, loaded as ``embed``/``serve`` load it, against the end-of-training predictions.

    Returns:
        ``(max |difference|, records compared)``.

    Raises:
        RuntimeError: the difference is above 1e-4.
    """
    load_spec = (
        spec
        if not card.backbone_included
        else dataclasses.replace(spec, checkpoint=artifact, sha256=sha, untrained=False, cache_dir=cache_dir)
    )
    encoder = create_encoder(get_spec(load_spec), device="cpu")
    expected = {(str(r), int(f)): p for r, f, p in zip(preds["record_id"], preds["frame"], preds["probs"])}
    diffs = []
    n = c.eval.verify_records
    for batch in datasets["val"].limit(n).iter_batches(batch_size=n, batch_format="numpy"):
        x, _ = stack_examples(batch, list(pre.input_shape))
        for rid, frame, p in zip(batch["record_id"], batch["frame"], head.predict(encoder.embed(x))):
            want = expected.get((str(rid), int(frame)))
            if want is not None:
                diffs.append(float(np.max(np.abs(np.asarray(want, np.float64) - p))))
    max_diff = max(diffs) if diffs else None
    if max_diff is not None and max_diff > 1e-4:
        raise RuntimeError(
            f"exported artifact disagrees with the trained model (max |diff| {max_diff:.2e} "
            f"on {len(diffs)} validation records)"
        )
    return max_diff, len(diffs)


def _record_embedding_info(job: Any) -> dict:
    """Card fields of a head over pooled record embeddings: what its input is and how it was made."""
    if job.features != "embeddings":
        return {}
    from dataclasses import asdict

    c = job.cfg
    modality = family_modality(job.spec.family)
    segments = {
        "audio": {k: v for k, v in asdict(c.audio).items() if k not in ("pool",)},
        "text": {k: v for k, v in asdict(c.text).items() if k not in ("pool", "max_chars", "max_chunks")},
        "image": {"slide": asdict(c.slide)},
    }.get(modality, {})
    return {
        "modality": modality,
        "features": "embeddings",
        "record_pooling": "mean of the record's windows / chunks / slide tissue tiles (image frames: each)",
        "segments": segments,
    }


def _verify_embeddings(job: Any, head: Any, preds: dict, datasets: dict) -> tuple[float | None, int]:
    """The exported head against the end-of-training predictions, from re-embedded records.

    Up to ``eval.verify_records`` validation records that are objects (not manifest
    text cells, not slides) are read, decoded and embedded again with the base
    encoder exactly as ``embed`` does (the pipeline's stages, in this process),
    their pooled rows fed to the exported head, and compared with the model's own
    predictions; records it cannot redo are checked on their stored embedding.

    Raises:
        RuntimeError: the difference is above 1e-4.
    """
    import pyarrow as pa

    c = job.cfg
    n = c.eval.verify_records
    expected = {(str(r), int(f)): p for r, f, p in zip(preds["record_id"], preds["frame"], preds["probs"])}
    diffs: list[float] = []
    batch = next(iter(datasets["val"].limit(n).iter_batches(batch_size=n, batch_format="pyarrow")), None)
    if batch is None:
        return None, 0
    rows = batch.to_pylist()
    redo = [r for r in rows if r["pool"] == "" and not c.data.text_column and not c.data.embeddings]
    fresh: dict[tuple, np.ndarray] = {}
    if redo:
        opts = job._stage_options(None)
        opts.text_column = None
        table = pa.table({"uri": [r["uri"] for r in redo], "member": [r["member"] for r in redo]})
        actor = EncoderActor(spec_to_dict(job.spec), device="cpu", dtype="float32", batch_size=c.data.encode_batch_size)
        out = actor(decode_batch(read_batch(table, opts), opts))
        ex = embedding_examples_batch(_with_dummy_labels(out, job.example_spec), job.example_spec)
        for r in ex.to_pylist():
            fresh[(r["record_id"], int(r["frame"]))] = np.frombuffer(r["x"], dtype=np.float32)
    for r in rows:
        key = (str(r["record_id"]), int(r["frame"]))
        x = fresh.get(key)
        if x is None:
            x = np.frombuffer(r["x"], dtype=np.float32)
        want = expected.get(key)
        if want is not None:
            p = head.predict(x[None, :])[0]
            diffs.append(float(np.max(np.abs(np.asarray(want, np.float64) - p))))
    max_diff = max(diffs) if diffs else None
    if max_diff is not None and max_diff > 1e-4:
        raise RuntimeError(
            f"exported head on re-embedded records disagrees with the trained model "
            f"(max |diff| {max_diff:.2e} on {len(diffs)} validation records)"
        )
    return max_diff, len(diffs)


def _with_dummy_labels(table: Any, spec: Any) -> Any:
    """``table`` with zero-valued label columns, so every record passes the example stage."""
    import pyarrow as pa

    for col in spec.label_columns:
        value = spec.labels[0] if spec.task == "multiclass" else 0.0
        arr = pa.array([value] * table.num_rows)
        if col in table.column_names:
            table = table.set_column(table.column_names.index(col), col, arr)
        else:
            table = table.append_column(col, arr)
    return table
