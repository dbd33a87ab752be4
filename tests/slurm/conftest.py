"""Fixtures of the SLURM tests: a running one-node cluster (started with
scripts/slurm/local_cluster.sh when we are root; otherwise the tests skip with the reason), a
fresh PostgreSQL database per module on the shared server, and a job registry that cancels
every job it submitted."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest
from slurm_helpers import REPO, SlurmJobs

PG_ADMIN = ["psql", "-h", "127.0.0.1", "-U", "postgres", "-qAt", "-d", "postgres", "-c"]


def _srun_works() -> tuple[bool, str]:
    if shutil.which("srun") is None:
        return False, "srun is not installed"
    try:
        proc = subprocess.run(
            ["srun", "--immediate=20", "-N1", "-n1", "hostname"],
            capture_output=True,
            text=True,
            timeout=40,
        )
    except subprocess.TimeoutExpired:
        return False, "srun hostname did not answer within 40 s"
    return proc.returncode == 0, (proc.stderr or proc.stdout).strip()[-300:]


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """The local SLURM cluster is up (srun hostname works); returns the node name."""
    ok, why = _srun_works()
    if not ok and os.geteuid() == 0:
        start = subprocess.run(
            ["bash", os.path.join(REPO, "scripts", "slurm", "local_cluster.sh")],
            capture_output=True,
            text=True,
            timeout=600,
        )
        ok, why = _srun_works()
        if not ok:
            why = f"{why}; local_cluster.sh: {(start.stderr or start.stdout).strip()[-300:]}"
    if not ok:
        pytest.skip(f"SLURM cannot start here ({why}); run scripts/slurm/local_cluster.sh as root")
    return subprocess.run(
        ["hostname", "-s"], capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.fixture(scope="module")
def slurm_pg_url() -> Iterator[str]:
    """A fresh database on the shared PostgreSQL server, dropped after the module."""
    name = f"slurm_{uuid.uuid4().hex[:10]}"
    try:
        subprocess.run(
            [*PG_ADMIN, f"CREATE DATABASE {name}"], check=True, capture_output=True, timeout=60
        )
    except (subprocess.CalledProcessError, FileNotFoundError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"cannot create a database on 127.0.0.1:5432: {exc}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        subprocess.run(
            [*PG_ADMIN, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"],
            capture_output=True,
            timeout=60,
        )


@pytest.fixture(scope="module")
def slurm_jobs(slurm_cluster) -> Iterator[SlurmJobs]:
    jobs = SlurmJobs()
    try:
        yield jobs
    finally:
        jobs.cancel_all()
