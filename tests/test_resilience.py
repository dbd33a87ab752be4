"""ResilientStorage and call_with_retry: backoff on a fake clock, transient-vs-permanent
classification, writes whose first attempt committed before the connection dropped, heartbeats
kept working, and one real PostgreSQL restart in the middle of a study."""

from __future__ import annotations

import logging
import os
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import optuna
import pytest
import sqlalchemy
import sqlalchemy.exc as sa_exc
from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled
from optuna.trial import TrialState

from optuna_guard.exceptions import ConfigError, StorageUnavailableError
from optuna_guard.resilience import (
    ResilientStorage,
    StorageRetrySettings,
    call_with_retry,
    is_transient_db_error,
)
from optuna_guard.storage import open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = [
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings(
        "ignore:Heartbeat of storage is supposed to be used with Study.optimize"
    ),
]

POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


class FakeClock:
    """time.monotonic and time.sleep for StorageRetrySettings: sleeping advances the clock."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def settings(self, **kwargs: Any) -> StorageRetrySettings:
        kwargs.setdefault("random", lambda: 0.0)
        return StorageRetrySettings(clock=self.clock, sleep=self.sleep, **kwargs)


def _dropped_connection() -> Exception:
    """What RDBStorage raises when the server went away: StorageInternalError from an
    sqlalchemy OperationalError from the driver's error."""
    driver = ConnectionResetError("server closed the connection unexpectedly")
    sa_error = sa_exc.OperationalError("COMMIT", {}, driver)
    error = optuna.exceptions.StorageInternalError("An exception is raised during the commit.")
    error.__cause__ = sa_error
    return error


def _failing(
    times: int, result: Any = 42, error: Callable[[], Exception] = _dropped_connection
) -> Callable[[], Any]:
    calls = {"n": 0}

    def fn() -> Any:
        calls["n"] += 1
        if calls["n"] <= times:
            raise error()
        return result

    fn.calls = calls  # type: ignore[attr-defined]
    return fn


# -- backoff on a fake clock ------------------------------------------------------------------


def test_transient_errors_are_retried_with_exponential_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeClock()
    fn = _failing(4)
    with caplog.at_level(logging.INFO, logger="optuna_guard"):
        assert (
            call_with_retry(
                fn, settings=fake.settings(initial_backoff_s=0.5, max_backoff_s=2.0), what="tell"
            )
            == 42
        )
    assert fn.calls["n"] == 5  # type: ignore[attr-defined]
    # 0.5 * 2**k capped at 2.0, times the jitter factor 0.5 (random() == 0)
    assert fake.sleeps == [0.25, 0.5, 1.0, 1.0]
    messages = [r.getMessage() for r in caplog.records]
    began = [m for m in messages if m.startswith("Storage outage began")]
    back = [m for m in messages if m.startswith("Storage back after")]
    assert len(began) == 1 and "tell failed with OperationalError" in began[0]
    assert "server closed the connection unexpectedly" in began[0]
    assert back == ["Storage back after 2.8 s (tell succeeded)."]


def test_jitter_stays_between_half_and_full_backoff() -> None:
    fake = FakeClock()
    values = iter([0.0, 0.999, 0.5, 0.25, 0.75, 0.1])
    settings = fake.settings(initial_backoff_s=1.0, max_backoff_s=8.0, random=lambda: next(values))
    call_with_retry(_failing(6), settings=settings)
    bases = [1, 2, 4, 8, 8, 8]
    for slept, base in zip(fake.sleeps, bases):
        assert 0.5 * base <= slept < base
    assert fake.sleeps[1] == pytest.approx(2 * (0.5 + 0.5 * 0.999))


def test_deadline_gives_storage_unavailable() -> None:
    fake = FakeClock()
    fn = _failing(10**6)
    with pytest.raises(StorageUnavailableError) as info:
        call_with_retry(
            fn,
            settings=fake.settings(deadline_s=30, initial_backoff_s=1, max_backoff_s=4),
            what="ask",
        )
    assert sum(fake.sleeps) == pytest.approx(30)  # the last wait is cut to the deadline
    message = str(info.value)
    assert "\n" not in message and "deadline 30 s" in message and "ask failed" in message
    assert isinstance(info.value.__cause__, optuna.exceptions.StorageInternalError)


