"""Every launch option is declared once, on LaunchConfig's fields (issue 14, item 1).

The ``optuna-guard run`` parser, ``launch()``'s options, the workers' settings and the option
table of docs/launcher.md are built from the fields; these tests read each of them back as a
user meets it (parsed flags, the config ``launch()`` builds, the Markdown table) and compare.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import pathlib
import re

import pytest

from optuna_guard.cli import build_parser
from optuna_guard.exceptions import ConfigError
from optuna_guard.retries import RetryPolicy
from optuna_guard.supervisor import _launch
from optuna_guard.supervisor._config import (
    LaunchConfig,
    LaunchOptions,
    WorkerSettings,
    launch_option_names,
    retry_policy,
)
from optuna_guard.supervisor._options import (
    BEGIN_MARKER,
    END_MARKER,
    config_kwargs,
    default_of,
    markdown_table,
    options_of,
    public_options,
)

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "launcher.md"
# set by the arbiter for each worker, not options of the launch
RUNTIME_WORKER_FIELDS = {"worker_id", "spawn_index", "launch_id", "supervisor_pid", "storage"}
# launch() converts these from wider Python types (durations as "2h", lists)
WIDENED = {"directions", "retry_on", "time_budget", "trial_timeout", "fingerprint_extra"}
WIDENED |= {"python_path"}


def _run_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices["run"]


def _cli_options() -> dict[str, tuple[str, object]]:
    """dest -> (flag, argparse default) of every argument of ``optuna-guard run``."""
    found = {}
    for action in _run_parser()._actions:
        if action.dest in ("help", "func"):
            continue
        flag = action.option_strings[0] if action.option_strings else str(action.metavar)
        found[action.dest] = (flag, action.default)
    return found


def _docs_rows(text: str) -> dict[str, tuple[str, object]]:
    """Python name -> (CLI cell, default) read from the table between the markers."""
    block = text.split(BEGIN_MARKER, 1)[1].split(END_MARKER, 1)[0]
    rows = {}
    for line in block.strip().splitlines()[2:]:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        cli, python, default = cells[0], cells[1].strip("`"), cells[2]
        if default == "required":
            value: object = dataclasses.MISSING
        else:
            value = ast.literal_eval(re.match(r"`([^`]*)`", default).group(1))
        rows[python] = (cli.strip("`"), value)
    return rows


def _field_defaults() -> dict[str, object]:
    return {f.name: default_of(f) for f, _ in public_options(LaunchConfig)}


# ------------------------------------------------------------------------------ declarations
def test_every_field_declares_an_option_and_flags_are_unique() -> None:
    options = list(options_of(LaunchConfig))  # raises for a field without metadata
    assert len(options) == len(dataclasses.fields(LaunchConfig))
    flags = [o.flag for _, o in options if o.flag]
    assert len(flags) == len(set(flags))
    assert {f.name for f, o in options if o.internal} == {"objective_version", "objective_digest"}


def test_the_defaults_the_issue_names_are_unchanged() -> None:
    defaults = _field_defaults()
    assert (
        defaults["max_worker_rss_gb"],
        defaults["min_available_gb"],
        defaults["warn_available_gb"],
        defaults["max_worker_age"],
        defaults["grace_period"],
        defaults["check_interval"],
        defaults["status_interval"],
    ) == (8.0, 2.0, 4.0, 3600.0, 120.0, 0.25, 60.0)


# ---------------------------------------------------------------------------------------- CLI
def test_cli_has_one_argument_per_flagged_field_with_the_fields_default() -> None:
    cli = _cli_options()
    declared = {f.name: (o.flag, default_of(f)) for f, o in options_of(LaunchConfig) if o.flag}
    assert set(cli) == set(declared)
    for name, (flag, default) in declared.items():
        cli_flag, cli_default = cli[name]
        assert cli_flag == flag, name
        if default is dataclasses.MISSING:  # OBJECTIVE and --study-name are required
            continue
        if isinstance(cli_default, list):  # argparse appends to a list
            cli_default = tuple(cli_default)
        assert cli_default == default, name


def test_defaults_quoted_in_cli_help_are_the_fields() -> None:
    """The help prose says "(default 8; 'off')": the number must be the field's default."""
    quoted = 0
    for field, option in options_of(LaunchConfig):
        match = re.search(r"\(default:? (\d+(?:\.\d+)?)\b(?!%)", option.help)
        if match:
            quoted += 1
            assert float(match.group(1)) == default_of(field), field.name
    assert quoted >= 10


def test_cli_without_options_builds_the_default_config() -> None:
    args = _run_parser().parse_args(["m:f", "--study-name", "s"])
    assert LaunchConfig(**config_kwargs(args, LaunchConfig)) == LaunchConfig(
        objective="m:f", study_name="s"
    )


def test_cli_values_reach_the_config() -> None:
    argv = ["m:f", "--study-name", "s", "--direction", "maximize,minimize", "--no-guard"]
    argv += ["--retry-on", "preempted, worker_lost", "--fingerprint-extra", "a"]
    argv += ["--fingerprint-extra", "b", "--time-budget", "1h30m", "--max-worker-rss-gb", "off"]
    args = _run_parser().parse_args(argv)
    config = LaunchConfig(**config_kwargs(args, LaunchConfig))
    assert config.directions == ("maximize", "minimize") and config.guard is False
    assert config.retry_on == ("preempted", "worker_lost")
    assert config.fingerprint_extra == ("a", "b") and config.time_budget == 5400.0
    assert config.max_worker_rss_gb is None and config.recycle_worker_rss_gb is None


