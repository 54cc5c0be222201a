"""Where an encoder replica runs its model: in a thread of the replica, or in a child process.

An encoder replica decodes requests in a thread pool and runs the model in one model thread
(:mod:`medray.serve.encoder`). On a CPU replica whose torch threads take every core the node
has, a model thread of a Ray worker runs at about half speed: libgomp (PyTorch's OpenMP)
counts every thread it manages, and once a process holds more of them than the CPUs it may
use (a non-initial thread's team plus the initial thread), it stops spinning between parallel
regions and puts its threads to sleep after each of the forward pass's hundreds of small
operators. Measured on the 2-core machine (random ViT-Tiny, 224 px, 2 threads; docs/serve.md
"Where the time goes"): 60-65 ms per image in a replica's thread against 35-45 ms in a child
process, whose initial thread runs the model, with the same Ray cluster beside it.

So :func:`create_runner` picks:

* ``thread`` -- the encoder in this process, called from the model thread (GPU replicas, and
  CPU replicas that leave the node cores to spare);
* ``process`` -- the encoder in a spawned child process whose initial thread runs every call;
  batches go through a pipe as raw float32 buffers (a 224 px image is 0.6 MB: well under a
  millisecond), and the replica keeps only the checkpoint's preprocessing
  (:func:`~medray.encoders.create_preprocessor`), so the weights are loaded once.

``serve.encoder.engine: auto`` (default) is ``process`` on CPU when ``torch_threads`` is at
least the node's usable CPUs and above 1, ``thread`` otherwise.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection
from typing import Any, Protocol

import numpy as np

from medray.platform.errors import EncodeError, RecordError

__all__ = ["ModelRunner", "ThreadRunner", "ProcessRunner", "create_runner", "choose_engine"]

log = logging.getLogger("ray.serve.medray.engine")

ENGINES = ("auto", "thread", "process")


class ModelRunner(Protocol):
    """The model of an encoder replica; every call comes from the replica's one model thread."""

    dim: int

    def describe(self) -> dict:
        """The encoder's identity (name, dim, weights and preprocessing hashes)."""
        ...

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """``(N, dim)`` float32 embeddings of a preprocessed batch."""
        ...

    def embed_text(self, texts: list[str]) -> np.ndarray:
        """Text-tower embeddings (image-text encoders); :class:`EncodeError` for others."""
        ...

    def alive(self) -> bool:
        """Whether the model can still take calls."""
        ...

    def close(self) -> None:
        """Free the model (and its process)."""
        ...


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity), as libgomp counts them."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def choose_engine(engine: str, device: str, threads: int) -> str:
    """Resolve ``serve.encoder.engine``: ``auto`` is ``process`` on CPU when ``threads`` (> 1)
    takes every usable CPU (where libgomp would throttle a thread's team), else ``thread``."""
    if engine != "auto":
        return engine
    if device == "cpu" and threads > 1 and threads >= usable_cpus():
        return "process"
    return "thread"


class ThreadRunner:
    """The encoder in this process (the model thread calls it)."""

    def __init__(self, encoder: Any) -> None:
        self._encoder = encoder
        self.dim = int(encoder.dim)

    def describe(self) -> dict:
        return dict(self._encoder.describe())

    def embed(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self._encoder.embed(batch), dtype=np.float32)

    def embed_text(self, texts: list[str]) -> np.ndarray:
        embed_text = getattr(self._encoder, "embed_text", None)
        if embed_text is None:
            raise _no_text_tower(self.describe())
        return np.asarray(embed_text(list(texts)), dtype=np.float32)

    def alive(self) -> bool:
        return True

    def close(self) -> None:
        self._encoder = None


def _no_text_tower(ident: Mapping[str, Any]) -> RecordError:
    from medray.platform.errors import UnsupportedFormat

    return UnsupportedFormat(f"encoder {ident.get('name')} is not an image-text encoder: it embeds no prompts")


# -- the child process ------------------------------------------------------------------------


def _send_array(conn: Any, arr: np.ndarray, op: str = "array") -> None:
    """One array frame, both ways: the header ``(op, dtype, shape)`` (``embed`` a call, ``array`` an
    answer), then the raw buffer."""
    arr = np.ascontiguousarray(arr)
    conn.send((op, str(arr.dtype), arr.shape))
    conn.send_bytes(arr.data.cast("B") if arr.size else b"")


def _recv_array(conn: Any, header: tuple) -> np.ndarray:
    """The array whose header :func:`_send_array` sent (and this side has read)."""
    _, dtype, shape = header
    out = np.empty(shape, dtype=np.dtype(dtype))  # received in place: writable, one copy
    if out.size:
        conn.recv_bytes_into(out.data.cast("B"))
    else:
        conn.recv_bytes()
    return out


def _child_entry(fd: int) -> None:
    """The model process's entry point (``python -c ...``): its first message is the config."""
    conn = Connection(fd)
    try:
        config = conn.recv()
    except (EOFError, OSError):
        return
    _child_main(conn, config["spec"], config["device"], config["dtype"], config["threads"])


