"""Google HAI-DEF's serving format: ``{"instances": [...]}`` in, ``{"predictions": [...]}`` out.

The HAI-DEF containers (CXR Foundation, MedSigLIP, Path Foundation, Derm
Foundation) answer Vertex AI's predict protocol with one instance schema and
one prediction schema (their ``vertex_schemata/instance.yaml`` and
``prediction.yaml``). medray answers the same requests, so a client written for
them works unchanged against ``medray serve`` (and the same image runs on
Vertex AI: ``AIP_PREDICT_ROUTE`` / ``AIP_HEALTH_ROUTE`` are honoured).

An instance is ``{"image": {...}}`` or ``{"text": "..."}``; an image gives
exactly one source: ``input_bytes`` (base64), ``dicomweb_uri`` (with an optional
``access_credential``, a bearer token used for that request only), ``gcs_uri``,
``image_url``, or medray's ``s3_uri``; every source but the bytes must lie
under ``serve.inputs.allowed_uri_prefixes``. ``radiology_dicom_window_level``
(``{center, width}``) windows monochrome DICOM before the file's own window;
``patch_coordinates_list`` embeds rectangles of the image, one embedding each.

Each instance is answered on its own: ``{"embedding": [...], "input_type": ...}``,
``{"patch_embeddings": [{"embedding", "patch_coordinate"}], "input_type": ...}``
or ``{"error": {"description": ...}}`` for that instance only. Image-text
encoders add ``model_temperature`` and ``model_bias``. An input with several
items (a multi-frame object, a long report in chunks) is answered with their
mean, as ``medray embed`` writes its pooled row.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "InstanceError",
    "ParsedInstance",
    "parse_instances",
    "prediction",
    "instance_error",
    "INSTANCE_SCHEMA",
    "PREDICTION_SCHEMA",
    "check_against",
]

#: HAI-DEF's DICOMweb instance URI (http allowed too, for a PACS on a private network).
_DICOMWEB_URI = re.compile(r"^https?://.+/studies/[0-9.]{1,64}/series/[0-9.]{1,64}/instances/[0-9.]{1,64}$")
_GCS_URI = re.compile(r"^gs://[^/]+(/[^/]+)*/[^/]+\.[^/]+$")
_S3_URI = re.compile(r"^s3://[^/]+(/[^/]+)*/[^/]+$")
_IMAGE_URL = re.compile(r"^https?://.+$")
_CREDENTIAL = re.compile(r"^(application_default|[a-zA-Z0-9_\-.]+)$")
_SOURCES = ("input_bytes", "dicomweb_uri", "gcs_uri", "image_url", "s3_uri")
_IMAGE_KEYS = frozenset(
    (
        *_SOURCES,
        "access_credential",
        "radiology_dicom_window_level",
        "patch_coordinates_list",
        "extensions",
        "openslide_pyramid_level",
    )
)
_MAX_DESCRIPTION = 1024


class InstanceError(Exception):
    """One instance cannot be answered; ``code`` is medray's stable error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class ParsedInstance:
    """An instance as the encoder's payload, and what its answer needs.

    Attributes:
        payload: what :func:`medray.serve.encoder.decode_input` takes.
        input_type: ``image`` or ``text``.
        patches: the requested rectangles ``(x, y, width, height)``, or empty.
        source: the source key of an image (``uri`` sources are checked
            against the allowed prefixes by the caller).
    """

    payload: dict[str, Any]
    input_type: str
    patches: list[tuple[int, int, int, int]] = field(default_factory=list)
    source: str = ""


def _int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InstanceError("invalid_request", f"{name} must be an integer >= {minimum}")
    return value


def _patches(value: Any, patch_size: int) -> list[tuple[int, int, int, int]]:
    if not isinstance(value, list) or not value:
        raise InstanceError("invalid_request", "patch_coordinates_list must be a non-empty array")
    out = []
    for item in value:
        if not isinstance(item, dict) or set(item) - {"x_origin", "y_origin", "width", "height"}:
            raise InstanceError("invalid_request", "a patch coordinate holds x_origin, y_origin, width, height only")
        if "x_origin" not in item or "y_origin" not in item:
            raise InstanceError("invalid_request", "a patch coordinate needs x_origin and y_origin")
        out.append(
            (
                _int(item["x_origin"], "x_origin", 0),
                _int(item["y_origin"], "y_origin", 0),
                _int(item.get("width", patch_size), "width", 1),
                _int(item.get("height", patch_size), "height", 1),
            )
        )
    return out


def _window(value: Any) -> tuple[float, float]:
    if not isinstance(value, dict) or set(value) != {"center", "width"}:
        raise InstanceError("invalid_request", "radiology_dicom_window_level holds center and width")
    center = value["center"]
    if isinstance(center, bool) or not isinstance(center, int):
        raise InstanceError("invalid_request", "radiology_dicom_window_level.center must be an integer")
    return float(center), float(_int(value["width"], "radiology_dicom_window_level.width", 1))


