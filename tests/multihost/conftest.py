"""Fixtures of the multi-host tests: one set of simulated hosts and a PostgreSQL cluster per session.

Every test in this directory carries the ``multihost`` marker and is skipped, with the reason,
where network namespaces cannot be made (not root, no ``ip``/``unshare``, no PostgreSQL server
binaries). The hosts, links and the cluster are torn down at the end of the session, also when a
test fails; after each test its links are brought back up, the cluster is started if it is down,
and any process left on a host is killed (and reported by the test's own checks first).
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from mh_harness import MultiHostRun
from mh_netns import PostgresCluster, SimulatedHosts, skip_reason

N_HOSTS = 3

_SKIP = skip_reason()


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers",
        "multihost: simulated hosts in network namespaces (root, ip, PostgreSQL binaries)",
    )


def pytest_collection_modifyitems(config, items) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.multihost)
            if _SKIP and "needs_netns" in item.fixturenames:
                item.add_marker(pytest.mark.skip(reason=_SKIP))


@pytest.fixture(scope="session")
def simulated_hosts() -> Iterator[tuple[SimulatedHosts, PostgresCluster]]:
    """N_HOSTS worker hosts + a database host running the session's own PostgreSQL cluster."""
    hosts = SimulatedHosts(N_HOSTS)
    cluster = PostgresCluster(hosts)
    try:
        hosts.start()
        cluster.start()
        yield hosts, cluster
    finally:
        cluster.stop()
        hosts.close()


@pytest.fixture()
def needs_netns() -> None:
    """Marks a test that needs the namespaces (skipped with the reason where they cannot be made)."""


@pytest.fixture()
def mh_run(needs_netns, simulated_hosts) -> Iterator[MultiHostRun]:
    """A fresh study on the simulated hosts; links healed and hosts emptied afterwards."""
    import optuna

    hosts, cluster = simulated_hosts
    work = Path(tempfile.mkdtemp(prefix="og-mh-run-", dir=hosts.base_dir))
    shared = work / "shared-store"
    shared.mkdir()
    run = MultiHostRun(
        hosts=hosts,
        storage_url=cluster.url,
        local_url=cluster.local_url,
        study_name=f"mh-{uuid.uuid4().hex[:10]}",
        work_dir=work,
        shared_store=shared,
    )
    optuna.create_study(study_name=run.study_name, storage=cluster.local_url)
    try:
        yield run
    finally:
        for n in range(1, hosts.n_hosts + 1):
            try:
                hosts.heal(n)
            except RuntimeError:
                pass
            hosts.kill_host(n)
        if not (cluster.data / "postmaster.pid").exists():
            cluster.restart()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the item (``rep_call``) so fixtures can print logs on failure."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
