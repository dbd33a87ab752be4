"""`optuna-guard report`: counts that match a study with known tags, the JSON schema, the text
and HTML outputs, and one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import uuid

import optuna
import pytest

from optuna_guard import tags
from optuna_guard.analysis import REPORT_KEYS, REPORT_SCHEMA, REPORT_VERSION
from optuna_guard.cli import main

sys.path.insert(0, os.path.dirname(__file__))
from analysis_study import EXPECTED, EXPECTED_WORKERS, build_known_study, write_event_log

optuna.logging.set_verbosity(optuna.logging.WARNING)

# The documented schema (docs/analysis.md), one level down.
NESTED_KEYS = {
    "study": {"name", "directions", "metric_names", "n_trials", "first_start", "last_complete"},
    "stopped": {tags.EMERGENCY_KILLED, tags.WORKER_CRASHED, tags.PREEMPTED, tags.DIVERGED},
    "retries": {"count", "trials", "shrunk", "exhausted"},
    "memory_constraint": {"trials_with_constraint", "infeasible", "infeasible_trials"},
    "best": {
        "valid_complete",
        "constrained",
        "feasible_complete",
        "trials",
        "killed_with_better_intermediate",
    },
    "event_log": {"path", "events", "first_ts", "last_ts", "by_event"},
    "plots": {
        "numeric_params",
        "categorical_params",
        "memory_points",
        "timeline_source",
        "timeline",
        "markers",
        "memory_samples",
    },
}
STOPPED_KEYS = {"count", "trials", "by_state", "by_limit", "top_reasons"}
BEST_TRIAL_KEYS = {"number", "values", "params", "peak_rss_gb", "duration_s", "constraint_memory"}
TOP_MEMORY_KEYS = {"number", "state", "end_state", "peak_rss_gb", "kill_reason", "params"}
WORKER_KEYS = {
    "worker_id",
    "pids",
    "trials_started",
    "trials_finished",
    "kills",
    "recycles",
    "crashes",
    "peak_rss_gb",
    "mean_rss_gb",
    "rss_samples",
}
SEGMENT_KEYS = {"worker_id", "trial_number", "start_ts", "end_ts", "end_state", "source"}


@pytest.fixture(scope="module")
def known(tmp_path_factory) -> tuple[str, str, str]:
    """(storage URL, study name, event log path) of the known study on SQLite (read only)."""
    directory = tmp_path_factory.mktemp("known")
    url = f"sqlite:///{directory / 'study.db'}"
    name = f"known-{uuid.uuid4().hex[:8]}"
    build_known_study(url, name)
    return url, name, write_event_log(directory / "events.jsonl")


def run_report(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["report", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_report_counts_match_the_study(known, capsys) -> None:
    url, name, events = known
    code, out, err = run_report(
        capsys, "--study-name", name, "--storage", url, "--format", "json", "--event-log", events
    )
    assert code == 0, err
    report = json.loads(out)

    assert tuple(report) == REPORT_KEYS
    assert report["schema"] == REPORT_SCHEMA and report["version"] == REPORT_VERSION
    for key, expected in NESTED_KEYS.items():
        assert set(report[key]) == expected, key
    for info in report["stopped"].values():
        assert set(info) == STOPPED_KEYS
    assert set(report["best"]["trials"][0]) == BEST_TRIAL_KEYS
    assert all(set(item) == TOP_MEMORY_KEYS for item in report["top_memory"])
    assert all(set(item) == WORKER_KEYS for item in report["workers"])
    assert all(set(seg) == SEGMENT_KEYS for seg in report["plots"]["timeline"])

    assert report["study"]["name"] == name and report["study"]["n_trials"] == EXPECTED["n_trials"]
    assert report["study"]["directions"] == ["minimize"]
    assert {
        k: v for k, v in report["trials_by_state"].items() if k in EXPECTED["states"]
    } == EXPECTED["states"]
    assert report["end_states"] == EXPECTED["end_states"]
    stopped = report["stopped"]
    assert stopped[tags.EMERGENCY_KILLED]["trials"] == EXPECTED["killed"]
    assert stopped[tags.EMERGENCY_KILLED]["by_limit"] == EXPECTED["killed_by_limit"]
    assert stopped[tags.EMERGENCY_KILLED]["top_reasons"][0] == {
        "reason": "OOM prevention [Trial #N split N/N]: available N GB < N GB",
        "count": 2,
        "example": "OOM prevention [Trial #6 split 2/5]: available 1.4 GB < 2.0 GB",
        "example_trial": 6,
    }
    assert stopped[tags.WORKER_CRASHED]["trials"] == EXPECTED["crashed"]
    assert stopped[tags.PREEMPTED]["trials"] == EXPECTED["preempted"]
    assert stopped[tags.DIVERGED]["trials"] == EXPECTED["diverged"]
    assert stopped[tags.DIVERGED]["top_reasons"][0]["reason"] == "NaN at step N"

    best = report["best"]
    assert [t["number"] for t in best["trials"]] == [EXPECTED["best_number"]]
    assert best["trials"][0]["values"] == [pytest.approx(EXPECTED["best_value"])]
    assert best["valid_complete"] == EXPECTED["valid_complete"]
    assert [k["number"] for k in best["killed_with_better_intermediate"]] == EXPECTED[
        "better_intermediate"
    ]
    assert best["killed_with_better_intermediate"][0]["intermediate_value"] == pytest.approx(0.15)
    assert [t["number"] for t in report["top_memory"]] == EXPECTED["top_memory"]
    assert report["retries"]["count"] == 2 and report["retries"]["shrunk"] == 1

    workers = {w["worker_id"]: w for w in report["workers"]}
    for wid, expected in EXPECTED_WORKERS.items():
        assert {k: workers[wid][k] for k in expected} == expected, wid
    assert report["event_log"]["by_event"]["trial_started"] == EXPECTED["n_trials"]
    plots = report["plots"]
    assert (
        plots["timeline_source"] == "event_log" and len(plots["timeline"]) == EXPECTED["n_trials"]
    )
    segment = {s["trial_number"]: s for s in plots["timeline"]}
    assert segment[6]["end_state"] == "killed" and segment[10]["end_state"] == "crashed"
    assert segment[6]["end_ts"] - segment[6]["start_ts"] == pytest.approx(30.0)
    # a hard kill logged as worker_killed + trial_killed is one marker; one recycle; one crash
    kinds = [m["event"] for m in plots["markers"]]
    assert kinds.count("worker_killed") == 3 and "trial_killed" not in kinds
    assert kinds.count("worker_recycled") == 1 and kinds.count("worker_crashed") == 1
    assert len(plots["memory_samples"]) == 3 * 39
    assert {p["name"] for p in plots["numeric_params"]} == {"batch_size", "width", "lr"}
    assert len(plots["memory_points"]) == EXPECTED["peak_rss_count"]


def test_text_report_shows_the_same_facts(known, capsys, tmp_path) -> None:
    url, name, events = known
    out_file = tmp_path / "report.txt"
    code, out, err = run_report(
        capsys, "--study-name", name, "--storage", url, "--event-log", events, "-o", str(out_file)
    )
    assert code == 0, err
    text = out_file.read_text()
    assert "\x1b[" not in text  # plain text in a file
    assert f"Study {name}: 17 trials (minimize)" in text
    for line in (
        "Trials by state",
        "Trials stopped early",
        "Best valid trial",
        "Highest peak memory",
        "Memory per worker",
    ):
        assert line in text, line
    for limit, count in EXPECTED["killed_by_limit"].items():
        assert f"{limit}: {count}" in text
    assert "Trial 6 (killed) reported 0.15 at step 1, better than the best valid value 0.2" in text
    assert "batch_size=512, width=1024" in text  # top-memory params
    assert "[Trial #N split N/N]" in text  # rich markup in reasons is printed, not swallowed

    code, out, err = run_report(capsys, "--study-name", name, "--storage", url)
    assert code == 0 and "Trials stopped early" in out and "Memory per worker" not in out


def test_html_report_is_one_self_contained_file(known, capsys, tmp_path) -> None:
    url, name, events = known
    out_file = tmp_path / "report.html"
    code, _out, err = run_report(
        capsys,
        "--study-name",
        name,
        "--storage",
        url,
        "--format",
        "html",
        "-o",
        str(out_file),
        "--event-log",
        events,
    )
    assert code == 0, err
    html = out_file.read_text()
    assert html.startswith("<!DOCTYPE html>")
    assert len(html) > 1_000_000  # plotly.js is inlined
    assert "<script src=" not in html
    for div in ("plot-memory-vs-params", "plot-timeline", "plot-memory-over-time"):
        assert f'id="{div}"' in html
    assert "Trial 6 (killed) reported 0.15" in html


def test_text_and_html_draw_the_same_tables_and_sentences(known) -> None:
    """Both renderers draw analysis._tables' blocks: every title, cell and note is in both."""
    import html as html_lib

    from optuna_guard.analysis import build_report, render_html, render_text
    from optuna_guard.analysis._tables import Note, report_blocks
    from optuna_guard.analysis._timeline import load_events
    from optuna_guard.storage import open_for_reading

    url, name, events = known
    report = build_report(open_for_reading(url, name), events=load_events(events))
    text, html = render_text(report, width=400), render_html(report)
    blocks = report_blocks(report)
    assert sum(not isinstance(b, Note) for b in blocks) == 5 and html.count("<table>") == 5
    for block in blocks:
        if isinstance(block, Note):
            pieces = [block.text]
        else:
            pieces = [block.title, *(c.name for c in block.columns)]
            for row in block.rows:
                pieces += [
                    line.strip()
                    for cell in row
                    for line in ([cell] if isinstance(cell, str) else cell)
                ]
        for piece in filter(None, pieces):
            assert piece in text, piece
            assert html_lib.escape(piece) in html, piece


