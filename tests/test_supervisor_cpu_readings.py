"""Adaptive memory readings of the watchdog (issue 15): a worker tree far below every limit is
read about once a second, one near a limit (or every one while memory is short) every tick, and
memory kills come when they came with a reading every tick. Scripted probe and clock; the
watchdog steps are run as the loop runs them, every ``check_interval``."""

from __future__ import annotations

import logging
import signal
import socket
import uuid
from collections import Counter
from collections.abc import Callable

import optuna
import pytest
from supervisor_helpers import FakeProc, PerPidProbe

from optuna_guard import events
from optuna_guard._units import GB
from optuna_guard.memory._cgroup import CgroupReader
from optuna_guard.storage import open_storage
from optuna_guard.supervisor import _memory_watch, _protocol
from optuna_guard.supervisor._arbiter import Arbiter
from optuna_guard.supervisor._cgroups import WorkerCgroup
from optuna_guard.supervisor._config import LaunchConfig
from optuna_guard.supervisor._worker_handle import WorkerHandle

TICK = 0.25  # the default check_interval


class CountingProbe(PerPidProbe):
    """Tree RSS per pid from a function of the clock (GB); counts the readings."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__()
        self.clock = clock
        self.growth: dict[int, Callable[[float], float]] = {}
        self.reads: Counter[int] = Counter()

    def process_tree_rss(self, pid: int) -> int:
        self.reads[pid] += 1
        if pid in self.growth:
            return int(self.growth[pid](self.clock()) * GB)
        return super().process_tree_rss(pid)


class Launch:
    def __init__(self, tmp_path, **config) -> None:
        url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
        self.study = optuna.create_study(
            study_name=f"cpu-{uuid.uuid4().hex[:8]}", storage=open_storage(url)
        )
        options = dict(
            objective="m:f",
            study_name=self.study.study_name,
            storage=url,
            workers=3,
            n_trials=10,
            max_worker_rss_gb=8.0,
            min_available_gb=2.0,
            warn_available_gb=4.0,
            kill_wait=1.0,
            log_dir=str(tmp_path / "logs"),
        )
        options.update(config)
        self.config = LaunchConfig(**options)
        self.now = 1000.0
        self.probe = CountingProbe(lambda: self.now)
        self.arbiter = Arbiter(
            self.config,
            self.study,
            url,
            probe=self.probe,
            event_log=events.EventLog(str(tmp_path / "events.jsonl")),
            clock=lambda: self.now,
        )
        self.signals: list[tuple[float, int, int]] = []
        self.arbiter.killer.send_signal = lambda worker, sig, tree: self.signals.append(
            (self.now, worker.pid, sig)
        )
        self._peers: list[socket.socket] = []

    def add_worker(self, worker_id: int, pid: int, rss_gb: float = 0.3) -> WorkerHandle:
        ours, theirs = socket.socketpair()
        self._peers.append(theirs)
        worker = WorkerHandle(
            worker_id=worker_id,
            spawn_index=pid,
            proc=FakeProc(pid),
            channel=_protocol.Channel(ours),
            log_path=f"{self.config.log_dir}/worker_{worker_id}.log",
            started_at=self.now,
            age_limit=None,
            ready=True,
        )
        self.arbiter.workers.append(worker)
        self.probe.rss_gb[pid] = rss_gb
        running = self.study.ask()
        self.arbiter.ledger.on_trial_started(worker, running._trial_id, running.number, self.now)
        return worker

    def run_ticks(self, seconds: float) -> None:
        """The watchdog's memory step every tick for ``seconds`` (from the current clock)."""
        end = self.now + seconds
        while self.now <= end + 1e-9:
            self.arbiter.check_memory(self.now)
            self.arbiter.check_cgroup_ooms(self.now)
            self.now += TICK

    def kill_times(self, pid: int) -> list[float]:
        return [at for at, who, sig in self.signals if who == pid and sig == signal.SIGTERM]


