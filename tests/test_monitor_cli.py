"""`optuna-guard monitor`: --once, the JSON-lines log, continuous mode + SIGTERM, --analyze,
and one-line errors with exit code 2 for bad arguments."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from fakes import FakeProbe

from optuna_guard import monitor
from optuna_guard._units import GB
from optuna_guard.cli import main
from optuna_guard.memory import GpuMemory

CLI = [sys.executable, "-m", "optuna_guard.cli", "monitor"]


def test_once_prints_one_line_and_logs_one_sample(tmp_path) -> None:
    log = tmp_path / "logs" / "mem.jsonl"
    out = subprocess.run(
        [*CLI, "--once", "--log", str(log)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    assert "RAM" in lines[0] and "GB available" in lines[0] and "swap" in lines[0]
    [record] = [json.loads(line) for line in log.read_text().splitlines()]
    assert set(record) >= {"timestamp", "memory", "swap", "gpu"}
    assert set(record["memory"]) >= {"total_gb", "used_gb", "available_gb", "percent"}
    assert 0 < record["memory"]["available_gb"] <= record["memory"]["total_gb"]
    assert record["memory"]["used_gb"] == pytest.approx(
        record["memory"]["total_gb"] - record["memory"]["available_gb"], abs=0.01
    )
    assert isinstance(record["gpu"], list)


def test_once_without_log_writes_no_file(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["monitor", "--once", "--no-log"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []


def test_default_log_file_in_cwd(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["monitor", "--once"]) == 0
    assert len((tmp_path / monitor.DEFAULT_LOG_FILE).read_text().splitlines()) == 1


def test_continuous_mode_stops_cleanly_on_sigterm(tmp_path) -> None:
    log = tmp_path / "mem.jsonl"
    proc = subprocess.Popen(
        [*CLI, "--interval", "0.1", "--log", str(log)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if log.exists() and len(log.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    samples = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(samples) >= 3
    assert len(stdout.strip().splitlines()) == len(samples)
    times = [s["ts"] for s in samples]
    assert times == sorted(times)


def test_library_loop_with_a_fake_probe() -> None:
    probe = FakeProbe(
        total_gb=32.0,
        available_gb=20.0,
        psi_some=1.25,
        psi_full=0.5,
        gpus=[GpuMemory(0, "Fake GPU", 16 * GB, 4 * GB)],
    )
    lines: list[str] = []
    assert (
        monitor.run_monitor(
            interval=0.01, log_path=None, out=lines.append, probe=probe, max_samples=3
        )
        == 3
    )
    assert len(lines) == 3
    assert "RAM 12.00/32.00 GB used (37.5%), 20.00 GB available [fake]" in lines[0]
    assert "PSI some 1.25% full 0.50%" in lines[0]
    assert "GPU0 4.00/16.00 GB (25.0%)" in lines[0]
    record = monitor.take_sample(probe)
    assert record["gpu"] == [
        {"index": 0, "name": "Fake GPU", "total_gb": 16.0, "used_gb": 4.0, "percent": 25.0}
    ]
    assert record["psi"] == {"some_avg10": 1.25, "full_avg10": 0.5}


# -- --analyze ----------------------------------------------------------------------------------


def _write_log(
    path, available, used, *, start=1_700_000_000.0, step=3600.0, percent=None, torn=False
) -> None:
    lines = []
    for index, (avail, use) in enumerate(zip(available, used)):
        ts = start + index * step
        record = monitor.take_sample(FakeProbe(total_gb=avail + use, available_gb=avail), now=ts)
        record["memory"].update(
            {"available_gb": avail, "used_gb": use, "percent": percent[index] if percent else 50.0}
        )
        lines.append(json.dumps(record))
    text = "\n".join(lines) + "\n"
    if torn:
        text += '{"timestamp": "2024-'  # the monitor was killed mid-write
    path.write_text(text)


def test_analyze_summarizes_a_log(tmp_path, capsys) -> None:
    log = tmp_path / "mem.jsonl"
    _write_log(
        log,
        available=[6.0, 3.0, 2.0, 5.0, 6.0],
        used=[2.0, 5.0, 6.0, 3.0, 2.0],
        percent=[25.0, 62.5, 75.0, 37.5, 25.0],
        torn=True,
    )
    summary = monitor.analyze_log(log, warn_available_gb=4.0)
    assert summary.samples == 5
    assert summary.duration_s == 4 * 3600
    assert summary.min_available_gb == 2.0
    assert summary.peak_percent == 75.0
    assert summary.below_warning_s == 2 * 3600
    assert summary.below_warning_samples == 2
    assert summary.trend_gb_per_hour == pytest.approx(-0.2)

    assert main(["monitor", "--analyze", str(log), "--warn-available-gb", "4"]) == 0
    text = capsys.readouterr().out
    assert "samples              5 over 4h00m00s" in text
    assert "minimum available    2.00 GB" in text
    assert "peak RAM use         75.0%" in text
    assert "below 4.00 GB warning 2h00m00s (50.0% of the time, 2 samples)" in text
    assert "-0.200 GB/hour" in text


def test_analyze_reports_a_growing_trend(tmp_path) -> None:
    log = tmp_path / "mem.jsonl"
    _write_log(log, available=[10.0, 9.5, 9.0, 8.5], used=[1.0, 1.5, 2.0, 2.5], step=1800.0)
    summary = monitor.analyze_log(log, warn_available_gb=4.0)
    assert summary.trend_gb_per_hour == pytest.approx(1.0)
    assert summary.below_warning_s == 0


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--interval", "0"], "--interval"),
        (["--interval", "-1"], "--interval"),
        (["--interval", "soon"], "--interval"),
        (["--log", "x.jsonl", "--no-log"], "--no-log"),
        (["--analyze", "/nonexistent/mem.jsonl"], "/nonexistent/mem.jsonl"),
        (["--analyze", "mem.jsonl", "--once"], "--analyze"),
        (["--warn-available-gb", "-2", "--once"], "--warn-available-gb"),
        (["--frobnicate"], "--frobnicate"),
    ],
)
def test_bad_arguments_are_one_line_errors_with_exit_2(args, needle, tmp_path) -> None:
    (tmp_path / "mem.jsonl").write_text("")
    out = subprocess.run(CLI + args, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert needle in lines[0]
    assert out.stdout == ""


def test_analyze_rejects_a_file_that_is_not_a_monitor_log(tmp_path, capsys) -> None:
    log = tmp_path / "mem.jsonl"
    _write_log(log, available=[6.0, 5.0], used=[2.0, 3.0])
    log.write_text(log.read_text() + "not json\n" + log.read_text())
    assert main(["monitor", "--analyze", str(log)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 3" in err[0]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main(["monitor", "--analyze", str(empty)]) == 2
    assert "no samples" in capsys.readouterr().err