def _image(image: Any, patch_size: int) -> ParsedInstance:
    if not isinstance(image, dict):
        raise InstanceError("invalid_request", '"image" must be an object')
    unknown = sorted(set(image) - _IMAGE_KEYS)
    if unknown:
        raise InstanceError("invalid_request", f"unknown image field(s): {', '.join(unknown)[:200]}")
    sources = [k for k in _SOURCES if k in image]
    if len(sources) != 1:
        raise InstanceError("invalid_request", f"an image gives exactly one of {', '.join(_SOURCES)}")
    source = sources[0]
    value = image[source]
    if not isinstance(value, str) or not value:
        raise InstanceError("invalid_request", f"{source} must be a non-empty string")
    credential = image.get("access_credential")
    if credential is not None:
        if source == "input_bytes":
            raise InstanceError("invalid_request", "access_credential does not go with input_bytes")
        if not isinstance(credential, str) or not _CREDENTIAL.match(credential):
            raise InstanceError("invalid_request", "access_credential must be a bearer token or application_default")
    if "openslide_pyramid_level" in image:
        raise InstanceError("unsupported", "openslide_pyramid_level is not supported; send patch_coordinates_list")
    payload: dict[str, Any]
    if source == "input_bytes":
        try:
            payload = {"data": base64.b64decode(value, validate=True), "name": ""}
        except (binascii.Error, ValueError):
            raise InstanceError("invalid_request", "input_bytes is not valid base64") from None
        if not payload["data"]:
            raise InstanceError("invalid_request", "input_bytes is empty")
    elif source == "dicomweb_uri":
        if not _DICOMWEB_URI.match(value):
            raise InstanceError(
                "invalid_request", "dicomweb_uri is https://<store>/studies/<uid>/series/<uid>/instances/<uid>"
            )
        payload = {"dicomweb_uri": value, "credential": credential}
    elif source == "image_url":
        if not _IMAGE_URL.match(value):
            raise InstanceError("invalid_request", "image_url must be an http(s) URL")
        payload = {"url": value, "credential": credential}
    else:
        pattern = _GCS_URI if source == "gcs_uri" else _S3_URI
        if not pattern.match(value):
            scheme = "gs" if source == "gcs_uri" else "s3"
            raise InstanceError("invalid_request", f"{source} must be {scheme}://<bucket>/<path>/<file>")
        payload = {"uri": value}
    if "radiology_dicom_window_level" in image:
        payload["window"] = _window(image["radiology_dicom_window_level"])
    patches = _patches(image["patch_coordinates_list"], patch_size) if "patch_coordinates_list" in image else []
    if patches:
        payload["patches"] = patches
    return ParsedInstance(payload, "image", patches, source)


def _instance(instance: Any, patch_size: int) -> ParsedInstance:
    if not isinstance(instance, dict):
        raise InstanceError("invalid_request", "an instance must be an object")
    keys = set(instance)
    if keys not in ({"image"}, {"text"}):
        raise InstanceError("invalid_request", 'an instance holds exactly one of "image" or "text"')
    if "text" in instance:
        text = instance["text"]
        if not isinstance(text, str) or not text.strip():
            raise InstanceError("invalid_request", '"text" must be a non-empty string')
        return ParsedInstance({"data": text.encode("utf-8"), "name": "input.txt"}, "text")
    return _image(instance["image"], patch_size)


def parse_instances(doc: Any, *, patch_size: int, max_instances: int) -> list[ParsedInstance | InstanceError]:
    """Each instance of a HAI-DEF request, parsed, or the reason it cannot be answered.

    Args:
        doc: the parsed JSON body.
        patch_size: width and height of a patch that leaves them out.
        max_instances: most instances (each patch counts one).

    Returns:
        One entry per instance, in order.

    Raises:
        InstanceError: the request as a whole is malformed (no ``instances``
            array) or over ``max_instances`` (code ``too_large``).
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("instances"), list) or not doc["instances"]:
        raise InstanceError("invalid_request", 'a HAI-DEF request is {"instances": [...]} with at least one instance')
    if set(doc) - {"instances", "parameters"}:
        raise InstanceError("invalid_request", 'a HAI-DEF request holds "instances" (and "parameters") only')
    out: list[ParsedInstance | InstanceError] = []
    for instance in doc["instances"]:
        try:
            out.append(_instance(instance, patch_size))
        except InstanceError as err:
            out.append(err)
    count = sum(max(1, len(p.patches)) if isinstance(p, ParsedInstance) else 1 for p in out)
    if count > max_instances:
        raise InstanceError(
            "too_large", f"{count} instances and patches, over serve.haidef.max_instances={max_instances}"
        )
    return out


def instance_error(code: str, message: str) -> dict[str, Any]:
    """The answer of an instance that failed: HAI-DEF's ``{"error": {"description"}}``."""
    return {"error": {"description": f"{code}: {message}"[:_MAX_DESCRIPTION]}}


