"""Checkpoints in an Optuna artifact store, so that a retry on any host can resume.

A local ``root`` is private to one host: a retry that lands on another host finds nothing. With
``TrialCheckpointer(..., store=ARTIFACT_STORE)`` each payload is uploaded as an artifact (any
Optuna artifact store: ``FileSystemArtifactStore`` on a shared directory, ``Boto3ArtifactStore``
for S3-compatible services, ``GCSArtifactStore``) and listed in the system attr
``optuna_guard:checkpoints`` of the trial that saved it: artifact id, step, SHA-256, size,
format. The list is written only after the upload succeeded, so a reader never sees a partial
upload; a retry reads the lists of every trial of its chain from the study storage (which all
hosts share), downloads the newest, verifies size and SHA-256 while downloading, and falls back
to older ones. Stores never need to list or rename (S3 and GCS cannot do either atomically).

``OPTUNA_GUARD_CHECKPOINT_STORE`` (``file:///shared/dir``, ``s3://bucket/prefix``,
``gs://bucket/prefix``) makes a store the default of checkpointers created without ``store=``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, Protocol
from urllib.parse import unquote, urlsplit

from optuna.exceptions import UpdateFinishedTrialError

from optuna_guard._logging import get_logger
from optuna_guard._units import MB
from optuna_guard.exceptions import ConfigError

_log = get_logger(__name__)

CHECKPOINTS_ATTR = "optuna_guard:checkpoints"
STORE_ENV = "OPTUNA_GUARD_CHECKPOINT_STORE"
_CHUNK = 8 * MB

__all__ = [
    "CHECKPOINTS_ATTR",
    "STORE_ENV",
    "ArtifactChain",
    "AtomicFileSystemArtifactStore",
    "CheckpointStoreError",
    "PrefixedArtifactStore",
    "StoredCheckpoint",
    "open_checkpoint_store",
    "store_from_env",
]


class ArtifactStore(Protocol):
    """What Optuna's artifact stores implement (``optuna.artifacts._protocol.ArtifactStore``)."""

    def open_reader(self, artifact_id: str) -> BinaryIO: ...

    def write(self, artifact_id: str, content_body: BinaryIO) -> None: ...

    def remove(self, artifact_id: str) -> None: ...


class CheckpointStoreError(OSError):
    """The artifact store refused an upload (network, permissions, quota). An OSError so that
    ``save()`` treats it like a full disk: the trial goes on without that checkpoint."""


class StoredCheckpoint(NamedTuple):
    """One checkpoint in an artifact store, as the trial that saved it listed it."""

    artifact_id: str
    step: int
    sha256: str
    size: int
    format: str
    trial_number: int
    saved_ns: int

    def record(self) -> dict[str, Any]:
        return {
            "id": self.artifact_id,
            "step": self.step,
            "sha256": self.sha256,
            "size": self.size,
            "format": self.format,
            "trial": self.trial_number,
            "saved_ns": self.saved_ns,
        }

    @classmethod
    def from_record(cls, record: Any) -> StoredCheckpoint | None:
        try:
            return cls(
                artifact_id=str(record["id"]),
                step=int(record["step"]),
                sha256=str(record["sha256"]),
                size=int(record["size"]),
                format=str(record["format"]),
                trial_number=int(record["trial"]),
                saved_ns=int(record["saved_ns"]),
            )
        except (KeyError, TypeError, ValueError):
            return None


# -- stores -------------------------------------------------------------------------------------


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _artifacts_module() -> Any:
    import optuna.artifacts

    return optuna.artifacts


