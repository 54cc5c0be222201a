"""Task heads, loaded on demand by id with ``@serve.multiplexed`` (LRU per replica).

A head is an artifact of ``medray finetune`` (:mod:`medray.encoders.heads`).

* A linear probe (no backbone) applies to a served encoder's embeddings:
  the replica asks the encoder deployment whose weights the head was
  trained on (by the card's ``encoder.weights_hash``; image, audio or text)
  to embed the input, then applies the head. It is refused (409) when no
  served encoder has those weights, since the numbers would otherwise be
  meaningless. Audio and text inputs get a prediction per window / chunk
  and one for the pooled record (frame -1).
* An artifact that carries its fine-tuned backbone is served with that
  backbone, loaded with the head, on this replica.

Requests reach the replica that already holds the head when one does
(Serve routes by multiplexed model id); at most ``max_loaded`` heads stay
loaded per replica, the least recently used is dropped first.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve

from medray.encoders import create_encoder, family_modality, get_spec
from medray.encoders.heads import load_artifact
from medray.serve.encoder import DecodeSettings, decode_input, error_result, replica_tag

__all__ = ["HeadRefused", "LoadedHead", "HeadsDeployment", "check_head_card"]

log = logging.getLogger("ray.serve.medray.heads")


class HeadRefused(Exception):
    """The head cannot be applied to the served encoder (hash or size differ)."""


@dataclass
class LoadedHead:
    """A head ready to predict: the numpy head, its card and, if it has one, its own backbone."""

    head: Any
    card: Any
    encoder: Any | None = None


def check_head_card(card: Any, head_dim: int, served: Mapping[str, Any]) -> None:
    """Refuse a linear-probe head whose base encoder is not the served one.

    Args:
        card: the head's :class:`~medray.encoders.heads.ModelCard`.
        head_dim: the embedding size the head expects.
        served: the served encoder's ``describe()`` (``weights_hash``, ``dim``, ``name``).

    Raises:
        HeadRefused: different weights hash or embedding size.
    """
    want = (card.encoder or {}).get("weights_hash")
    if not want or want != served.get("weights_hash"):
        raise HeadRefused(
            f"head '{card.id}' was trained on encoder weights {str(want)[:12] or '?'}..., but this "
            f"server runs '{served.get('name')}' with weights {str(served.get('weights_hash'))[:12]}...; "
            "serve it with its own encoder"
        )
    if head_dim != int(served.get("dim") or -1):
        raise HeadRefused(f"head '{card.id}' expects {head_dim}-d embeddings, the encoder gives {served.get('dim')}")


def _warm_imports() -> None:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except Exception:  # noqa: BLE001 - only a head load that needs them will tell
        pass


class HeadsDeployment:
    """Serve deployment body: predictions of many heads over one encoder.

    Args:
        heads: ``{head id: artifact uri}``.
        encoder: handle of the encoder deployment, or ``{modality: handle}`` when
            several encoders are served.
        settings: decode options (for heads that bring their own backbone).
        max_loaded: heads kept per replica (LRU beyond).
        storage_options: fsspec options for the artifacts.
        cache_dir: node-local artifact cache (``None``: the default).
        device: ``auto``, ``cpu`` or ``cuda`` for heads with a backbone.
    """

    def __init__(
        self,
        heads: Mapping[str, str],
        encoder: Any,
        settings: DecodeSettings,
        *,
        max_loaded: int = 8,
        storage_options: Mapping[str, Any] | None = None,
        cache_dir: str | None = None,
        device: str = "auto",
    ) -> None:
        self._heads = dict(heads)
        self._encoders = dict(encoder) if isinstance(encoder, Mapping) else {"image": encoder}
        self._settings = settings
        self._storage_options = dict(storage_options or {})
        self._cache_dir = cache_dir
        self._device = device
        self._served: dict | None = None  # modality -> describe()
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="medray-heads")
        self._salt = secrets.token_hex(16)
        self._replica = replica_tag()

        async def load_head(head_id: str) -> LoadedHead:
            return await self._load(head_id)

        # A head with its own backbone needs torch and the model code: import them now, in the
        # background, so that the first request for such a head does not pay for it.
        self._pool.submit(_warm_imports)
        # Wrapped here, not at class level, so that max_loaded comes from config.
        self._get_head = serve.multiplexed(max_num_models_per_replica=int(max_loaded))(load_head)

    async def _served_encoders(self) -> dict:
        if self._served is None:
            described = await asyncio.gather(*(h.describe.remote() for h in self._encoders.values()))
            self._served = dict(zip(self._encoders, described))
        return self._served

    async def _encoder_for(self, card: Any) -> str:
        """The modality of the served encoder with the head's base weights (else the first, to refuse)."""
        served = await self._served_encoders()
        want = (card.encoder or {}).get("weights_hash")
        return next((m for m, d in served.items() if want and d.get("weights_hash") == want), next(iter(served)))

    async def ready(self) -> bool:
        """For ``/readyz``: this replica runs."""
        return True

    async def _load(self, head_id: str) -> LoadedHead:
        loop = asyncio.get_running_loop()
        head, card, local, _ = await loop.run_in_executor(
            self._pool,
            lambda: load_artifact(
                self._heads[head_id], storage_options=self._storage_options, cache_dir=self._cache_dir
            ),
        )
        if card.backbone_included:
            encoder = await loop.run_in_executor(self._pool, self._backbone, card, local)
            if encoder.dim != head.dim:
                raise HeadRefused(f"head '{card.id}' expects {head.dim}-d embeddings, its backbone gives {encoder.dim}")
            log.info("loaded head %s with its own backbone", head_id)
            return LoadedHead(head, card, encoder)
        check_head_card(card, head.dim, (await self._served_encoders())[await self._encoder_for(card)])
        log.info("loaded head %s", head_id)
        return LoadedHead(head, card)

    def _backbone(self, card: Any, local_dir: str) -> Any:
        import torch

        enc = dict(card.encoder or {})
        device = self._device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        spec = get_spec(
            {
                "name": f"{card.id}-backbone",
                "family": enc.get("family", "hf_image"),
                "checkpoint": local_dir,
                "pooling": enc.get("pooling", "cls"),
                "options": dict(enc.get("options") or {}),
            }
        )
        return create_encoder(spec, device=device)

    async def predict(self, payload: dict) -> dict:
        """Predict with the head named by the request's multiplexed model id.

        Args:
            payload: the input, as for :meth:`EncoderDeployment.embed`.

        Returns:
            ``{"head", "model_card_id", "task", "labels", "probabilities" (F, outputs), "frames",
            "encoder", "replica"}``, or ``{"error": {...}}`` (``UnknownHead``, ``HeadRefused``,
            ``HeadUnavailable`` or an input error).
        """
        head_id = serve.get_multiplexed_model_id()
        if head_id not in self._heads:
            return {"error": {"class": "UnknownHead", "stage": "route", "message": f"no head '{head_id}'"}}
        try:
            loaded = await self._get_head(head_id)
        except HeadRefused as err:
            log.warning("head %s refused: %s", head_id, err)
            return {"error": {"class": "HeadRefused", "stage": "load", "message": str(err)}}
        except Exception as err:  # noqa: BLE001 - storage down, damaged artifact: not the caller's fault
            log.error("head %s could not be loaded (%s)", head_id, type(err).__name__)
            return {
                "error": {
                    "class": "HeadUnavailable",
                    "stage": "load",
                    "message": f"head '{head_id}' could not be loaded ({type(err).__name__})",
                }
            }
        if loaded.encoder is None:
            res = await self._encoders[await self._encoder_for(loaded.card)].embed.remote(payload)
            if "error" in res:
                return res
            if res["encoder"].get("weights_hash") != (loaded.card.encoder or {}).get("weights_hash"):
                # The encoder deployment was redeployed with other weights since the head loaded.
                return {
                    "error": {
                        "class": "HeadRefused",
                        "stage": "predict",
                        "message": f"head '{head_id}' does not match the encoder now served",
                    }
                }
            emb, frames, ident = res["embeddings"], list(res["frames"]), res["encoder"]
            if res.get("pooled") is not None:  # audio / text: the record-level row, frame -1
                emb = np.concatenate([emb, np.asarray(res["pooled"]["embedding"], np.float32)[None]])
                frames.append(-1)
        else:
            loop = asyncio.get_running_loop()
            try:
                modality = family_modality(str((loaded.card.encoder or {}).get("family", "hf_image")))
                decoded = await loop.run_in_executor(
                    self._pool,
                    functools.partial(
                        decode_input, payload, self._settings, loaded.encoder, salt=self._salt, modality=modality
                    ),
                )
                emb = await loop.run_in_executor(self._pool, loaded.encoder.embed, decoded.pixels)
            except Exception as err:  # noqa: BLE001
                return error_result(err)
            frames = list(decoded.frames)
            if decoded.pool == "mean":
                emb = np.concatenate([emb, emb.mean(axis=0, keepdims=True)])
                frames.append(-1)
            ident = {k: v for k, v in loaded.encoder.describe().items() if k != "checkpoint"}
        probs = loaded.head.predict(np.asarray(emb, dtype=np.float32))
        return {
            "head": head_id,
            "model_card_id": loaded.card.id,
            "task": loaded.card.task,
            "labels": list(loaded.card.labels),
            "probabilities": probs,
            "frames": frames,
            "encoder": ident,
            "replica": self._replica,
        }
