"""Atomic, verified trial checkpoints that a retried trial resumes from.

Layout: ``<root>/<study name>/trial-<N>/`` where N is the number of the ORIGINAL trial of the
retry chain (Optuna's ``failed_trial`` system attr), so every retry of a killed trial looks in
the directory its predecessors wrote. Each checkpoint is two files::

    step-0000000005-1a2b3c4d.ckpt   the payload (torch.save or pickle)
    step-0000000005-1a2b3c4d.json   the manifest: step, hash, size, format; written LAST

Both are written to a temp file in the same directory, flushed, fsync'ed and renamed into place
with ``os.replace``; the directory is fsync'ed once after both renames, so a crash at any point
leaves either the previous checkpoints or a complete new one (a manifest whose payload rename
was lost names a missing file and is skipped). A payload without a manifest, or one whose size
or hash does not match it, is not a checkpoint: ``load`` skips it with a warning and uses the
previous good one.

The hash (XXH3-128 by default; SHA-256 too with ``verify="sha256"``) is computed in the same
pass as the write (:class:`_HashingWriter`) and as the read on load (:class:`_HashingReader`):
the payload's bytes are never read a second time.
"""

from __future__ import annotations

import collections
import concurrent.futures
import errno
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, NamedTuple

from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from optuna_guard import preemption, tags
from optuna_guard._logging import get_logger
from optuna_guard._rng import capture_rng_state, restore_rng_state
from optuna_guard._units import MB
from optuna_guard.exceptions import CheckpointError, ConfigError
from optuna_guard.retries import FAILED_TRIAL, RETRY_HISTORY, end_reasons, original_trial_number

if TYPE_CHECKING:
    from optuna_guard._checkpoint_store import ArtifactChain, ArtifactStore

_log = get_logger(__name__)

__all__ = ["CheckpointCleanupCallback", "CheckpointInfo", "TrialCheckpointer", "chain_directory"]

MANIFEST_VERSION = 1
_PAYLOAD_SUFFIX = ".ckpt"
_MANIFEST_SUFFIX = ".json"
_TMP_PREFIX = ".tmp-"
_NAME_RE = re.compile(r"^step-(\d{10})-([0-9a-f]{8})$")
_HASH_CHUNK = 8 * MB
_STALE_TMP_S = 3600.0  # a temp file this old belongs to a save that crashed

Format = Literal["auto", "torch", "pickle"]

# One helper thread hashes payloads while they are written (shared by all checkpointers of the
# process; re-created in a forked child, where the parent's thread does not exist).
_pool_lock = threading.Lock()
_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _hash_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="optuna-guard-hash"
            )
        return _pool


def _forget_pool_after_fork() -> None:
    global _pool, _pool_lock
    _pool = None
    _pool_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_after_fork)

# (study name, trial number) of trials already warned about a full disk: one warning per trial.
_disk_full_lock = threading.Lock()
_disk_full_warned: collections.OrderedDict[tuple[str | None, int], None] = (
    collections.OrderedDict()
)


def _is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _is_upload_error(exc: BaseException) -> bool:
    return type(exc).__name__ == "CheckpointStoreError"  # without importing the store module


def _is_skippable(exc: BaseException) -> bool:
    """Failures that cost this checkpoint but must not cost the trial."""
    return _is_disk_full(exc) or _is_upload_error(exc)


class CheckpointInfo(NamedTuple):
    """One complete checkpoint as its manifest describes it."""

    step: int
    payload: Path
    manifest: Path
    sha256: str
    size: int
    format: str
    trial_number: int
    saved_ns: int
    xxh3_128: str | None = None  # fast load-time check, written with the SHA-256 in one pass


def _fast_hash() -> Any:
    """The ``xxhash`` module (a core dependency; XXH3-128 runs ~7x faster than SHA-256 here),
    or None if it cannot be imported; checkpoints then carry only the SHA-256."""
    try:
        import xxhash
    except ImportError:
        return None
    return xxhash


def _study_dirname(study_name: str | None) -> str:
    """A directory name for a study: readable, and distinct for distinct names."""
    if not study_name:
        return "no-study"
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", study_name).strip(".") or "study"
    if safe != study_name:
        safe = f"{safe[:80]}-{hashlib.sha1(study_name.encode()).hexdigest()[:8]}"
    return safe


def chain_directory(
    root: str | os.PathLike[str], study_name: str | None, original_number: int
) -> Path:
    """Where the checkpoints of a retry chain live."""
    return Path(root) / _study_dirname(study_name) / f"trial-{original_number}"


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems refuse fsync on directories
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _makedirs_durable(path: Path) -> None:
    """Create ``path`` and fsync each parent whose entry we added, so the directory survives
    a power cut together with the files in it."""
    missing = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    path.mkdir(parents=True, exist_ok=True)
    for created in reversed(missing):
        _fsync_directory(created.parent)


