"""Turn a checkpoint URI into a verified local directory, once per node.

Four kinds of ``encoder.checkpoint`` are understood:

* a local directory or ``file://`` URI: used in place and hashed;
* a Hugging Face hub id (``"org/name"``, ``"org/name@revision"``, timm's
  ``"hf-hub:org/name"``): fetched with ``huggingface_hub.snapshot_download``
  into the usual HF cache;
* any other fsspec URI (``s3://``, ``gs://``, ``memory://``): copied once per
  node into ``<cache_dir>/<sha256(uri)>``. An ``fcntl`` lock makes concurrent
  actors on one node wait for a single copy, which lands in a temp directory
  and is renamed into place, so a half-copied checkpoint is never seen;
* a scheme registered by the module that owns it (:func:`register_scheme`):
  ``medray-demo://tiny_vit``, the tiny random demo model built on first use
  (:mod:`medray.encoders.tiny`), and ``torchvision://<arch>/<weights>``
  (:mod:`medray.encoders.video`).

The hash of a directory (:func:`hash_directory`) covers sorted relative paths
and bytes. For cached copies it is kept in a sidecar file next to the copy,
checked against file sizes and mtimes, so actor start-up does not re-read
gigabytes of weights.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from medray.encoders.spec import MISSING, default_cache_dir
from medray.platform.errors import ConfigError

__all__ = [
    "DEMO_SCHEME",
    "UNTRAINED_MARKER",
    "hash_directory",
    "is_untrained",
    "node_lock",
    "register_scheme",
    "resolve_checkpoint",
]

_log = logging.getLogger(__name__)

#: File whose presence marks a checkpoint as random, untrained weights.
UNTRAINED_MARKER = "MEDRAY_UNTRAINED"
#: URI scheme of the built-in demo checkpoints (``medray-demo://tiny_vit``).
DEMO_SCHEME = "medray-demo://"

#: Checkpoint URI schemes built by the modules that own them (see :func:`register_scheme`).
_SCHEMES: dict[str, Callable[[str, Path], str]] = {}


def register_scheme(scheme: str, builder: Callable[[str, Path], str]) -> None:
    """Make ``scheme`` (e.g. ``"medray-demo://"``) a checkpoint URI that ``builder`` resolves.

    Args:
        scheme: the URI prefix, ending in ``://``.
        builder: ``(uri, cache_root) -> local directory``; it builds or fetches the
            checkpoint once per node (use :func:`node_lock`) and raises
            :class:`~medray.platform.errors.ConfigError` for a URI it cannot serve.
    """
    _SCHEMES[scheme] = builder


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_CHUNK = 1 << 20


def hash_directory(path: str | os.PathLike) -> str:
    """Return the sha256 of a directory's content.

    Files are visited in sorted order of their relative POSIX paths; each
    contributes its path, its size and its bytes. Hidden entries (names
    starting with ``.``, such as ``.cache/`` or ``.gitattributes``) are
    skipped, so tooling metadata does not change the hash. Symlinks are
    followed (HF cache snapshots are symlinks to blobs).

    Args:
        path: Directory to hash.

    Returns:
        64 lowercase hex digits.

    Raises:
        ConfigError: ``path`` is not a directory.
    """
    root = Path(path)
    if not root.is_dir():
        raise ConfigError("encoder.checkpoint", f"{root} is not a directory")
    digest = hashlib.sha256()
    for rel, full in _files(root):
        digest.update(rel.encode("utf-8") + b"\0")
        digest.update(full.stat().st_size.to_bytes(8, "little"))
        with open(full, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def is_untrained(local_dir: str | os.PathLike) -> bool:
    """Return True when ``local_dir`` holds the :data:`UNTRAINED_MARKER` file."""
    return (Path(local_dir) / UNTRAINED_MARKER).is_file()


def resolve_checkpoint(
    uri: str,
    *,
    storage_options: dict | None = None,
    cache_dir: str | None = None,
    expected_sha256: str | None = None,
) -> tuple[str, str]:
    """Return a local directory holding the checkpoint, and its hash.

    Args:
        uri: Local directory, ``file://`` URI, hub id, fsspec URI or
            ``medray-demo://`` URI (see the module docstring).
        storage_options: fsspec options for remote URIs (endpoint, keys),
            flat or keyed by protocol (``{"s3": {...}}``).
        cache_dir: Node-local cache; ``None`` means ``$MEDRAY_CACHE_DIR`` or
            ``~/.cache/medray/checkpoints``.
        expected_sha256: When given, the directory hash must match it. A
            cached remote copy that does not match is fetched again once.

    Returns:
        ``(local_dir, sha256)``. ``local_dir`` is for loading only: never
        record it, record ``uri``.

    Raises:
        ConfigError: The checkpoint cannot be found or fetched (key
            ``encoder.checkpoint``), or its hash differs from
            ``expected_sha256`` (key ``encoder.sha256``).
    """
    if not isinstance(uri, str) or not uri or uri == MISSING:
        raise ConfigError(
            "encoder.checkpoint",
            "is not set: give a hub id (org/name), a local directory or an s3:// URI",
        )
    root = Path(cache_dir or default_cache_dir()).expanduser()
    expected = expected_sha256.lower() if expected_sha256 else None

    builder = next((b for scheme, b in _SCHEMES.items() if uri.startswith(scheme)), None)
    if builder is not None:
        local, sha = builder(uri, root), None
    elif uri.startswith("hf-hub:"):
        local, sha = _hub(uri, uri[len("hf-hub:") :], root)
    elif uri.startswith("file://"):
        local, sha = _local(uri, uri[len("file://") :]), None
    elif "://" in uri:
        local, sha = _remote(uri, storage_options or {}, root, expected)
    elif Path(uri).expanduser().exists() or not _HUB_ID.match(uri):
        local, sha = _local(uri, uri), None
    else:
        local, sha = _hub(uri, uri, root)

    if sha is None:
        sha = hash_directory(local)
    if expected is not None and sha != expected:
        _raise_mismatch(uri, sha, expected)
    return local, sha


def _raise_mismatch(uri: str, sha: str, expected: str) -> None:
    """Raise the error for a checkpoint whose hash is not the expected one."""
    raise ConfigError(
        "encoder.sha256",
        f"checkpoint {uri} hashes to {sha} but {expected} was expected; "
        f"if the checkpoint changed on purpose set encoder.sha256={sha} "
        "(or null to skip the check), else fix encoder.checkpoint",
    )


def _files(root: Path) -> Iterator[tuple[str, Path]]:
    """Yield ``(relative posix path, path)`` for non-hidden files, sorted."""
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            full = Path(dirpath) / name
            found.append((full.relative_to(root).as_posix(), full))
    found.sort(key=lambda item: item[0])
    return iter(found)


def _stamp(root: Path) -> str:
    """Cheap fingerprint (paths, sizes, mtimes) that tells when to re-hash."""
    digest = hashlib.sha256()
    for rel, full in _files(root):
        st = full.stat()
        digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _cached_hash(directory: Path, sidecar: Path) -> str:
    """Hash ``directory``, reusing ``sidecar`` while the stamp still matches."""
    stamp = _stamp(directory)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = json.loads(sidecar.read_text())
        if saved["stamp"] == stamp:
            return str(saved["sha256"])
    sha = hash_directory(directory)
    _write_sidecar(sidecar, stamp, sha)
    return sha


def _write_sidecar(sidecar: Path, stamp: str, sha: str) -> None:
    """Atomically record a directory's hash with the stamp it belongs to."""
    try:
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        tmp = sidecar.with_name(f"{sidecar.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps({"sha256": sha, "stamp": stamp}))
        os.replace(tmp, sidecar)
    except OSError as err:  # a read-only cache only costs a re-hash next time
        _log.debug("cannot write hash sidecar %s: %s", sidecar, err)


@contextlib.contextmanager
def node_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``path`` (all processes of a node)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _local(uri: str, path: str) -> str:
    """Check a local checkpoint directory and return its absolute path."""
    local = Path(path).expanduser()
    if not local.is_dir():
        what = "is not a directory" if local.exists() else "does not exist"
        raise ConfigError(
            "encoder.checkpoint",
            f"local checkpoint {uri} {what}; give a directory holding config.json and "
            "the weights, a hub id (org/name) or an fsspec URI (s3://bucket/prefix)",
        )
    return str(local.resolve())


def _hub(uri: str, repo: str, root: Path) -> tuple[str, str]:
    """Fetch a hub snapshot (or find it in the HF cache); return (path, sha256)."""
    repo_id, _, revision = repo.partition("@")
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id=repo_id, revision=revision or None, local_files_only=offline)
    except Exception as err:  # offline, 404, gated, DNS: all need the same fix
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        raise ConfigError(
            "encoder.checkpoint",
            f"cannot download {uri} from the Hugging Face hub ({reason}). "
            "Set encoder.checkpoint to a local directory or an s3:// URI holding the "
            "checkpoint files, or enable network access (unset HF_HUB_OFFLINE; set "
            "HF_TOKEN for gated models)",
        ) from err
    # Snapshots are large and immutable: keep their hash next to our cache.
    key = hashlib.sha256(str(path).encode()).hexdigest()
    return str(path), _cached_hash(Path(path), root / "hub" / f"{key}.json")


