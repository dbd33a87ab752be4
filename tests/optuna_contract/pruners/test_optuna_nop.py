# Copied from Optuna (https://github.com/optuna/optuna), tests/pruners_tests/test_nop.py,
# commit 1d8ce7bb6f3c7274a7a31a0a007991995085baa7. MIT License, Copyright (c) 2018 Preferred Networks, Inc.
# Unchanged: tests/optuna_contract/conftest.py runs it with the pruner wrapped (see there).
import optuna


def test_nop_pruner() -> None:
    pruner = optuna.pruners.NopPruner()
    study = optuna.study.create_study(pruner=pruner)
    trial = study.ask()
    trial.report(1, 1)

    # A NopPruner instance is always deactivated.
    assert not trial.should_prune()