def test_a_worker_growing_at_the_fastest_assumed_rate_is_killed_when_every_tick_would(
    tmp_path, caplog
):
    """0.2 GB growing 4 GB/s: over the guard's 7.2 GB at +2.0 s (8.2 GB, also over the hard
    limit), killed one guard interval later, at +2.25 s, as with a reading every tick."""
    launch = Launch(tmp_path)
    launch.add_worker(1, 101)
    launch.add_worker(2, 102)
    start = launch.now
    launch.probe.growth[102] = lambda t: 0.2 + _memory_watch.GROWTH_RATE_BYTES_S / GB * (t - start)
    with caplog.at_level(logging.WARNING, logger="optuna_guard"):
        launch.run_ticks(3.0)
    assert launch.kill_times(102) == [start + 2.25]
    assert launch.kill_times(101) == []
    assert (
        "Worker 2 (pid 102) was killed: worker memory limit: worker 2 tree RSS 9.20 GB > 8.00 GB; "
        "trial 1 marked emergency_killed."
    ) in caplog.messages


def test_a_jump_faster_than_assumed_is_still_killed_within_the_longest_interval(tmp_path):
    """0.3 GB to 9 GB at once (faster than any page-faulting): seen at the worker's next
    reading, at most MAX_READ_INTERVAL_S later, and killed a guard interval after that."""
    launch = Launch(tmp_path)
    launch.add_worker(1, 101)
    start = launch.now
    launch.probe.growth[101] = lambda t: 0.3 if t < start + 0.1 else 9.0
    launch.run_ticks(3.0)
    (killed_at,) = launch.kill_times(101)
    assert killed_at <= start + _memory_watch.MAX_READ_INTERVAL_S + TICK


def test_a_worker_near_its_limit_is_read_every_tick_one_far_below_about_once_a_second(tmp_path):
    launch = Launch(tmp_path)
    launch.add_worker(1, 101, rss_gb=0.3)  # 6.9 GB below the guard's limit
    launch.add_worker(2, 102, rss_gb=6.5)  # 0.7 GB below it: reachable within a tick
    launch.run_ticks(4.0 - TICK)  # 16 ticks
    assert launch.probe.reads[102] == 16
    assert 4 <= launch.probe.reads[101] <= 6
    assert launch.signals == []


def test_every_worker_is_read_every_tick_while_available_memory_is_near_its_minimum(tmp_path):
    launch = Launch(tmp_path)
    for worker_id in (1, 2, 3):
        launch.add_worker(worker_id, 100 + worker_id, rss_gb=0.3)
    launch.probe.available_gb = 2.5  # 0.5 GB above --min-available-gb
    launch.run_ticks(2.0 - TICK)  # 8 ticks
    assert [launch.probe.reads[pid] for pid in (101, 102, 103)] == [8, 8, 8]


def test_without_memory_limits_trees_are_still_read_once_a_second(tmp_path):
    launch = Launch(
        tmp_path, max_worker_rss_gb=None, min_available_gb=None, warn_available_gb=None
    )
    launch.add_worker(1, 101)
    launch.run_ticks(4.0 - TICK)
    assert 4 <= launch.probe.reads[101] <= 6


def test_low_system_memory_kill_uses_fresh_readings_of_every_worker(tmp_path, caplog):
    """Memory turns short while one worker's reading is 0.5 s old and it has grown since: the
    victim is chosen on this tick's readings (the grown worker), as with readings every tick."""
    launch = Launch(tmp_path)
    launch.add_worker(1, 101, rss_gb=1.0)
    launch.add_worker(2, 102, rss_gb=0.5)
    launch.run_ticks(TICK)  # both read at the first tick, next due a second later
    assert launch.probe.reads == {101: 1, 102: 1}
    launch.probe.rss_gb[102] = 3.0
    launch.probe.available_gb = 1.0
    with caplog.at_level(logging.WARNING, logger="optuna_guard"):
        launch.run_ticks(0.0)
    assert [pid for _, pid, _ in launch.signals] == [102]
    assert any(
        "worker 2 used the most memory (tree RSS 3.00 GB)" in message
        for message in caplog.messages
    )


