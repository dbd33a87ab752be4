"""The standalone memory monitor behind ``optuna-guard monitor``: sample, print, log, analyze.

A sample is one JSON object per line, so a week of samples can be grepped, tailed and read back
by ``analyze_log`` (what was the lowest available memory, how long were we under the warning
level, is usage creeping up):

    {"timestamp": "2025-01-01T12:00:00.000+01:00", "ts": 1735729200.0,
     "memory": {"total_gb", "used_gb", "available_gb", "percent", "source"},
     "swap": {"total_gb", "used_gb", "percent"},
     "psi": {"some_avg10", "full_avg10"},            # null values where the kernel has no PSI
     "gpu": [{"index", "name", "total_gb", "used_gb", "percent"}, ...]}
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import itertools
import json
import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TextIO

from optuna_guard._units import GB
from optuna_guard.events import read_json_lines
from optuna_guard.exceptions import ConfigError
from optuna_guard.memory import MemoryProbe, default_probe
from optuna_guard.time_budget import format_duration

DEFAULT_LOG_FILE = "optuna_guard_monitor.jsonl"


def _gb(value_bytes: float) -> float:
    return round(value_bytes / GB, 3)


def take_sample(probe: MemoryProbe | None = None, *, now: float | None = None) -> dict[str, Any]:
    """One reading of RAM (cgroup aware), swap, PSI and every GPU, as a JSON-able dict."""
    probe = probe or default_probe()
    system = probe.system()
    gpus = probe.gpus()
    now = time.time() if now is None else now
    return {
        "timestamp": _dt.datetime.fromtimestamp(now)
        .astimezone()
        .isoformat(timespec="milliseconds"),
        "ts": round(now, 3),
        "memory": {
            "total_gb": _gb(system.total_bytes),
            "used_gb": _gb(system.used_bytes),
            "available_gb": _gb(system.available_bytes),
            "percent": round(system.percent, 1),
            "source": system.source,
        },
        "swap": {
            "total_gb": _gb(system.swap_total_bytes),
            "used_gb": _gb(system.swap_used_bytes),
            "percent": round(system.swap_percent, 1),
        },
        "psi": {"some_avg10": system.psi_some_avg10, "full_avg10": system.psi_full_avg10},
        "gpu": [
            {
                "index": gpu.index,
                "name": gpu.name,
                "total_gb": _gb(gpu.total_bytes),
                "used_gb": _gb(gpu.used_bytes),
                "percent": round(gpu.percent, 1),
            }
            for gpu in gpus
        ],
    }


def format_sample(record: dict[str, Any]) -> str:
    """The one terminal line per sample."""
    mem, swap, psi = record["memory"], record["swap"], record.get("psi") or {}
    clock = record["timestamp"][11:19]
    parts = [
        f"{clock} RAM {mem['used_gb']:.2f}/{mem['total_gb']:.2f} GB used ({mem['percent']:.1f}%), "
        f"{mem['available_gb']:.2f} GB available [{mem.get('source', 'host')}]",
        f"swap {swap['used_gb']:.2f}/{swap['total_gb']:.2f} GB ({swap['percent']:.1f}%)",
    ]
    if psi.get("some_avg10") is not None:
        full = psi.get("full_avg10")
        parts.append(
            f"PSI some {psi['some_avg10']:.2f}%"
            + (f" full {full:.2f}%" if full is not None else "")
        )
    else:
        parts.append("PSI n/a")
    if record["gpu"]:
        for gpu in record["gpu"]:
            parts.append(
                f"GPU{gpu['index']} {gpu['used_gb']:.2f}/{gpu['total_gb']:.2f} GB ({gpu['percent']:.1f}%)"
            )
    else:
        parts.append("no GPU")
    return " | ".join(parts)


def run_monitor(
    *,
    interval: float = 1.0,
    log_path: str | os.PathLike[str] | None = DEFAULT_LOG_FILE,
    once: bool = False,
    out: Callable[[str], None] = print,
    stop: threading.Event | None = None,
    probe: MemoryProbe | None = None,
    max_samples: int | None = None,
) -> int:
    """Print (and append to ``log_path`` unless None) one sample per ``interval`` until ``stop``
    is set, ``max_samples`` are taken, or once with ``once``. Returns the number of samples."""
    if not (isinstance(interval, (int, float)) and math.isfinite(interval) and interval > 0):
        raise ConfigError(f"interval must be a positive number of seconds but got {interval!r}.")
    stop = stop or threading.Event()
    handle: TextIO | None = None
    if log_path is not None:
        try:
            directory = os.path.dirname(os.path.abspath(os.fspath(log_path)))
            os.makedirs(directory, exist_ok=True)
            handle = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 (closed in finally below)
        except OSError as exc:
            raise ConfigError(
                f"cannot write the monitor log {os.fspath(log_path)!r}: {exc.strerror}; pass --log FILE in a writable place or --no-log."
            ) from None
    taken = 0
    try:
        while True:
            record = take_sample(probe)
            out(format_sample(record))
            if handle is not None:
                handle.write(json.dumps(record) + "\n")
                handle.flush()
            taken += 1
            if once or (max_samples is not None and taken >= max_samples):
                return taken
            if stop.wait(interval):
                return taken
    finally:
        if handle is not None:
            handle.close()


# -- analysis -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LogSummary:
    """What ``--analyze`` reports about a monitor log."""

    path: str
    samples: int
    start: str
    end: str
    duration_s: float
    min_available_gb: float
    min_available_at: str
    peak_percent: float
    peak_percent_at: str
    peak_swap_percent: float
    warn_available_gb: float
    below_warning_s: float
    below_warning_samples: int
    trend_gb_per_hour: float | None  # slope of used memory; > 0 means usage is growing
    peak_gpu_percent: float | None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_samples(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Samples of a monitor log; a torn last line is skipped. ConfigError when unreadable."""
    name = os.fspath(path)
    samples = read_json_lines(
        name,
        _parse_sample,
        what="monitor log",
        unreadable_hint="pass a file written by 'optuna-guard monitor --log'.",
        bad_line="not a monitor sample; is it a file written by 'optuna-guard monitor'?",
    )
    if not samples:
        raise ConfigError(
            f"monitor log {name!r} has no samples; run 'optuna-guard monitor --log {name}' first."
        )
    return samples