# ------------------------------------------------------------------------------------ launch()
def test_launch_takes_exactly_the_public_options_and_restates_no_default() -> None:
    public = {f.name for f, _ in public_options(LaunchConfig)}
    assert set(LaunchOptions.__annotations__) == launch_option_names()
    assert launch_option_names() == (public - {"objective", "study_name"}) | {"direction"}
    params = inspect.signature(_launch.launch).parameters
    assert [p for p in params if params[p].kind is not inspect.Parameter.VAR_KEYWORD] == [
        "objective",
        "study_name",
        "probe",
    ]
    fields = {f.name: f.type for f in dataclasses.fields(LaunchConfig)}
    for name, annotation in LaunchOptions.__annotations__.items():
        if name in fields and name not in WIDENED:
            assert annotation.__forward_arg__ == fields[name], name


def test_launch_defaults_are_the_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[LaunchConfig] = []
    monkeypatch.setattr(_launch, "run_launch", lambda config, probe=None: seen.append(config))
    _launch.launch("m:f", study_name="s")
    assert seen == [LaunchConfig(objective="m:f", study_name="s")]
    _launch.launch(
        "m:f",
        study_name="s",
        direction="maximize",
        time_budget="2h",
        trial_timeout="90m",
        retry_on=["preempted"],
        kill_wait=1.0,
    )
    assert seen[1].directions == ("maximize",) and seen[1].time_budget == 7200.0
    assert seen[1].trial_timeout == 5400.0 and seen[1].retry_on == ("preempted",)
    assert seen[1].kill_wait == 1.0


@pytest.mark.parametrize("name", ["bogus", "objective_version", "objective_digest"])
def test_launch_rejects_what_is_not_an_option(name: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown option\\(s\\) {name};"):
        _launch.launch("m:f", study_name="s", **{name: 1})


# ---------------------------------------------------------------------------------------- docs
def test_docs_table_lists_every_option_with_the_fields_default_and_flag() -> None:
    rows = _docs_rows(DOCS.read_text(encoding="utf-8"))
    declared = {f.name: (o.flag or "–", default_of(f)) for f, o in public_options(LaunchConfig)}
    assert rows == declared
    cli = _cli_options()
    assert {name for name, (flag, _) in rows.items() if flag != "–"} == set(cli)


def test_docs_table_is_the_generated_one() -> None:
    text = DOCS.read_text(encoding="utf-8")
    block = text.split(BEGIN_MARKER, 1)[1].split(END_MARKER, 1)[0]
    assert block.strip() == markdown_table(LaunchConfig), "run scripts/gen_options_table.py"


def test_a_wrong_default_in_the_docs_is_caught() -> None:
    text = DOCS.read_text(encoding="utf-8")
    row = "| `--max-worker-rss-gb` | `max_worker_rss_gb` | `8.0` |"
    assert row in text
    rows = _docs_rows(text.replace(row, row.replace("`8.0`", "`9.0`")))
    assert rows["max_worker_rss_gb"] != ("--max-worker-rss-gb", 8.0)


# ------------------------------------------------------------------------------------ workers
def test_worker_options_are_worker_settings_minus_the_runtime_fields() -> None:
    config = LaunchConfig(objective="m:f", study_name="s", retry=2, retry_on=("preempted",))
    settings_fields = {f.name for f in dataclasses.fields(WorkerSettings)}
    assert set(config.worker_options()) == settings_fields - RUNTIME_WORKER_FIELDS
    settings = WorkerSettings(
        worker_id=1,
        spawn_index=4,
        launch_id="L",
        supervisor_pid=os.getpid(),
        storage="sqlite:///x.db",
        **config.worker_options(),
    )
    assert settings.retry == 2 and settings.heartbeat_interval == 30
    assert WorkerSettings.from_env(settings.to_env()) == settings


# -------------------------------------------------------------------------------- retry policy
def test_one_retry_policy_for_launcher_and_worker() -> None:
    assert retry_policy(LaunchConfig(objective="m:f", study_name="s")) is None
    config = LaunchConfig(
        objective="m:f", study_name="s", retry=3, retry_on=("preempted",), max_preemptions=5
    )
    policy = retry_policy(config)
    assert policy == RetryPolicy(
        max_retries=3, max_preemptions=5, retry_on=frozenset({"preempted"})
    )
    worker = WorkerSettings(worker_id=0, spawn_index=0, storage="x", **config.worker_options())
    assert retry_policy(worker) == policy


# ------------------------------------------------------------------------------------- resolve
def test_resolve_makes_every_path_absolute_in_one_pass(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "objective.py").write_text("def f(trial):\n    return 0.0\n")
    (tmp_path / "sub" / "factories.py").write_text("def make(seed=None):\n    return None\n")
    monkeypatch.chdir(tmp_path)
    config = _launch.resolve(
        LaunchConfig(
            objective="sub/objective.py:f",
            study_name="s",
            sampler="factories.py:make",
            pruner="median",
            log_dir="logs",
            retry=1,
            retry_shrink="shrink.py:halve",
        )
    )
    assert config.objective == f"{tmp_path / 'sub' / 'objective.py'}:f"
    assert config.sampler == f"{tmp_path / 'sub' / 'factories.py'}:make"  # next to the objective
    assert config.pruner == "median"
    assert config.log_dir == str(tmp_path / "logs")
    assert config.retry_shrink == f"{tmp_path / 'shrink.py'}:halve"
    assert config.storage is not None and config.storage.startswith("sqlite:///")
    assert _launch.resolve(config) == config  # a resolved config stays as it is
