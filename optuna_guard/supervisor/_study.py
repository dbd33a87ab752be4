"""Opening the study storage with bounded connect times, creating or checking the study,
and building samplers/pruners from their CLI names (shared by supervisor and workers)."""

from __future__ import annotations

import importlib
import re
import warnings
from typing import Any, Sequence

import optuna

from optuna_guard._logging import get_logger
from optuna_guard.exceptions import ConfigError, StorageUnavailableError
from optuna_guard.storage import default_storage_url, open_storage

_log = get_logger(__name__)


def mask_url(url: str) -> str:
    """The storage URL with any password replaced, for logs and error messages."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def engine_kwargs_for(url: str, connect_timeout: float) -> dict[str, Any]:
    """Connect timeouts so an unreachable server is an error within seconds, not minutes."""
    timeout = max(1, int(round(connect_timeout)))
    if url.startswith("postgresql"):
        return {"connect_args": {"connect_timeout": timeout}}
    if url.startswith("mysql"):
        return {"connect_args": {"connect_timeout": timeout}}
    return {}


def resolve_storage_url(url: str | None) -> str:
    return url or default_storage_url()


def probe_connection(url: str, timeout: float) -> None:
    """Connect once with strict timeouts (handshake reads included) so an unreachable or silent
    server is a one-line StorageUnavailableError within about ``timeout`` seconds. Runs in a
    thread with a hard deadline because some drivers can still block past their own timeouts."""
    if "://" not in url:
        raise ConfigError(
            f"storage URL {url!r} is not a database URL; use e.g. sqlite:///study.db or "
            "postgresql+psycopg://user@host/db"
        )
    if url.startswith("sqlite"):
        return
    import threading

    import sqlalchemy

    seconds = max(1, int(round(timeout)))
    connect_args: dict[str, Any] = {"connect_timeout": seconds}
    if url.startswith("mysql"):
        connect_args.update(read_timeout=seconds, write_timeout=seconds)
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            engine = sqlalchemy.create_engine(url, connect_args=connect_args, poolclass=sqlalchemy.pool.NullPool)
            try:
                with engine.connect() as connection:
                    connection.execute(sqlalchemy.text("SELECT 1"))
            finally:
                engine.dispose()
            outcome.append(None)
        except BaseException as exc:  # reported below
            outcome.append(exc)

    thread = threading.Thread(target=attempt, name="optuna-guard-storage-probe", daemon=True)
    thread.start()
    thread.join(seconds + 3.0)
    if not outcome:
        raise StorageUnavailableError(
            f"cannot reach storage {mask_url(url)}: no answer within {seconds + 3:.0f}s; check --storage and that the server is running."
        )
    error = outcome[0]
    if error is None:
        return
    if isinstance(error, ImportError):
        raise ConfigError(
            f"storage {mask_url(url)}: the database driver is not installed ({error}); "
            "install optuna-guard[postgres] or optuna-guard[mysql]."
        )
    if isinstance(error, sqlalchemy.exc.ArgumentError):
        raise ConfigError(f"storage URL {mask_url(url)} is invalid: {_first_line(error)}.")
    raise StorageUnavailableError(
        f"cannot reach storage {mask_url(url)}: {_first_line(error)}; check --storage and that the server is running."
    )


def open_checked_storage(
    url: str,
    *,
    connect_timeout: float = 5.0,
    heartbeat_interval: int | None = None,
    heartbeat_grace: int | None = None,
    skip_setup: bool = False,
) -> optuna.storages.RDBStorage:
    """open_storage, turning "cannot connect" into a one-line StorageUnavailableError."""
    import sqlalchemy.exc

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return open_storage(
                url,
                heartbeat_interval=heartbeat_interval,
                grace_period=heartbeat_grace if heartbeat_interval else None,
                engine_kwargs=engine_kwargs_for(url, connect_timeout),
                skip_setup=skip_setup,
            )
    except ConfigError:
        raise
    except ImportError as exc:
        raise ConfigError(
            f"storage {mask_url(url)}: the database driver is not installed ({exc.__cause__ or exc}); "
            "install optuna-guard[postgres] or optuna-guard[mysql]."
        ) from None
    except (sqlalchemy.exc.SQLAlchemyError, OSError) as exc:
        raise StorageUnavailableError(
            f"cannot reach storage {mask_url(url)}: {_first_line(exc)}; check --storage and that the server is running."
        ) from None


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()
    return text[0] if text else type(orig).__name__


def create_or_check_study(
    storage: optuna.storages.BaseStorage, study_name: str, directions: Sequence[str]
) -> optuna.Study:
    """Create the study if missing; an existing study with other directions is a ConfigError."""
    study = optuna.create_study(
        study_name=study_name,
        storage=storage,
        directions=list(directions),
        load_if_exists=True,
    )
    existing = [d.name.lower() for d in study.directions]
    if existing != [d.lower() for d in directions]:
        raise ConfigError(
            f"study {study_name!r} already exists with direction {','.join(existing)} but "
            f"--direction {','.join(directions)} was given; use the study's direction or another --study-name."
        )
    return study


def make_sampler(name: str | None, seed: int | None) -> optuna.samplers.BaseSampler | None:
    """A sampler from its CLI name (or ``module:factory``); None means Optuna's default."""
    if name is None:
        return optuna.samplers.TPESampler(seed=seed) if seed is not None else None
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
        raise ConfigError(f"--sampler {name}: a dependency is missing ({exc}); install it or pick another sampler.") from None
    module_name, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"--sampler {name!r} cannot be loaded ({exc}); use a known name or module:factory.") from None
    sampler = factory(seed=seed) if seed is not None else factory()
    if not isinstance(sampler, optuna.samplers.BaseSampler):
        raise ConfigError(f"--sampler {name!r} did not return an Optuna sampler but {type(sampler).__name__}.")
    return sampler


def make_pruner(name: str | None) -> optuna.pruners.BasePruner | None:
    if name is None:
        return None
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
        raise ConfigError("--pruner threshold needs bounds; pass a pruner in your objective's study instead.")
    raise ConfigError(f"--pruner {name!r} is unknown.")
