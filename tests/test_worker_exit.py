"""Workers exit like a normal Python program: atexit handlers run, and a recycled worker of a
joblib (loky) objective leaves no process of the launch alive (issue 16 item 1)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from supervisor_helpers import FAST, objective_spec, trials_of

from optuna_guard import tags
from optuna_guard.memory import _tree
from optuna_guard.supervisor import _lifeline, launch

N_TRIALS = 3


ORPHAN_GRACE_S = (
    1.0  # the supervisor reaps within a check interval; longer than this is "left behind"
)


def _launch_processes(launch_id: str) -> list[int]:
    return _tree.pids_with_env(f"{_lifeline.ENV_LAUNCH_ID}={launch_id}".encode())


def _worker_mark(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            for entry in handle.read().split(b"\0"):
                if entry.startswith(_lifeline.ENV_WORKER_MARK.encode() + b"="):
                    return entry.split(b"=", 1)[1].decode()
    except OSError:
        pass
    return None


class OrphanWatch:
    """Samples every process carrying a worker marker while the launch runs; a process whose
    worker (a direct child of this test process with the same marker) is gone is an orphan."""

    def __init__(self) -> None:
        self.first_seen: dict[int, float] = {}
        self.last_seen: dict[int, float] = {}
        self.launch_ids: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> OrphanWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.wait(0.1):
            marked = {
                int(name): _worker_mark(int(name))
                for name in os.listdir("/proc")
                if name.isdigit()
            }
            marked = {pid: mark for pid, mark in marked.items() if mark is not None}
            live_workers = {mark for pid, mark in marked.items() if _parent(pid) == me}
            self.launch_ids.update(
                mark.split("/")[0] for mark in live_workers
            )  # ours, not a parallel test's
            now = time.monotonic()
            for pid, mark in marked.items():
                if mark.split("/")[0] in self.launch_ids and mark not in live_workers:
                    self.first_seen.setdefault(pid, now)
                    self.last_seen[pid] = now

    def left_behind(self) -> list[int]:
        return sorted(
            pid
            for pid, first in self.first_seen.items()
            if self.last_seen[pid] - first > ORPHAN_GRACE_S
        )


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return int(handle.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


@pytest.mark.parametrize("cgroups", ["0", "1"], ids=["process_tree", "cgroups"])
def test_recycled_joblib_workers_leave_nothing_and_run_atexit(
    cgroups, sqlite_url, tmp_path, unique_study_name, quiet_optuna, monkeypatch
):
    if cgroups == "1" and not os.access("/sys/fs/cgroup/memory", os.W_OK):
        pytest.skip("needs a writable cgroup v1 memory controller (root)")
    exit_dir = tmp_path / "exits"
    exit_dir.mkdir()
    monkeypatch.setenv("WORKER_EXIT_DIR", str(exit_dir))
    monkeypatch.setenv("OPTUNA_GUARD_WORKER_CGROUPS", cgroups)
    launch_ids: set[str] = set()
    try:
        with OrphanWatch() as watch:
            summary = launch(
                objective_spec("worker_exit_joblib"),
                study_name=unique_study_name,
                storage=sqlite_url,
                workers=1,
                n_trials=N_TRIALS,
                max_trials_per_worker=1,
                log_dir=str(tmp_path / "logs"),
                **FAST,
            )
        trials = trials_of(sqlite_url, unique_study_name)
        launch_ids = {t.user_attrs[tags.LAUNCH_ID] for t in trials}
        assert summary.exit_code == 0 and summary.complete == N_TRIALS
        worker_pids = {t.user_attrs[tags.WORKER_PID] for t in trials}
        assert len(worker_pids) == N_TRIALS  # one trial per worker: every worker was recycled
        orphans = watch.left_behind()
        print(f"processes outliving their recycled worker by > {ORPHAN_GRACE_S}s: {len(orphans)}")
        assert orphans == [], f"recycled workers left these processes alive: {orphans}"
        left = [pid for launch_id in launch_ids for pid in _launch_processes(launch_id)]
        assert left == [], f"processes of the launch still alive after it returned: {left}"
        marked = {int(name.split("_")[1]) for name in os.listdir(exit_dir)}
        assert worker_pids <= marked, "every worker must run its atexit handlers"
    finally:
        for launch_id in launch_ids:
            for pid in _launch_processes(launch_id):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def test_a_worker_that_cannot_exit_is_killed_after_the_bounded_wait(
    sqlite_url, tmp_path, unique_study_name, quiet_optuna
):
    """A non-daemon thread keeps the interpreter from exiting: the supervisor kills the worker
    WORKER_EXIT_WAIT_S after it was told to exit, without a crash or a strike."""
    from optuna.trial import TrialState
    from supervisor_helpers import read_events

    from optuna_guard import events
    from optuna_guard.supervisor._kills import WORKER_EXIT_WAIT_S

    started = time.monotonic()
    summary = launch(
        objective_spec("worker_exit_hang"),
        study_name=unique_study_name,
        storage=sqlite_url,
        workers=1,
        n_trials=1,
        log_dir=str(tmp_path / "logs"),
        **FAST,
    )
    elapsed = time.monotonic() - started
    trials = trials_of(sqlite_url, unique_study_name)
    assert summary.exit_code == 0 and [t.state for t in trials] == [TrialState.COMPLETE]
    assert WORKER_EXIT_WAIT_S <= elapsed < WORKER_EXIT_WAIT_S + 60
    exits = [
        e
        for e in read_events(str(tmp_path / "logs" / "events.jsonl"))
        if e["event"] == events.WORKER_EXITED
    ]
    assert any("did not exit within" in str(e.get("reason")) for e in exits), exits
    assert summary.crashes == 0
