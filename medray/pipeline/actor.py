"""The encoder actor of the embedding path: loads encoders once, embeds batches of records."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from medray.encoders import create_encoder, family_modalities, spec_from_dict
from medray.pipeline.columns import STATUS_COLUMNS, assemble
from medray.platform.errors import EncodeError, RecordError
from medray.platform.formats import pooled_segment, segment_columns
from medray.platform.records import quarantine_fields

__all__ = ["EncoderActor"]


class EncoderActor:
    """Ray Data actor: loads the encoders once, embeds batches of records.

    Each record is embedded by the encoder of its ``route`` (modality). All
    rows of a record, its pooled row included, come out of one call, so
    "record id present in the output" stays the resume criterion. A batch
    that fails is retried record by record so that one poison record becomes
    a quarantine row instead of failing (and endlessly retrying) the whole
    batch.

    Args:
        spec: the primary encoder spec (dict form).
        device: ``cpu``, ``cuda`` or ``auto``.
        dtype: ``auto`` (bf16 on GPU), ``float32``, ``bfloat16`` or ``float16``.
        batch_size: items (frames, windows, chunks) per forward pass.
        provenance: columns stamped on every row (encoder, hashes, version).
        specs: modality -> spec dict when the job has several encoders;
            ``None``: ``spec`` alone, under its family's modality.
        provenances: modality -> provenance columns, with ``specs``.
    """

    def __init__(
        self,
        spec: dict,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 32,
        provenance: Mapping[str, Any] | None = None,
        specs: Mapping[str, dict] | None = None,
        provenances: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        specs = dict(specs or {family_modalities(spec["family"])[0]: spec})
        for s in list(specs.values()):  # an image-text encoder embeds text too, with the same weights
            for modality in family_modalities(s["family"])[1:]:
                specs.setdefault(modality, s)
        loaded: dict[str, Any] = {}  # one model per distinct spec, however many routes it serves
        self.encoders = {}
        for m, s in specs.items():
            key = json.dumps(s, sort_keys=True, default=str)
            if key not in loaded:
                loaded[key] = create_encoder(spec_from_dict(s), device=device, dtype=dtype)
            self.encoders[m] = loaded[key]
        self.primary = next(iter(self.encoders))
        self.encoder = self.encoders[self.primary]
        self.batch_size = int(batch_size)
        self.provenance = dict(provenance or {})
        self.provenances = {m: dict(p) for m, p in (provenances or {}).items()}
        # One encoder: a fixed-size embedding column, exactly as before; several: variable lists
        # that the sink types per encoder.
        self.fixed = len(loaded) == 1

    def _embed(self, items: list[tuple[str, np.ndarray]]) -> list[np.ndarray]:
        """Embed each (route, input) in batches of items that share an encoder and a shape."""
        out: list[np.ndarray | None] = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for k, (route, arr) in enumerate(items):
            groups.setdefault((route, arr.shape[1:], arr.dtype.str), []).append(k)
        for (route, _, _), ks in groups.items():
            encoder = self.encoders[route]
            flat = np.concatenate([items[k][1] for k in ks], axis=0)
            parts = [encoder.embed(flat[s : s + self.batch_size]) for s in range(0, len(flat), self.batch_size)]
            emb = (
                np.concatenate(parts, axis=0).astype(np.float32, copy=False)
                if parts
                else np.zeros((0, encoder.dim), np.float32)
            )
            if not np.all(np.isfinite(emb)):
                raise EncodeError("model produced non-finite values")
            for k, e in zip(ks, np.split(emb, np.cumsum([len(items[k][1]) for k in ks])[:-1])):
                out[k] = e
        return out  # type: ignore[return-value]

    def __call__(self, table: pa.Table) -> pa.Table:
        n = table.num_rows
        status = table.column("status").to_pylist()
        pv = table.column("pixel_values").to_pylist()
        shapes = table.column("pixel_shape").to_pylist()
        names = table.column_names
        dtypes = table.column("pixel_dtype").to_pylist() if "pixel_dtype" in names else [None] * n
        raw_routes = table.column("route").to_pylist() if "route" in names else [None] * n
        routes: list[str] = [str(r or self.primary) for r in raw_routes]
        segs = table.column("segments").to_pylist() if "segments" in names else [None] * n
        pools = table.column("pool").to_pylist() if "pool" in names else [None] * n
        results: list[np.ndarray | BaseException | None] = [None] * n
        ok_idx = [i for i in range(n) if status[i] == "ok"]
        arrays = {}
        for i in ok_idx:
            if routes[i] not in self.encoders:
                results[i] = EncodeError(f"no encoder for modality '{routes[i]}' in this actor")
                continue
            arrays[i] = np.frombuffer(pv[i], dtype=np.dtype(dtypes[i] or "float32")).reshape(shapes[i])
        todo = [i for i in ok_idx if i in arrays]
        t0 = time.perf_counter()
        try:
            if todo:
                for i, emb in zip(todo, self._embed([(routes[i], arrays[i]) for i in todo])):
                    results[i] = emb
        except Exception:  # noqa: BLE001 - isolate the poison record(s)
            for i in todo:
                try:
                    results[i] = self._embed([(routes[i], arrays[i])])[0]
                except Exception as err:  # noqa: BLE001
                    results[i] = (
                        err if isinstance(err, RecordError) else EncodeError(f"model failed ({type(err).__name__})")
                    )
        dt = (time.perf_counter() - t0) / max(1, sum(len(arrays[i]) for i in todo))

        seg_names = [f for f, _ in segment_columns()]
        index: list[int] = []
        new: dict[str, list] = {
            k: [] for k in ("frame", "n_frames", "embedding", "t_encode", *STATUS_COLUMNS, *seg_names)
        }

        def add(i: int, frame: Any, n_frames: Any, emb: Any, t: Any, q: Mapping[str, Any], seg: Mapping) -> None:
            index.append(i)
            new["frame"].append(frame)
            new["n_frames"].append(n_frames)
            new["embedding"].append(emb)
            new["t_encode"].append(t)
            for c in STATUS_COLUMNS:
                new[c].append(q.get(c))
            for c in seg_names:
                new[c].append(seg.get(c))

        ok_q = {"status": "ok"}
        frames_col = table.column("frames").to_pylist()
        for i in range(n):
            res = results[i]
            if status[i] == "ok" and isinstance(res, np.ndarray):
                frames = frames_col[i]
                seg = segs[i]
                items = json.loads(seg) if seg else [{"segment": "frame"}] * len(frames)
                for j, f in enumerate(frames):
                    # slide tiles are one record each; n_frames is the slide's tile count
                    add(i, int(f), items[j].get("n_items") or len(frames), res[j], dt, ok_q, items[j])
                if pools[i] == "mean" and len(frames):
                    add(i, -1, len(frames), res.mean(axis=0), 0.0, ok_q, pooled_segment(items))
                continue
            if status[i] == "ok":
                q = quarantine_fields(res if isinstance(res, BaseException) else EncodeError("no result"), "encode")
            else:
                q = {c: table.column(c)[i].as_py() for c in STATUS_COLUMNS}
            add(i, None, None, None, None, q, {})
        route_of = [routes[i] for i in index]
        emb_values = new.pop("embedding")
        if self.fixed:
            emb_type = pa.list_(pa.float32(), self.encoder.dim)
        else:
            emb_type = pa.list_(pa.float32())
        emb_col = pa.array(
            [None if e is None else np.asarray(e, np.float32).tolist() for e in emb_values], type=emb_type
        )
        out = assemble(
            table, index, new, drop=("pixel_values", "pixel_shape", "pixel_dtype", "frames", "segments", "pool", "tile")
        )
        out = out.append_column("embedding", emb_col)
        if "route" not in out.column_names:
            out = out.append_column("route", pa.array(route_of, pa.string()))
        for k, v in self.provenance.items():
            vals = [self.provenances.get(r, self.provenance).get(k, v) for r in route_of]
            out = out.append_column(k, pa.array(vals))
        # when this batch left the model: the summary's steady-state throughput comes from it
        return out.append_column("t_done", pa.array([time.time()] * out.num_rows, pa.float64()))
