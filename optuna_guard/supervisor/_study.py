"""Opening the study storage with bounded connect times, creating or checking the study,
and building samplers/pruners from their CLI names (shared by supervisor and workers)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar, cast

import optuna

from optuna_guard._logging import get_logger
from optuna_guard.exceptions import ConfigError, StorageUnavailableError
from optuna_guard.storage import mask_url as mask_url  # re-exported: launcher, storage-proxy
from optuna_guard.storage import open_storage, resolve_url

_log = get_logger(__name__)

T = TypeVar("T")

resolve_storage_url = resolve_url  # the launcher's name: the URL every process uses


def engine_kwargs_for(url: str, connect_timeout: float) -> dict[str, Any]:
    """Connect timeouts so an unreachable server is an error within seconds, not minutes."""
    timeout = max(1, round(connect_timeout))
    if url.startswith("postgresql"):
        return {"connect_args": {"connect_timeout": timeout}}
    if url.startswith(
        ("mysql", "redis", "rediss")
    ):  # Redis: open_storage turns it into socket timeouts
        return {"connect_args": {"connect_timeout": timeout}}
    return {}


def probe_connection(url: str, timeout: float, deadline_s: float | None = None) -> None:
    """Connect once with strict timeouts (handshake reads included) so a silent server cannot
    hang the launch. Errors that retrying cannot fix (bad URL, unknown host, authentication,
    unknown database, missing driver) are a one-line ConfigError at once; transient ones
    (refused, terminated, too many connections, server starting) are retried with backoff for
    up to ``deadline_s`` seconds (``--storage-deadline``), then StorageUnavailableError."""
    from optuna_guard._storage_urls import is_rdb_url

    if "://" not in url:
        raise ConfigError(
            f"storage URL {url!r} is not a database URL; use e.g. sqlite:///study.db, "
            "postgresql+psycopg://user@host/db, journal:///path/study.log, redis://host:6379/0 or grpc://host:13000"
        )
    if url.startswith("sqlite"):
        return
    probe = _probe_once if is_rdb_url(url) else _probe_url_storage_once
    _with_start_retries(url, lambda: probe(url, timeout), deadline_s, "connecting to the storage")


def _probe_url_storage_once(url: str, timeout: float) -> None:
    """Journal, Redis and gRPC storages: open once (Redis: connect and read the journal) and,
    for a gRPC proxy, wait up to ``timeout`` for it to answer."""
    from optuna_guard._storage_urls import url_kind

    if url_kind(url) == "journal":
        check_writable_dir(os.path.dirname(url.split("://", 1)[1]), "--storage")
    storage = open_storage(url, engine_kwargs={"connect_args": {"connect_timeout": timeout}})
    if url_kind(url) == "grpc":
        proxy = cast(optuna.storages.GrpcStorageProxy, storage)  # what grpc:// URLs open
        try:
            proxy.wait_server_ready(timeout=max(1.0, timeout))
            proxy.get_all_studies()
        finally:
            proxy.close()


def _probe_once(url: str, timeout: float) -> None:
    """One connection attempt in a thread with a hard deadline (some drivers block past their
    own timeouts); raises what the driver raised, or TimeoutError."""
    import threading

    import sqlalchemy

    seconds = max(1, round(timeout))
    connect_args: dict[str, Any] = {"connect_timeout": seconds}
    if url.startswith("mysql"):
        connect_args.update(read_timeout=seconds, write_timeout=seconds)
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            engine = sqlalchemy.create_engine(
                url, connect_args=connect_args, poolclass=sqlalchemy.pool.NullPool
            )
            try:
                with engine.connect() as connection:
                    connection.execute(sqlalchemy.text("SELECT 1"))
            finally:
                engine.dispose()
            outcome.append(None)
        except BaseException as exc:  # reported by the caller
            outcome.append(exc)

    thread = threading.Thread(target=attempt, name="optuna-guard-storage-probe", daemon=True)
    thread.start()
    thread.join(seconds + 3.0)
    if not outcome:
        raise TimeoutError(f"no answer within {seconds + 3:.0f}s")
    if outcome[0] is not None:
        raise outcome[0]


def _with_start_retries(url: str, call: Callable[[], T], deadline_s: float | None, what: str) -> T:
    """``call()``, with permanent storage errors turned into one-line ConfigErrors and transient
    ones retried (logged once per outage, with its duration) until ``deadline_s``."""
    from optuna_guard.resilience import (
        StorageRetrySettings,
        call_with_retry,
        is_transient_db_error,
    )

    try:
        if deadline_s is None:
            return call()
        return call_with_retry(
            call, settings=StorageRetrySettings(deadline_s=deadline_s), what=what
        )
    except ConfigError:
        raise
    except StorageUnavailableError as exc:  # still transient at the deadline
        raise StorageUnavailableError(f"cannot reach storage {mask_url(url)}: {exc}") from None
    except ImportError as exc:
        raise ConfigError(
            f"storage {mask_url(url)}: the database driver is not installed ({exc.__cause__ or exc}); "
            "install optuna-guard[postgres] or optuna-guard[mysql]."
        ) from None
    except Exception as exc:
        if _is_bad_url(exc):
            raise ConfigError(
                f"storage URL {mask_url(url)} is invalid: {_first_line(exc)}."
            ) from None
        if is_transient_db_error(exc) or isinstance(exc, TimeoutError):
            raise StorageUnavailableError(
                f"cannot reach storage {mask_url(url)}: {_first_line(exc)}; the server may be down "
                f"(retried for {deadline_s or 0:g}s, --storage-deadline)."
            ) from None
        raise ConfigError(
            f"cannot use storage {mask_url(url)}: {_first_line(exc)}; check --storage."
        ) from None


def _is_bad_url(exc: BaseException) -> bool:
    import sqlalchemy.exc

    return isinstance(exc, (sqlalchemy.exc.ArgumentError, ValueError)) and not isinstance(
        exc, ConfigError
    )


def open_checked_storage(
    url: str,
    *,
    connect_timeout: float = 5.0,
    heartbeat_interval: int | None = None,
    heartbeat_grace: int | None = None,
    skip_setup: bool = False,
    deadline_s: float | None = None,
) -> optuna.storages.BaseStorage:
    """open_storage (Optuna's RDBStorage queries the database in its constructor, JournalStorage
    reads the journal), with transient errors retried until ``deadline_s`` and the rest as
    one-line errors. Journal, Redis and gRPC storages have no Optuna heartbeat: the heartbeat
    options are ignored for them."""

    def attempt() -> optuna.storages.BaseStorage:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return open_storage(
                url,
                heartbeat_interval=heartbeat_interval,
                grace_period=heartbeat_grace if heartbeat_interval else None,
                engine_kwargs=engine_kwargs_for(url, connect_timeout),
                skip_setup=skip_setup,
            )

    return _with_start_retries(url, attempt, deadline_s, "opening the storage")


def _first_line(exc: BaseException) -> str:
    """The most specific message in the chain (Optuna wraps the driver's error in its own)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()
    return text[0] if text else type(orig).__name__


def create_or_check_study(
    storage: optuna.storages.BaseStorage, study_name: str, directions: Sequence[str]
) -> optuna.Study:
    """Create the study if missing; an existing study with other directions is a ConfigError.
    A new study says which way it optimizes: minimize is Optuna's default, and an accuracy
    minimized by mistake looks like a working study."""
    check_study_name(study_name)
    try:
        storage.get_study_id_from_name(study_name)
        is_new = False
    except KeyError:
        is_new = True
    try:
        study = optuna.create_study(
            study_name=study_name,
            storage=storage,
            # LaunchConfig checked each is "minimize" or "maximize"
            directions=cast("list[Literal['minimize', 'maximize']]", list(directions)),
            load_if_exists=True,
        )
    except optuna.exceptions.StorageInternalError as exc:  # transient ones were retried below us
        raise ConfigError(
            f"cannot create study {study_name[:60]!r}: {_first_line(exc)}."
        ) from None
    existing = [d.name.lower() for d in study.directions]
    if existing != [d.lower() for d in directions]:
        raise ConfigError(
            f"study {study_name!r} already exists with direction {','.join(existing)} but "
            f"--direction {','.join(directions)} was given; use the study's direction or another --study-name."
        )
    if is_new:
        _log.info("New study %r: %s.", study_name, describe_directions(existing))
    return study


def describe_directions(directions: Sequence[str]) -> str:
    """ "minimizing; pass --direction maximize if your objective is a score" and the like."""
    words = ["minimizing" if d == "minimize" else "maximizing" for d in directions]
    if len(words) == 1:
        hint = (
            "pass --direction maximize if your objective is a score"
            if words[0] == "minimizing"
            else "pass --direction minimize if your objective is a loss"
        )
        return f"{words[0]}; {hint}"
    return f"{', '.join(words)} ({len(words)} objectives, in the order the objective returns them)"


def check_writable_dir(path: str, option: str) -> None:
    """A directory we will create or write into, checked without creating it (so a failed
    launch leaves nothing behind)."""
    import os

    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ConfigError(f"{option} {path!r} is not usable: {probe!r} is not a directory.")
    import tempfile

    try:  # os.access says yes to root everywhere (even /proc): try it, leave nothing behind
        os.rmdir(tempfile.mkdtemp(prefix=".optuna-guard-check-", dir=probe))
    except OSError as exc:
        raise ConfigError(
            f"{option} {path!r} is not writable ({probe!r}: {exc.strerror}); choose another directory."
        ) from None


MAX_STUDY_NAME_LENGTH = 512  # optuna's studies.study_name column (MAX_INDEXED_STRING_LENGTH)


def check_study_name(study_name: str) -> None:
    """Names longer than Optuna's column fail inside the database driver with a traceback."""
    if not study_name:
        raise ConfigError("--study-name is empty; give the study a name.")
    if len(study_name) > MAX_STUDY_NAME_LENGTH:
        raise ConfigError(
            f"--study-name is {len(study_name)} characters long; Optuna stores at most "
            f"{MAX_STUDY_NAME_LENGTH} (study names are indexed); use a shorter name."
        )


def is_factory_spec(name: str | None) -> bool:
    """``module:factory`` or ``file.py:factory`` (names never contain a colon)."""
    return name is not None and ":" in name


def make_sampler(name: str | None, seed: int | None) -> optuna.samplers.BaseSampler | None:
    """A sampler from its CLI name, or from ``module:factory`` / ``file.py:factory`` (called
    with ``seed=`` when it takes one); None means Optuna's default."""
    if name is None:
        return optuna.samplers.TPESampler(seed=seed) if seed is not None else None
    if is_factory_spec(name):
        sampler: optuna.samplers.BaseSampler = _from_factory(
            "--sampler", name, optuna.samplers.BaseSampler, "an Optuna sampler", seed=seed
        )  # an instance of that class: _from_factory checked it
        return sampler
    key = name.lower()
    samplers = optuna.samplers
    try:
        if key == "tpe":
            return samplers.TPESampler(seed=seed)
        if key == "random":
            return samplers.RandomSampler(seed=seed)
        if key == "cmaes":
            return samplers.CmaEsSampler(seed=seed)
        if key == "gp":
            return samplers.GPSampler(seed=seed)
        if key == "qmc":
            return samplers.QMCSampler(seed=seed)
        if key == "nsgaii":
            return samplers.NSGAIISampler(seed=seed)
        if key == "nsgaiii":
            return samplers.NSGAIIISampler(seed=seed)
        if key == "bruteforce":
            return samplers.BruteForceSampler(seed=seed)
    except ImportError as exc:
        raise ConfigError(
            f"--sampler {name}: a dependency is missing ({exc}); install it or pick another sampler."
        ) from None
    raise ConfigError(
        f"--sampler {name!r} is unknown; use a sampler name, module:factory or file.py:factory."
    )


def make_pruner(name: str | None) -> optuna.pruners.BasePruner | None:
    """A pruner from its CLI name (default arguments), or from ``module:factory`` /
    ``file.py:factory`` for anything with arguments or wrapped (``MemoryGuardPruner``,
    ``DivergencePruner``); None means Optuna's default."""
    if name is None:
        return None
    if is_factory_spec(name):
        pruner: optuna.pruners.BasePruner = _from_factory(
            "--pruner", name, optuna.pruners.BasePruner, "an Optuna pruner"
        )  # an instance of that class: _from_factory checked it
        return pruner
    key = name.lower()
    pruners = optuna.pruners
    if key == "median":
        return pruners.MedianPruner()
    if key in ("nop", "none"):
        return pruners.NopPruner()
    if key == "percentile":
        return pruners.PercentilePruner(25.0)
    if key == "hyperband":
        return pruners.HyperbandPruner()
    if key == "successive-halving":
        return pruners.SuccessiveHalvingPruner()
    if key == "threshold":
        raise ConfigError(
            "--pruner threshold needs bounds; pass a factory instead: --pruner file.py:make_pruner."
        )
    raise ConfigError(
        f"--pruner {name!r} is unknown; use a pruner name, module:factory or file.py:factory."
    )


def _from_factory(option: str, spec: str, kind: type, what: str, **kwargs: Any) -> Any:
    """Load ``spec`` with the objective's loader and call it (a class or a function); an
    instance named directly is taken as it is. The result must be an instance of ``kind``."""
    from optuna_guard.supervisor._objective_spec import load_callable

    label = f"{option} {spec!r}"
    try:
        target = load_callable(spec, label=label, what=f"a function returning {what}")
    except ConfigError as exc:
        if "names a" not in str(exc):
            raise
        target = _attribute(spec)  # e.g. module:SAMPLER, an instance (instances are not callable)
    if isinstance(target, kind):
        return target
    call_kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if call_kwargs and not _accepts(target, call_kwargs):
        _log.warning(
            "%s: %s takes no %s argument; --seed is not passed to it.",
            option,
            spec,
            ", ".join(call_kwargs),
        )
        call_kwargs = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            made = target(**call_kwargs)
    except Exception as exc:
        raise ConfigError(
            f"{label}: calling it failed: {type(exc).__name__}: {' '.join(str(exc).split())}"
        ) from None
    if not isinstance(made, kind):
        raise ConfigError(f"{label} returned {type(made).__name__}, not {what}.")
    return made


def _attribute(spec: str) -> Any:
    from optuna_guard.supervisor._objective_spec import (
        _load_file,
        _load_module,
        is_file_target,
        split_spec,
    )

    target, attr = split_spec(spec)
    obj = _load_file(target, spec) if is_file_target(target) else _load_module(target, spec)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _accepts(func: Any, kwargs: dict[str, Any]) -> bool:
    import inspect

    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return True  # a builtin or C class: try it
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return True
    return all(name in params for name in kwargs)