def _remote(uri: str, storage_options: dict, root: Path, expected: str | None) -> tuple[str, str]:
    """Copy an fsspec directory into the node cache once; return (dir, sha)."""
    key = hashlib.sha256(uri.encode()).hexdigest()
    target, sidecar, lock = root / key, root / f"{key}.json", root / f"{key}.lock"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            "encoder.cache_dir",
            f"cannot create the checkpoint cache {root} ({type(err).__name__}); set "
            "encoder.cache_dir or MEDRAY_CACHE_DIR to a writable node-local directory",
        ) from err

    # Fast path: a finished copy exists (rename is atomic, so it is complete).
    if target.is_dir():
        sha = _cached_hash(target, sidecar)
        if expected is None or sha == expected:
            return str(target), sha

    with node_lock(lock):
        stale = None
        if target.is_dir():
            stale = _cached_hash(target, sidecar)
            if expected is None or stale == expected:
                return str(target), stale
            _log.warning("cached copy of %s does not match encoder.sha256; fetching again", uri)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
        try:
            try:
                _copy_tree(uri, storage_options, tmp)
            except ConfigError as err:
                if stale is None:
                    raise
                raise ConfigError(
                    "encoder.sha256",
                    f"cached copy of {uri} hashes to {stale}, not {expected}, and fetching it "
                    f"again failed ({err}); fix encoder.sha256 or encoder.checkpoint",
                ) from err
            sha, stamp = hash_directory(tmp), _stamp(tmp)
            if expected is not None and sha != expected:
                _raise_mismatch(uri, sha, expected)  # the old copy, if any, stays
            if stale is not None:
                _remove(target, root)
            os.rename(tmp, target)  # keeps mtimes, so the stamp still holds
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        _write_sidecar(sidecar, stamp, sha)
        _log.info("cached checkpoint %s (sha256 %s)", uri, sha[:12])
        return str(target), sha