class _HashingWriter:
    """A write-only file object that hashes what goes through it, so the payload is hashed
    while it is written instead of being read back.

    XXH3-128 only (the default): a large write is split into 1 MB pieces, each hashed right
    before it is written, while it is in the CPU cache (a few % of the write's CPU; no thread
    hand-off, which on a busy machine waits for the scheduler). With a SHA-256 (slower than
    the disk here) large writes are hashed in a helper thread in parallel with the write
    (hashlib and file writes both release the GIL); when the hash is the slower of the two, the
    bytes written so far are flushed to disk (``fdatasync``) while it finishes, so the final
    fsync has little left to do."""

    _SYNC_EARLY_BYTES = 16 * MB
    _PIECE = 1 * MB

    def __init__(
        self,
        raw: BinaryIO,
        pool: concurrent.futures.Executor,
        *,
        durable: bool = True,
        sha256: bool = True,
    ) -> None:
        self._raw = raw
        self._pool = pool
        fast = _fast_hash()
        self.sha256 = hashlib.sha256() if sha256 or fast is None else None
        self.xxh3 = fast.xxh3_128() if fast is not None else None
        self.size = 0
        self._unsynced = 0
        self._durable = durable  # False for a spool file that is uploaded, not kept

    def _hash(self, view: memoryview) -> None:
        if self.sha256 is not None:
            self.sha256.update(view)
        if self.xxh3 is not None:
            self.xxh3.update(view)

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        nbytes = view.nbytes
        if self.sha256 is None and self.xxh3 is not None:
            for start in range(0, nbytes, self._PIECE):
                piece = view[start : start + self._PIECE]
                self.xxh3.update(piece)
                self._raw.write(piece)
        elif nbytes >= 1 * MB:
            pending = self._pool.submit(self._hash, view)
            self._raw.write(view)
            self._unsynced += nbytes
            if self._durable and not pending.done() and self._unsynced >= self._SYNC_EARLY_BYTES:
                self._raw.flush()
                os.fdatasync(self._raw.fileno())
                self._unsynced = 0
            pending.result()  # the caller may reuse its buffer once we return
        else:
            self._hash(view)
            self._raw.write(view)
            self._unsynced += nbytes
        self.size += nbytes
        return nbytes

    def flush(self) -> None:
        self._raw.flush()

    def writable(self) -> bool:
        return True


class _HashingReader:
    """A read-only, seekable file object over a checkpoint payload that hashes the bytes the
    deserializer reads, in file order, so a verified load reads the payload once.

    ``torch.load`` reads a zip: the directory at the end first, then small records, then each
    tensor's bytes with one ``readinto`` into the tensor's own storage; ``pickle.load`` reads
    front to back. Bytes are hashed as soon as everything before them is hashed: a read that
    starts a little past the hashed prefix (zip headers skipped by the reader) first hashes the
    gap with ``pread``; one far ahead (the zip directory) is left for :meth:`hexdigest`, which
    hashes whatever was never read in order. Every byte is thus hashed exactly once and in order,
    whatever the access pattern, and the big tensors are hashed from the buffer they were read
    into: a large read is done in 1 MB pieces, each hashed right after it is read, while it is
    still in the CPU cache (XXH3 then costs a few % of the read; handing pieces to a hash thread
    was slower on a busy machine, where each hand-off waits for the scheduler)."""

    _GAP_MAX = 1 * MB  # a gap up to this is read just to hash it; a larger one waits for the end
    _PIECE = 1 * MB

    def __init__(self, raw: io.BufferedReader, digest: Any) -> None:
        self._raw = raw
        self._fd = raw.fileno()
        self._digest = digest
        self._hashed = 0  # bytes [0, _hashed) of the file are in the digest

    # -- file object ----------------------------------------------------------------------

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def read(self, size: int = -1) -> bytes:
        offset = self._raw.tell()
        data = self._raw.read(size)
        self._saw(offset, memoryview(data))
        return data

    def readline(self, size: int = -1) -> bytes:
        offset = self._raw.tell()
        data = self._raw.readline(size)
        self._saw(offset, memoryview(data))
        return data

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        offset = self._raw.tell()
        if not self._catch_up(offset) or self._hashed != offset:  # out of order, or a re-read
            n = self._raw.readinto(view) or 0
            self._saw(offset, view[:n])
            return n
        total = 0
        while total < view.nbytes:
            piece = view[total : total + self._PIECE]
            n = self._raw.readinto(piece) or 0
            if n == 0:
                break
            self._digest.update(piece[:n])  # while the piece is still in the CPU cache
            total += n
            self._hashed += n
            if n < piece.nbytes:
                break
        return total

    # -- hashing --------------------------------------------------------------------------

    def _catch_up(self, offset: int) -> bool:
        """Hash a small gap before ``offset``; True when the hashed prefix then reaches it."""
        if self._hashed < offset <= self._hashed + self._GAP_MAX:
            self._hash_range(self._hashed, offset)
        return self._hashed >= offset

    def _saw(self, offset: int, view: memoryview) -> None:
        """Bytes read at ``offset``: hash the part that extends the hashed prefix."""
        end = offset + view.nbytes
        if end <= self._hashed or not self._catch_up(offset):
            return
        self._digest.update(view[self._hashed - offset :])
        self._hashed = end

    def _hash_range(self, start: int, stop: int) -> None:
        """Hash bytes [start, stop) of the file, read with ``pread`` (the position is kept)."""
        while start < stop:
            data = os.pread(self._fd, min(8 * self._PIECE, stop - start), start)
            if not data:
                break
            self._digest.update(data)
            start += len(data)
        self._hashed = max(self._hashed, start)

    def hexdigest(self) -> str:
        """The digest of the whole file: what was never read in order is read and hashed now."""
        self._hash_range(self._hashed, os.fstat(self._fd).st_size)
        return str(self._digest.hexdigest())


