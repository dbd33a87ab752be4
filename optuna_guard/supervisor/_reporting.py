"""What the launch says while it runs: progress, per-worker health and status lines (every
``--status-interval`` and on SIGUSR1), memory samples for the event log, the live display."""

from __future__ import annotations

from typing import TYPE_CHECKING

from optuna_guard import events
from optuna_guard._logging import get_logger
from optuna_guard._units import GB, to_gb
from optuna_guard.memory import _tree
from optuna_guard.supervisor import _hung
from optuna_guard.supervisor._status import Progress, worker_status_line
from optuna_guard.supervisor._worker_handle import WorkerHandle

if TYPE_CHECKING:
    from optuna_guard.supervisor._arbiter import Arbiter

_log = get_logger(__name__)


class Reporter:
    """Status lines, memory samples and the live display, each on its own interval."""

    def __init__(self, arbiter: Arbiter, started: float) -> None:
        self._a = arbiter
        self._started = started
        self._next_status = started + arbiter.config.status_interval
        self._next_sample = started

    def progress(self, now: float) -> Progress:
        a = self._a
        states = list(a.ledger.finished_states.values())
        finished = len(states)
        elapsed = now - self._started
        eta = None
        target = a.config.n_trials
        if target is not None and finished and elapsed > 0:
            eta = (target - finished) * elapsed / finished
        system = a.memory.system
        return Progress(
            target=target,
            finished=finished,
            running=sum(1 for w in a.workers if w.trial_id is not None),
            complete=states.count("COMPLETE"),
            pruned=states.count("PRUNED"),
            failed=states.count("FAIL"),
            killed=a.kills,
            crashed=a.crashes,
            recycles=a.recycles,
            workers=len(a.workers),
            available_gb=None if system is None else system.available_bytes / GB,
            eta_s=eta,
        )

    def report(self, now: float) -> None:
        a = self._a
        a.display.update(self.progress(now))
        if now >= self._next_sample:
            self._next_sample = now + a.config.memory_sample_interval
            self.emit_memory_sample()
        if now >= self._next_status:
            self._next_status = now + a.config.status_interval
            self.log_status(now)

    def emit_memory_sample(self) -> None:
        a = self._a
        system = a.memory.system
        a.emit(
            events.MEMORY_SAMPLE,
            available_gb=None if system is None else to_gb(system.available_bytes),
            total_gb=None if system is None else to_gb(system.total_bytes),
            used_percent=None if system is None else round(system.percent, 1),
            workers=[
                {
                    "worker_id": w.worker_id,
                    "pid": w.pid,
                    "rss_gb": to_gb(w.rss_bytes),
                    "trial_number": w.trial_number,
                }
                for w in a.workers
            ],
        )

    def status_lines(self, now: float) -> list[str]:
        lines = []
        for worker in sorted(self._a.workers, key=lambda w: (w.worker_id, w.spawn_index)):
            lines.append(
                worker_status_line(
                    worker.worker_id,
                    worker.pid,
                    self.health(worker),
                    now - worker.started_at,
                    worker.age_limit,
                    worker.rss_bytes,
                )
            )
        lines.append(self.progress(now).line())
        return lines

    def log_status(self, now: float) -> None:
        a = self._a
        for line in self.status_lines(now):
            _log.info("%s", line)
        system = a.memory.system
        a.emit(
            events.STATUS,
            reason=self.progress(now).line(),
            available_gb=None if system is None else to_gb(system.available_bytes),
            workers=[
                {
                    "worker_id": w.worker_id,
                    "pid": w.pid,
                    "health": self.health(w),
                    "rss_gb": to_gb(w.rss_bytes),
                    "age_s": round(now - w.started_at, 1),
                    "trial_number": w.trial_number,
                }
                for w in a.workers
            ],
        )

    def _hang_note(self, worker: WorkerHandle, now: float) -> str | None:
        cpu = _tree.cpu_ticks(worker.pid)
        if cpu != worker.cpu_ticks or worker.cpu_changed_at is None:
            worker.cpu_ticks, worker.cpu_changed_at = cpu, now
        idle = now - worker.cpu_changed_at if cpu is not None else None
        return _hung.health_note(
            _tree.process_state(worker.pid), idle, worker.trial_id is not None
        )

    def health(self, worker: WorkerHandle) -> str:
        a = self._a
        note = self._hang_note(worker, a.clock()) if a.probe is None else None
        if note is not None:
            return note
        if worker.kill is not None:
            return "killing"
        if a.stopping:
            return "stopping"
        if worker.deny_reason is not None:
            return "recycling" if worker.recycled else "exiting"
        if not worker.ready:
            return "starting"
        recycle = a.config.recycle_worker_rss_gb
        if recycle is not None and worker.rss_bytes > recycle * GB:
            return "high-memory"
        return "healthy"