@pytest.mark.parametrize(
    "error",
    [
        lambda: ValueError("bad value"),
        lambda: optuna.exceptions.UpdateFinishedTrialError("Trial#3 has already finished"),
        lambda: KeyError("No study with id 7"),
        lambda: optuna.exceptions.DuplicatedStudyError(),
    ],
)
def test_permanent_errors_pass_through_at_once(error: Callable[[], Exception]) -> None:
    fake = FakeClock()
    fn = _failing(1, error=error)
    with pytest.raises(type(error())):
        call_with_retry(fn, settings=fake.settings())
    assert fake.sleeps == [] and fn.calls["n"] == 1  # type: ignore[attr-defined]


def _wrapped(
    inner: BaseException, outer: type[Exception] = optuna.exceptions.StorageInternalError
) -> Exception:
    error = outer("wrapper")
    error.__cause__ = inner
    return error


def _sqlite_error(message: str) -> Exception:
    import sqlite3

    return sa_exc.OperationalError("SELECT 1", {}, sqlite3.OperationalError(message))


class _FakePsycopgError(Exception):
    pass


_FakePsycopgError.__module__ = "psycopg"
_FakePsycopgError.__name__ = "OperationalError"


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (_dropped_connection(), True),
        (
            sa_exc.OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused")),
            True,
        ),
        (sa_exc.InterfaceError("SELECT 1", {}, Exception("connection already closed")), True),
        (sa_exc.DBAPIError("SELECT 1", {}, Exception("x"), connection_invalidated=True), True),
        (sa_exc.DisconnectionError("gone"), True),
        (sa_exc.TimeoutError("QueuePool limit of size 5 overflow 10 reached"), True),
        (_wrapped(_FakePsycopgError("the database system is starting up")), True),
        (_FakePsycopgError("FATAL: terminating connection due to administrator command"), True),
        (_sqlite_error("database is locked"), True),
        (_wrapped(_sqlite_error("database is locked")), True),
        (_sqlite_error("no such table: trials"), False),
        (
            sa_exc.OperationalError("SELECT 1", {}, Exception('relation "trials" does not exist')),
            False,
        ),
        (sa_exc.IntegrityError("INSERT", {}, Exception("duplicate key")), False),
        (sa_exc.ProgrammingError("SELECT", {}, Exception("syntax error")), False),
        (ConnectionRefusedError("refused"), True),
        (optuna.exceptions.UpdateFinishedTrialError("finished"), False),
        (ValueError("Cannot tell a COMPLETE trial"), False),
        (KeyError("x"), False),
        (RuntimeError("boom"), False),
    ],
)
def test_is_transient_db_error(error: BaseException, transient: bool) -> None:
    assert is_transient_db_error(error) is transient


@pytest.mark.parametrize(
    "kwargs",
    [
        {"deadline_s": -1},
        {"initial_backoff_s": 0},
        {"max_backoff_s": float("inf")},
        {"initial_backoff_s": 5, "max_backoff_s": 1},
        {"deadline_s": "300"},
    ],
)
def test_settings_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        StorageRetrySettings(**kwargs)


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPTUNA_GUARD_STORAGE_DEADLINE_S", "42")
    assert StorageRetrySettings.from_env().deadline_s == 42
    monkeypatch.setenv("OPTUNA_GUARD_STORAGE_DEADLINE_S", "soon")
    with pytest.raises(ConfigError, match="OPTUNA_GUARD_STORAGE_DEADLINE_S"):
        StorageRetrySettings.from_env()


