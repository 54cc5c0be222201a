"""The ``medray finetune`` config schema: what Hydra composes from ``conf/finetune.yaml`` and its groups."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from medray.config import (
    DecodeConf,
    EncoderConf,
    RayConf,
    StorageConf,
    TrackingConf,
    with_format_sections,
)
from medray.platform.decoders.audio import AudioOptions
from medray.platform.decoders.slide import SlideOptions
from medray.platform.formats import TextOptions

__all__ = [
    "TASK_TYPES",
    "STRATEGIES",
    "PRECISIONS",
    "SCHEDULES",
    "FinetuneDataConf",
    "TaskConf",
    "LoraConf",
    "TrainConf",
    "DeepSpeedConf",
    "ScalingConf",
    "EvalConf",
    "FinetuneConf",
    "register",
]

TASK_TYPES = ("binary", "multilabel", "multiclass", "regression")
STRATEGIES = ("linear_probe", "full", "lora")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = ("cosine", "linear", "constant")


# --------------------------------------------------------------------------
# schema (stored in Hydra's ConfigStore as "finetune_schema")
# --------------------------------------------------------------------------
@dataclass
class FinetuneDataConf:
    """Labelled manifests and how to split them."""

    train: str = MISSING  # manifest: uri + label columns (+ optional split/group columns)
    val: Optional[str] = None  # a separate validation manifest (then train is not split)
    split_column: Optional[str] = None  # a column with train/val/test; overrides the computed split
    group_by: str = "patient_key"  # patient_key (salted, from the DICOM) or a manifest column
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    seed: int = 0
    features: str = "auto"  # auto | inputs | embeddings (frozen encoder's pooled record embeddings)
    embeddings: Optional[str] = None  # a `medray embed` output to reuse (joined to the manifest by uri)
    text_column: Optional[str] = None  # documents in a manifest column instead of files
    read_batch_size: int = 16
    decode_batch_size: int = 16
    decode_num_cpus: float = 1.0
    decode_concurrency: Optional[int] = None
    encode_batch_size: int = 32  # features=embeddings: items per forward pass
    encode_actors: int = 1  # features=embeddings: encoder actors
    shuffle_buffer: int = 256
    cache: str = "auto"  # auto | true | false: keep decoded examples in the object store


@dataclass
class TaskConf:
    """What the head predicts."""

    type: str = "binary"  # binary | multilabel | multiclass | regression
    labels: List[str] = field(default_factory=list)  # label columns; multiclass: the class values
    column: Optional[str] = None  # multiclass: the column holding the class


@dataclass
class LoraConf:
    """LoRA adapters (``train.strategy=lora``)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Optional[List[str]] = None  # null: the attention query/value projections


@dataclass
class TrainConf:
    """Optimisation."""

    strategy: str = "full"  # linear_probe | full | lora
    epochs: int = 10
    batch_size: int = 16  # per worker per step (DeepSpeed micro batch)
    eval_batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    schedule: str = "cosine"  # cosine | linear | constant (after warm-up)
    clip_grad_norm: Optional[float] = 1.0
    precision: str = "auto"  # auto (bf16 on GPUs that have it, fp32 on CPU) | fp32 | bf16 | fp16
    seed: int = 0
    max_failures: int = 2  # worker failures survived (restart from the last checkpoint)
    checkpoints_to_keep: int = 2
    lora: LoraConf = field(default_factory=LoraConf)
    augment: Dict[str, Dict[str, float]] = field(default_factory=dict)  # modality|default -> {hflip: 0.5, ...}


@dataclass
class DeepSpeedConf:
    """DeepSpeed: ZeRO stage and offload; ``config`` is merged into the generated DeepSpeed config."""

    stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    config: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ScalingConf:
    """Ray Train workers."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0


@dataclass
class EvalConf:
    """Validation metrics."""

    subgroups: List[str] = field(default_factory=list)  # manifest columns, metadata keys, or age_band
    age_bands: List[int] = field(default_factory=lambda: [40, 60, 80])
    ece_bins: int = 10
    min_subgroup_size: int = 5
    verify_records: int = 16  # artifact vs end-of-training predictions on this many records


@dataclass
class FinetuneConf:
    """``medray finetune``: labelled manifest in, artifact + metrics + checkpoints out."""

    output: str = MISSING
    resume: bool = False
    data: FinetuneDataConf = field(default_factory=FinetuneDataConf)
    task: TaskConf = field(default_factory=TaskConf)
    train: TrainConf = field(default_factory=TrainConf)
    deepspeed: DeepSpeedConf = field(default_factory=DeepSpeedConf)
    scaling: ScalingConf = field(default_factory=ScalingConf)
    eval: EvalConf = field(default_factory=EvalConf)
    encoder: EncoderConf = field(default_factory=EncoderConf)
    decode: DecodeConf = field(default_factory=DecodeConf)
    audio: AudioOptions = field(default_factory=AudioOptions)
    text: TextOptions = field(default_factory=TextOptions)
    slide: SlideOptions = field(default_factory=SlideOptions)
    storage: StorageConf = field(default_factory=StorageConf)
    ray: RayConf = field(default_factory=RayConf)
    tracking: TrackingConf = field(default_factory=TrackingConf)
    patient_salt: Optional[str] = None
    run_name: Optional[str] = None


def register() -> None:
    """Store the finetune schema in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    # the declared sections plus every registered format's options (e.g. nifti)
    ConfigStore.instance().store(name="finetune_schema", node=with_format_sections(FinetuneConf, "FinetuneConf"))