def _write_atomically(
    directory: Path,
    final: Path,
    write: Any,
    pool: concurrent.futures.Executor,
    *,
    sha256: bool = True,
    sync_directory: bool = True,
) -> tuple[str | None, int, str | None]:
    """Temp file in ``directory`` -> ``write(fileobj)`` -> flush -> fsync -> rename -> fsync dir
    (unless ``sync_directory`` is False: the caller fsyncs it after a later rename, one journal
    commit for both). Returns (sha256 or None, size, xxh3_128 or None). The temp file is removed
    if anything fails."""
    tmp = directory / f"{_TMP_PREFIX}{final.name}.{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as raw:
            writer = _HashingWriter(raw, pool, sha256=sha256)
            write(writer)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, final)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    if sync_directory:
        _fsync_directory(directory)
    xxh3 = writer.xxh3.hexdigest() if writer.xxh3 is not None else None
    return (writer.sha256.hexdigest() if writer.sha256 is not None else None), writer.size, xxh3


def _resolve_format(fmt: Format) -> str:
    if fmt != "auto":
        return fmt
    # A process that never imported torch holds no tensors: pickle, and do not import torch.
    return "torch" if "torch" in sys.modules else "pickle"


class TrialCheckpointer:
    """Save and resume the training state of one trial, across retries of that trial.

    Args:
        trial: the running ``optuna.trial.Trial``.
        root: directory that holds the checkpoints of all studies.
        keep_last: how many complete checkpoints of the chain to keep (older ones are removed
            after each save).
        keep_on_complete: what :meth:`finalize` does: ``False`` removes the chain's
            checkpoints, ``True`` keeps them, ``"best"`` keeps them only while the trial is
            the best so far (see also :class:`CheckpointCleanupCallback`).
        capture_rng: also save Python/NumPy/torch RNG states and restore them on ``load``.
        format: ``"auto"`` (torch.save when torch is imported, else pickle), ``"torch"`` or
            ``"pickle"``.
        verify: which hashes a local checkpoint gets and which one ``load`` checks (all in
            the same pass as the write and the read): ``"xxh3"`` (default) writes and checks
            only the XXH3-128 (non-cryptographic, enough for torn writes and bit rot; a save
            costs about what a plain save + fsync costs); ``"sha256"`` writes SHA-256 and
            XXH3-128 and checks the SHA-256 (for ``sha256sum``; SHA-256 runs at a fraction of
            disk and page-cache speed, so saves and loads take longer); ``"fast"`` writes both
            and checks the XXH3-128. Old manifests with only a SHA-256 are checked with it.
            Stores always get and check a SHA-256.
        study: the study, when ``trial`` is a FrozenTrial (tools that inspect checkpoints);
            a running Trial knows its study.
        store: an Optuna artifact store or a URL (``file:///shared/dir``,
            ``s3://bucket/prefix``, ``gs://bucket/prefix``) to keep the checkpoints in, so that a
            retry on any host resumes; default ``OPTUNA_GUARD_CHECKPOINT_STORE``, else ``root``.
    """

    def __init__(
        self,
        trial: Any,
        root: str | os.PathLike[str] = "checkpoints",
        keep_last: int = 2,
        *,
        keep_on_complete: bool | Literal["best"] = False,
        capture_rng: bool = False,
        format: Format = "auto",
        verify: Literal["xxh3", "fast", "sha256"] = "xxh3",
        study: Any = None,
        store: Any = None,
    ) -> None:
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ConfigError(f"keep_last must be an integer >= 1 but got {keep_last!r}.")
        if keep_on_complete not in (False, True, "best"):
            raise ConfigError(
                f"keep_on_complete must be False, True or 'best' but got {keep_on_complete!r}."
            )
        if format not in ("auto", "torch", "pickle"):
            raise ConfigError(f"format must be 'auto', 'torch' or 'pickle' but got {format!r}.")
        self._trial = trial
        self.keep_last = keep_last
        self.keep_on_complete = keep_on_complete
        self.capture_rng = capture_rng
        if verify not in ("xxh3", "fast", "sha256"):
            raise ConfigError(f"verify must be 'xxh3', 'fast' or 'sha256' but got {verify!r}.")
        self.verify = verify
        self.format: Format = format
        self.number: int = int(getattr(trial, "number", 0))
        study = getattr(trial, "study", None) or study
        system_attrs = self._system_attrs(trial, study)
        self.retry_history: list[int] = list(system_attrs.get(RETRY_HISTORY, []))
        original = system_attrs.get(FAILED_TRIAL)
        self.original_number: int = int(original) if original is not None else self.number
        self.study_name: str | None = getattr(study, "study_name", None)
        self.directory: Path = chain_directory(root, self.study_name, self.original_number)
        self._chain: ArtifactChain | None = self._artifact_chain(store, trial, study)
        self.resumed_from_step: int | None = None
        self.last_saved_step: int | None = None
        self._last_save_monotonic = time.monotonic()

    def _artifact_chain(self, store: Any, trial: Any, study: Any) -> ArtifactChain | None:
        """The chain in an artifact store (``store=``, else ``OPTUNA_GUARD_CHECKPOINT_STORE``),
        or None for checkpoints under the local ``root``."""
        from optuna_guard import _checkpoint_store as stores

        if store is None:
            store = stores.store_from_env()
            if store is None:
                return None
        elif isinstance(store, str):
            store = stores.open_checkpoint_store(store)
        elif not all(
            callable(getattr(store, m, None)) for m in ("open_reader", "write", "remove")
        ):
            raise ConfigError(
                f"store must be an Optuna artifact store (open_reader/write/remove) or a URL such as "
                f"file:///shared/dir or s3://bucket/prefix, but got {type(store).__name__}."
            )
        if study is None:
            raise ConfigError(
                "a checkpoint store needs the study: pass study= with a FrozenTrial."
            )
        storage = study._storage
        study_id = getattr(study, "_study_id", None)
        chain_ids = [
            storage.get_trial_id_from_study_id_trial_number(study_id, n)
            for n in self.retry_history
        ]
        return stores.ArtifactChain(
            store,
            storage,
            getattr(trial, "_trial_id", None),
            self.number,
            chain_ids,
            name_prefix=f"{_study_dirname(self.study_name)}.trial-{self.original_number}.",
        )

    @staticmethod
    def _system_attrs(trial: Any, study: Any) -> dict[str, Any]:
        """The trial's system attrs from the storage (Optuna 5 removed ``Trial.system_attrs``)."""
        trial_id = getattr(trial, "_trial_id", None)
        if study is not None and trial_id is not None:
            return dict(study._storage.get_trial_system_attrs(trial_id))
        if isinstance(trial, FrozenTrial):
            return dict(trial.system_attrs)
        return {}

    @property
    def location(self) -> str:
        """Where this chain's checkpoints go, for messages."""
        if self._chain is not None:
            return f"{self._chain.url} ({self._chain.name_prefix}*)"
        return str(self.directory)

    def __repr__(self) -> str:
        return (
            f"TrialCheckpointer(trial={self.number}, original={self.original_number}, "
            f"location={self.location!r}, keep_last={self.keep_last})"
        )

    # -- saving ---------------------------------------------------------------------------

    def should_save(
        self, step: int, every: int | None = None, *, every_seconds: float | None = None
    ) -> bool:
        """True when a checkpoint is due: every ``every`` steps, every ``every_seconds``
        seconds, when SIGUSR1 asked for one, or when the trial is asked to stop (so it saves
        before :meth:`save` raises TrialPreempted)."""
        if every is not None and (
            isinstance(every, bool) or not isinstance(every, int) or every < 1
        ):
            raise ConfigError(f"every must be an integer >= 1 but got {every!r}.")
        if preemption.stop_requested() or preemption.consume_checkpoint_request():
            return True
        if step == self.last_saved_step or step == self.resumed_from_step:
            return False
        if every is not None and step % every == 0:
            return True
        return (
            every_seconds is not None
            and time.monotonic() - self._last_save_monotonic >= every_seconds
        )

    def save(self, state: Any, step: int) -> Path | str | None:
        """Write a checkpoint of ``state`` at ``step`` atomically and durably; return the
        payload path (the artifact id with a store). Then, if the trial was asked to stop, tag
        it and raise TrialPreempted (a save is a preemption boundary: the state is safe before
        the trial ends).

        A full disk (ENOSPC, EDQUOT) or a refused upload does not fail the trial: on a full
        disk the older checkpoints that ``keep_last`` lets go are removed first; the save is
        tried once more; if that fails too, a warning is logged (once per trial), nothing is
        left half-written or listed, and None is returned so training goes on. Other OS errors
        raise :class:`CheckpointError`."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ConfigError(f"step must be an integer >= 0 but got {step!r}.")
        path: Path | str | None
        try:
            path = self._save_making_room(state, step)
        except UpdateFinishedTrialError:
            # Another launcher ended this trial (its worker or host was presumed lost) while it
            # ran: the checkpoint would belong to nobody. Training goes on; its end is logged
            # as a lost result by the worker.
            self._warn_taken_over(step)
            path = None
        except OSError as exc:
            message = f"Trial {self.number} could not save checkpoint step {step} in {self.location}: {exc}"
            if preemption.stop_requested():
                _log.error("%s; stopping without it.", message)
                preemption.raise_if_stop_requested(self._trial)
            if not _is_skippable(exc):
                raise CheckpointError(message) from exc
            self._warn_disk_full(message, exc)
            path = None
        if path is not None:
            self._record_step(step)
        preemption.consume_checkpoint_request()
        if preemption.stop_requested():
            _log.warning(
                "Trial %d saved checkpoint step %d before stopping (%s).",
                self.number,
                step,
                preemption.stop_reason(),
            )
            preemption.raise_if_stop_requested(self._trial)
        return path

    def _warn_taken_over(self, step: int) -> None:
        if not getattr(self, "_warned_taken_over", False):
            self._warned_taken_over = True
            _log.warning(
                "Trial %d was ended from outside while it ran (taken over as lost); checkpoint "
                "step %d and later ones are not kept.",
                self.number,
                step,
            )

    def _record_step(self, step: int) -> None:
        """The trial's last saved step, in the storage: a preempted attempt that got further than
        it resumed from made progress, and its retry does not use up --retry (retries.py)."""
        trial_id = getattr(self._trial, "_trial_id", None)
        storage = getattr(self._trial, "storage", None)
        if trial_id is None or storage is None or isinstance(self._trial, FrozenTrial):
            return
        from optuna_guard.retries import CHECKPOINT_STEP

        try:
            storage.set_trial_system_attr(trial_id, CHECKPOINT_STEP, int(step))
        except Exception as exc:  # a bookkeeping write must never fail the save
            _log.debug(
                "Could not record checkpoint step %d of trial %s: %s", step, self.number, exc
            )

    def _save_making_room(self, state: Any, step: int) -> Path | str:
        """``_save``; on a full disk, rotate away what ``keep_last`` allows and retry once; a
        refused upload is retried once as it is."""
        try:
            return self._save(state, step)
        except OSError as exc:
            if _is_upload_error(exc):
                _log.info("Trial %d: %s; retrying once.", self.number, exc)
                return self._save(state, step)
            if not _is_disk_full(exc):
                raise
            freed = self._make_room()
            _log.info(
                "Trial %d: disk full saving checkpoint step %d; removed %d older checkpoint(s) "
                "that keep_last=%d lets go, retrying once.",
                self.number,
                step,
                freed,
                self.keep_last,
            )
            return self._save(state, step)

    def _make_room(self) -> int:
        """Remove the checkpoints the save in progress would rotate away anyway: all but the
        newest ``keep_last - 1`` (but never the only good one: with ``keep_last=1`` a failed
        retry would otherwise leave the chain with nothing to resume from)."""
        keep = max(self.keep_last - 1, 1)
        if self._chain is not None:
            return self._chain.rotate(keep)
        removed = 0
        for info in self.checkpoints()[keep:]:
            for path in (
                info.manifest,
                info.payload,
            ):  # manifest first: never a manifest without payload
                _unlink_quietly(path)
            removed += 1
        if self.directory.is_dir():  # leftovers of crashed saves hold space too
            for entry in self.directory.iterdir():
                if entry.name.startswith(_TMP_PREFIX):
                    _unlink_quietly(entry)
        return removed

    def _warn_disk_full(self, message: str, exc: BaseException) -> None:
        """One warning per trial for checkpoints lost to a full disk or a refused upload."""
        key = (self.study_name, self.number)
        with _disk_full_lock:
            first = key not in _disk_full_warned
            _disk_full_warned[key] = None
            while len(_disk_full_warned) > 1024:
                _disk_full_warned.popitem(last=False)
        if first:
            hint = " Free disk space or lower keep_last." if _is_disk_full(exc) else ""
            _log.warning(
                "%s; the trial goes on without this checkpoint (a retry resumes from the last one "
                "saved).%s Further failures of this trial are logged at DEBUG.",
                message,
                hint,
            )
        else:
            _log.debug("%s; the trial goes on without it.", message)

    def _save(self, state: Any, step: int) -> Path | str:
        fmt = _resolve_format(self.format)
        payload_obj = {
            "state": state,
            "step": step,
            "rng": capture_rng_state() if self.capture_rng else None,
        }
        if self._chain is not None:
            return self._save_to_store(payload_obj, step, fmt)
        started = time.monotonic()
        _makedirs_durable(self.directory)
        stem = f"step-{step:010d}-{uuid.uuid4().hex[:8]}"
        payload = self.directory / f"{stem}{_PAYLOAD_SUFFIX}"
        manifest = self.directory / f"{stem}{_MANIFEST_SUFFIX}"

        write_payload = _serializer(payload_obj, fmt)
        pool = _hash_pool()
        sha256, size, xxh3 = _write_atomically(
            self.directory,
            payload,
            write_payload,
            pool,
            sha256=self.verify != "xxh3",
            sync_directory=False,  # after the manifest's rename: one directory fsync for both
        )
        record = {
            "version": MANIFEST_VERSION,
            "step": step,
            "payload": payload.name,
            **({"sha256": sha256} if sha256 is not None else {}),
            **({"xxh3_128": xxh3} if xxh3 is not None else {}),
            "size": size,
            "format": fmt,
            "rng": self.capture_rng,
            "trial_number": self.number,
            "original_trial_number": self.original_number,
            "study_name": self.study_name,
            "saved_at": time.time(),
            "saved_ns": time.time_ns(),
        }
        encoded = json.dumps(record, indent=1).encode()
        try:
            _write_atomically(
                self.directory, manifest, lambda f: f.write(encoded), pool, sha256=False
            )
        except BaseException:
            _unlink_quietly(
                payload
            )  # a payload without manifest is no checkpoint, only used space
            raise
        self.last_saved_step = step
        self._last_save_monotonic = time.monotonic()
        self._rotate(keep=payload, save_started=time.time() - (time.monotonic() - started))
        _log.debug(
            "Trial %d saved checkpoint step %d (%.1f MB, %s) in %.2f s to %s.",
            self.number,
            step,
            size / MB,
            fmt,
            time.monotonic() - started,
            payload,
        )
        return payload

    def _save_to_store(self, payload_obj: dict[str, Any], step: int, fmt: str) -> str:
        started = time.monotonic()
        write_payload = _serializer(payload_obj, fmt)

        def spool(f: BinaryIO) -> tuple[str, int]:
            writer = _HashingWriter(f, _hash_pool(), durable=False)
            write_payload(writer)
            assert writer.sha256 is not None  # stores always list a SHA-256
            return writer.sha256.hexdigest(), writer.size

        assert self._chain is not None
        saved = self._chain.save(spool, step, fmt, self.keep_last)
        self.last_saved_step = step
        self._last_save_monotonic = time.monotonic()
        _log.debug(
            "Trial %d saved checkpoint step %d (%.1f MB, %s) in %.2f s to %s.",
            self.number,
            step,
            saved.size / MB,
            fmt,
            time.monotonic() - started,
            self._chain.url,
        )
        return saved.artifact_id

    def _rotate(self, keep: Path, save_started: float) -> None:
        """Keep the newest ``keep_last`` complete checkpoints; remove older ones, temp files
        of crashed saves and payloads that have no manifest (older than this save, so a
        payload another process is about to describe is left alone)."""
        complete = self.checkpoints()
        referenced = {info.payload.name for info in complete}
        for info in complete[self.keep_last :]:
            if info.payload == keep:
                continue
            for path in (
                info.manifest,
                info.payload,
            ):  # manifest first: never a manifest without payload
                _unlink_quietly(path)
            referenced.discard(info.payload.name)
        now = time.time()
        for entry in self.directory.iterdir():
            name = entry.name
            if name.startswith(_TMP_PREFIX):
                if now - _mtime(entry) > _STALE_TMP_S:
                    _unlink_quietly(entry)
            elif (
                name.endswith(_PAYLOAD_SUFFIX)
                and name not in referenced
                and entry != keep
                and _mtime(entry) < save_started
            ):
                _unlink_quietly(entry)

    # -- loading --------------------------------------------------------------------------

    def checkpoints(self) -> list[Any]:
        """The chain's checkpoints that have a readable manifest, newest first (not verified):
        :class:`CheckpointInfo` under a local root, ``StoredCheckpoint`` in an artifact store."""
        if self._chain is not None:
            return self._chain.checkpoints()
        if not self.directory.is_dir():
            return []
        found = []
        for manifest in self.directory.glob(f"step-*{_MANIFEST_SUFFIX}"):
            if not _NAME_RE.match(manifest.name[: -len(_MANIFEST_SUFFIX)]):
                continue
            info = _read_manifest(manifest)
            if info is not None:
                found.append(info)
        found.sort(key=lambda info: (info.step, info.saved_ns), reverse=True)
        return found

    def load(self, *, map_location: Any = None) -> tuple[Any, int] | None:
        """The newest good checkpoint of this trial or of the trials it retries, as
        ``(state, step)``; None when there is none. Bad ones (missing manifest, wrong size or
        SHA-256, unreadable) are skipped with a warning. Writes ``resumed_from_step``."""
        if self._chain is not None:
            return self._load_from_store(map_location)
        for info in self.checkpoints():
            payload, problem = _verified_payload(info, map_location, self.verify)
            if problem is not None:
                _log.warning(
                    "Trial %d: checkpoint step %d (%s) %s; skipped, trying the previous one.",
                    self.number,
                    info.step,
                    info.payload.name,
                    problem,
                )
                _quarantine(info)
                continue
            if payload.get("rng") is not None and self.capture_rng:
                restore_rng_state(payload["rng"])
            self.resumed_from_step = info.step
            self._record_resume(info)
            return payload["state"], info.step
        return None

    def _load_from_store(self, map_location: Any) -> tuple[Any, int] | None:
        chain = self._chain
        assert chain is not None
        for item in chain.checkpoints():
            with tempfile.TemporaryFile(prefix="optuna-guard-spool-") as spool:
                problem = chain.download_verified(item, spool)
                payload: Any = None
                if problem is None:
                    spool.seek(0)
                    try:
                        payload = _deserialize(spool, item.format, map_location)
                    except Exception as exc:
                        problem = f"cannot be read ({type(exc).__name__}: {exc})"
                if problem is None and payload.get("step") != item.step:
                    problem = f"is listed as step {item.step} but the payload holds step {payload.get('step')!r}"
            if problem is not None:
                _log.warning(
                    "Trial %d: checkpoint step %d (%s in %s) %s; skipped, trying the previous one.",
                    self.number,
                    item.step,
                    item.artifact_id,
                    chain.url,
                    problem,
                )
                chain.forget(item)
                continue
            if payload.get("rng") is not None and self.capture_rng:
                restore_rng_state(payload["rng"])
            self.resumed_from_step = item.step
            self._record_resume(item)
            return payload["state"], item.step
        return None

    def _record_resume(self, info: Any) -> None:
        origin = "its own" if info.trial_number == self.number else f"trial {info.trial_number}'s"
        _log.info("Trial %d resumes from step %d (%s checkpoint).", self.number, info.step, origin)
        set_user_attr = getattr(self._trial, "set_user_attr", None)
        if set_user_attr is not None and not isinstance(self._trial, FrozenTrial):
            set_user_attr(tags.RESUMED_FROM_STEP, info.step)

    # -- cleanup --------------------------------------------------------------------------

    def finalize(self, value: float | None = None) -> bool:
        """Call when the trial completed: remove the chain's checkpoints unless
        ``keep_on_complete`` says to keep them. With ``"best"``, they are kept when ``value``
        is at least as good as the study's best so far (or when ``value`` is not given; then
        :class:`CheckpointCleanupCallback` removes them once another trial is better).
        Returns True when the checkpoints were removed."""
        if self.keep_on_complete is True:
            return False
        if self.keep_on_complete == "best" and (value is None or self._is_best_so_far(value)):
            return False
        if self._chain is not None:
            return self._chain.remove_all()
        return remove_directory(self.directory)

    def _is_best_so_far(self, value: float) -> bool:
        study = getattr(self._trial, "study", None)
        if study is None or len(study.directions) != 1:
            return True
        try:
            best = study.best_value
        except ValueError:  # no complete trial yet
            return True
        maximize = study.direction.name == "MAXIMIZE"
        return bool(value >= best if maximize else value <= best)

    def __enter__(self) -> TrialCheckpointer:
        return self

    def __exit__(self, exc_type: Any, exc: Any, _tb: Any) -> None:
        """Leaving the block normally means the objective is about to return: finalize.
        Leaving by an exception (pruned, killed, preempted) keeps them for the retry."""
        if exc_type is None:
            self.finalize()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return time.time()


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _quarantine(info: CheckpointInfo) -> None:
    """Rename a bad checkpoint's manifest to ``*.json.corrupt``: kept for inspection, no
    longer counted as a checkpoint (so it neither shadows good ones nor uses a rotation slot)."""
    try:
        os.replace(info.manifest, info.manifest.with_name(info.manifest.name + ".corrupt"))
    except OSError:
        pass


def remove_directory(directory: Path) -> bool:
    if not directory.is_dir():
        return False
    shutil.rmtree(directory, ignore_errors=True)
    return not directory.exists()


def _read_manifest(path: Path) -> CheckpointInfo | None:
    try:
        record = json.loads(path.read_text())
        payload = path.with_name(str(record["payload"]))
        if payload.parent != path.parent or "/" in record["payload"]:
            raise ValueError("payload outside the checkpoint directory")
        return CheckpointInfo(
            step=int(record["step"]),
            payload=payload,
            manifest=path,
            sha256=_manifest_hashes(record),
            size=int(record["size"]),
            format=str(record["format"]),
            trial_number=int(record.get("trial_number", -1)),
            saved_ns=int(record.get("saved_ns", 0)),
            xxh3_128=str(record["xxh3_128"]) if record.get("xxh3_128") else None,
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _log.warning("Checkpoint manifest %s is unreadable (%s); skipped.", path, exc)
        return None


def _manifest_hashes(record: dict[str, Any]) -> str:
    """The manifest's SHA-256 ("" when it only has an XXH3-128); a manifest with neither is unreadable."""
    if not record.get("sha256") and not record.get("xxh3_128"):
        raise KeyError("sha256")
    return str(record.get("sha256") or "")