# the base class comes from a lazy import (typed Any): mypy cannot subclass it statically
class AtomicFileSystemArtifactStore(_artifacts_module().FileSystemArtifactStore):  # type: ignore[misc]
    """Optuna's ``FileSystemArtifactStore`` whose ``write`` is atomic and durable (temp file in
    the same directory, fsync, rename, directory fsync): on a shared file system another host
    never sees half a file under the final name, and a power cut keeps what was listed."""

    def __init__(self, base_path: str | os.PathLike[str]) -> None:
        super().__init__(Path(base_path))
        self.base_path = Path(base_path)
        self.url = f"file://{self.base_path}"

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        final = self._get_filepath(artifact_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".tmp-{final.name}.{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                while chunk := content_body.read(_CHUNK):
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
            raise
        _fsync_directory(final.parent)


class PrefixedArtifactStore:
    """An artifact store whose ids all start with ``prefix`` (``s3://bucket/prefix``)."""

    def __init__(self, store: ArtifactStore, prefix: str, url: str) -> None:
        self.store = store
        self.prefix = prefix
        self.url = url

    def open_reader(self, artifact_id: str) -> BinaryIO:
        return self.store.open_reader(self.prefix + artifact_id)

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        self.store.write(self.prefix + artifact_id, content_body)

    def remove(self, artifact_id: str) -> None:
        self.store.remove(self.prefix + artifact_id)


_SCHEMES = "file:///shared/dir, s3://bucket/prefix or gs://bucket/prefix"


def open_checkpoint_store(url: str) -> ArtifactStore:
    """The artifact store a checkpoint-store URL names. S3 takes its endpoint and credentials
    from the usual AWS environment (``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``,
    ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ...)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ConfigError(
                f"checkpoint store {url!r}: a file URL needs an absolute path, e.g. file:///shared/checkpoints."
            )
        base = Path(unquote(parts.path))
        try:
            base.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"checkpoint store {url!r}: cannot create {base}: {exc.strerror}."
            ) from exc
        return AtomicFileSystemArtifactStore(base)
    if scheme in ("s3", "gs"):
        bucket = parts.netloc
        if not bucket:
            raise ConfigError(
                f"checkpoint store {url!r} names no bucket; use {scheme}://bucket/prefix."
            )
        prefix = parts.path.strip("/")
        prefix = f"{prefix}/" if prefix else ""
        return PrefixedArtifactStore(_bucket_store(scheme, bucket, url), prefix, url)
    raise ConfigError(
        f"checkpoint store {url!r}: unknown scheme {parts.scheme or '(none)'!r}; use {_SCHEMES}."
    )


def _bucket_store(scheme: str, bucket: str, url: str) -> ArtifactStore:
    artifacts = _artifacts_module()
    if scheme == "s3":
        try:
            import boto3
        except ImportError as exc:
            raise ConfigError(
                f"checkpoint store {url!r} needs boto3: pip install 'optuna-guard[s3]'."
            ) from exc
        endpoint = (
            os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
        )
        client = boto3.client("s3", endpoint_url=endpoint)
        # avoid_buf_copy: we hand it a spool file we no longer need, so no in-memory copy of it
        s3_store: ArtifactStore = artifacts.Boto3ArtifactStore(
            bucket, client=client, avoid_buf_copy=True
        )
        return s3_store
    try:
        gcs_store: ArtifactStore = artifacts.GCSArtifactStore(bucket)
        return gcs_store
    except ImportError as exc:
        raise ConfigError(
            f"checkpoint store {url!r} needs google-cloud-storage: pip install google-cloud-storage."
        ) from exc


_env_cache: dict[str, ArtifactStore] = {}


def store_from_env() -> ArtifactStore | None:
    """The store ``OPTUNA_GUARD_CHECKPOINT_STORE`` names (one per URL per process), or None."""
    url = os.environ.get(STORE_ENV, "").strip()
    if not url:
        return None
    if url not in _env_cache:
        try:
            _env_cache[url] = open_checkpoint_store(url)
        except ConfigError as exc:
            raise ConfigError(f"{STORE_ENV}: {exc}") from exc
    return _env_cache[url]


def describe_store(store: Any) -> str:
    url = getattr(store, "url", None)
    if url:
        return str(url)
    base = getattr(store, "_base_path", None)
    if base is not None:
        return f"file://{os.path.abspath(base)}"
    bucket = getattr(store, "bucket", None) or getattr(store, "_bucket_name", None)
    return f"{type(store).__name__}({bucket})" if bucket else type(store).__name__


def _is_not_found(exc: BaseException) -> bool:
    if type(exc).__name__ == "ArtifactNotFound" or isinstance(exc, FileNotFoundError):
        return True
    response = getattr(exc, "response", None)  # botocore ClientError
    code = (
        str((response or {}).get("Error", {}).get("Code", ""))
        if isinstance(response, dict)
        else ""
    )
    return code in ("404", "NoSuchKey", "NotFound")


# -- one retry chain ----------------------------------------------------------------------------


class ArtifactChain:
    """The checkpoints of one retry chain in an artifact store, listed in the study storage.

    Each trial lists only the checkpoints it saved and still keeps (finished trials cannot be
    written to); the chain's list is the union over the trial and the trials it retries.
    """

    def __init__(
        self,
        store: ArtifactStore,
        storage: Any,
        trial_id: int | None,
        trial_number: int,
        chain_trial_ids: list[int],
        name_prefix: str,
    ) -> None:
        self.store = store
        self.storage = storage
        self.trial_id = trial_id
        self.trial_number = trial_number
        self.chain_trial_ids = chain_trial_ids  # the trials this one retries, oldest first
        self.name_prefix = name_prefix
        self.url = describe_store(store)
        self._bad: set[str] = set()  # verified corrupt or missing in this process

    # listing ---------------------------------------------------------------------------------

    def _listed(self, trial_id: int) -> list[StoredCheckpoint]:
        try:
            records = self.storage.get_trial_system_attrs(trial_id).get(CHECKPOINTS_ATTR, [])
        except KeyError:  # a trial that no longer exists
            return []
        found = (
            [StoredCheckpoint.from_record(r) for r in records] if isinstance(records, list) else []
        )
        return [c for c in found if c is not None]

    def own(self) -> list[StoredCheckpoint]:
        return self._listed(self.trial_id) if self.trial_id is not None else []

    def checkpoints(self) -> list[StoredCheckpoint]:
        """The chain's listed checkpoints, newest first (not verified)."""
        found: dict[str, StoredCheckpoint] = {}
        for trial_id in [
            *self.chain_trial_ids,
            *([self.trial_id] if self.trial_id is not None else []),
        ]:
            for item in self._listed(trial_id):
                if item.artifact_id not in self._bad:
                    found[item.artifact_id] = item
        return sorted(found.values(), key=lambda c: (c.step, c.saved_ns), reverse=True)

    def _publish(self, own: list[StoredCheckpoint]) -> None:
        if self.trial_id is None:
            raise ConfigError(
                "a FrozenTrial's checkpointer can load from a store but not save to it."
            )
        self.storage.set_trial_system_attr(
            self.trial_id, CHECKPOINTS_ATTR, [c.record() for c in own]
        )

    # saving ----------------------------------------------------------------------------------

    def save(
        self,
        write_payload: Callable[[BinaryIO], tuple[str, int]],
        step: int,
        fmt: str,
        keep_last: int,
    ) -> StoredCheckpoint:
        """Serialize into a local spool file (hashed while written), upload it, list it, then
        rotate the chain down to ``keep_last``."""
        artifact_id = f"{self.name_prefix}step-{step:010d}-{uuid.uuid4().hex[:8]}.ckpt"
        with tempfile.TemporaryFile(prefix="optuna-guard-spool-") as spool:
            sha256, size = write_payload(spool)
            spool.flush()
            spool.seek(0)
            try:
                self.store.write(artifact_id, spool)
            except OSError:
                raise
            except Exception as exc:  # botocore/google errors: not ours to classify
                raise CheckpointStoreError(
                    f"upload of {artifact_id} to {self.url} failed: {type(exc).__name__}: {exc}"
                ) from exc
        saved = StoredCheckpoint(
            artifact_id, step, sha256, size, fmt, self.trial_number, time.time_ns()
        )
        try:
            self.rotate(keep_last, new=saved)
        except UpdateFinishedTrialError:
            self._remove(artifact_id)  # the trial was ended from outside: nobody will list it
            raise
        return saved

    def rotate(self, keep_last: int, new: StoredCheckpoint | None = None) -> int:
        """List ``new`` and keep the newest ``keep_last`` of the chain: the trial's list is
        written first (readers stop seeing the dropped ones), then their artifacts are removed."""
        chain = self.checkpoints()
        if new is not None:
            chain = sorted([new, *chain], key=lambda c: (c.step, c.saved_ns), reverse=True)
        kept, dropped = chain[:keep_last], chain[keep_last:]
        kept_ids = {c.artifact_id for c in kept}
        own = [
            c for c in ([new] if new is not None else []) + self.own() if c.artifact_id in kept_ids
        ]
        self._publish(own)
        for item in dropped:
            self._remove(item.artifact_id)
        return len(dropped)

    def _remove(self, artifact_id: str) -> None:
        self._bad.add(artifact_id)
        try:
            self.store.remove(artifact_id)
        except Exception as exc:
            if not _is_not_found(exc):
                _log.warning(
                    "Could not remove checkpoint %s from %s: %s", artifact_id, self.url, exc
                )

    def remove_all(self) -> bool:
        """Remove every checkpoint of the chain; True when there was any."""
        chain = self.checkpoints()
        if self.trial_id is not None and self.own():
            self._publish([])
        for item in chain:
            self._remove(item.artifact_id)
        return bool(chain)

    # loading ---------------------------------------------------------------------------------

    def download_verified(self, item: StoredCheckpoint, spool: BinaryIO) -> str | None:
        """Copy the artifact into ``spool``, hashing while it streams; a problem or None."""
        digest = hashlib.sha256()
        size = 0
        try:
            reader = self.store.open_reader(item.artifact_id)
        except Exception as exc:
            if _is_not_found(exc):
                return "is listed but missing from the store (removed by a rotation or lost)"
            return f"cannot be read from {self.url} ({type(exc).__name__}: {exc})"
        try:
            while chunk := reader.read(_CHUNK):
                digest.update(chunk)
                spool.write(chunk)
                size += len(chunk)
                if size > item.size:
                    return f"is larger than listed (more than {item.size} bytes)"
        except Exception as exc:
            return f"download failed ({type(exc).__name__}: {exc})"
        finally:
            reader.close()
        if size != item.size:
            return f"is truncated ({size} bytes, listed as {item.size})"
        if digest.hexdigest() != item.sha256:
            return "is corrupted (SHA-256 does not match the listing)"
        spool.flush()
        return None

    def forget(self, item: StoredCheckpoint) -> None:
        """A bad checkpoint: not tried again, not counted by rotation; unlisted if it is ours."""
        self._bad.add(item.artifact_id)
        own = self.own()
        if any(c.artifact_id == item.artifact_id for c in own):
            self._publish([c for c in own if c.artifact_id != item.artifact_id])
