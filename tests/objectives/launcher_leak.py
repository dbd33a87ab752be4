"""Launcher tests: leaks LAUNCHER_TEST_LEAK_MB (default 60) MB per trial into a module-level list,
the classic "worker grows until the machine dies" pattern the launcher recycles away."""

import os

_LEAK = []


def objective(trial):
    x = trial.suggest_float("x", -1.0, 1.0)
    megabytes = int(os.environ.get("LAUNCHER_TEST_LEAK_MB", "60"))
    _LEAK.append(b"\x01" * (megabytes * 1024 * 1024))  # written, so resident
    trial.set_user_attr("leaked_chunks", len(_LEAK))
    return x * x
