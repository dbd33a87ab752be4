"""Fixtures shared by the whole suite (storages, study names, memory helpers, clean state).

Server URLs are the services the CI machine runs; tests that use them must run, not skip.
Helpers and fakes live in ``tests/fakes.py`` (``from fakes import FakeProbe``).
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Iterator

import optuna
import pytest

sys.path.insert(0, os.path.dirname(__file__))  # so `from fakes import ...` works from any rootdir

from fakes import FakeProbe
from fakes import current_rss_gb as _current_rss_gb

POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
MYSQL_URL = "mysql+pymysql://root@127.0.0.1:3306/test"


_SERVER_MARKERS = {"postgres": ("postgres", "postgres_url"), "mysql": ("mysql", "mysql_url")}

# End-to-end tests that race real worker processes, signals, cgroups, database servers or SLURM
# against the OS scheduler on a shared 2-core machine. One of these failing once in a run of
# 1,600 tests is the scheduler, twice in a row is us: each is rerun once (pytest-rerunfailures,
# the "R" in the progress line and "rerun" in the summary say so), as CPython's regrtest reruns
# its failed tests. Unit tests are never rerun.
_RACES_REAL_PROCESSES = (
    "test_launch_",
    "test_supervision_",
    "test_faults_",
    "test_worker_exit.py",
    "test_sigterm_copies",
    "test_cli_run",
    "test_heartbeat_rows_live",
    "test_preemption",
    "test_guard_stuck",
    "chaos/",
    "multihost/",
)  # not slurm/: its tests read scenarios run once per module, a rerun would read the same result


_PURE = ("test_faults_units.py", "test_supervision_exits.py")  # decision tables, no processes


def _races_real_processes(item: pytest.Item) -> bool:
    path = item.nodeid.split("::", 1)[0].removeprefix("tests/")
    if os.path.basename(path) in _PURE:
        return False
    return any(
        path.startswith(prefix)
        if prefix.endswith("/")
        else os.path.basename(path).startswith(prefix)
        for prefix in _RACES_REAL_PROCESSES
    )


def pytest_collection_modifyitems(config, items) -> None:
    """Mark every test that talks to a server, so ``-m "not postgres"`` selects what it says,
    and let end-to-end tests that race real processes run a second time after a failure.

    A test needs a server when it takes the ``postgres_url``/``mysql_url`` fixture or is
    parametrized with that backend (``request.getfixturevalue(f"{backend}_url")``).
    """
    rerun_once = config.pluginmanager.hasplugin("rerunfailures")
    for item in items:
        if rerun_once and _races_real_processes(item):
            item.add_marker(pytest.mark.flaky(reruns=1, reruns_delay=2))
        params = getattr(getattr(item, "callspec", None), "params", {})
        values = {v for v in params.values() if isinstance(v, str)}
        for marker, names in _SERVER_MARKERS.items():
            if names[1] in item.fixturenames or values & set(names):
                item.add_marker(getattr(pytest.mark, marker))


@pytest.fixture()
def sqlite_url(tmp_path) -> str:
    """A fresh SQLite file storage URL in the test's tmp_path."""
    return f"sqlite:///{tmp_path / 'study.db'}"


@pytest.fixture()
def postgres_url() -> str:
    """The CI PostgreSQL server (use a unique study name: other runs share the database)."""
    return POSTGRES_URL


@pytest.fixture()
def mysql_url() -> str:
    """The CI MariaDB server (use a unique study name: other runs share the database)."""
    return MYSQL_URL


@pytest.fixture()
def unique_study_name(request) -> str:
    """A study name no parallel test run uses."""
    return f"{request.node.name[:40]}-{uuid.uuid4().hex[:12]}"


@pytest.fixture()
def current_rss_gb() -> Callable[[], float]:
    """Call it to get this process tree's RSS in GB now (make memory limits relative to it)."""
    return _current_rss_gb


@pytest.fixture()
def fake_probe() -> FakeProbe:
    """A fake probe with plenty of memory: 16 GB total, 12 GB available, 0.5 GB RSS."""
    return FakeProbe()


@pytest.fixture()
def quiet_optuna() -> Iterator[None]:
    """Optuna logs only warnings during the test."""
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(previous)


@pytest.fixture(autouse=True)
def _clean_process_state() -> Iterator[None]:
    """Process-wide flags must not leak between tests: stop/checkpoint requests, default probe."""
    from optuna_guard import preemption
    from optuna_guard.memory import set_default_probe

    preemption.reset()
    yield
    preemption.reset()
    set_default_probe(None)