def test_retry_settings_is_a_deprecated_alias_of_storage_retry_settings() -> None:
    import optuna_guard.resilience as resilience

    with pytest.warns(DeprecationWarning, match="use StorageRetrySettings"):
        from optuna_guard.resilience import RetrySettings
    assert RetrySettings is StorageRetrySettings
    assert RetrySettings(deadline_s=7) == StorageRetrySettings(deadline_s=7)
    assert "RetrySettings" not in resilience.__all__
    with pytest.raises(AttributeError, match="no attribute 'RetrySetting'"):
        resilience.RetrySetting  # noqa: B018  (a typo still fails)


# -- ResilientStorage over a real SQLite storage, with injected faults ----------------------------

FAST = dict(deadline_s=10.0, initial_backoff_s=0.01, max_backoff_s=0.05)


@pytest.fixture(scope="module")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'resilience.db'}"
    open_storage(url)  # create the schema once
    return url


def _inject(
    storage: ResilientStorage, method: str, *, after_commit: bool, times: int = 1
) -> dict[str, int]:
    """Make ``method`` of the wrapped storage fail like a dropped connection ``times`` times,
    optionally after doing its work (the commit happened, the reply was lost)."""
    inner = storage.wrapped
    original = getattr(inner, method)
    calls = {"n": 0}

    def faulty(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] <= times:
            if after_commit:
                original(*args, **kwargs)
            raise _dropped_connection()
        return original(*args, **kwargs)

    setattr(inner, method, faulty)
    return calls


def _study(url: str, **storage_kwargs: Any) -> tuple[optuna.Study, ResilientStorage]:
    storage = ResilientStorage(open_storage(url, **storage_kwargs), StorageRetrySettings(**FAST))
    return optuna.create_study(storage=storage, study_name=f"res-{uuid.uuid4().hex[:8]}"), storage


def test_wrapper_keeps_optunas_heartbeat(sqlite_url: str) -> None:
    with_heartbeat = ResilientStorage(open_storage(sqlite_url, heartbeat_interval=1))
    without = ResilientStorage(open_storage(sqlite_url))
    in_memory = ResilientStorage(optuna.storages.InMemoryStorage())
    assert isinstance(with_heartbeat, BaseHeartbeat) and is_heartbeat_enabled(with_heartbeat)
    assert isinstance(without, BaseHeartbeat) and not is_heartbeat_enabled(without)
    assert not isinstance(in_memory, BaseHeartbeat)
    assert isinstance(in_memory, ResilientStorage)
    assert with_heartbeat.engine is with_heartbeat._rdb.engine  # other attributes are forwarded


def test_optimize_through_the_wrapper_records_heartbeats(sqlite_url: str) -> None:
    study, storage = _study(sqlite_url, heartbeat_interval=1)
    study.optimize(lambda t: (time.sleep(0.3), t.suggest_float("x", 0, 1))[1], n_trials=2)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    with storage.engine.connect() as conn:
        ids = {
            row[0]
            for row in conn.execute(sqlalchemy.text("SELECT trial_id FROM trial_heartbeats"))
        }
    assert {t._trial_id for t in study.trials} <= ids


def test_completed_value_survives_a_commit_whose_reply_was_lost(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    study, storage = _study(sqlite_url)
    trial = study.ask()
    calls = _inject(storage, "set_trial_state_values", after_commit=True)
    with caplog.at_level(logging.INFO, logger="optuna_guard"):
        study.tell(
            trial, 1.5
        )  # the retry hits "already finished": same state and value -> success
    assert calls["n"] == 2
    assert study.trials[0].state == TrialState.COMPLETE and study.trials[0].value == 1.5
    assert any("already COMPLETE with these values" in r.getMessage() for r in caplog.records)
    assert storage.outages == 1


def test_a_different_finished_state_is_not_hidden(sqlite_url: str) -> None:
    study, storage = _study(sqlite_url)
    trial = study.ask()
    study._storage.set_trial_state_values(
        trial._trial_id, TrialState.FAIL
    )  # e.g. failed by a watchdog
    _inject(storage, "set_trial_state_values", after_commit=False)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_state_values(trial._trial_id, TrialState.COMPLETE, [2.0])
    assert study.trials[0].state == TrialState.FAIL


def test_trial_creation_is_not_duplicated(sqlite_url: str) -> None:
    study, storage = _study(sqlite_url)
    calls = _inject(storage, "create_new_trial", after_commit=True)
    trial = study.ask()
    assert (
        calls["n"] == 1
    )  # the retry found the trial by its start time instead of creating another
    assert len(study.trials) == 1 and trial.number == 0
    assert study.trials[0].system_attrs == {}  # nothing of ours visible to other readers
    study.tell(trial, 0.0)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]