def _precheck(info: CheckpointInfo) -> str | None:
    """The cheap checks: the payload exists, has the manifest's size and a known format."""
    try:
        size = info.payload.stat().st_size
    except FileNotFoundError:
        return "has no payload file"
    if size != info.size:
        return f"is truncated or overwritten ({size} bytes, manifest says {info.size})"
    if info.format not in ("torch", "pickle"):
        return f"has unknown format {info.format!r}"
    named = _NAME_RE.match(info.payload.name[: -len(_PAYLOAD_SUFFIX)])
    if named is None or int(named.group(1)) != info.step:
        return f"has a manifest that says step {info.step} but the payload is named {info.payload.name}"
    return None


def _verified_payload(
    info: CheckpointInfo, map_location: Any, verify: str = "xxh3"
) -> tuple[Any, str | None]:
    """Deserialize a checkpoint through a :class:`_HashingReader`, which hashes the bytes as
    the deserializer reads them (one pass over the file); the result is used only if the hash
    then matches the manifest. (A corrupted file of the right size at worst makes the
    deserializer fail or build a state that is thrown away.) The XXH3-128 is checked when the
    manifest has one, unless ``verify="sha256"`` and it also has a SHA-256; otherwise the
    SHA-256 (manifests written before XXH3-128 was added)."""
    problem = _precheck(info)
    if problem is not None:
        return None, problem
    use_xxh3 = bool(info.xxh3_128) and (verify != "sha256" or not info.sha256)
    fast = _fast_hash() if use_xxh3 else None
    if use_xxh3 and fast is None:
        return None, "has only an XXH3-128 in its manifest and the xxhash package is not installed"
    if fast is not None:
        expected, algorithm, digest = info.xxh3_128, "XXH3-128", fast.xxh3_128()
    else:
        expected, algorithm, digest = info.sha256, "SHA-256", hashlib.sha256()
    payload: Any = None
    error: Exception | None = None
    try:
        with open(info.payload, "rb") as raw:
            reader = _HashingReader(raw, digest)
            try:
                payload = _deserialize(reader, info.format, map_location)
            except Exception as exc:
                error = exc
            matches = reader.hexdigest() == expected
    except OSError as exc:
        return None, f"cannot be read ({exc})"
    if not matches:
        return None, f"is corrupted ({algorithm} does not match its manifest)"
    if error is not None:
        return None, f"cannot be read ({type(error).__name__}: {error})"
    if payload.get("step") != info.step:  # the manifest was edited: it is not trusted
        return (
            None,
            f"has a manifest that says step {info.step} but the payload holds step {payload.get('step')!r}",
        )
    return payload, None


