"""LoRA adapters (``peft``) for the encoder families' torch modules.

:func:`apply_lora` injects low-rank adapters into the attention projections of
an encoder's module, in place, and freezes everything else in it; the module
keeps its class and its ``forward``, so the family's pooling code runs
unchanged. :func:`merge_lora` folds the adapters back into plain weights, so
a fine-tuned encoder saves (and loads) in its family's own layout.

Default targets are found by name: the query and value projections
(``q_proj``/``v_proj`` in transformers 5, ``query``/``value`` before) and
timm's fused ``qkv``.

Example::

    from medray.encoders import create_encoder, get_spec
    from medray.encoders.lora import apply_lora, merge_lora

    enc = create_encoder(get_spec("hf_image", checkpoint="/models/tiny-vit"))
    tuner = apply_lora(enc.module, r=8, alpha=16)
    # ... train: only parameters named *lora_* require grad ...
    merged = merge_lora(tuner)          # the same module object, adapters folded in
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from medray.platform.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_TARGETS", "apply_lora", "default_targets", "is_lora_parameter", "merge_lora"]

#: Candidate target sets, tried in order; the first one present in the module wins.
DEFAULT_TARGETS: tuple[tuple[str, ...], ...] = (("q_proj", "v_proj"), ("query", "value"), ("qkv",))


def default_targets(module: torch.nn.Module) -> list[str]:
    """The attention projections of ``module`` to adapt (see :data:`DEFAULT_TARGETS`).

    Raises:
        ConfigError: No known projection name is present; name them in
            ``train.lora.target_modules``.
    """
    import torch

    names = {n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
    for candidate in DEFAULT_TARGETS:
        if all(c in names for c in candidate):
            return list(candidate)
    raise ConfigError(
        "train.lora.target_modules",
        f"no known attention projection in {type(module).__name__}; set it to some of its "
        f"linear layers, e.g. {sorted(names)[:6]}",
    )


def apply_lora(
    module: torch.nn.Module,
    *,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    target_modules: Sequence[str] | None = None,
) -> Any:
    """Inject LoRA adapters into ``module`` in place; freeze its other weights.

    Args:
        module: an encoder's torch module (``Encoder.module``).
        r: adapter rank.
        alpha: LoRA scaling numerator (scale = alpha / r).
        dropout: dropout on the adapter input.
        target_modules: module-name suffixes to adapt; ``None`` picks
            :func:`default_targets`.

    Returns:
        The peft ``LoraModel`` tuner that wraps ``module`` (keep it for
        :func:`merge_lora`); ``module`` itself now holds the adapters.

    Raises:
        ConfigError: bad rank, or no target module found.
    """
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    if int(r) < 1:
        raise ConfigError("train.lora.r", f"must be >= 1, got {r}")
    targets = list(target_modules) if target_modules else default_targets(module)
    config = LoraConfig(
        r=int(r),
        lora_alpha=float(alpha),  # type: ignore[arg-type]  # peft annotates it int but only divides by it (alpha / r)
        lora_dropout=float(dropout),
        target_modules=targets,
        bias="none",
    )
    try:
        return LoraModel(module, config, "default")
    except ValueError as err:  # peft: "Target modules ... not found in the base model"
        raise ConfigError("train.lora.target_modules", f"{err}".splitlines()[0][:300]) from None


def is_lora_parameter(name: str) -> bool:
    """True for the parameters that :func:`apply_lora` adds."""
    return "lora_" in name


def merge_lora(tuner: Any) -> torch.nn.Module:
    """Fold the adapters into the base weights and drop them; return the plain module."""
    return tuner.merge_and_unload()