def test_write_lost_before_commit_is_simply_redone(sqlite_url: str) -> None:
    study, storage = _study(sqlite_url)
    trial = study.ask()
    _inject(storage, "set_trial_intermediate_value", after_commit=False, times=3)
    _inject(storage, "set_trial_user_attr", after_commit=True, times=2)
    trial.report(0.25, 1)
    trial.set_user_attr("note", "kept")
    study.tell(trial, 0.5)
    frozen = study.trials[0]
    assert frozen.intermediate_values == {1: 0.25} and frozen.user_attrs == {"note": "kept"}


def test_waiting_trial_taken_before_the_drop_is_not_left_running(sqlite_url: str) -> None:
    study, storage = _study(sqlite_url, heartbeat_interval=1, grace_period=1)
    study.enqueue_trial({"x": 0.5})
    _inject(storage, "set_trial_state_values", after_commit=True)
    trial = study.ask()  # the pop committed but looked failed: ask creates a new trial instead
    assert trial.number == 1
    assert study.trials[0].state == TrialState.RUNNING  # taken, and nobody runs it ...
    time.sleep(2.5)  # ... it has a heartbeat, which goes stale after the 1 s grace period
    storage._tracker._ended = -1e9  # the post-outage pause (tested below) is over
    optuna.storages.fail_stale_trials(study)
    assert study.trials[0].state == TrialState.FAIL


def test_stale_check_waits_after_an_outage(sqlite_url: str) -> None:
    fake = FakeClock()
    storage = ResilientStorage(
        open_storage(sqlite_url, heartbeat_interval=1, grace_period=2), fake.settings(**FAST)
    )
    study = optuna.create_study(storage=storage, study_name=f"stale-{uuid.uuid4().hex[:8]}")
    trial = study.ask()
    storage.record_heartbeat(trial._trial_id)
    _inject(storage, "get_all_trials", after_commit=False)
    study.get_trials()  # an outage, over at once
    time.sleep(3.2)  # the heartbeat is now stale by the database's clock
    assert storage._get_stale_trial_ids(study._study_id) == []  # live workers get time to beat
    fake.now += 3.5  # grace (2) + interval (1) later
    assert storage._get_stale_trial_ids(study._study_id) == [trial._trial_id]