def _serializer(payload_obj: dict[str, Any], fmt: str) -> Any:
    """A function writing ``payload_obj`` to a binary file object in format ``fmt``."""
    if fmt == "torch":
        import torch

        def write_payload(f: Any) -> None:
            torch.save(payload_obj, f)
    else:

        def write_payload(f: Any) -> None:
            pickle.dump(payload_obj, f, protocol=pickle.HIGHEST_PROTOCOL)

    return write_payload


def _deserialize(source: Any, fmt: str, map_location: Any) -> dict[str, Any]:
    """A payload from a path (torch) or a binary file object (either format)."""
    if fmt == "torch":
        import torch

        # Our own verified file; it may hold RNG states and arbitrary picklables.
        payload = torch.load(source, map_location=map_location, weights_only=False)
    elif fmt == "pickle":
        payload = pickle.load(source)
    else:
        raise CheckpointError(f"unknown format {fmt!r}")
    if not isinstance(payload, dict) or "state" not in payload:
        raise CheckpointError("payload is not an optuna-guard checkpoint")
    return payload


def _chain_finished(trial: FrozenTrial) -> bool:
    """The last trial of a chain that will not be retried again."""
    if trial.state == TrialState.COMPLETE:
        return True
    if trial.user_attrs.get(tags.RETRIES_EXHAUSTED):
        return True
    # Pruned by a pruner (no kill/crash/preemption tag): nothing will retry it.
    return trial.state == TrialState.PRUNED and not end_reasons(trial.user_attrs)


