"""The arbiter's steps one at a time, with scripted processes, a scripted probe and clock:
assert the exact signals sent, the log lines, and the trial states/tags in a real storage."""

from __future__ import annotations

import logging
import signal
import socket
import uuid

import optuna
import pytest
from optuna.trial import TrialState
from supervisor_helpers import FakeProc, PerPidProbe, read_events

from optuna_guard import events, tags
from optuna_guard.exceptions import CrashLoopError
from optuna_guard.storage import open_storage
from optuna_guard.supervisor import _protocol
from optuna_guard.supervisor._arbiter import Arbiter
from optuna_guard.supervisor._config import LaunchConfig
from optuna_guard.supervisor._worker_handle import WorkerHandle

_SHARED: dict = {}


@pytest.fixture(autouse=True, scope="module")
def _shared_storage(tmp_path_factory):
    """One SQLite storage for the module (opening a storage runs the schema check, ~1 s)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('arbiter') / 'units.db'}"
    _SHARED.update(url=url, storage=open_storage(url))
    yield
    _SHARED.clear()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Harness:
    """An Arbiter on a real SQLite study whose workers are FakeProcs with socket pairs."""

    def __init__(self, tmp_path, **config) -> None:
        self.url = _SHARED["url"]
        name = f"units-{uuid.uuid4().hex[:10]}"
        self.study = optuna.create_study(study_name=name, storage=_SHARED["storage"])
        options = dict(
            objective="m:f",
            study_name=name,
            storage=self.url,
            workers=2,
            n_trials=10,
            max_worker_rss_gb=8.0,
            min_available_gb=2.0,
            warn_available_gb=4.0,
            kill_wait=1.0,
            grace_period=5.0,
            log_dir=str(tmp_path / "logs"),
        )
        options.update(config)
        self.config = LaunchConfig(**options)
        self.probe = PerPidProbe()
        self.clock = Clock()
        self.events_path = str(tmp_path / "events.jsonl")
        self.arbiter = Arbiter(
            self.config,
            self.study,
            self.url,
            probe=self.probe,
            event_log=events.EventLog(self.events_path),
            clock=self.clock,
        )
        self.signals: list[tuple[int, int, bool]] = []
        self.arbiter.killer.send_signal = lambda worker, sig, tree: self.signals.append(
            (worker.pid, sig, tree)
        )
        self.spawned: list[int] = []
        self.peers: dict[int, _protocol.Channel] = {}

    def add_worker(
        self, worker_id: int, pid: int, *, rss_gb: float = 0.5, trial: bool = False
    ) -> WorkerHandle:
        ours, theirs = socket.socketpair()
        worker = WorkerHandle(
            worker_id=worker_id,
            spawn_index=pid,
            proc=FakeProc(pid),
            channel=_protocol.Channel(ours),
            log_path=f"{self.config.log_dir}/worker_{worker_id}.log",
            started_at=self.clock.now,
            age_limit=3600.0,
            ready=True,
        )
        self.peers[pid] = _protocol.Channel(theirs)
        self.arbiter.workers.append(worker)
        self.probe.rss_gb[pid] = rss_gb
        if trial:
            running = self.study.ask()
            self.arbiter.ledger.on_trial_started(
                worker, running._trial_id, running.number, self.clock.now
            )
        return worker

    def received(self, pid: int) -> list[dict]:
        messages, _ = self.peers[pid].feed()
        return messages

    def state(self, number: int) -> optuna.trial.FrozenTrial:
        assert self.arbiter.wait_for_storage(timeout=30)  # trials are ended on the storage thread
        return self.study.get_trials(deepcopy=False)[number]


def test_worker_over_its_rss_limit_is_killed_sigterm_then_sigkill_and_its_trial_pruned(
    tmp_path, caplog
):
    h = Harness(tmp_path)
    calm = h.add_worker(1, 101, rss_gb=1.0, trial=True)
    hog = h.add_worker(2, 102, rss_gb=8.25, trial=True)
    h.arbiter.check_memory(h.clock.now)
    assert (
        h.signals == []
    )  # the in-trial guard (at 90 % of the limit) gets one sampling interval first
    h.clock.now += 0.25
    with caplog.at_level(logging.WARNING, logger="optuna_guard"):
        h.arbiter.check_memory(h.clock.now)
    assert h.signals == [(102, signal.SIGTERM, True)]
    assert (
        "Worker 2 (pid 102) was killed: worker memory limit: worker 2 tree RSS 8.25 GB > 8.00 GB; "
        "trial 1 marked emergency_killed."
    ) in caplog.messages
    notice = h.received(102)
    assert notice[0]["op"] == _protocol.KILL and notice[0]["tags"][tags.EMERGENCY_KILLED] is True
    # one victim at a time: another worker over the limit waits until the first is gone
    h.probe.rss_gb[101] = 9.0
    h.arbiter.check_memory(h.clock.now)
    assert len(h.signals) == 1
    h.clock.now += 0.5
    h.arbiter.advance_kills(h.clock.now)
    assert len(h.signals) == 1
    h.clock.now += 0.6  # kill_wait (1 s) is over
    h.arbiter.advance_kills(h.clock.now)
    assert h.signals[-1] == (102, signal.SIGKILL, True)
    hog.proc.returncode = -9
    h.arbiter.reap(h.clock.now)
    trial = h.state(1)
    assert trial.state == TrialState.PRUNED
    assert trial.user_attrs[tags.EMERGENCY_KILLED] is True
    assert trial.user_attrs[tags.KILL_LIMIT] == "max_worker_rss_gb"
    assert (
        trial.user_attrs[tags.KILL_REASON]
        == "worker memory limit: worker 2 tree RSS 8.25 GB > 8.00 GB"
    )
    assert trial.user_attrs[tags.AVAILABLE_GB_AT_KILL] == 12.0
    assert trial.user_attrs[tags.WORKER_PID] == 102 and trial.user_attrs[tags.PEAK_RSS_GB] == 8.25
    assert h.arbiter.workers == [calm] and h.arbiter.kills == 1
    h.arbiter.check_memory(h.clock.now)  # now the next victim may be chosen
    assert h.signals[-1] == (101, signal.SIGTERM, True)
    kinds = [e["event"] for e in read_events(h.events_path)]
    assert kinds.count(events.WORKER_KILLED) == 2 and kinds.count(events.TRIAL_KILLED) == 1


def test_low_system_memory_kills_the_largest_worker_in_a_trial(tmp_path, caplog):
    h = Harness(tmp_path, on_kill="fail")
    h.add_worker(1, 101, rss_gb=5.0)  # idle, large
    h.add_worker(2, 102, rss_gb=3.0, trial=True)
    h.add_worker(3, 103, rss_gb=2.0, trial=True)
    h.probe.available_gb = 1.0
    with caplog.at_level(logging.WARNING, logger="optuna_guard"):
        h.arbiter.check_memory(h.clock.now)
    assert h.signals == [(102, signal.SIGTERM, True)]
    assert any(
        m.startswith("System memory available 1.00GB is below the warning level 4.00GB")
        for m in caplog.messages
    )
    h.arbiter.workers[1].proc.returncode = -15  # it went at the SIGTERM
    h.arbiter.reap(h.clock.now)
    trial = h.state(0)
    assert trial.state == TrialState.FAIL  # --on-kill fail
    assert trial.user_attrs[tags.KILL_LIMIT] == "min_available_gb"
    assert trial.user_attrs[tags.KILL_REASON] == (
        "system memory low: 1.00 GB available < 2.00 GB; worker 2 used the "
        "most memory (tree RSS 3.00 GB)"
    )
    assert trial.user_attrs[tags.AVAILABLE_GB_AT_KILL] == 1.0
    assert h.state(1).state == TrialState.RUNNING  # worker 3 untouched
    # while memory stays low no replacement is started
    h.arbiter.spawn = lambda now: pytest.fail("spawned a worker while memory is low")
    h.arbiter.reconcile(h.clock.now)


def test_crashed_worker_fails_its_trial_with_the_decoded_signal(tmp_path, caplog):
    h = Harness(tmp_path)
    worker = h.add_worker(1, 101, trial=True)
    worker.proc.returncode = -signal.SIGSEGV
    with caplog.at_level(logging.ERROR, logger="optuna_guard"):
        h.arbiter.reap(h.clock.now)
    trial = h.state(0)
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs[tags.WORKER_CRASHED] is True
    assert (
        trial.user_attrs[tags.KILL_REASON]
        == "worker exited with SIGSEGV — segmentation fault in native code"
    )
    assert h.arbiter.crashes == 1 and h.arbiter.workers == []
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("optuna_guard")]
    assert ours[0].startswith(
        "Worker 1 (pid 101) crashed under trial 0: worker exited with SIGSEGV"
    )


def test_a_finished_message_read_at_reap_time_keeps_the_trial_complete(tmp_path):
    h = Harness(tmp_path)
    worker = h.add_worker(1, 101, trial=True)
    h.study.tell(0, 1.5)
    h.peers[101].send(
        _protocol.FINISHED, number=0, trial_id=worker.trial_id, state="COMPLETE", duration=0.1
    )
    worker.proc.returncode = -9  # died right after reporting
    h.arbiter.reap(h.clock.now)
    assert (
        h.state(0).state == TrialState.COMPLETE
        and tags.WORKER_CRASHED not in h.state(0).user_attrs
    )
    assert h.arbiter.crashes == 1  # the worker did crash, between trials: no trial is blamed
    assert list(h.arbiter.finished_states.values()) == ["COMPLETE"]


def test_workers_dying_before_their_first_trial_raise_crash_loop_with_the_log_tail(tmp_path):
    h = Harness(tmp_path, crash_loop_limit=3)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "worker_1.log").write_text(
        "booting\nImportError: libcudart.so.12: cannot open shared object file\n"
    )
    for attempt in range(3):
        worker = h.add_worker(1, 200 + attempt)
        worker.proc.returncode = 1
        if attempt < 2:
            h.arbiter.reap(h.clock.now)
    with pytest.raises(CrashLoopError) as info:
        h.arbiter.reap(h.clock.now)
    message = str(info.value)
    assert "died before their first trial 3 times in a row" in message
    assert (
        "worker exited with code 1" in message
        and "libcudart.so.12" in message
        and "\n" not in message
    )
    # the same facts as fields, for a caller that shows them without parsing the message
    error = info.value
    assert error.exit_code == 3
    assert error.worker_id == 1
    assert error.log_path == str(tmp_path / "logs" / "worker_1.log")
    assert error.log_tail == (
        "booting",
        "ImportError: libcudart.so.12: cannot open shared object file",
    )


def test_tickets_grant_exactly_t_and_recycle_between_trials(tmp_path):
    h = Harness(tmp_path, n_trials=3, max_trials_per_worker=2, recycle_worker_rss_gb=2.0)
    a = h.add_worker(1, 101)
    b = h.add_worker(2, 102)
    assert h.arbiter.ledger.decide_ticket(a, h.clock.now) == (True, "")
    a.ticket = True
    assert h.arbiter.ledger.decide_ticket(b, h.clock.now) == (True, "")
    b.ticket = True
    h.arbiter.finished_states[99] = "COMPLETE"
    granted, reason = h.arbiter.ledger.decide_ticket(h.add_worker(3, 103), h.clock.now)
    assert not granted and reason == "done: 3 trials finished or running"
    a.ticket = False
    a.trials_finished = 2
    assert h.arbiter.ledger.decide_ticket(a, h.clock.now) == (
        False,
        "recycle: 2 trials >= --max-trials-per-worker 2",
    )
    b.ticket, b.trials_finished = False, 1
    h.probe.rss_gb[102] = 2.5
    assert h.arbiter.ledger.decide_ticket(b, h.clock.now) == (
        False,
        "recycle: tree RSS 2.50 GB after a trial > 2.00 GB",
    )
    assert h.arbiter.recycles == 2
    h.clock.now += 4000
    c = h.add_worker(4, 104)
    c.started_at = h.clock.now - 3700
    h.arbiter.finished_states.clear()
    assert h.arbiter.ledger.decide_ticket(c, h.clock.now) == (False, "recycle: age 3700s >= 3600s")


def test_reconcile_starts_only_the_workers_the_remaining_trials_need(tmp_path):
    h = Harness(tmp_path, workers=4, n_trials=5)
    started = []
    h.arbiter.spawn = lambda now: (
        started.append(now) or h.add_worker(10 + len(started), 500 + len(started))
    )
    for _tick in range(4):  # one worker per tick (issue 10: paced start-up)
        h.arbiter.reconcile(h.clock.now)
    assert len(started) == 4
    for number, worker in enumerate(h.arbiter.workers):
        worker.proc.returncode = 0
        worker.deny_reason = "done"
        h.arbiter.finished_states[number] = "COMPLETE"
    h.arbiter.reap(h.clock.now)
    h.arbiter.reconcile(h.clock.now)
    assert len(started) == 5  # one trial left -> one worker


def test_sigterm_stops_gracefully_then_kills_and_tags_preempted(tmp_path, caplog):
    h = Harness(tmp_path)
    busy = h.add_worker(1, 101, trial=True)
    idle = h.add_worker(2, 102)
    h.arbiter.signal_queue.put_nowait(signal.SIGUSR1)
    h.arbiter.signal_queue.put_nowait(signal.SIGTERM)
    with caplog.at_level(logging.INFO, logger="optuna_guard"):
        h.arbiter.handle_signals()
    assert (
        "Worker 1 PID 101 healthy (age: 0s/3600s, mem: 0.00GB, restart in 3600s)"
        in caplog.messages
    )
    assert h.arbiter.stopping and h.arbiter.exit_code == 99
    assert h.signals == [
        (101, signal.SIGTERM, False),
        (102, signal.SIGTERM, False),
    ]  # the worker only, not its tree
    assert h.arbiter.ledger.decide_ticket(idle, h.clock.now) == (
        False,
        "stopping: launcher received SIGTERM",
    )
    idle.proc.returncode = 0
    h.clock.now += 4.0
    h.arbiter.tick(h.clock.now)
    assert len(h.signals) == 2  # still within the 5 s grace period
    h.clock.now += 1.5
    h.arbiter.check_stop(h.clock.now)
    assert h.signals[-1] == (101, signal.SIGKILL, True)
    busy.proc.returncode = -9
    h.arbiter.reap(h.clock.now)
    trial = h.state(0)
    assert trial.state == TrialState.FAIL and trial.user_attrs[tags.PREEMPTED] is True
    assert trial.user_attrs[tags.KILL_REASON] == (
        "preempted: launcher received SIGTERM; worker killed after the 5s grace period"
    )
    assert h.arbiter.done()


def test_second_signal_kills_at_once(tmp_path):
    h = Harness(tmp_path, grace_period=120.0)
    h.add_worker(1, 101, trial=True)
    h.arbiter.signal_queue.put_nowait(signal.SIGINT)
    h.arbiter.handle_signals()
    h.arbiter.signal_queue.put_nowait(signal.SIGINT)
    h.arbiter.handle_signals()
    assert h.signals == [(101, signal.SIGTERM, False), (101, signal.SIGKILL, True)]


def test_shutdown_sweeps_running_trials_of_its_workers_only(tmp_path):
    h = Harness(tmp_path)
    ours = h.study.ask()
    ours.set_user_attr(tags.WORKER_PID, 4242)
    ours.set_user_attr(tags.HOSTNAME, socket.gethostname())
    ours.set_user_attr(tags.LAUNCH_ID, h.arbiter.launch_id)
    other_host = h.study.ask()
    other_host.set_user_attr(tags.WORKER_PID, 4242)
    other_host.set_user_attr(tags.HOSTNAME, "another-host")
    other_launch = (
        h.study.ask()
    )  # same host, a pid this launch once used: another launch's live trial
    other_launch.set_user_attr(tags.WORKER_PID, 4242)
    other_launch.set_user_attr(tags.HOSTNAME, socket.gethostname())
    other_launch.set_user_attr(tags.LAUNCH_ID, "another-launch")
    h.arbiter.shutdown("launcher error: boom")
    assert (
        h.state(0).state == TrialState.FAIL and h.state(0).user_attrs[tags.WORKER_CRASHED] is True
    )
    assert h.state(0).user_attrs[tags.KILL_REASON] == "launcher stopped: launcher error: boom"
    assert (
        h.state(1).state == TrialState.RUNNING
    )  # another launcher's trial: its heartbeat handles it
    assert h.state(2).state == TrialState.RUNNING  # pid reuse never makes a trial ours


def test_victim_is_chosen_by_process_when_a_slot_is_shared_with_its_replacement(tmp_path):
    h = Harness(tmp_path)
    leaving = h.add_worker(1, 101, rss_gb=1.0)
    leaving.deny_reason = (
        "recycle: age 3601s >= 3600s"  # exiting; its replacement has the same slot
    )
    h.add_worker(1, 102, rss_gb=8.5, trial=True)
    h.arbiter.check_memory(h.clock.now)
    h.clock.now += 0.25  # the guard's chance (issue 16)
    h.arbiter.check_memory(h.clock.now)
    assert h.signals == [(102, signal.SIGTERM, True)]
    assert leaving.kill is None


def test_worker_dying_between_trial_creation_and_objective_start_leaves_nothing_running(tmp_path):
    """The trial exists (created with the worker's pid and host) but the supervisor never heard
    'started': it is found by those tags and ended FAIL, and counts toward T."""
    h = Harness(tmp_path)
    worker = h.add_worker(1, 101)
    worker.ticket = True  # granted, then the worker died inside Optuna's ask()
    orphan = h.study.ask()
    orphan.set_user_attr(tags.WORKER_PID, 101)
    orphan.set_user_attr(tags.HOSTNAME, socket.gethostname())
    orphan.set_user_attr(tags.LAUNCH_ID, h.arbiter.launch_id)
    worker.proc.returncode = -9
    h.arbiter.reap(h.clock.now)
    trial = h.state(0)
    assert trial.state == TrialState.FAIL and trial.user_attrs[tags.WORKER_CRASHED] is True
    assert trial.user_attrs[tags.KILL_REASON] == (
        "worker exited with SIGKILL — perhaps the kernel OOM killer before its objective started"
    )
    h.arbiter.merge_late_finished()
    assert list(h.arbiter.finished_states) == [orphan._trial_id]