def test_heartbeat_failing_past_the_deadline_is_logged_not_raised(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeClock()
    storage = ResilientStorage(
        open_storage(sqlite_url, heartbeat_interval=1), fake.settings(deadline_s=5)
    )
    study = optuna.create_study(storage=storage, study_name=f"hb-{uuid.uuid4().hex[:8]}")
    trial = study.ask()
    _inject(storage, "record_heartbeat", after_commit=False, times=10**6)
    with caplog.at_level(logging.ERROR, logger="optuna_guard"):
        storage.record_heartbeat(trial._trial_id)  # must not kill Optuna's heartbeat thread
    assert any("Heartbeat of trial id" in r.getMessage() for r in caplog.records)


def test_permanent_storage_errors_are_not_retried(sqlite_url: str) -> None:
    study, storage = _study(sqlite_url)
    trial = study.ask()
    study.tell(trial, 1.0)
    started = time.monotonic()
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_user_attr(trial._trial_id, "late", 1)
    with pytest.raises(KeyError):
        storage.get_study_name_from_id(10**9)
    assert time.monotonic() - started < 2
    assert storage.outages == 0


def test_outage_listener_gets_begin_and_end(sqlite_url: str) -> None:
    events: list[tuple[str, str]] = []
    storage = ResilientStorage(
        open_storage(sqlite_url),
        StorageRetrySettings(**FAST),
        on_outage=lambda event, seconds, what: events.append((event, what)),
    )
    study = optuna.create_study(storage=storage, study_name=f"l-{uuid.uuid4().hex[:8]}")
    _inject(storage, "get_all_trials", after_commit=False, times=2)
    study.get_trials()
    assert events == [("began", "get_all_trials"), ("ended", "get_all_trials")]


# -- a real PostgreSQL restart ------------------------------------------------------------------


def _pg_version() -> str:
    return sorted(os.listdir("/etc/postgresql"))[-1]


def _pg_accepts_connections() -> bool:
    import psycopg

    try:
        with psycopg.connect(
            "host=127.0.0.1 port=5432 user=postgres dbname=test", connect_timeout=1
        ) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def _ensure_pg_up() -> None:
    deadline = time.monotonic() + 60
    while not _pg_accepts_connections():
        if time.monotonic() > deadline:
            subprocess.run(
                ["pg_ctlcluster", "--skip-systemctl-redirect", _pg_version(), "main", "start"],
                check=False,
            )
            deadline = time.monotonic() + 60
        time.sleep(0.2)


@pytest.mark.postgres
def test_postgres_restart_mid_study_loses_nothing(caplog: pytest.LogCaptureFixture) -> None:
    storage = ResilientStorage(
        open_storage(POSTGRES_URL, heartbeat_interval=1, grace_period=30),
        StorageRetrySettings(deadline_s=120, initial_backoff_s=0.1, max_backoff_s=1.0),
    )
    study = optuna.create_study(storage=storage, study_name=f"pg-restart-{uuid.uuid4().hex[:8]}")
    restart: dict[str, subprocess.Popen[bytes]] = {}

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0, 1)
        trial.report(x, 0)
        if trial.number == 3:
            restart["proc"] = subprocess.Popen(
                ["pg_ctlcluster", "--skip-systemctl-redirect", _pg_version(), "main", "restart"]
            )
            deadline = time.monotonic() + 20
            while _pg_accepts_connections() and time.monotonic() < deadline:
                time.sleep(0.01)  # return our result while the server is down
        return x

    try:
        with caplog.at_level(logging.INFO, logger="optuna_guard"):
            study.optimize(objective, n_trials=10)
    finally:
        if "proc" in restart:
            restart["proc"].wait(timeout=120)
        _ensure_pg_up()

    assert restart["proc"].returncode == 0
    fresh = optuna.load_study(study_name=study.study_name, storage=POSTGRES_URL)
    trials = fresh.get_trials()
    assert Counter(t.state for t in trials) == {TrialState.COMPLETE: 10}
    assert all(
        t.value == t.params["x"] and t.intermediate_values == {0: t.params["x"]} for t in trials
    )
    assert storage.outages >= 1
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("Storage outage began") for m in messages)
    assert any(m.startswith("Storage back after") for m in messages)


# -- behaving as the storage it wraps (issue 16, item 4) ---------------------------------------


def _square(trial: optuna.Trial) -> float:
    return trial.suggest_float("x", -1, 1) ** 2


def _optimize_in_child(study: optuna.Study) -> int:
    study.optimize(_square, n_trials=2)
    return os.getpid()


def test_a_study_on_it_goes_to_a_process_pool(sqlite_url: str) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    study, _storage = _study(sqlite_url)
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        pids = list(pool.map(_optimize_in_child, [study, study]))
    assert os.getpid() not in pids
    trials = study.get_trials()
    assert len(trials) == 4 and {t.state for t in trials} == {TrialState.COMPLETE}
    assert all(t.system_attrs == {} for t in trials)


