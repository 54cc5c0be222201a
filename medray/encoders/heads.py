"""Task heads and the servable artifact format shared by finetune, embed and serve.

An *artifact* is a directory (local or on object storage)::

    model_card.json      what it is: task, labels, base encoder, metrics, config, version
    head.safetensors     the task head: ``weight`` (outputs x dim) and ``bias`` (outputs)
    <backbone files>     optional: the (fine-tuned) encoder in its family's own layout
                         (transformers ``save_pretrained`` / timm ``config.json`` +
                         ``model.safetensors``), so ``encoder.checkpoint=<artifact>`` loads it

A *linear-probe* artifact has no backbone files: its head applies to the
embeddings of the base encoder named in the card (``card["encoder"]``), which
is how the serving app multiplexes many heads over one encoder. A fine-tuned
artifact carries its backbone (``card["backbone_included"] = true``).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

import medray
from medray.encoders.checkpoint import resolve_checkpoint
from medray.platform.errors import ConfigError
from medray.platform.storage import open_fs

__all__ = [
    "TASKS",
    "ARTIFACT_FORMAT",
    "ModelCard",
    "LinearHead",
    "save_artifact",
    "load_artifact",
    "is_artifact",
]

#: Supported task types and the activation that turns logits into outputs.
TASKS: dict[str, str] = {
    "binary": "sigmoid",
    "multilabel": "sigmoid",
    "multiclass": "softmax",
    "regression": "identity",
}
ARTIFACT_FORMAT = "medray-artifact/1"
CARD_FILE = "model_card.json"
HEAD_FILE = "head.safetensors"


@dataclass
class ModelCard:
    """The model card JSON of an artifact.

    Attributes:
        id: stable identifier (used as the serving model id by default).
        task: one of :data:`TASKS`.
        labels: output names (one per output unit; binary has one).
        encoder: the base encoder: name, family, checkpoint, weights_hash,
            preprocessing_hash, pooling, dim.
        backbone_included: True when the artifact holds fine-tuned encoder weights.
        strategy: ``linear_probe``, ``full`` or ``lora``.
        metrics: overall and per-subgroup metrics.
        data_manifest_sha256: hash of the training manifest.
        config: the resolved training config (no secrets).
    """

    id: str
    task: str
    labels: list[str]
    encoder: dict[str, Any]
    backbone_included: bool = False
    strategy: str = "linear_probe"
    metrics: dict[str, Any] = field(default_factory=dict)
    data_manifest_sha256: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    medray_version: str = ""
    created: str = ""
    format: str = ARTIFACT_FORMAT

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError("task.type", f"unknown task '{self.task}'; expected one of {sorted(TASKS)}")
        if not self.labels:
            raise ConfigError("task.labels", "at least one label is required")

    @property
    def activation(self) -> str:
        """``sigmoid``, ``softmax`` or ``identity``."""
        return TASKS[self.task]


class LinearHead:
    """A linear head over pooled embeddings, as numpy (no torch needed to serve it).

    Args:
        weight: ``(outputs, dim)`` float32.
        bias: ``(outputs,)`` float32.
        task: one of :data:`TASKS`; selects the output activation.
    """

    def __init__(self, weight: np.ndarray, bias: np.ndarray, task: str) -> None:
        weight = np.asarray(weight, dtype=np.float32)
        bias = np.asarray(bias, dtype=np.float32)
        if weight.ndim != 2 or bias.shape != (weight.shape[0],):
            raise ValueError(f"head shapes do not match: weight {weight.shape}, bias {bias.shape}")
        self.weight, self.bias, self.task = weight, bias, task

    @property
    def dim(self) -> int:
        """Embedding size the head expects."""
        return int(self.weight.shape[1])

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        """``(N, dim)`` -> ``(N, outputs)`` raw scores."""
        emb = np.asarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise ValueError(f"expected embeddings of shape (N, {self.dim}), got {emb.shape}")
        return emb @ self.weight.T + self.bias

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        """Probabilities (sigmoid/softmax) or values (regression), ``(N, outputs)``."""
        z = self.logits(embeddings).astype(np.float64)
        act = TASKS[self.task]
        if act == "sigmoid":
            out = 1.0 / (1.0 + np.exp(-z))
        elif act == "softmax":
            z = z - z.max(axis=1, keepdims=True)
            e = np.exp(z)
            out = e / e.sum(axis=1, keepdims=True)
        else:
            out = z
        return out.astype(np.float32)


def is_artifact(local_dir: str) -> bool:
    """True when ``local_dir`` holds a medray artifact (a model card)."""
    return os.path.isfile(os.path.join(local_dir, CARD_FILE))


def save_artifact(
    out_uri: str,
    *,
    head: LinearHead,
    card: ModelCard,
    backbone_dir: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Write an artifact to ``out_uri`` (local path or object storage).

    Files are staged in a local temp dir and uploaded; the model card goes
    last, so a reader that finds the card finds a complete artifact.

    Args:
        out_uri: destination directory URI.
        head: the trained head.
        card: its model card (``created``/``medray_version`` filled if empty).
        backbone_dir: a local directory with fine-tuned encoder files to include.
        storage_options: fsspec options for ``out_uri``.

    Returns:
        ``out_uri``.
    """
    from safetensors.numpy import save_file

    card.medray_version = card.medray_version or medray.__version__
    card.created = card.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    card.backbone_included = backbone_dir is not None
    fs, root = open_fs(out_uri, storage_options)
    with tempfile.TemporaryDirectory(prefix="medray-artifact-") as tmp:
        save_file({"weight": head.weight, "bias": head.bias}, os.path.join(tmp, HEAD_FILE))
        files = [HEAD_FILE]
        if backbone_dir:
            for dirpath, _, names in os.walk(backbone_dir):
                for name in names:
                    rel = os.path.relpath(os.path.join(dirpath, name), backbone_dir)
                    if rel in (HEAD_FILE, CARD_FILE):
                        continue
                    files.append(rel)
        fs.makedirs(root, exist_ok=True)
        for rel in files:
            src = os.path.join(tmp if rel == HEAD_FILE else backbone_dir or tmp, rel)
            fs.put_file(src, f"{root.rstrip('/')}/{rel}")
        with fs.open(f"{root.rstrip('/')}/{CARD_FILE}", "wb") as f:
            f.write(json.dumps(asdict(card), indent=2, default=str).encode())
    return out_uri


def load_artifact(
    uri: str, *, storage_options: Mapping[str, Any] | None = None, cache_dir: str | None = None
) -> tuple[LinearHead, ModelCard, str, str]:
    """Fetch (once per node, hashed) and load an artifact's head and card.

    Returns:
        ``(head, card, local_dir, sha256)``; ``local_dir`` also loads as an
        encoder checkpoint when ``card.backbone_included``.

    Raises:
        ConfigError: when ``uri`` is not a medray artifact.
    """
    from safetensors.numpy import load_file

    local, sha = resolve_checkpoint(uri, storage_options=dict(storage_options or {}), cache_dir=cache_dir)
    if not is_artifact(local):
        raise ConfigError(
            "heads", f"'{uri}' is not a medray artifact (no {CARD_FILE}); give the output of `medray finetune`"
        )
    with open(os.path.join(local, CARD_FILE)) as f:
        raw = json.load(f)
    known = set(ModelCard.__dataclass_fields__)
    card = ModelCard(**{k: v for k, v in raw.items() if k in known})
    tensors = load_file(os.path.join(local, HEAD_FILE))
    return LinearHead(tensors["weight"], tensors["bias"], card.task), card, local, sha
