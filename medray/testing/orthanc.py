"""A real PACS for tests: Orthanc with its DICOMweb plugin (Debian's ``orthanc``, ``orthanc-dicomweb``).

Started on free loopback ports with HTTP authentication on, its storage in a
temp directory; :meth:`OrthancServer.upload` stores DICOM files through
Orthanc's REST API. ``make test`` installs the packages (``make system-deps``).

Example::

    with OrthancServer() as pacs:
        pacs.upload(paths)
        os.environ.update(pacs.env())  # MEDRAY_DICOMWEB_USER / _PASSWORD
        uri = pacs.dicomweb_uri          # dicomweb+http://127.0.0.1:<port>/dicom-web
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["OrthancServer", "OrthancError", "find_orthanc"]

_PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins", "/usr/local/share/orthanc/plugins")


class OrthancError(RuntimeError):
    """Orthanc is missing or did not start."""


def find_orthanc() -> tuple[str, str]:
    """``(Orthanc binary, DICOMweb plugin)``; raises :class:`OrthancError` naming the packages to install."""
    binary = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc") else None)
    plugin = next(
        (
            os.path.join(d, "libOrthancDicomWeb.so")
            for d in _PLUGIN_DIRS
            if os.path.exists(os.path.join(d, "libOrthancDicomWeb.so"))
        ),
        None,
    )
    if binary is None or plugin is None:
        raise OrthancError("Orthanc with its DICOMweb plugin is needed: apt-get install orthanc orthanc-dicomweb")
    return binary, plugin


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OrthancServer:
    """An Orthanc on ``127.0.0.1`` with one user, DICOMweb under ``/dicom-web/``.

    Args:
        user, password: the only accepted credentials (HTTP basic auth).
        startup_timeout: seconds to wait for ``/system`` to answer.
    """

    def __init__(self, *, user: str = "medray", password: str = "pacs-secret-0123", startup_timeout: float = 60.0):
        self.user, self.password = user, password
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: Path | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>`` (Orthanc's REST API)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_uri(self) -> str:
        """The medray input URI of the whole server."""
        return f"dicomweb+{self.url}/dicom-web"

    def env(self) -> dict[str, str]:
        """The environment a medray job needs to authenticate."""
        return {"MEDRAY_DICOMWEB_USER": self.user, "MEDRAY_DICOMWEB_PASSWORD": self.password}

    def _session(self) -> Any:
        import requests

        s = requests.Session()
        s.auth = (self.user, self.password)
        return s

    def start(self) -> OrthancServer:
        """Start Orthanc and wait until its REST API answers an authenticated call."""
        binary, plugin = find_orthanc()
        self._tmp = Path(tempfile.mkdtemp(prefix="medray-orthanc-"))
        self.port = _free_port()
        config = {
            "Name": "medray-test",
            "StorageDirectory": str(self._tmp / "db"),
            "IndexDirectory": str(self._tmp / "db"),
            "HttpPort": self.port,
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
            "Plugins": [plugin],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "Full"},
            "StableAge": 1,
        }
        cfg = self._tmp / "orthanc.json"
        cfg.write_text(json.dumps(config))
        log = open(self._tmp / "orthanc.log", "wb")  # noqa: SIM115 - closed by the process's exit
        self._proc = subprocess.Popen(
            [binary, str(cfg)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + self.startup_timeout
        session = self._session()
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            with contextlib.suppress(Exception):
                if session.get(f"{self.url}/system", timeout=2).status_code == 200:
                    return self
            time.sleep(0.2)
        tail = (self._tmp / "orthanc.log").read_text(errors="replace")[-3000:]
        self.stop()
        raise OrthancError(f"Orthanc did not start; log tail:\n{tail}")

    def upload(self, paths: Iterable[str | os.PathLike]) -> list[str]:
        """Store DICOM files (REST ``POST /instances``); return Orthanc's instance ids."""
        session = self._session()
        ids = []
        for p in paths:
            r = session.post(f"{self.url}/instances", data=Path(p).read_bytes(), timeout=60)
            r.raise_for_status()
            body = r.json()
            ids += [b["ID"] for b in body] if isinstance(body, list) else [body["ID"]]
        return ids

    def stop(self) -> None:
        """Stop Orthanc and remove its storage."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        self._proc = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
