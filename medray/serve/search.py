"""``POST /v1/search``: the stored records nearest to an image, a text or a stored record.

A deployment of its own (``Search``) holds the index ``medray index`` built
(memory-mapped, see :mod:`medray.platform.vectorindex`) and the encoder
handles; the ingress only forwards the body. A request is one of::

    {"record_id": "<32 hex>", "k": 10, "filters": {"modality": "CT", "year": [2019, 2020]}}
    {"text": "left pleural effusion", "k": 5}        (image-text encoders only: 400 otherwise)
    {"bytes_b64": ...} | {"uri": ...} | {"dicomweb_uri": ...}, or an upload / raw image body
                                                     (embedded by the encoder, as /v1/embeddings)

``k`` and the filters may also come as query parameters (``?k=5&modality=CT``),
which is how an upload or a raw body sets them. The answer::

    {"query": {"kind": "image" | "text" | "record_id", ...}, "encoder", "weights_hash",
     "index": {"count", "dtype", ...},
     "hits": [{"record_id", "uri", "member", "frame", "modality", "study", "series",
               "site", "year", "distance", "similarity"}, ...]}

Errors come back as ``{"error": {"class", "status", "code", "message"}}``
results, which the ingress answers with that status: 400 a malformed search,
404 an unknown record id, 409 an index of other encoder weights.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from medray.platform.vectorindex import FILTER_COLUMNS, IndexMismatch, VectorIndex, load_index

__all__ = ["SearchDeployment", "SearchError", "parse_search", "query_vector"]

log = logging.getLogger("ray.serve.medray.search")

_IMAGE_KEYS = ("bytes_b64", "uri", "dicomweb_uri")


class SearchError(Exception):
    """A search request that cannot be answered: its HTTP status, code and a PHI-free message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def result(self) -> dict:
        """The ``{"error": ...}`` result the ingress turns into the answer."""
        return {"error": {"class": "SearchError", "status": self.status, "code": self.code, "message": self.message}}


def _int(value: Any, key: str, low: int, high: int) -> int:
    try:
        v = int(value)
        if isinstance(value, bool) or float(value) != v:
            raise ValueError
    except (TypeError, ValueError):
        raise SearchError(400, "invalid_request", f'"{key}" must be an integer, got {str(value)[:40]!r}') from None
    if not (low <= v <= high):
        raise SearchError(400, "invalid_request", f'"{key}" must be between {low} and {high} (serve.search.max_k)')
    return v


def parse_search(doc: Mapping[str, Any], params: Mapping[str, str], *, max_k: int) -> tuple[int, dict[str, Any]]:
    """``k`` and the filters of a search, from the JSON body and the query parameters (the body wins).

    Raises:
        SearchError: (400) ``k`` out of range, a filter on an unknown column or of the wrong type.
    """
    filters: dict[str, Any] = {}
    for name, value in params.items():
        if name in FILTER_COLUMNS:
            filters[name] = value.split(",") if "," in value else value
        elif name != "k":
            raise SearchError(
                400, "invalid_request", f"unknown query parameter {name[:40]!r}; filter on {FILTER_COLUMNS}"
            )
    body_filters = doc.get("filters") or {}
    if not isinstance(body_filters, Mapping):
        raise SearchError(400, "invalid_request", '"filters" must be an object, e.g. {"modality": "CT"}')
    for name, value in body_filters.items():
        if name not in FILTER_COLUMNS:
            raise SearchError(
                400, "invalid_request", f"cannot filter on {str(name)[:40]!r}; filter on {', '.join(FILTER_COLUMNS)}"
            )
        if isinstance(value, (dict, bool)) or (isinstance(value, list) and not value):
            raise SearchError(400, "invalid_request", f'filter "{name}" takes a value or a non-empty list of values')
        filters[name] = value
    k = _int(doc.get("k", params.get("k", 10)), "k", 1, max_k)
    return k, filters


def query_vector(result: Mapping[str, Any]) -> np.ndarray:
    """The one vector of an encoder's answer: its pooled row, else the mean of its frames.

    This is how ``medray index`` reads a record (:func:`medray.pipeline.records.read_record_embeddings`).
    """
    pooled = result.get("pooled")
    if pooled is not None and pooled.get("embedding") is not None:
        return np.asarray(pooled["embedding"], np.float32)
    emb = np.asarray(result["embeddings"], np.float32)
    return emb.mean(axis=0) if emb.ndim == 2 else emb


