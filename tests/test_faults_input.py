"""Bad input is one line on stderr, never a traceback, and nothing is written to the storage
before every input is checked (issue 10 item 6, D14/D17)."""

from __future__ import annotations

import signal

import optuna
import pytest
from supervisor_helpers import cli, objective_spec, start_cli, wait_for

QUICK = objective_spec("launcher_quick")


def _run(*extra: str, study: str = "s", storage: str, logs: str) -> list[str]:
    return [
        "run",
        QUICK,
        "--study-name",
        study,
        "--storage",
        storage,
        "--log-dir",
        logs,
        "--display",
        "off",
        "--n-trials",
        "1",
        "--min-available-gb",
        "0.25",
        "--warn-available-gb",
        "0.5",
        *extra,
    ]


def _one_line(result, code: int = 2) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_in_memory_sqlite_is_refused_in_one_line(url, tmp_path):
    """Before: 115-line traceback, exit 1."""
    line = _one_line(cli(*_run(storage=url, logs=str(tmp_path / "logs")), cwd=str(tmp_path)))
    assert "in-memory SQLite" in line and "never share" in line


@pytest.mark.postgres
def test_600_character_study_name_on_postgresql_is_one_line(postgres_url, tmp_path):
    """Before: 119-line traceback, exit 1."""
    line = _one_line(
        cli(
            *_run(study="y" * 600, storage=postgres_url, logs=str(tmp_path / "logs")),
            cwd=str(tmp_path),
        )
    )
    assert "--study-name is 600 characters long" in line


def test_report_into_an_unwritable_place_is_exit_1_one_line(tmp_path):
    """Before: FileNotFoundError traceback."""
    url = f"sqlite:///{tmp_path / 'r.db'}"
    optuna.create_study(study_name="r", storage=url).optimize(
        lambda t: t.suggest_float("x", 0, 1), n_trials=1
    )
    line = _one_line(
        cli(
            "report",
            "--study-name",
            "r",
            "--storage",
            url,
            "--format",
            "html",
            "-o",
            "/proc/x.html",
        ),
        code=1,
    )
    assert line.startswith("optuna-guard report: error: cannot write '/proc/x.html'")


@pytest.mark.parametrize(
    "extra", [("--sampler", "nosuch"), ("--pruner", "nosuch"), ("--log-dir", "/proc/og-logs")]
)
def test_bad_input_leaves_no_study_behind(extra, tmp_path):
    """D17. Before: the study was created before --sampler/--log-dir were checked."""
    db = tmp_path / "study.db"
    args = _run(storage=f"sqlite:///{db}", logs=str(tmp_path / "logs"))
    if extra[0] == "--log-dir":
        args[args.index("--log-dir") + 1] = extra[1]
    else:
        args += list(extra)
    _one_line(cli(*args, cwd=str(tmp_path)))
    if db.exists():
        assert optuna.get_all_study_names(storage=f"sqlite:///{db}") == []


def test_launchers_own_kills_are_not_blamed_on_the_oom_killer(tmp_path):
    """D17. Before: 'exited with SIGKILL — perhaps the kernel OOM killer' and 'died before its
    first trial' for workers the launcher killed itself at the grace period."""
    url = f"sqlite:///{tmp_path / 'k.db'}"
    proc = start_cli(
        "run",
        objective_spec("faults_objs", "stubborn"),
        "--study-name",
        "k",
        "--storage",
        url,
        "--log-dir",
        str(tmp_path / "logs"),
        "--display",
        "off",
        "--workers",
        "2",
        "--n-trials",
        "4",
        "--grace-period",
        "1",
        "--min-available-gb",
        "0.25",
        "--warn-available-gb",
        "0.5",
        cwd=str(tmp_path),
    )
    try:
        wait_for(lambda: _running(url) >= 2, timeout=60, what="two RUNNING trials")
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 99, err[-2000:]
    assert (
        "perhaps the kernel OOM killer" not in err and "died before its first trial" not in err
    ), err[-3000:]
    trials = optuna.load_study(study_name="k", storage=url).get_trials()
    assert trials and all(t.state.name == "FAIL" and t.user_attrs.get("preempted") for t in trials)


def _running(url: str) -> int:
    try:
        return sum(
            t.state.name == "RUNNING"
            for t in optuna.load_study(study_name="k", storage=url).get_trials()
        )
    except Exception:
        return 0
