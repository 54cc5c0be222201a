"""``/v1/zero_shot``: class scores of one image from class names, with an image-text encoder.

The request is an ``/v1/embeddings`` body (a file, raw bytes, or JSON with
``bytes_b64``/``uri``) plus the classes: ``labels`` (and optional ``prompts``,
templates with ``{}`` for the class name) as JSON keys next to the input, or
as query parameters (``?labels=effusion&labels=pneumothorax`` or
``?labels=effusion,pneumothorax``). The answer::

    {"labels": [...], "scores": {label: p}, "logits": {label: z}, "score": "sigmoid" | "softmax",
     "model_temperature": t, "model_bias": b | null, "prompts": {label: [...]}, "encoder": {...}}

is what ``medray zeroshot`` computes for a stored embedding
(:mod:`medray.platform.zeroshot`), so the two agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medray.platform.errors import ConfigError
from medray.platform.zeroshot import class_embeddings, expand_prompts, logits, zero_shot_scores

__all__ = ["MAX_CLASSES", "MAX_PROMPTS", "ZeroShotRequestError", "zero_shot_answer", "zero_shot_request"]

#: Limits of one request: classes, and prompts (classes x templates) the text tower embeds.
MAX_CLASSES = 64
MAX_PROMPTS = 512


class ZeroShotRequestError(ValueError):
    """The request's labels or prompts are unusable; the message says what to send."""


def _strings(value: Any, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ZeroShotRequestError(f'"{key}" must be a list of strings')
    out: list[str] = []
    for v in value:
        if key == "labels":  # query parameters may also come comma-separated
            out.extend(p.strip() for p in v.split(",") if p.strip())
        else:
            out.append(v)
    return out


def zero_shot_request(query: Mapping[str, Any], doc: Mapping[str, Any] | None = None) -> tuple[list[str], list[str]]:
    """The classes and prompt templates of a request: JSON keys win over query parameters.

    Args:
        query: query parameters, each a list of values (``{"labels": ["a,b"], "prompts": [...]}``).
        doc: the JSON body, when the request was JSON.

    Returns:
        ``(labels, templates)``; templates default to ``["{}"]`` (the class name itself).

    Raises:
        ZeroShotRequestError: no labels, too many, or a template without ``{}``.
    """
    doc = doc or {}
    labels = _strings(doc.get("labels"), "labels") or _strings(query.get("labels"), "labels")
    prompts = _strings(doc.get("prompts"), "prompts") or _strings(query.get("prompts"), "prompts") or ["{}"]
    if not labels:
        raise ZeroShotRequestError(
            'name the classes: "labels": ["effusion", "no finding"] next to the input in JSON, '
            "or ?labels=effusion,no%20finding in the query"
        )
    if len(labels) > MAX_CLASSES or len(labels) * len(prompts) > MAX_PROMPTS:
        raise ZeroShotRequestError(f"at most {MAX_CLASSES} labels and {MAX_PROMPTS} labels x prompts per request")
    try:
        expand_prompts(labels, prompts)
    except ConfigError as err:
        raise ZeroShotRequestError(str(err).split(": ", 1)[-1]) from None
    return labels, prompts


def zero_shot_answer(
    result: Mapping[str, Any], text_embeddings: np.ndarray, labels: Sequence[str], templates: Sequence[str]
) -> dict[str, Any]:
    """Scores of one embedded input against the classes.

    Args:
        result: the encoder deployment's answer for the image (``embeddings``,
            optionally ``pooled``; ``encoder`` with ``score``, ``model_temperature``
            and ``model_bias``).
        text_embeddings: ``(C * T, dim)`` embeddings of ``expand_prompts(labels, templates)``, class-major.
        labels: the ``C`` classes.
        templates: the ``T`` templates.

    Raises:
        ZeroShotRequestError: the encoder is not an image-text encoder.
    """
    encoder = dict(result.get("encoder") or {})
    if not encoder.get("image_text"):
        raise ZeroShotRequestError(
            f"the served encoder {encoder.get('name')} has no text tower in its images' space; "
            "serve an image-text encoder (encoder=medsiglip_448, biomedclip, siglip or open_clip)"
        )
    emb = np.asarray(result["embeddings"], dtype=np.float64)
    pooled = result.get("pooled")
    vector = np.asarray(pooled["embedding"] if pooled is not None else emb.mean(axis=0), dtype=np.float64)[None]
    classes = class_embeddings(np.asarray(text_embeddings), len(labels))
    scale, bias = float(encoder["model_temperature"]), encoder.get("model_bias")
    z = logits(vector, classes, scale=scale, bias=bias)[0]
    p = zero_shot_scores(vector, classes, scale=scale, bias=bias, score=str(encoder.get("score")))[0]
    return {
        "labels": list(labels),
        "scores": {label: float(v) for label, v in zip(labels, p)},
        "logits": {label: float(v) for label, v in zip(labels, z)},
        "score": encoder.get("score"),
        "model_temperature": scale,
        "model_bias": None if bias is None else float(bias),
        "prompts": {label: row for label, row in zip(labels, expand_prompts(labels, templates))},
        "modality": result.get("modality"),
        "encoder": {k: encoder.get(k) for k in ("name", "weights_hash", "preprocessing_hash", "untrained")},
    }
