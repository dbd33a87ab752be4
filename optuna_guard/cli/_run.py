"""``optuna-guard run``: N supervised workers on one study (a thin layer over ``launch``).

    optuna-guard run OBJECTIVE --study-name NAME [--workers N] [--n-trials T] [...]

Every option is a ``LaunchConfig`` field; its flag, help, parser and default are declared there
(``supervisor/_config.py``), and the parser below is built from them (``optuna-guard run --help``,
docs/launcher.md).

Exit codes: 0 done, 1 error, 2 bad input, 3 crash loop, 99 stopped by a signal or the time
budget (a SLURM script requeues on 99).
"""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> None:
    """The ``run`` parser: one argument per LaunchConfig field with a flag (the field's
    metadata holds the flag, help, parser and default; see ``supervisor/_options.py``)."""
    from optuna_guard.supervisor._config import LaunchConfig
    from optuna_guard.supervisor._options import add_arguments

    parser = subparsers.add_parser(
        "run",
        help="run a study with N supervised worker processes",
        description=(
            "Run OBJECTIVE (package.module:function or path/to/file.py:function) in N supervised "
            "worker processes on one study until T trials finished. Exit codes: 0 done, 1 error, "
            "2 bad input, 3 crash loop, 99 stopped by a signal or the time budget. Worker memory: "
            "each worker gets a memory cgroup of its own (kernel hard limit --max-worker-rss-gb, every "
            "descendant counted and killed) where the cgroup tree is writable (root on cgroup v1, a "
            "delegated cgroup v2 subtree); elsewhere process-tree RSS plus a per-launch environment "
            "marker, so no descendant outlives the launch. The mode is logged at start."
        ),
    )
    add_arguments(parser, LaunchConfig)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from optuna_guard.supervisor._config import LaunchConfig
    from optuna_guard.supervisor._objective_spec import SpecCheck
    from optuna_guard.supervisor._options import config_kwargs

    config = LaunchConfig(**config_kwargs(args, LaunchConfig))
    # The objective check's interpreter runs while this one imports Optuna (light modules only
    # so far); a spec that cannot even be resolved is reported by run_launch as before.
    spec_check = None
    try:
        spec_check = SpecCheck.for_config(config)
    except Exception:
        pass
    from optuna_guard.supervisor._launch import run_launch

    summary = run_launch(config, spec_check=spec_check)
    print(summary)
    return summary.exit_code
