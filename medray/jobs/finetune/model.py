"""The model side of ``medray finetune``: classifier, DeepSpeed config, schedule, export.

The classifier is the registry encoder itself (its torch module and its own
pooling, :meth:`medray.encoders.Encoder.forward`) plus a linear head, so the
embedding a fine-tuned model computes in training is exactly what
``medray embed`` computes from the exported artifact, and the head is exactly
what :class:`medray.encoders.heads.LinearHead` applies to it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from medray.encoders import create_encoder, spec_from_dict
from medray.encoders.lora import apply_lora
from medray.platform.metrics import json_safe

if TYPE_CHECKING:
    from medray.encoders.registry import Encoder

__all__ = [
    "AUGMENT_KEYS",
    "Classifier",
    "EmbeddingHead",
    "feature_stats",
    "augment_batch",
    "build_classifier",
    "build_engine",
    "consolidated_state_dict",
    "deepspeed_config",
    "lr_factor",
    "task_loss",
    "to_outputs",
    "stack_examples",
    "write_backbone",
    "write_json",
]

#: Augmentations per modality (``train.augment.<MODALITY|default>.<key>``), on preprocessed tensors.
AUGMENT_KEYS = ("hflip", "vflip", "brightness", "contrast", "noise", "shift")


class Classifier(torch.nn.Module):
    """Registry encoder (same pooling as ``embed``) plus a linear head.

    Args:
        encoder: a :class:`medray.encoders.Encoder`; its module becomes ``backbone``.
        n_outputs: head outputs.
        freeze_backbone: run the backbone without autograd (linear probe).
    """

    _encoder: Encoder  # set with object.__setattr__, so Module.__getattr__ never types it

    def __init__(self, encoder: Any, n_outputs: int, freeze_backbone: bool = False) -> None:
        super().__init__()
        self.backbone = encoder.module
        self.head = torch.nn.Linear(encoder.dim, n_outputs)
        object.__setattr__(self, "_encoder", encoder)  # not a submodule: it wraps `backbone`
        self.freeze_backbone = freeze_backbone

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embeddings, as ``medray embed`` computes them."""
        if self.freeze_backbone:
            with torch.no_grad():
                return self._encoder.forward(x)
        return self._encoder.forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


class EmbeddingHead(torch.nn.Module):
    """The head alone, over precomputed pooled embeddings (``data.features=embeddings``).

    The embeddings are standardised with the training split's per-feature mean
    and standard deviation (fixed buffers) before the linear layer, as a linear
    probe should be: foundation-model embeddings are far from isotropic, and
    without it a few steps of SGD barely move the head. :meth:`linear_weights`
    folds the standardisation into one linear map over raw embeddings, which is
    what the exported :class:`~medray.encoders.heads.LinearHead` applies. Its
    parameters are named like :class:`Classifier`'s head (``head.weight``,
    ``head.bias``), so checkpoints and export treat both alike.
    """

    feature_mean: torch.Tensor  # buffers (register_buffer)
    feature_std: torch.Tensor

    def __init__(
        self, dim: int, n_outputs: int, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
    ) -> None:
        super().__init__()
        self.head = torch.nn.Linear(int(dim), int(n_outputs))
        mean_t = torch.zeros(int(dim)) if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        std_t = torch.ones(int(dim)) if std is None else torch.as_tensor(std, dtype=torch.float32)
        self.register_buffer("feature_mean", mean_t.clone())
        self.register_buffer("feature_std", std_t.clamp_min(1e-6).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((x - self.feature_mean.to(x.dtype)) / self.feature_std.to(x.dtype))

    def linear_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """``(weight, bias)`` of the same map on raw embeddings (float64 folding, float32 out)."""
        w = self.head.weight.detach().double().cpu() / self.feature_std.double().cpu()
        b = self.head.bias.detach().double().cpu() - w @ self.feature_mean.double().cpu()
        return w.float().numpy(), b.float().numpy()


def feature_stats(batches: Any) -> tuple[list[float], list[float]]:
    """Per-feature mean and standard deviation of embeddings (``x`` bytes) streamed in batches."""
    total: np.ndarray | None = None
    total_sq: np.ndarray | None = None
    n = 0
    for batch in batches:
        x = np.stack([np.frombuffer(b, dtype=np.float32) for b in batch["x"]]).astype(np.float64)
        if not len(x):
            continue
        total = x.sum(0) if total is None else total + x.sum(0)
        total_sq = (x * x).sum(0) if total_sq is None else total_sq + (x * x).sum(0)
        n += len(x)
    if not n:
        raise ValueError("no embeddings to standardise")
    assert total is not None and total_sq is not None  # set by the first non-empty batch
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean * mean, 0.0))
    return mean.tolist(), np.where(std > 1e-6, std, 1.0).tolist()