def test_report_on_a_study_without_tags(tmp_path, capsys) -> None:
    url = f"sqlite:///{tmp_path / 'plain.db'}"
    study = optuna.create_study(study_name="plain", storage=url)
    study.optimize(lambda t: (t.suggest_float("x", -1, 1) - 0.2) ** 2, n_trials=5)
    code, out, err = run_report(
        capsys, "--study-name", "plain", "--storage", url, "--format", "json"
    )
    assert code == 0, err
    report = json.loads(out)
    assert tuple(report) == REPORT_KEYS
    assert report["trials_by_state"]["COMPLETE"] == 5
    assert all(info["count"] == 0 for info in report["stopped"].values())
    assert report["top_memory"] == [] and report["workers"] is None and report["event_log"] is None
    assert report["best"]["trials"][0]["number"] == study.best_trial.number
    assert (
        report["plots"]["timeline_source"] == "storage" and len(report["plots"]["timeline"]) == 5
    )

    html_file = tmp_path / "plain.html"
    assert (
        main(
            [
                "report",
                "--study-name",
                "plain",
                "--storage",
                url,
                "--format",
                "html",
                "-o",
                str(html_file),
            ]
        )
        == 0
    )
    html = html_file.read_text()
    assert 'id="plot-memory-vs-params-empty"' in html and 'id="plot-timeline"' in html
    code, out, err = run_report(capsys, "--study-name", "plain", "--storage", url)
    assert code == 0 and "no trial has a peak_rss_gb tag" in out