def _remove(target: Path, root: Path) -> None:
    """Move a stale cached copy aside atomically, then delete it."""
    trash = Path(tempfile.mkdtemp(prefix=".trash.", dir=root))
    os.rename(target, trash / "old")
    shutil.rmtree(trash, ignore_errors=True)


def _copy_tree(uri: str, storage_options: dict, dest: Path) -> None:
    """Copy every file under ``uri`` into ``dest``, keeping relative paths."""
    import fsspec

    protocol = uri.split("://", 1)[0]
    if isinstance(storage_options.get(protocol), dict):  # keyed by protocol: {s3: {...}}
        storage_options = storage_options[protocol]
    try:
        fs, base = fsspec.core.url_to_fs(uri, **storage_options)
        base = base.rstrip("/")
        if fs.isfile(base):
            raise ConfigError(
                "encoder.checkpoint",
                f"{uri} is a file; point encoder.checkpoint at the directory that holds it",
            )
        remote = sorted(fs.find(base, withdirs=False, detail=False))
        if not remote:
            raise ConfigError(
                "encoder.checkpoint",
                f"no files under {uri}; check the URI and that the checkpoint was uploaded",
            )
        local = []
        for path in remote:
            rel = posixpath.relpath(path, base)
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            local.append(str(out))
        fs.get(remote, local)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(
            "encoder.checkpoint",
            f"cannot copy {uri} ({type(err).__name__}: {str(err)[:200]}); check the URI, "
            "encoder.storage_options and the storage credentials (AWS_* variables)",
        ) from err