def test_pickled_copy_keeps_retrying_and_drops_the_listener(sqlite_url: str) -> None:
    import copy
    import pickle

    heard: list[str] = []
    storage = ResilientStorage(
        open_storage(sqlite_url),
        StorageRetrySettings(**FAST),
        on_outage=lambda e, s, w: heard.append(e),
    )
    for clone in (pickle.loads(pickle.dumps(storage)), copy.deepcopy(storage)):
        assert type(clone) is type(storage) and clone.settings == storage.settings
        study = optuna.create_study(storage=clone, study_name=f"res-{uuid.uuid4().hex[:8]}")
        _inject(clone, "set_trial_state_values", after_commit=False)
        study.optimize(_square, n_trials=1)
        assert clone.outages == 1 and study.trials[0].state == TrialState.COMPLETE
    assert heard == [] and storage.outages == 0


def test_attribute_writes_reach_the_wrapped_storage(sqlite_url: str) -> None:
    rdb = open_storage(sqlite_url)
    storage = ResilientStorage(rdb)
    assert not is_heartbeat_enabled(storage)
    storage.heartbeat_interval = 1
    storage.grace_period = 3
    assert rdb.heartbeat_interval == 1 and rdb.grace_period == 3
    assert "heartbeat_interval" not in storage.__dict__
    assert is_heartbeat_enabled(storage) and storage.get_heartbeat_interval() == 1
    study = optuna.create_study(storage=storage, study_name=f"res-{uuid.uuid4().hex[:8]}")

    def beats(trial_id: int) -> int:  # the module's SQLite file is shared by its tests
        with rdb.engine.connect() as conn:
            return int(
                conn.execute(
                    sqlalchemy.text("SELECT COUNT(*) FROM trial_heartbeats WHERE trial_id = :id"),
                    {"id": trial_id},
                ).scalar()
            )

    def wait_for_a_beat(trial: optuna.Trial) -> float:
        deadline = time.monotonic() + 30  # Optuna's heartbeat thread beats right after it starts
        while not beats(trial._trial_id) and time.monotonic() < deadline:
            time.sleep(0.05)
        return 0.0

    study.optimize(wait_for_a_beat, n_trials=1)
    assert (
        beats(study.trials[0]._trial_id) == 1
    )  # Optuna's heartbeat thread ran through the wrapper
    storage.settings = StorageRetrySettings(
        deadline_s=1.0
    )  # the wrapper's own attributes stay its own
    assert storage.settings.deadline_s == 1.0 and not hasattr(rdb, "settings")


@pytest.mark.mysql
@pytest.mark.parametrize("tagged", [True, False])
def test_retried_create_on_mysql_second_precision(
    tagged: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """MySQL keeps start times to the second: a retried create adopts the first attempt's trial
    only when it carries this process's pid and host (as the launcher's workers create them);
    an untagged one is never guessed at (it could be another process's), it is said instead."""
    import socket

    from optuna_guard import tags

    url = "mysql+pymysql://root@127.0.0.1:3306/test"
    name = f"res-mysql-{uuid.uuid4().hex[:8]}"
    storage = ResilientStorage(open_storage(url), StorageRetrySettings(**FAST))
    try:
        study = optuna.create_study(storage=storage, study_name=name)
        inner = storage.wrapped
        original = inner.create_new_trial
        calls = {"n": 0}

        def tag_commit_then_drop(study_id: int, template: Any = None) -> int:
            calls["n"] += 1
            if tagged:
                template.user_attrs = {
                    tags.WORKER_PID: os.getpid(),
                    tags.HOSTNAME: socket.gethostname(),
                }
            trial_id = original(study_id, template)
            if calls["n"] == 1:
                raise _dropped_connection()
            return trial_id

        inner.create_new_trial = tag_commit_then_drop
        with caplog.at_level(logging.WARNING, logger="optuna_guard"):
            trial = study.ask()
            study.tell(trial, 1.0)
        states = [t.state for t in study.get_trials()]
        if tagged:
            assert calls["n"] == 1 and states == [TrialState.COMPLETE]
        else:
            assert calls["n"] == 2 and states == [TrialState.RUNNING, TrialState.COMPLETE]
            assert any("keeps start times to the second" in r.getMessage() for r in caplog.records)
    finally:
        optuna.delete_study(study_name=name, storage=url)