class CheckpointCleanupCallback:
    """A ``study.optimize`` callback that removes the checkpoints of finished retry chains.

    A chain is finished when its last trial COMPLETEd, was pruned by a pruner, or is tagged
    ``retries_exhausted``. Chains that may still be retried (killed, crashed, preempted
    trials) and running ones are left alone. With ``keep_best=True`` the checkpoints of the
    best trial (the Pareto front for multi-objective studies) are kept.

    Args:
        root: The local checkpoint directory (the one the trials saved under); its per-study
            ``trial-<n>`` chain directories are removed. Unused when a store is in effect.
        keep_best: Keep the checkpoints of the best trial (or of the Pareto front).
        store: An artifact store, or a checkpoint-store URL (``file://``, ``s3://``, ``gs://``)
            to open one, whose checkpoints listed in the trials' system attrs are removed
            instead of ``root``'s directories. By default the store
            ``OPTUNA_GUARD_CHECKPOINT_STORE`` names, if set.

    Raises:
        ConfigError: ``store`` (or ``OPTUNA_GUARD_CHECKPOINT_STORE``) is a URL that cannot be
            opened.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] = "checkpoints",
        *,
        keep_best: bool = False,
        store: Any = None,
    ) -> None:
        from optuna_guard import _checkpoint_store as stores

        self.root = Path(root)
        self.keep_best = keep_best
        if isinstance(store, str):
            store = stores.open_checkpoint_store(store)
        self.store: ArtifactStore | None = store if store is not None else stores.store_from_env()
        self._removed_chains: set[int] = set()

    def __call__(self, study: Any, trial: FrozenTrial) -> None:
        if not trial.state.is_finished():
            return
        if self.store is not None:
            self._clean_store(study)
            return
        study_dir = self.root / _study_dirname(study.study_name)
        if not study_dir.is_dir():
            return
        present = {
            p.name for p in study_dir.iterdir() if p.is_dir() and p.name.startswith("trial-")
        }
        if not present:
            return
        finished: set[int] = set()
        unfinished: set[int] = set()
        for t in study.get_trials(deepcopy=False):
            original = original_trial_number(t)
            if not t.state.is_finished():
                unfinished.add(original)
            elif _chain_finished(t):
                finished.add(original)
        keep = set(unfinished)
        if self.keep_best:
            keep |= {original_trial_number(t) for t in _best_trials(study)}
        for original in sorted(finished - keep):
            name = f"trial-{original}"
            if name in present and remove_directory(study_dir / name):
                _log.debug("Removed the checkpoints of finished trial chain %d.", original)

    def _clean_store(self, study: Any) -> None:
        """Artifact-store mode: remove the listed checkpoints of finished chains (once each)."""
        assert self.store is not None
        from optuna_guard._checkpoint_store import (
            CHECKPOINTS_ATTR,
            StoredCheckpoint,
            _is_not_found,
        )

        trials = study.get_trials(deepcopy=False)
        listed: dict[int, list[str]] = {}
        finished: set[int] = set()
        unfinished: set[int] = set()
        for t in trials:
            original = original_trial_number(t)
            if not t.state.is_finished():
                unfinished.add(original)
            elif _chain_finished(t):
                finished.add(original)
            for record in t.system_attrs.get(CHECKPOINTS_ATTR) or []:
                item = StoredCheckpoint.from_record(record)
                if item is not None:
                    listed.setdefault(original, []).append(item.artifact_id)
        keep = set(unfinished)
        if self.keep_best:
            keep |= {original_trial_number(t) for t in _best_trials(study)}
        for original in sorted(finished - keep - self._removed_chains):
            for artifact_id in listed.get(original, []):
                try:
                    self.store.remove(artifact_id)
                except Exception as exc:
                    if not _is_not_found(exc):
                        _log.warning("Could not remove checkpoint %s: %s", artifact_id, exc)
            self._removed_chains.add(original)


def _best_trials(study: Any) -> list[FrozenTrial]:
    try:
        if len(study.directions) == 1:
            return [study.best_trial]
        return list(study.best_trials)
    except ValueError:
        return []
