"""The encoder replica's way to the model: a lone request skips the batch queue, company joins it.

No Ray cluster: the replica body runs on an event loop here. Ray's ``@serve.batch`` queue needs a
replica context, so the queue's side is stood in for by a function that counts what enters it and
runs the same forward pass (:meth:`EncoderDeployment._run_batch`).
"""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from medray.encoders import build_tiny_checkpoint
from medray.serve.encoder import DecodeSettings, EncoderDeployment


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tiny_checkpoint("hf_image", str(tmp_path_factory.mktemp("enc")))


@pytest.fixture
def encoder(checkpoint: str) -> EncoderDeployment:
    """A fresh replica body per test (its gate event belongs to one event loop)."""
    spec = {"name": "tiny", "family": "hf_image", "checkpoint": checkpoint, "untrained": True}
    return EncoderDeployment(spec, DecodeSettings(), device="cpu", engine="thread", torch_threads=1)


def _png(seed: int) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def _queue_spy(encoder: EncoderDeployment, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Replace the replica's batch queue with one that runs each frame alone; returns its log."""
    entered: list[int] = []  # requests still being decoded when each frame entered

    async def queued(frame: np.ndarray) -> tuple:
        entered.append(encoder._decoding)
        await asyncio.sleep(0)
        return (await encoder._run_batch([frame]))[0]

    monkeypatch.setattr(encoder, "_embed_frames", queued)
    return entered


def test_a_lone_request_goes_straight_to_the_model(encoder: EncoderDeployment) -> None:
    encoder.reconfigure({"max_batch_size": 8, "batch_wait_timeout_s": 0.05})

    async def lone() -> tuple[dict, dict, dict]:
        # Ray's queue would raise here (no replica context): an answer proves the request bypassed it
        first = await encoder.embed({"data": _png(0), "name": "a.png"})
        second = await encoder.embed({"data": _png(0), "name": "a.png"})
        return first, second, await encoder.stats()

    out, again, stats = asyncio.run(lone())
    assert "error" not in out, out
    assert out["batch_size"] == 1 and out["embeddings"].shape == (1, 32)
    assert out["timings"]["batch_wait_s"] < 0.05  # no batch wait when nothing could join
    assert (stats["batches"], stats["frames"], stats["max_batch_size"]) == (2, 2, 8)
    assert np.array_equal(again["embeddings"], out["embeddings"])


def test_a_burst_enters_the_batch_queue_together_once_decoded(
    encoder: EncoderDeployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoder.reconfigure({"max_batch_size": 8, "batch_wait_timeout_s": 0.5})
    entered = _queue_spy(encoder, monkeypatch)

    async def burst() -> tuple[dict, list[dict], int, tuple]:
        lone = await encoder.embed({"data": _png(1), "name": "a.png"})
        n = len(entered)
        answers = await asyncio.gather(*(encoder.embed({"data": _png(1), "name": "a.png"}) for _ in range(6)))
        at_rest = (encoder._decoding, encoder._ready, encoder._inflight)
        await encoder.embed({"data": _png(1), "name": "a.png"})
        return lone, answers, n, at_rest

    lone, answers, n_lone, at_rest = asyncio.run(burst())
    assert n_lone == 0  # alone: straight to the model
    # the first one decoded still had company decoding beside it: none of the six was alone, and
    # the batch was held open until the last of them was decoded (one forward pass, not two)
    assert entered == [0] * 6
    for a in answers:
        np.testing.assert_allclose(a["embeddings"], lone["embeddings"], atol=1e-6, rtol=0)
    # every counter is back at rest, so the next lone request takes the direct way again
    assert at_rest == (0, 0, 0) and len(entered) == 6


def test_a_cancelled_request_leaves_the_counters_at_rest(
    encoder: EncoderDeployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered = _queue_spy(encoder, monkeypatch)
    queued = encoder._embed_frames
    release = asyncio.Event()
    waiting: list[np.ndarray] = []

    async def held(frame: np.ndarray) -> tuple:  # the batch queue holds every frame until released
        waiting.append(frame)
        await release.wait()
        return await queued(frame)

    monkeypatch.setattr(encoder, "_embed_frames", held)

    async def cancel_in_the_queue() -> tuple[tuple, int, dict, int]:
        tasks = [asyncio.create_task(encoder.embed({"data": _png(2), "name": "a.png"})) for _ in range(4)]
        while len(waiting) < 4:  # all four decoded and waiting in the batch queue
            await asyncio.sleep(0.005)
        tasks[0].cancel()
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        at_rest = (encoder._decoding, encoder._ready, encoder._inflight)
        n = len(entered)
        return at_rest, n, await encoder.embed({"data": _png(2), "name": "a.png"}), len(entered)

    at_rest, n, out, n_after = asyncio.run(cancel_in_the_queue())
    assert at_rest == (0, 0, 0)
    assert "error" not in out and n_after == n  # alone again: straight to the model