def _child_main(conn: Any, spec: dict, device: str, dtype: str, threads: int) -> None:
    """The model process: load the encoder, then answer calls on this (the initial) thread."""
    import torch

    torch.set_num_threads(max(1, int(threads)))
    from medray.encoders import create_encoder, get_spec

    try:
        encoder = create_encoder(get_spec(dict(spec)), device=device, dtype=dtype)
    except BaseException as err:  # noqa: BLE001 - the replica reports it
        conn.send(("error", type(err).__name__, str(err)[:500], isinstance(err, RecordError)))
        return
    ident = dict(encoder.describe())
    conn.send(("ready", ident, int(encoder.dim)))
    runner = ThreadRunner(encoder)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the replica is gone
            return
        op = msg[0]
        if op == "close":
            return
        try:
            if op == "embed":
                out = runner.embed(_recv_array(conn, msg))
            elif op == "embed_text":
                out = runner.embed_text(list(msg[1]))
            else:
                raise ValueError(f"unknown call {op!r}")
        except BaseException as err:  # noqa: BLE001 - sent back as the call's error
            conn.send(("error", type(err).__name__, str(err)[:500], isinstance(err, RecordError)))
            continue
        _send_array(conn, out)


class ProcessRunner:
    """The encoder in a spawned child process whose initial thread runs every call.

    The child starts loading at once; :meth:`wait_ready` waits for it (:func:`create_runner` builds
    the replica's preprocessing in between, so the two overlap).

    Args:
        spec: the encoder spec (as a dict).
        device: ``cpu`` or ``cuda[:N]`` (the child sees the replica's devices).
        dtype: as :func:`~medray.encoders.create_encoder`.
        threads: the child's torch threads.
        start_timeout_s: how long the model may take to load (:meth:`wait_ready`).
    """

    def __init__(
        self, spec: Mapping[str, Any], *, device: str, dtype: str, threads: int, start_timeout_s: float = 600.0
    ):
        # A fresh interpreter (never a fork of a Ray worker, and no re-import of its __main__ as
        # multiprocessing's spawn does), talking over a socket pair it inherits.
        ours, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._proc = subprocess.Popen(
            [sys.executable, "-c", f"import medray.serve.engine as e; e._child_entry({theirs.fileno()})"],
            pass_fds=(theirs.fileno(),),
            env=env,
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self._conn = Connection(ours.detach())
        # the spec over the socket, not argv: its storage options may hold credentials
        self._conn.send({"spec": dict(spec), "device": device, "dtype": dtype, "threads": int(threads)})
        self._lock = threading.Lock()  # one call at a time on the pipe
        self._start_timeout_s = start_timeout_s
        self._ident: dict = {}
        self.dim = 0

    def wait_ready(self) -> ProcessRunner:
        """Wait until the child has loaded the model (the replica builds its preprocessing meanwhile).

        Raises:
            RuntimeError: the child could not load the model, exited, or took over ``start_timeout_s``.
        """
        if self._ident:
            return self
        if not self._conn.poll(self._start_timeout_s):
            self.close()
            raise RuntimeError(f"the model process did not load the encoder within {self._start_timeout_s:g} s")
        try:
            msg = self._conn.recv()
        except EOFError:
            code = self._proc.poll()
            self.close()
            raise RuntimeError(f"the model process exited while loading the encoder (exit code {code})") from None
        if msg[0] == "error":
            self.close()
            raise RuntimeError(f"the model process could not load the encoder: {msg[1]}: {msg[2]}")
        _, self._ident, self.dim = msg
        log.info("model process %d serves %s", self._proc.pid, self._ident.get("name"))
        return self

    @property
    def pid(self) -> int | None:
        """The child's process id."""
        return self._proc.pid

    def describe(self) -> dict:
        return dict(self._ident)

    def _call(self, send: Any) -> np.ndarray:
        with self._lock:
            try:
                send()
                header = self._conn.recv()
                if header[0] == "error":
                    _, cls, message, is_record = header
                    if is_record:
                        raise EncodeError(message)
                    raise EncodeError(f"model failed ({cls})")
                return _recv_array(self._conn, header)
            except (EOFError, OSError):
                raise RuntimeError(f"the model process exited (exit code {self._proc.poll()})") from None

    def embed(self, batch: np.ndarray) -> np.ndarray:
        return self._call(lambda: _send_array(self._conn, batch, "embed"))

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        return self._call(lambda: self._conn.send(("embed_text", [str(t) for t in texts])))

    def alive(self) -> bool:
        return self._proc.poll() is None

    def close(self) -> None:
        try:
            if self.alive():
                try:
                    self._conn.send(("close",))
                except OSError:
                    pass
                try:
                    self._proc.wait(5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(5)
        finally:
            self._conn.close()


def create_runner(
    spec: Mapping[str, Any], *, engine: str, device: str, dtype: str, threads: int
) -> tuple[ModelRunner, Any]:
    """The model runner of an encoder replica and the preprocessing its decode threads use.

    Args:
        spec: the encoder spec (as a dict).
        engine: ``thread`` or ``process`` (resolve ``auto`` with :func:`choose_engine`).
        device: ``cpu`` or ``cuda[:N]``.
        dtype: as :func:`~medray.encoders.create_encoder`.
        threads: torch threads of the model.

    Returns:
        ``(runner, preprocessor)``: in ``thread`` mode the preprocessor is the encoder itself.
    """
    from medray.encoders import create_encoder, create_preprocessor, get_spec

    if engine == "process":
        runner = ProcessRunner(spec, device=device, dtype=dtype, threads=threads)  # loads in the background
        try:
            preprocessor = create_preprocessor(get_spec(dict(spec)))
        except BaseException:
            runner.close()
            raise
        return runner.wait_ready(), preprocessor
    if engine != "thread":
        raise ValueError(f"engine must be thread or process, got {engine!r}")
    encoder = create_encoder(get_spec(dict(spec)), device=device, dtype=dtype)
    return ThreadRunner(encoder), encoder