def _parse_sample(line: str) -> dict[str, Any]:
    """One monitor sample; ValueError/KeyError/TypeError when the line is not one."""
    record: dict[str, Any] = json.loads(line)
    _time_of(record)
    for key in ("available_gb", "used_gb", "percent"):
        float(record["memory"][key])
    return record


def _parse_time(text: str) -> float:
    return _dt.datetime.fromisoformat(text).timestamp()


def _time_of(record: dict[str, Any]) -> float:
    return float(record["ts"]) if "ts" in record else _parse_time(record["timestamp"])


def analyze_samples(
    samples: Iterable[dict[str, Any]], *, warn_available_gb: float = 4.0, path: str = ""
) -> LogSummary:
    ordered = sorted(samples, key=_time_of)
    if not ordered:
        raise ConfigError("no monitor samples to analyze.")
    times = [_time_of(r) for r in ordered]
    available = [float(r["memory"]["available_gb"]) for r in ordered]
    used = [float(r["memory"]["used_gb"]) for r in ordered]
    percent = [float(r["memory"]["percent"]) for r in ordered]
    swap = [float((r.get("swap") or {}).get("percent", 0.0)) for r in ordered]
    gpu_percents = [float(g["percent"]) for r in ordered for g in (r.get("gpu") or [])]

    # Time under the warning level: each sample stands for the gap to the next one; a gap
    # longer than 3x the typical one is a pause of the monitor and counts one typical gap.
    gaps = [b - a for a, b in itertools.pairwise(times)]
    typical = statistics.median(gaps) if gaps else 0.0
    below_s = 0.0
    for index, value in enumerate(available):
        if value < warn_available_gb:
            gap = gaps[index] if index < len(gaps) else typical
            below_s += gap if gap <= 3 * typical or typical == 0 else typical
    low = min(range(len(ordered)), key=lambda i: available[i])
    high = max(range(len(ordered)), key=lambda i: percent[i])
    return LogSummary(
        path=path,
        samples=len(ordered),
        start=ordered[0]["timestamp"],
        end=ordered[-1]["timestamp"],
        duration_s=round(times[-1] - times[0], 3),
        min_available_gb=available[low],
        min_available_at=ordered[low]["timestamp"],
        peak_percent=percent[high],
        peak_percent_at=ordered[high]["timestamp"],
        peak_swap_percent=max(swap),
        warn_available_gb=warn_available_gb,
        below_warning_s=round(below_s, 3),
        below_warning_samples=sum(1 for v in available if v < warn_available_gb),
        trend_gb_per_hour=_slope_per_hour(times, used),
        peak_gpu_percent=max(gpu_percents) if gpu_percents else None,
    )


def _slope_per_hour(times: list[float], values: list[float]) -> float | None:
    """Least-squares slope of ``values`` over time, per hour (None with < 2 distinct times)."""
    if len(times) < 2:
        return None
    mean_t = sum(times) / len(times)
    mean_v = sum(values) / len(values)
    var = sum((t - mean_t) ** 2 for t in times)
    if var == 0:
        return None
    cov = sum((t - mean_t) * (v - mean_v) for t, v in zip(times, values))
    return round(cov / var * 3600.0, 3)


def analyze_log(path: str | os.PathLike[str], *, warn_available_gb: float = 4.0) -> LogSummary:
    """Summarize a monitor log (see :class:`LogSummary`)."""
    return analyze_samples(
        read_samples(path), warn_available_gb=warn_available_gb, path=os.fspath(path)
    )


def format_summary(summary: LogSummary) -> str:
    trend = (
        "n/a (fewer than 2 samples)"
        if summary.trend_gb_per_hour is None
        else f"{summary.trend_gb_per_hour:+.3f} GB/hour ({'growing' if summary.trend_gb_per_hour > 0 else 'flat or shrinking'})"
    )
    share = 100.0 * summary.below_warning_s / summary.duration_s if summary.duration_s else 0.0
    lines = [
        f"Monitor log {summary.path}",
        f"  samples              {summary.samples} over {format_duration(summary.duration_s)} ({summary.start} .. {summary.end})",
        f"  minimum available    {summary.min_available_gb:.2f} GB at {summary.min_available_at}",
        f"  peak RAM use         {summary.peak_percent:.1f}% at {summary.peak_percent_at}",
        f"  peak swap use        {summary.peak_swap_percent:.1f}%",
        f"  below {summary.warn_available_gb:.2f} GB warning {format_duration(summary.below_warning_s)} ({share:.1f}% of the time, {summary.below_warning_samples} samples)",
        f"  used-memory trend    {trend}",
    ]
    if summary.peak_gpu_percent is not None:
        lines.append(f"  peak GPU use         {summary.peak_gpu_percent:.1f}%")
    return "\n".join(lines)


__all__ = [
    "DEFAULT_LOG_FILE",
    "LogSummary",
    "analyze_log",
    "analyze_samples",
    "format_sample",
    "format_summary",
    "read_samples",
    "run_monitor",
    "take_sample",
]