class SearchDeployment:
    """Serve deployment body: the index (memory-mapped) and the encoder handles that embed queries.

    Args:
        index: URI of the index directory.
        encoders: ``{modality: encoder handle}``; ``primary`` is the encoder the index must match.
        settings: the ingress settings (allowed URI prefixes, JSON depth) for parsing inputs.
        storage_options: fsspec options for the index and ``uri`` inputs.
        cache_dir: where an object-store index is downloaded.
        max_k: most hits per request.
        expansion_search: HNSW ``ef`` (None: the index's).

    Raises:
        ConfigError: no index at ``index``.
    """

    def __init__(
        self,
        index: str,
        encoders: Mapping[str, Any],
        settings: Any,
        *,
        primary: str = "image",
        storage_options: Mapping[str, Any] | None = None,
        cache_dir: str | None = None,
        max_k: int = 100,
        expansion_search: int | None = None,
    ) -> None:
        self._index: VectorIndex = load_index(
            index, storage_options, cache_dir=cache_dir, expansion_search=expansion_search
        )
        self._encoders = dict(encoders)
        self._primary = primary
        self._settings = settings
        self._max_k = int(max_k)
        self._served: dict | None = None
        log.info("search index ready: %d records x %d", len(self._index), self._index.dim)

    async def _check(self) -> dict:
        """The primary encoder's description, once checked against the index (IndexMismatch if not its)."""
        if self._served is None:
            served = await self._encoders[self._primary].describe.remote()
            self._index.check_encoder(served)
            self._served = served
        return self._served

    async def ready(self) -> bool:
        """True once the index is open (it is, by construction)."""
        return True

    async def search(self, content_type: str, body: bytes, params: Mapping[str, str] | None = None) -> dict:
        """Answer one ``/v1/search`` request (see the module docstring); never raises."""
        try:
            return await self._search(content_type, body, dict(params or {}))
        except SearchError as err:
            return err.result()
        except IndexMismatch as err:
            return SearchError(409, "index_mismatch", str(err)).result()
        except Exception as err:  # noqa: BLE001 - a failed request is an answer, PHI-free
            from medray.serve.ingress import ApiError

            if isinstance(err, ApiError):  # the input parser's own answers (403, 413, 415, 422)
                return SearchError(err.status, err.code, err.message).result()
            log.warning("search failed (%s)", type(err).__name__)
            return SearchError(503, "internal", f"the search failed ({type(err).__name__}); retry").result()

    async def _search(self, content_type: str, body: bytes, params: dict[str, str]) -> dict:
        from medray.serve.ingress import json_depth, parse_input

        served = await self._check()
        ctype = (content_type or "").split(";", 1)[0].strip().lower()
        doc: dict[str, Any] = {}
        if ctype == "application/json" or ctype.endswith("+json"):
            if json_depth(body, self._settings.max_json_depth) > self._settings.max_json_depth:
                raise SearchError(422, "too_deep", "JSON nested deeper than serve.limits.max_json_depth")
            try:
                loaded = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                raise SearchError(422, "invalid_request", "body is not valid JSON") from None
            if not isinstance(loaded, dict):
                raise SearchError(400, "invalid_request", "the JSON body must be an object")
            doc = loaded
        k, filters = parse_search(doc, params, max_k=self._max_k)
        kinds = [key for key in ("record_id", "text", *_IMAGE_KEYS) if key in doc]
        if doc and len(kinds) != 1:
            raise SearchError(
                400,
                "invalid_request",
                'a search holds exactly one of "record_id", "text", "bytes_b64", "uri" or "dicomweb_uri"',
            )
        query: dict[str, Any]
        if doc and kinds[0] == "record_id":
            rid = doc["record_id"]
            if not isinstance(rid, str):
                raise SearchError(400, "invalid_request", '"record_id" must be a string')
            try:
                vector = self._index.vector(rid)
            except KeyError:
                raise SearchError(404, "unknown_record", "no record with that id in the index") from None
            query = {"kind": "record_id", "record_id": rid}
        elif doc and kinds[0] == "text":
            vector = await self._embed_text(doc, served)
            query = {"kind": "text"}
        else:
            payload = await parse_input(content_type, body, self._settings)
            result = await self._encoders[self._primary].embed.remote(payload)
            if isinstance(result, dict) and result.get("error"):
                return dict(result)  # the encoder's own error (415, 422...), answered as /v1/embeddings does
            vector = query_vector(result)
            query = {"kind": "image", "modality": result.get("modality")}
        hits = self._index.search(vector, k=k, filters=filters)
        m = self._index.manifest
        return {
            "query": {**query, "k": k, "filters": filters},
            "encoder": served.get("name"),
            "weights_hash": served.get("weights_hash"),
            "index": {"count": m["count"], "dim": m["dim"], "metric": m["metric"], "dtype": m["dtype"]},
            "hits": hits,
        }

    async def _embed_text(self, doc: Mapping[str, Any], served: Mapping[str, Any]) -> np.ndarray:
        """A text query's vector: only from an encoder whose text and images share the index's space."""
        text = doc["text"]
        if not isinstance(text, str) or not text.strip():
            raise SearchError(400, "invalid_request", '"text" must be a non-empty string')
        # the text must be embedded by the same weights as the indexed images (an image-text model)
        candidates = [self._encoders[self._primary]]
        other = self._encoders.get("text")
        if other is not None and other is not candidates[0]:
            described = await other.describe.remote()
            if described.get("weights_hash") == served.get("weights_hash"):
                candidates.insert(0, other)
        payload = {"data": text.encode("utf-8"), "name": "input.txt"}
        result = await candidates[0].embed.remote(payload)
        if result.get("error") or result.get("modality") not in ("text", None):
            raise SearchError(
                400,
                "text_not_supported",
                f"text search needs an image-text encoder (open_clip, SigLIP): the served encoder "
                f"'{served.get('name')}' does not embed text in the space of its images; search by image or "
                "record_id instead",
            )
        return query_vector(result)
