"""Status output of a launch: the per-worker status lines people already grep for, a progress
line, and a rich live display on a terminal (plain lines otherwise).

The line shape is fixed on purpose (scripts parse it)::

    Worker 1 PID 17650 healthy (age: 74s/3600s, mem: 2.27GB, restart in 3526s)
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Any

from optuna_guard._units import GB


def worker_status_line(
    worker_id: int, pid: int, health: str, age_s: float, age_limit_s: float | None, rss_bytes: int
) -> str:
    """One worker's status line; ``age_limit_s=None`` (no age limit) prints ``/off`` and ``never``."""
    if age_limit_s is None:
        limit, restart = "off", "never"
    else:
        limit, restart = f"{age_limit_s:.0f}s", f"{max(age_limit_s - age_s, 0.0):.0f}s"
    return (
        f"Worker {worker_id} PID {pid} {health} "
        f"(age: {age_s:.0f}s/{limit}, mem: {rss_bytes / GB:.2f}GB, restart in {restart})"
    )


@dataclasses.dataclass(frozen=True)
class Progress:
    """A snapshot of the launch for the display and the progress line."""

    target: int | None
    finished: int
    running: int
    complete: int
    pruned: int
    failed: int
    killed: int
    crashed: int
    recycles: int
    workers: int
    available_gb: float | None
    eta_s: float | None

    def line(self) -> str:
        target = "" if self.target is None else f"/{self.target}"
        parts = [
            f"running {self.running}",
            f"complete {self.complete}",
            f"pruned {self.pruned}",
            f"failed {self.failed}",
            f"killed {self.killed}",
            f"crashed {self.crashed}",
            f"recycled {self.recycles}",
        ]
        tail = ""
        if self.available_gb is not None:
            tail += f", available {self.available_gb:.2f}GB"
        if self.eta_s is not None:
            tail += f", ETA {format_duration(self.eta_s)}"
        return f"Trials {self.finished}{target} finished ({', '.join(parts)}), {self.workers} workers{tail}"


def format_duration(seconds: float) -> str:
    seconds = max(round(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class NullDisplay:
    """No live display (not a terminal, or switched off): status goes to the log only."""

    def start(self) -> None:
        pass

    def update(self, progress: Progress) -> None:
        pass

    def stop(self) -> None:
        pass


class RichDisplay:
    """A rich live progress bar: trials finished / target, running, pruned, killed, failed, ETA."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
        )
        from rich.progress import (
            Progress as RichProgress,
        )

        self._console = Console(stderr=True)
        self._progress = RichProgress(
            TextColumn("[bold]trials"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[detail]}"),
            console=self._console,
            refresh_per_second=2,
            redirect_stderr=True,
            redirect_stdout=True,
        )
        self._task = self._progress.add_task("trials", total=None, detail="")
        self._handlers: list[tuple[logging.StreamHandler[Any], Any]] = []

    def start(self) -> None:
        self._progress.start()
        # Log lines must go through rich's proxy so they print above the live bar.
        for handler in logging.getLogger().handlers:
            if (
                isinstance(handler, logging.StreamHandler)
                and getattr(handler.stream, "name", None) == "<stderr>"
            ):
                self._handlers.append((handler, handler.stream))
                handler.setStream(sys.stderr)

    def update(self, progress: Progress) -> None:
        detail = (
            f"running {progress.running} · pruned {progress.pruned} · killed {progress.killed} · "
            f"failed {progress.failed} · workers {progress.workers}"
        )
        if progress.eta_s is not None:
            detail += f" · ETA {format_duration(progress.eta_s)}"
        self._progress.update(
            self._task, completed=progress.finished, total=progress.target, detail=detail
        )

    def stop(self) -> None:
        for handler, stream in self._handlers:
            handler.setStream(stream)
        self._handlers.clear()
        self._progress.stop()


def make_display(mode: str) -> NullDisplay | RichDisplay:
    """``auto``: rich on a terminal, nothing extra otherwise (status lines are logged anyway)."""
    if mode == "rich" or (mode == "auto" and sys.stderr.isatty()):
        try:
            return RichDisplay()
        except Exception:  # pragma: no cover - a broken terminal must not stop the launch
            return NullDisplay()
    return NullDisplay()