def build_classifier(
    spec: Mapping[str, Any],
    *,
    n_outputs: int,
    strategy: str,
    lora: Mapping[str, Any],
    seed: int,
    input_shape: Sequence[int],
    device: str = "cpu",
    embedding_dim: int | None = None,
    embedding_stats: Mapping[str, Sequence[float]] | None = None,
) -> tuple[Any, Any, Any]:
    """Load the encoder and build the classifier for a strategy.

    ``full`` trains every used weight, ``lora`` only the adapters (plus the
    head), ``linear_probe`` only the head. Weights that take no part in the
    loss (a pooler the pooling skips, timm's own classifier) are frozen, so
    every optimizer state belongs to a weight that learns.

    Args:
        spec: the encoder spec as a dict.
        n_outputs: head outputs.
        strategy: ``full``, ``lora`` or ``linear_probe``.
        lora: ``r``, ``alpha``, ``dropout``, ``target_modules``.
        seed: seeds the head's initialisation (identical on every rank).
        input_shape: ``(C, H, W)`` of the preprocessed input.
        device: torch device.
        embedding_dim: examples are pooled embeddings of this size: the model is
            an :class:`EmbeddingHead` and no encoder is loaded.
        embedding_stats: ``{"mean", "std"}`` of the training embeddings (standardisation).

    Returns:
        ``(model, tuner, encoder)``; ``tuner`` is the peft LoRA tuner or None,
        ``encoder`` is None for an :class:`EmbeddingHead`.
    """
    if embedding_dim:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            stats = embedding_stats or {}
            head = EmbeddingHead(int(embedding_dim), n_outputs, stats.get("mean"), stats.get("std"))
        return head.to(device), None, None

    encoder = create_encoder(spec_from_dict(dict(spec)), device=device)
    module = encoder.module
    module.train()
    tuner = None
    if strategy == "lora":
        tuner = apply_lora(
            module,
            r=lora.get("r", 8),
            alpha=lora.get("alpha", 16.0),
            dropout=lora.get("dropout", 0.0),
            target_modules=lora.get("target_modules"),
        )
        module.train()
    elif strategy == "linear_probe":
        module.requires_grad_(False)
    else:
        module.requires_grad_(True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = Classifier(encoder, n_outputs, freeze_backbone=strategy == "linear_probe")
    model.to(device)
    _freeze_unused(model, input_shape, device)
    return model, tuner, encoder


def _freeze_unused(model: Any, input_shape: Sequence[int], device: str) -> list[str]:
    """Freeze trainable parameters that get no gradient from a probe batch."""
    x = torch.zeros((2, *[int(s) for s in input_shape]), device=device)
    model.zero_grad(set_to_none=True)
    model(x).float().sum().backward()
    frozen = []
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is None:
            p.requires_grad_(False)
            frozen.append(name)
        p.grad = None
    return frozen


def task_loss(task: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits (binary, multi-label), cross-entropy (multi-class) or MSE (regression)."""
    import torch.nn.functional as F

    logits = logits.float()
    if task in ("binary", "multilabel"):
        return F.binary_cross_entropy_with_logits(logits, y)
    if task == "multiclass":
        return F.cross_entropy(logits, y[:, 0].long())
    return F.mse_loss(logits, y)


def to_outputs(task: str, logits: torch.Tensor) -> torch.Tensor:
    """Logits -> probabilities (sigmoid / softmax) or values (regression)."""
    logits = logits.float()
    if task in ("binary", "multilabel"):
        return torch.sigmoid(logits)
    if task == "multiclass":
        return torch.softmax(logits, dim=1)
    return logits


def lr_factor(step: int, *, total: int, warmup: int, schedule: str) -> float:
    """LR multiplier at optimizer step ``step``: linear warm-up, then cosine/linear decay or constant."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def deepspeed_config(
    *,
    stage: int,
    micro_batch: int,
    grad_accum: int,
    clip: float | None,
    precision: str,
    offload_optimizer: bool,
    offload_params: bool,
    extra: Mapping[str, Any],
) -> dict:
    """The DeepSpeed config: ZeRO stage, offload, precision, accumulation, clipping.

    The optimizer and LR schedule are torch objects handed to
    ``deepspeed.initialize`` (so no fused op is compiled on CPU); ``extra``
    is merged last, key by key, for anything else DeepSpeed accepts.
    """
    zero: dict[str, Any] = {"stage": int(stage)}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(micro_batch),
        "gradient_accumulation_steps": int(grad_accum),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if clip:
        cfg["gradient_clipping"] = float(clip)
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 16}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
        cfg["zero_force_ds_cpu_optimizer"] = False  # keep the torch optimizer (no cpu_adam build)
    if offload_params:
        zero["offload_param"] = {"device": "cpu"}
    return _merge(cfg, extra)


