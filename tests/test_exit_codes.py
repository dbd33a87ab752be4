"""Every error carries its exit code; the CLI exits with it (as click's ClickException does)."""

from __future__ import annotations

import pytest

from optuna_guard import exceptions as e


@pytest.mark.parametrize(
    "error,code",
    [
        (e.ConfigError, 2),
        (e.ObjectiveSpecError, 2),
        (e.StorageUnavailableError, 1),
        (e.CrashLoopError, 3),
        (e.MemoryStallError, 4),
        (e.CheckpointError, 1),
        (e.InsufficientMemoryError, 1),
        (e.GuardError, 1),
    ],
)
def test_each_error_carries_its_exit_code(error: type[e.GuardError], code: int) -> None:
    assert error("x").exit_code == code


def test_cli_exits_with_the_errors_code(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from optuna_guard import cli
    from optuna_guard.cli import _status

    def stalled(_args: object) -> int:
        raise e.MemoryStallError("no worker could start for 600 s: memory held by pid 42")

    monkeypatch.setattr(_status, "run_status", stalled, raising=False)
    parser = cli.build_parser()
    args = parser.parse_args(["status", "--study-name", "x"])
    monkeypatch.setattr(cli, "build_parser", lambda: _Fixed(parser, args, stalled))
    assert cli.main(["status", "--study-name", "x"]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "optuna-guard status: error: no worker could start for 600 s: memory held by pid 42"
    ]
    assert cli.EXIT_STOPPED == e.EXIT_STOPPED == 99


class _Fixed:
    """A parser that returns the given args with ``func`` replaced."""

    def __init__(self, parser: object, args: object, func: object) -> None:
        self._args = args
        self._args.func = func  # type: ignore[attr-defined]

    def parse_args(self, _argv: object) -> object:
        return self._args