class FakeCgroups:
    """Worker cgroups (v1 layout) in plain directories: the test writes the kernel's counters."""

    def __init__(self, root) -> None:
        self.root = root
        self.by_pid: dict[int, WorkerCgroup] = {}

    def add(self, pid: int) -> None:
        directory = self.root / f"w{pid}"
        directory.mkdir()
        (directory / "memory.usage_in_bytes").write_text("1000\n")
        (directory / "memory.stat").write_text("total_inactive_file 0\n")
        self.oom_kills(pid, 0)
        self.by_pid[pid] = WorkerCgroup(1, str(directory), 0)

    def oom_kills(self, pid: int, count: int) -> None:
        with open(self.root / f"w{pid}" / "memory.oom_control", "w") as handle:
            handle.write(f"oom_kill_disable 0\nunder_oom 0\noom_kill {count}\n")

    def of(self, pid: int) -> WorkerCgroup | None:
        return self.by_pid.get(pid)


def test_kernel_oom_kills_in_worker_cgroups_are_acted_on_at_the_workers_next_reading(
    tmp_path, caplog
):
    """A helper OOM-killed in a worker's own cgroup: noticed at once for a worker near its limit,
    within the longest reading interval for one far below (a kill there means a spike faster
    than any reading)."""
    launch = Launch(tmp_path)
    cgroups = FakeCgroups(tmp_path)
    launch.arbiter.spawner.cgroups = cgroups  # type: ignore[assignment]
    for worker_id, pid, rss_gb in ((1, 101, 0.3), (2, 102, 6.5)):
        cgroups.add(pid)
        launch.add_worker(worker_id, pid, rss_gb=rss_gb)
    start = launch.now
    launch.run_ticks(0.0)
    assert launch.signals == []
    cgroups.oom_kills(101, 1)
    cgroups.oom_kills(102, 1)
    with caplog.at_level(logging.WARNING, logger="optuna_guard"):
        launch.run_ticks(1.5)
    assert launch.kill_times(102) == [start + TICK]
    (far_killed_at,) = launch.kill_times(101)
    assert far_killed_at <= start + _memory_watch.MAX_READ_INTERVAL_S
    assert any(
        "Worker 1 (pid 101) was killed: out of memory: the kernel killed a process in worker 1's "
        "memory cgroup" in message
        for message in caplog.messages
    )


def test_cgroup_reader_rereads_its_open_files(tmp_path):
    """The worker cgroup's counters are read from files kept open: a changed value is seen."""
    (tmp_path / "memory.usage_in_bytes").write_text("1000000\n")
    (tmp_path / "memory.stat").write_text("cache 5\ntotal_inactive_file 250000\n")
    (tmp_path / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
    reader = CgroupReader(1, str(tmp_path))
    try:
        assert reader.working_set() == 750_000 and reader.oom_kills() == 0
        with open(tmp_path / "memory.usage_in_bytes", "r+") as handle:  # same file, new value
            handle.write("2000000\n")
        with open(tmp_path / "memory.oom_control", "r+") as handle:
            handle.write("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
        assert reader.working_set() == 1_750_000 and reader.oom_kills() == 2
    finally:
        reader.close()
    assert CgroupReader(1, str(tmp_path / "gone")).working_set() == 0


@pytest.mark.parametrize(
    ("rss_gb", "available_gb", "expected"),
    [
        (0.3, 12.0, _memory_watch.MAX_READ_INTERVAL_S),  # far below everything
        (6.9, 12.0, 0.3 / 4),  # 0.3 GB below the guard's 7.2 GB
        (8.5, 12.0, 0.0),  # over the limit
        (0.3, 2.2, 0.2 / 4),  # available 0.2 GB above the minimum
    ],
)
def test_read_interval(tmp_path, rss_gb, available_gb, expected):
    launch = Launch(tmp_path)
    interval = launch.arbiter.memory.read_interval(int(rss_gb * GB), int(available_gb * GB))
    assert interval == pytest.approx(expected, abs=1e-6)