def build_engine(
    model: torch.nn.Module,
    *,
    stage: int,
    micro_batch: int,
    grad_accum: int,
    clip: float | None,
    precision: str,
    lr: float,
    weight_decay: float,
    total_steps: int,
    warmup_steps: int,
    schedule: str,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> tuple[Any, Any]:
    """``deepspeed.initialize`` with torch AdamW over the trainable weights and the warm-up schedule.

    Returns:
        ``(engine, lr_scheduler)``. With a single worker at ZeRO-0 the gradient all-reduce
        (a copy of every gradient with nobody to reduce with) is switched off.
    """
    import functools

    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, total=total_steps, warmup=warmup_steps, schedule=schedule)
    )
    config = deepspeed_config(
        stage=stage,
        micro_batch=micro_batch,
        grad_accum=grad_accum,
        clip=clip,
        precision=precision,
        offload_optimizer=offload_optimizer,
        offload_params=offload_params,
        extra=extra or {},
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config, dist_init_required=False
    )
    if int(stage) == 0 and engine.dp_world_size == 1:
        engine.enable_backward_allreduce = False
    return engine, scheduler


def _merge(base: dict, extra: Mapping[str, Any]) -> dict:
    out = dict(base)
    for k, v in (extra or {}).items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def augment_batch(
    x: torch.Tensor, modalities: Sequence[str], augment: Mapping[str, Mapping[str, float]], generator: torch.Generator
) -> torch.Tensor:
    """Random flips, intensity jitter, noise and shifts per sample, by modality.

    ``augment`` maps a modality (``DX``, ``CT``, ...; ``default`` for the
    rest) to probabilities (``hflip``, ``vflip``) and magnitudes
    (``brightness``, ``contrast``: +-fraction; ``noise``: std; ``shift``:
    max fraction of the side, circular).
    """
    if not augment:
        return x
    x = x.clone()
    n, _, h, w = x.shape
    for i in range(n):
        cfg = augment.get(modalities[i]) or augment.get("default") or {}
        if not cfg:
            continue
        r = torch.rand(6, generator=generator).tolist()
        if r[0] < float(cfg.get("hflip", 0.0)):
            x[i] = x[i].flip(-1)
        if r[1] < float(cfg.get("vflip", 0.0)):
            x[i] = x[i].flip(-2)
        c = float(cfg.get("contrast", 0.0))
        b = float(cfg.get("brightness", 0.0))
        if c or b:
            x[i] = x[i] * (1.0 + c * (2 * r[2] - 1)) + b * (2 * r[3] - 1)
        s = float(cfg.get("shift", 0.0))
        if s:
            dy, dx = int(round(s * h * (2 * r[4] - 1))), int(round(s * w * (2 * r[5] - 1)))
            x[i] = torch.roll(x[i], shifts=(dy, dx), dims=(-2, -1))
        noise = float(cfg.get("noise", 0.0))
        if noise:
            x[i] = x[i] + noise * torch.randn(x[i].shape, generator=generator)
    return x


# --------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------
def consolidated_state_dict(checkpoint_dir: str, tag: str, stage: int) -> dict[str, Any]:
    """Full fp32 weights from a DeepSpeed checkpoint (ZeRO shards merged by ``zero_to_fp32``)."""
    if int(stage) == 0:
        states = torch.load(
            os.path.join(checkpoint_dir, tag, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False
        )
        return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag))


def write_backbone(module: Any, *, family: str, base_dir: str, out_dir: str) -> None:
    """Save a (fine-tuned, LoRA-merged) encoder module in its family's own layout.

    ``hf_image``: ``save_pretrained`` plus the base checkpoint's processor
    config; ``timm_image``: the base ``config.json`` plus ``model.safetensors``.
    The base's untrained marker is not copied: these weights were trained.
    """
    os.makedirs(out_dir, exist_ok=True)
    if family == "hf_image":
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        module.save_pretrained(out_dir, safe_serialization=True)
        for name in ("preprocessor_config.json",):
            src = os.path.join(base_dir, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(out_dir, name))
        return
    if family == "timm_image":
        from safetensors.torch import save_file

        shutil.copyfile(os.path.join(base_dir, "config.json"), os.path.join(out_dir, "config.json"))
        state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
        save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return
    raise ValueError(f"no backbone writer for family {family!r}")


def write_json(path: str, data: Any) -> None:
    """Write JSON (strict: nan/inf as null)."""
    with open(path, "w") as f:
        json.dump(json_safe(data), f, indent=2, default=str)


def stack_examples(batch: Mapping[str, Any], input_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """A numpy batch of examples -> ``x (N, C, H, W)`` float32 and ``y (N, K)`` float32."""
    x = np.stack([np.frombuffer(b, dtype=np.float32) for b in batch["x"]]).reshape(-1, *input_shape)
    y = np.stack([np.asarray(v, dtype=np.float32) for v in batch["y"]])
    return x, y
