"""Zero-shot classification with image-text embeddings: classes written as text, scored by similarity.

Plain numpy over embeddings; it knows no model. The recipe is CLIP's prompt
ensembling:

1. each class name is put into every prompt template (``"a chest x-ray
   showing {}"``) -> ``C x T`` prompts, embedded by the text tower;
2. each prompt embedding is L2-normalised, the ``T`` of a class averaged and
   the mean normalised again: one class embedding (:func:`class_embeddings`);
3. an image embedding is normalised and compared by cosine:
   ``logit = cos * scale + bias`` with the checkpoint's learnt ``scale``
   (``exp(logit_scale)``) and ``bias`` (SigLIP);
4. scores: ``softmax`` over the classes (CLIP: the classes compete, one per
   image) or ``sigmoid`` per class (SigLIP: each class is its own yes/no, so
   several, or none, may hold) (:func:`zero_shot_scores`).

Example:
    >>> import numpy as np
    >>> prompts = expand_prompts(["effusion", "no finding"], ["{}", "a chest x-ray showing {}"])
    >>> prompts[1]
    ['no finding', 'a chest x-ray showing no finding']
    >>> text = np.eye(4, 3)  # 2 classes x 2 templates, 3 dims
    >>> classes = class_embeddings(text, n_classes=2)
    >>> p = zero_shot_scores(np.array([[1.0, 0.0, 0.0]]), classes, scale=10.0, score="softmax")
    >>> bool(p[0, 0] > p[0, 1])
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medray.platform.errors import ConfigError

__all__ = ["SCORES", "class_embeddings", "expand_prompts", "logits", "normalise", "zero_shot_scores"]

#: How logits become scores: ``softmax`` over classes (CLIP) or ``sigmoid`` per class (SigLIP).
SCORES = ("softmax", "sigmoid")


def expand_prompts(labels: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """Every template filled with every class name: ``[class][template] -> prompt``.

    A template holds ``{}`` (or ``{label}``) where the class name goes.

    Raises:
        ConfigError: no labels, no templates, a repeated label, or a template without a placeholder.
    """
    labels = [str(lab) for lab in labels]
    if not labels:
        raise ConfigError("labels", "name the classes, e.g. labels=[effusion,pneumothorax,'no finding']")
    if len(set(labels)) != len(labels):
        raise ConfigError("labels", f"each class once, got {labels}")
    if not templates:
        raise ConfigError("prompts", "give at least one template, e.g. prompts=['a chest x-ray showing {}']")
    out: list[list[str]] = []
    for label in labels:
        row = []
        for template in templates:
            template = str(template)
            if "{}" not in template and "{label}" not in template:
                raise ConfigError(
                    "prompts", f"template {template!r} has no '{{}}' where the class name goes, e.g. 'an x-ray of {{}}'"
                )
            row.append(template.replace("{label}", label).replace("{}", label))
        out.append(row)
    return out


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float64; an all-zero row stays zero)."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def class_embeddings(text_embeddings: np.ndarray, n_classes: int) -> np.ndarray:
    """One unit embedding per class: the normalised mean of its normalised prompt embeddings.

    Args:
        text_embeddings: ``(C * T, dim)`` prompt embeddings, class-major (the
            order of ``sum(expand_prompts(...), [])``).
        n_classes: ``C``.

    Returns:
        ``(C, dim)`` float64, unit rows.
    """
    text = normalise(text_embeddings)
    if n_classes < 1 or len(text) % n_classes:
        raise ValueError(f"{len(text)} prompt embeddings do not split into {n_classes} classes")
    per_class = text.reshape(n_classes, len(text) // n_classes, -1).mean(axis=1)
    return normalise(per_class)


def logits(image_embeddings: np.ndarray, classes: np.ndarray, *, scale: float, bias: float | None = None) -> np.ndarray:
    """``cos(image, class) * scale + bias``: ``(N, C)`` float64."""
    return normalise(image_embeddings) @ normalise(classes).T * float(scale) + float(bias or 0.0)


def zero_shot_scores(
    image_embeddings: np.ndarray,
    classes: np.ndarray,
    *,
    scale: float,
    bias: float | None = None,
    score: str = "softmax",
) -> np.ndarray:
    """Class scores of each image: softmax over classes or sigmoid per class.

    Args:
        image_embeddings: ``(N, dim)`` image embeddings (any norm).
        classes: ``(C, dim)`` from :func:`class_embeddings`.
        scale: the multiplier of a cosine (the checkpoint's ``exp(logit_scale)``).
        bias: added to every logit (SigLIP's learnt bias); ``None``: 0.
        score: ``softmax`` or ``sigmoid``.

    Returns:
        ``(N, C)`` float64 in [0, 1] (softmax rows sum to 1).

    Raises:
        ConfigError: an unknown ``score``.
    """
    if score not in SCORES:
        raise ConfigError("score", f"expected one of {', '.join(SCORES)}, got {score!r}")
    z = logits(image_embeddings, classes, scale=scale, bias=bias)
    if score == "sigmoid":
        return 0.5 * (1.0 + np.tanh(0.5 * z))  # sigmoid without overflow for large |z|
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