def test_multi_objective_best_is_the_valid_pareto_front(tmp_path, capsys) -> None:
    url = f"sqlite:///{tmp_path / 'mo.db'}"
    study = optuna.create_study(study_name="mo", storage=url, directions=["minimize", "minimize"])
    for x, y, killed in (
        (1.0, 3.0, False),
        (2.0, 2.0, False),
        (3.0, 3.0, False),
        (0.5, 0.5, True),
    ):
        trial = study.ask()
        if killed:
            trial.set_user_attr(tags.EMERGENCY_KILLED, True)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, [x, y])
    code, out, err = run_report(capsys, "--study-name", "mo", "--storage", url, "--format", "json")
    assert code == 0, err
    best = json.loads(out)["best"]
    assert sorted(t["number"] for t in best["trials"]) == [0, 1]


def test_the_best_valid_trial_respects_the_memory_constraint(tmp_path, capsys) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    study = optuna.create_study(study_name="c", storage=url)
    for value, constraint in ((0.1, 2.0), (0.3, -1.0), (0.5, -3.0)):
        trial = study.ask()
        trial.set_constraint("memory", constraint)
        study.tell(trial, value)
    code, out, err = run_report(capsys, "--study-name", "c", "--storage", url, "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert report["best"]["trials"][0]["number"] == 1  # trial 0 is better but over the budget
    assert report["memory_constraint"] == {
        "trials_with_constraint": 3,
        "infeasible": 1,
        "infeasible_trials": [0],
    }


def test_report_reads_postgresql(postgres_url, capsys) -> None:
    name = f"report-pg-{uuid.uuid4().hex[:10]}"
    build_known_study(postgres_url, name)
    try:
        code, out, err = run_report(
            capsys, "--study-name", name, "--storage", postgres_url, "--format", "json"
        )
        assert code == 0, err
        report = json.loads(out)
        assert report["end_states"] == EXPECTED["end_states"]
        assert report["stopped"][tags.EMERGENCY_KILLED]["trials"] == EXPECTED["killed"]
    finally:
        optuna.delete_study(study_name=name, storage=postgres_url)


# -- bad input: one line, exit 2, nothing created -----------------------------------------------


def _one_line_error(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("optuna-guard report: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_unknown_study_is_exit_2_and_no_study_is_created(known, capsys) -> None:
    url, name, _ = known
    code, _out, err = run_report(capsys, "--study-name", "does-not-exist", "--storage", url)
    assert code == 2
    _one_line_error(err, "study 'does-not-exist' not found")
    assert optuna.get_all_study_names(storage=url) == [name]


def test_missing_sqlite_file_is_exit_2_and_is_not_created(tmp_path, capsys) -> None:
    path = tmp_path / "nope.db"
    code, _out, err = run_report(capsys, "--study-name", "x", "--storage", f"sqlite:///{path}")
    assert code == 2
    _one_line_error(err, "does not exist")
    assert not path.exists()


@pytest.mark.parametrize(
    ("storage", "needle"),
    [
        ("not-a-url", "is not a database URL"),
        ("nosuchdb://host/x", "is not usable"),
        ("postgresql+psycopg://postgres@127.0.0.1:1/test", "cannot reach storage"),
    ],
)
def test_bad_storage_is_exit_2(storage, needle, capsys) -> None:
    code, _out, err = run_report(capsys, "--study-name", "x", "--storage", storage)
    assert code == 2
    _one_line_error(err, needle)


def test_a_sqlite_file_that_is_not_an_optuna_storage_is_exit_2(tmp_path, capsys) -> None:
    path = tmp_path / "garbage.db"
    path.write_text("this is not sqlite")
    code, _out, err = run_report(capsys, "--study-name", "x", "--storage", f"sqlite:///{path}")
    assert code == 2
    _one_line_error(err, "cannot read storage", "file is not a database")


@pytest.mark.parametrize("kind", ["missing", "directory", "garbage", "empty"])
def test_unreadable_event_log_is_exit_2(known, kind, tmp_path, capsys) -> None:
    url, name, events = known
    target = tmp_path / f"events-{kind}"
    if kind == "directory":
        target.mkdir()
    elif kind == "garbage":
        lines = pathlib.Path(events).read_text().splitlines()
        target.write_text("\n".join([*lines[:3], "{not json", *lines[3:]]) + "\n")
    elif kind == "empty":
        target.write_text("")
    code, _out, err = run_report(
        capsys, "--study-name", name, "--storage", url, "--event-log", str(target)
    )
    assert code == 2
    _one_line_error(err, "event log")


def test_output_into_a_missing_directory_is_exit_2(known, tmp_path, capsys) -> None:
    url, name, _ = known
    code, _out, err = run_report(
        capsys, "--study-name", name, "--storage", url, "-o", str(tmp_path / "no" / "r.html")
    )
    assert code == 2
    _one_line_error(err, "output directory")


def test_cli_exit_code_in_a_real_process(known) -> None:
    url, name, _ = known
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "optuna_guard.cli",
            "report",
            "--study-name",
            name,
            "--storage",
            url,
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["study"]["name"] == name
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "optuna_guard.cli",
            "report",
            "--study-name",
            "nope",
            "--storage",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not found" in bad.stderr