def _vector(values: Any) -> list[float]:
    return [float(v) for v in np.asarray(values, dtype=np.float32).ravel()]


def prediction(result: Mapping[str, Any], parsed: ParsedInstance) -> dict[str, Any]:
    """The answer of an embedded instance in HAI-DEF's prediction schema.

    Args:
        result: the encoder deployment's answer (``embeddings``, ``frames``,
            optionally ``pooled`` and ``encoder``).
        parsed: the instance it answers.
    """
    emb = np.asarray(result["embeddings"], dtype=np.float32)
    out: dict[str, Any] = {"input_type": parsed.input_type}
    if parsed.patches:
        out["patch_embeddings"] = [
            {
                "embedding": _vector(vector),
                "patch_coordinate": {"x_origin": x, "y_origin": y, "width": w, "height": h},
            }
            for vector, (x, y, w, h) in zip(emb, parsed.patches)
        ]
    elif result.get("pooled") is not None:
        out["embedding"] = _vector(result["pooled"]["embedding"])
    else:
        out["embedding"] = _vector(emb[0] if len(emb) == 1 else emb.mean(axis=0))
    encoder = result.get("encoder") or {}
    for key in ("model_temperature", "model_bias"):
        if encoder.get(key) is not None:
            out[key] = float(encoder[key])
    return out


def _any_of(*keys: str) -> dict[str, Any]:
    return {"anyOf": [{"required": [k]} for k in keys]}


def _embedding_array() -> dict[str, Any]:
    return {"type": "array", "minItems": 1, "items": {"type": "number"}}


_PATCH_COORDINATE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["x_origin", "y_origin"],
    "properties": {
        "x_origin": {"type": "integer", "minimum": 0},
        "y_origin": {"type": "integer", "minimum": 0},
        "width": {"type": "integer", "minimum": 1},
        "height": {"type": "integer", "minimum": 1},
    },
}

#: The instance schema medray takes (JSON Schema, draft 2020-12): HAI-DEF's, plus ``s3_uri``.
INSTANCE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "image": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "dicomweb_uri": {"type": "string", "pattern": _DICOMWEB_URI.pattern},
                "gcs_uri": {"type": "string", "pattern": _GCS_URI.pattern},
                "s3_uri": {"type": "string", "pattern": _S3_URI.pattern},
                "input_bytes": {"type": "string"},
                "image_url": {"type": "string", "pattern": _IMAGE_URL.pattern},
                "access_credential": {"type": "string", "pattern": _CREDENTIAL.pattern},
                "radiology_dicom_window_level": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["center", "width"],
                    "properties": {"center": {"type": "integer"}, "width": {"type": "integer", "minimum": 1}},
                },
                "patch_coordinates_list": {"type": "array", "minItems": 1, "items": _PATCH_COORDINATE},
                "extensions": {"type": "object"},
            },
            "oneOf": [
                {"required": [s], "not": {"required": ["access_credential"]}}
                if s == "input_bytes"
                else {"required": [s]}
                for s in _SOURCES
            ],
        },
        "text": {"type": "string"},
    },
    "oneOf": [{"required": ["image"]}, {"required": ["text"]}],
}

#: The prediction schema medray answers with: HAI-DEF's (MedSigLIP / Path Foundation form).
PREDICTION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "embedding": _embedding_array(),
        "input_type": {"type": "string", "enum": ["image", "text"]},
        "patch_embeddings": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["embedding", "patch_coordinate"],
                "properties": {"embedding": _embedding_array(), "patch_coordinate": _PATCH_COORDINATE},
            },
        },
        "model_temperature": {"type": "number"},
        "model_bias": {"type": "number"},
        "error": {
            "type": "object",
            "additionalProperties": False,
            "required": ["description"],
            "properties": {"description": {"type": "string", "maxLength": _MAX_DESCRIPTION}},
        },
    },
    "oneOf": [
        {"required": ["embedding", "input_type"], "not": _any_of("patch_embeddings", "error")},
        {"required": ["patch_embeddings", "input_type"], "not": _any_of("embedding", "error")},
        {"required": ["error"], "not": _any_of("embedding", "input_type", "patch_embeddings")},
    ],
}


def check_against(schema: Mapping[str, Any], doc: Any) -> Sequence[str]:
    """Schema violations of ``doc`` (empty when valid); needs ``jsonschema`` (tests, tooling)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    return [e.message for e in validator.iter_errors(doc)]
