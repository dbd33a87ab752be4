"""Objective fingerprints: recorded on the study, a changed objective refused before any worker
starts (exit 2, one line), ``--allow-changed-objective`` makes version 2 and the report
separates versions; the standalone ``@guard`` warns or raises; ``--sampler-history current``."""

from __future__ import annotations

import json
import logging
import os

import optuna
import pytest
from optuna.trial import TrialState
from supervisor_helpers import cli

from optuna_guard import guard
from optuna_guard.analysis import build_report, render_html, trials_frame, valid_trials
from optuna_guard.fingerprint import (
    CURRENT_ATTR,
    OBJECTIVE_VERSION,
    VERSIONS_ATTR,
    ObjectiveChangedError,
    fingerprint_file,
    fingerprint_spec,
    resolve_version,
)
from optuna_guard.resume import CurrentVersionSampler

OBJECTIVE = """
import time


def helper():
    return 1


def objective(trial):
    x = trial.suggest_float("x", -2.0, 2.0)
    time.sleep(0.01)
    return (x - 0.5) ** 2
"""


@pytest.fixture(params=["sqlite", "postgres"])
def storage_url(request, tmp_path, unique_study_name):
    """A storage URL; on PostgreSQL the test's study is deleted afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fp.db'}"
        return
    url = request.getfixturevalue("postgres_url")
    yield url
    try:
        optuna.delete_study(study_name=unique_study_name, storage=url)
    except KeyError:
        pass


def _attrs(study: optuna.Study) -> dict:
    return study._storage.get_study_system_attrs(study._study_id)


# ------------------------------------------------------------------------------ unit level
def test_fingerprint_parts_line_endings_and_other_functions(tmp_path):
    lf, crlf = tmp_path / "lf.py", tmp_path / "crlf.py"
    lf.write_bytes(OBJECTIVE.encode())
    crlf.write_bytes(OBJECTIVE.replace("\n", "\r\n").encode())
    a = fingerprint_file(str(lf), "objective", spec_text="obj.py:objective")
    b = fingerprint_file(str(crlf), "objective", spec_text="obj.py:objective")
    assert a.digest == b.digest  # line endings normalised

    lf.write_text(OBJECTIVE.replace("return 1", "return 2"))  # another function in the file
    c = fingerprint_file(str(lf), "objective", spec_text="obj.py:objective")
    assert c.function == a.function and c.file != a.file and c.digest != a.digest

    lf.write_text(OBJECTIVE.replace("(x - 0.5)", "(x - 0.25)"))
    d = fingerprint_file(str(lf), "objective", spec_text="obj.py:objective", extra=["data-v2"])
    assert d.function != a.function and d.extra and d.extra != a.extra


def test_module_spec_is_fingerprinted_without_importing_it(tmp_path):
    package = tmp_path / "pkg_fp"
    package.mkdir()
    marker = tmp_path / "imported"
    (package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (package / "train.py").write_text(f"open({str(marker)!r}, 'w').close()\n" + OBJECTIVE)
    fp = fingerprint_spec("pkg_fp.train:objective", search_path=[str(tmp_path)])
    assert fp.file_path == str(package / "train.py") and fp.function != "unavailable"
    assert not marker.exists()
    # the directory of a file spec is not part of it: another checkout is the same objective
    other = tmp_path / "other"
    other.mkdir()
    (tmp_path / "a.py").write_text(OBJECTIVE)
    (other / "a.py").write_text(OBJECTIVE)
    assert (
        fingerprint_spec(f"{tmp_path / 'a.py'}:objective").digest
        == fingerprint_spec(f"{other / 'a.py'}:objective").digest
    )


def test_resolve_version_records_matches_refuses_allows_and_reverts(tmp_path):
    study = optuna.create_study(study_name="fp")
    path = tmp_path / "obj.py"
    path.write_text(OBJECTIVE)
    v1 = fingerprint_file(str(path), "objective", spec_text="obj.py:objective")
    assert resolve_version(study, v1, allow_changed=False, how_to_allow="x").version == 1
    assert resolve_version(study, v1, allow_changed=False, how_to_allow="x").recorded is False
    path.write_text(OBJECTIVE.replace("0.5", "0.7"))
    v2 = fingerprint_file(str(path), "objective", spec_text="obj.py:objective")
    with pytest.raises(
        ObjectiveChangedError,
        match=r"function source and defining file .*obj.py differ; x to record it as version 2",
    ):
        resolve_version(study, v2, allow_changed=False, how_to_allow="x")
    assert resolve_version(study, v2, allow_changed=True, how_to_allow="x").version == 2
    assert (
        resolve_version(study, v1, allow_changed=True, how_to_allow="x").version == 1
    )  # reverted code
    attrs = _attrs(study)
    assert attrs[CURRENT_ATTR] == 1 and [v["version"] for v in attrs[VERSIONS_ATTR]] == [1, 2]


# ------------------------------------------------------------------------- the launcher
def _launch(
    tmp_path, spec: str, study: str, url: str, *extra: str, logs: str = "logs", n: int = 4
):
    return cli(
        "run",
        spec,
        "--study-name",
        study,
        "--storage",
        url,
        "--workers",
        "1",
        "--n-trials",
        str(n),
        "--log-dir",
        str(tmp_path / logs),
        "--display",
        "off",
        "--max-worker-age",
        "off",
        *extra,
        cwd=str(tmp_path),
        timeout=180,
    )


def test_changed_objective_exits_2_before_any_worker_and_allow_makes_version_2(
    tmp_path, storage_url, unique_study_name
):
    path = tmp_path / "train.py"
    path.write_text(OBJECTIVE)
    spec = f"{path}:objective"
    first = _launch(tmp_path, spec, unique_study_name, storage_url)
    assert first.returncode == 0, first.stderr[-2000:]
    study = optuna.load_study(study_name=unique_study_name, storage=storage_url)
    versions = _attrs(study)[VERSIONS_ATTR]
    assert len(versions) == 1 and len(versions[0]["fingerprint"]["digest"]) == 64
    assert {t.user_attrs[OBJECTIVE_VERSION] for t in study.trials} == {1}

    status = cli(
        "status",
        "--study-name",
        unique_study_name,
        "--storage",
        storage_url,
        "--json",
        cwd=str(tmp_path),
    )
    objective = json.loads(status.stdout)["objective"]
    assert (
        objective["current_version"] == 1
        and objective["digest"] == versions[0]["fingerprint"]["digest"]
    )

    path.write_text(OBJECTIVE.replace("(x - 0.5)", "(x - 0.75)"))  # a "bug fix"
    refused = _launch(tmp_path, spec, unique_study_name, storage_url, logs="logs2")
    assert refused.returncode == 2
    lines = [
        line for line in refused.stderr.splitlines() if line.strip() and not line.startswith("[I ")
    ]
    assert len(lines) == 1, refused.stderr
    assert (
        "function source" in lines[0]
        and "--allow-changed-objective" in lines[0]
        and "version 2" in lines[0]
    )
    assert not list((tmp_path / "logs2").glob("worker_*.log"))  # no worker started
    assert len(optuna.load_study(study_name=unique_study_name, storage=storage_url).trials) == 4

    allowed = _launch(
        tmp_path,
        spec,
        unique_study_name,
        storage_url,
        "--allow-changed-objective",
        logs="logs3",
        n=3,
    )
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    study = optuna.load_study(study_name=unique_study_name, storage=storage_url)
    assert [t.user_attrs[OBJECTIVE_VERSION] for t in study.trials] == [1] * 4 + [2] * 3
    assert len(valid_trials(study, objective_version="current")) == 3
    assert list(trials_frame(study, objective_version=1)["objective_version"]) == [1] * 4

    report = build_report(study)
    rows = {row["version"]: row for row in report["objective"]["versions"]}
    assert rows[1]["n_trials"] == 4 and rows[2]["n_trials"] == 3
    assert rows[1]["best"]["number"] < 4 <= rows[2]["best"]["number"]
    assert (
        report["objective"]["best_from_version"] == 2
        and report["best"]["trials"][0]["number"] >= 4
    )
    text = cli(
        "report", "--study-name", unique_study_name, "--storage", storage_url, cwd=str(tmp_path)
    )
    assert text.returncode == 0 and "Objective versions (current: 2)" in text.stdout
    assert "Objective versions (current: 2)" in render_html(report)


def test_changed_extra_input_is_named(tmp_path, sqlite_url, unique_study_name):
    path = tmp_path / "train.py"
    path.write_text(OBJECTIVE)
    config = tmp_path / "config.yaml"
    config.write_text("lr: 0.1\n")
    spec = f"{path}:objective"
    assert (
        _launch(
            tmp_path,
            spec,
            unique_study_name,
            sqlite_url,
            "--fingerprint-extra",
            str(config),
            "--fingerprint-extra",
            "data-v1",
            n=1,
        ).returncode
        == 0
    )
    config.write_text("lr: 0.2\n")
    refused = _launch(
        tmp_path,
        spec,
        unique_study_name,
        sqlite_url,
        "--fingerprint-extra",
        str(config),
        "--fingerprint-extra",
        "data-v1",
        n=1,
    )
    assert refused.returncode == 2 and f"extra input '{config}' differs" in refused.stderr
    refused = _launch(
        tmp_path, spec, unique_study_name, sqlite_url, "--fingerprint-extra", str(config), n=1
    )
    assert refused.returncode == 2 and "extra input 'data-v1' (removed)" in refused.stderr


# ------------------------------------------------------------------------ standalone @guard
def _objective_from(path, name: str = "objective"):
    namespace: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    function = namespace[name]
    function.__module__ = "fp_test_module"
    return function


def test_standalone_guard_records_warns_and_raises(tmp_path, caplog, quiet_optuna):
    path = tmp_path / "standalone.py"
    path.write_text(OBJECTIVE)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}")
    study.optimize(guard(fingerprint=True)(_objective_from(path)), n_trials=2)
    assert _attrs(study)[CURRENT_ATTR] == 1

    path.write_text(OBJECTIVE.replace("0.5", "0.9"))
    with pytest.raises(ObjectiveChangedError, match="on_changed_objective='warn'"):
        study.optimize(
            guard(fingerprint=True, on_changed_objective="raise")(_objective_from(path)),
            n_trials=1,
        )
    with caplog.at_level(logging.WARNING, logger="optuna_guard"):
        study.optimize(guard(fingerprint=True)(_objective_from(path)), n_trials=2)
    assert any(
        "changed" in r.getMessage() and "objective_version 2" in r.getMessage()
        for r in caplog.records
    )
    tagged = [
        t.user_attrs.get(OBJECTIVE_VERSION) for t in study.trials if t.state == TrialState.COMPLETE
    ]
    assert tagged == [1, 1, 2, 2]


def test_guard_rejects_bad_options():
    with pytest.raises(ValueError, match="on_changed_objective must be 'warn' or 'raise'"):
        guard(fingerprint=True, on_changed_objective="ignore")
    with pytest.raises(ValueError, match="cache=True needs the objective fingerprint"):
        guard(cache=True, fingerprint=False)


# --------------------------------------------------------------------- sampler history
class _RecordingSampler(optuna.samplers.RandomSampler):
    def __init__(self) -> None:
        super().__init__(seed=0)
        self.seen: list[int] = []

    def sample_independent(self, study, trial, param_name, param_distribution):
        self.seen.append(len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))))
        return super().sample_independent(study, trial, param_name, param_distribution)


def test_current_version_sampler_sees_only_the_current_version():
    study = optuna.create_study()
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for i, version in enumerate((1, 1, 1, 2)):
        study.add_trial(
            optuna.trial.create_trial(
                params={"x": i / 10},
                distributions=dist,
                value=float(i),
                user_attrs={OBJECTIVE_VERSION: version},
            )
        )
    inner = _RecordingSampler()
    study.sampler = CurrentVersionSampler(inner, version=2)
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    assert inner.seen == [1]
    inner.seen.clear()
    study.sampler = inner
    study.ask().suggest_float("x", 0, 1)
    assert inner.seen == [4]


def test_sampler_history_current_reaches_the_workers(tmp_path, sqlite_url, unique_study_name):
    path = tmp_path / "train.py"
    path.write_text(OBJECTIVE)
    result = _launch(
        tmp_path,
        f"{path}:objective",
        unique_study_name,
        sqlite_url,
        "--sampler-history",
        "current",
        n=2,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    log = (tmp_path / "logs" / "worker_1.log").read_text()
    assert "Traceback" not in log
    assert (
        os.environ.get("OPTUNA_GUARD_SAMPLER_HISTORY") is None
    )  # only the workers' environment has it
