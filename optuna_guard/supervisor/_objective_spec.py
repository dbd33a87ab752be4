"""Loading an OBJECTIVE spec: ``package.module:function`` or ``path/to/file.py:function``.

Workers are fresh processes, so the objective travels to them as a spec string, never as a
pickled function. The supervisor checks a spec in a short-lived subprocess
(:func:`check_spec_in_subprocess`) so a user module that imports torch or allocates at import
time never runs inside the supervisor, and a bad spec is a one-line error before any worker starts.

The same loader serves every ``module:function`` / ``file.py:function`` option
(:func:`load_callable`): ``--sampler``/``--pruner`` factories and ``--retry-shrink`` hooks.
A relative ``file.py:factory`` is looked for next to the objective file first
(:func:`resolve_next_to_objective`), and a ``module:factory`` imports from the objective's
directory, which is on ``sys.path`` once the objective is loaded.

Run as ``python -m optuna_guard.supervisor._objective_spec SPEC [--sampler S] [--pruner P]
[--seed N]`` it loads the spec (then builds the sampler and pruner) and exits 0, or prints the
one-line error and exits 2.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from optuna_guard.exceptions import ObjectiveSpecError

if TYPE_CHECKING:
    from optuna_guard.supervisor._config import LaunchConfig

FORMAT_HINT = "use package.module:function or path/to/file.py:function"
_FILE_MODULE_PREFIX = "optuna_guard_objective_"


def _label(spec: Any, label: str | None) -> str:
    return label or f"objective spec {spec!r}"


def split_spec(spec: str, label: str | None = None) -> tuple[str, str]:
    """``"a/b.py:f"`` -> ``("a/b.py", "f")``; raises ObjectiveSpecError on a malformed spec.
    ``label`` names the option in messages (default "objective spec '...'")."""
    what = _label(spec, label)
    if not isinstance(spec, str) or ":" not in spec:
        raise ObjectiveSpecError(f"{what} has no ':function' part; {FORMAT_HINT}.")
    target, _, attr = spec.rpartition(":")
    target, attr = target.strip(), attr.strip()
    if not target or not attr:
        raise ObjectiveSpecError(f"{what} is incomplete; {FORMAT_HINT}.")
    if not all(part.isidentifier() for part in attr.split(".")):
        raise ObjectiveSpecError(f"{what}: {attr!r} is not a Python name; {FORMAT_HINT}.")
    return target, attr


def is_file_target(target: str) -> bool:
    return target.endswith(".py") or os.sep in target or "/" in target


def normalize_spec(spec: str) -> str:
    """Make a file spec absolute so workers started elsewhere find the same file."""
    target, attr = split_spec(spec)
    if is_file_target(target):
        return f"{os.path.abspath(target)}:{attr}"
    return f"{target}:{attr}"


def spec_from_callable(func: Callable[..., Any]) -> str:
    """The spec of a module-level function, so the Python API can take a function object.

    A function defined in a script run as ``__main__`` is addressed by the script's file path.
    Lambdas, closures and methods of local classes cannot be re-imported in a worker.
    """
    qualname = getattr(func, "__qualname__", None)
    module_name = getattr(func, "__module__", None)
    if not qualname or not module_name or "<" in qualname:
        raise ObjectiveSpecError(
            f"objective {func!r} cannot be re-imported by a worker process (lambda, closure or "
            f"local function); define it at module level or pass a spec string, {FORMAT_HINT}."
        )
    module = sys.modules.get(module_name)
    if module_name == "__main__" or module_name.startswith(_FILE_MODULE_PREFIX):
        path = getattr(module, "__file__", None)
        if not path:
            raise ObjectiveSpecError(
                f"objective {qualname!r} lives in an interactive __main__ with no file; "
                f"put it in a module and pass its spec, {FORMAT_HINT}."
            )
        return f"{os.path.abspath(path)}:{qualname}"
    return f"{module_name}:{qualname}"


def import_root(func: Callable[..., Any]) -> str | None:
    """The directory a fresh interpreter needs on ``sys.path`` to import ``func``'s module
    (``None`` for ``__main__`` scripts, addressed by file path instead)."""
    module_name = getattr(func, "__module__", None) or ""
    module = sys.modules.get(module_name)
    path: str | None = getattr(module, "__file__", None)
    if not path or module_name == "__main__" or module_name.startswith(_FILE_MODULE_PREFIX):
        return None
    root = os.path.dirname(os.path.abspath(path))
    depth = module_name.count(".") + (1 if os.path.basename(path) == "__init__.py" else 0)
    for _ in range(depth):
        root = os.path.dirname(root)
    return root


def resolve_next_to_objective(
    spec: str, objective_spec: str | None, label: str | None = None
) -> str:
    """A ``file.py:function`` spec with a relative path made absolute: next to the objective
    file if the file is there, else in the current directory (so workers started elsewhere
    find it). Module specs are returned as they are."""
    target, attr = split_spec(spec, label)
    if not is_file_target(target) or os.path.isabs(target):
        return f"{target}:{attr}"
    if objective_spec:
        objective_target, _ = split_spec(objective_spec)
        if is_file_target(objective_target):
            beside = os.path.join(os.path.dirname(os.path.abspath(objective_target)), target)
            if os.path.isfile(beside):
                return f"{beside}:{attr}"
    return f"{os.path.abspath(target)}:{attr}"


def load_objective(spec: str) -> Callable[..., Any]:
    """Import the spec's module (or file) and return the callable it names."""
    return load_callable(spec, what="the objective function")


def load_callable(
    spec: str, *, label: str | None = None, what: str = "a function"
) -> Callable[..., Any]:
    """Import the spec's module (or file) and return the callable it names. ``label`` names
    the option in error messages (e.g. "--sampler 'f.py:make'"), ``what`` what it should be."""
    name = _label(spec, label)
    target, attr = split_spec(spec, label)
    module = _load_file(target, name) if is_file_target(target) else _load_module(target, name)
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ObjectiveSpecError(
                f"{name}: {target!r} has no attribute {part!r}; check the function name."
            ) from None
    if not callable(obj):
        raise ObjectiveSpecError(
            f"{name} names a {type(obj).__name__}, not a function; point it at {what}."
        )
    return cast("Callable[..., Any]", obj)  # checked callable() just above


def _load_module(name: str, spec: str) -> Any:
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError) as exc:  # parent package missing or broken
        raise ObjectiveSpecError(f"{spec}: cannot import {name!r} ({_one_line(exc)}).") from None
    if found is None:
        raise ObjectiveSpecError(
            f"{spec}: no module named {name!r} on the Python path (current directory "
            f"{os.getcwd()}); {FORMAT_HINT}."
        )
    try:
        return importlib.import_module(name)
    except Exception as exc:
        raise ObjectiveSpecError(f"{spec}: importing {name!r} failed: {_one_line(exc)}.") from None


def _load_file(path: str, spec: str) -> Any:
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise ObjectiveSpecError(f"{spec}: file {path!r} does not exist.")
    stem = os.path.splitext(os.path.basename(path))[0]
    module_name = _FILE_MODULE_PREFIX + "".join(c if c.isalnum() else "_" for c in stem)
    if module_name in sys.modules:
        return sys.modules[module_name]
    directory = os.path.dirname(path)
    if directory not in sys.path:
        sys.path.insert(0, directory)  # like running the script: its siblings are importable
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ObjectiveSpecError(f"{spec}: {path!r} is not a Python file.")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[module_name]
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise ObjectiveSpecError(f"{spec}: {path!r} exited while being imported.") from None
        raise ObjectiveSpecError(f"{spec}: importing {path!r} failed: {_one_line(exc)}.") from None
    return module


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, SyntaxError):
        return f"SyntaxError: {exc.msg} (line {exc.lineno})"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def resolve_specs(
    objective: str, sampler: str | None, pruner: str | None
) -> tuple[str, str | None, str | None]:
    """The objective spec with an absolute file path, and ``--sampler``/``--pruner`` factory
    files looked for next to it (what every process must see). Loads no user code."""
    spec = normalize_spec(objective)

    def beside_objective(option: str, value: str | None) -> str | None:
        if not value or ":" not in value:
            return value
        return resolve_next_to_objective(value, spec, label=f"--{option} {value!r}")

    return spec, beside_objective("sampler", sampler), beside_objective("pruner", pruner)


class SpecCheck:
    """The throw-away interpreter that loads an objective spec (and builds the sampler/pruner
    as a worker would), started at once and waited for later: the CLI starts it before the
    supervisor imports Optuna, so the two overlap (a torch-importing objective takes seconds)."""

    def __init__(
        self,
        spec: str,
        *,
        env: dict[str, str] | None = None,
        sampler: str | None = None,
        pruner: str | None = None,
        seed: int | None = None,
        timeout: float = 120.0,
    ) -> None:
        self.key = (spec, sampler, pruner, seed)
        self._spec = spec
        self._timeout = timeout
        self._started = time.monotonic()
        extra: list[str] = []
        for option, value in (("--sampler", sampler), ("--pruner", pruner), ("--seed", seed)):
            if value is not None:
                extra += [option, str(value)]
        self._process = subprocess.Popen(
            [sys.executable, "-m", "optuna_guard.supervisor._objective_spec", spec, *extra],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    @classmethod
    def for_config(cls, config: LaunchConfig) -> SpecCheck:
        """The check a launch of ``config`` needs: its resolved specs, its workers' environment."""
        spec, sampler, pruner = resolve_specs(config.objective, config.sampler, config.pruner)
        return cls(spec, env=config.python_env(), sampler=sampler, pruner=pruner, seed=config.seed)

    def cancel(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
        self._process.communicate()

    def result(self) -> None:
        """Wait for the check; raise ObjectiveSpecError with the one-line reason."""
        spec, timeout = self._spec, self._timeout
        try:
            stdout, stderr = self._process.communicate(
                timeout=max(timeout - (time.monotonic() - self._started), 0.1)
            )
        except subprocess.TimeoutExpired:
            self.cancel()
            raise ObjectiveSpecError(
                f"objective spec {spec!r}: importing it took longer than {timeout:.0f} s; does the module do work at import time?"
            ) from None
        if self._process.returncode == 0:
            return
        lines = [line for line in stdout.splitlines() if line.strip()]
        if self._process.returncode == 2 and lines:
            raise ObjectiveSpecError(lines[-1])
        tail = (stderr.strip().splitlines() or ["no output"])[-1]
        raise ObjectiveSpecError(
            f"objective spec {spec!r}: the check process failed (exit {self._process.returncode}): {tail}"
        )


def check_spec_in_subprocess(
    spec: str,
    *,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
    sampler: str | None = None,
    pruner: str | None = None,
    seed: int | None = None,
) -> None:
    """Load ``spec`` (and build ``sampler``/``pruner`` as a worker would) in a throw-away
    interpreter, so user code never runs in the supervisor; raise ObjectiveSpecError with the
    one-line reason."""
    SpecCheck(spec, env=env, sampler=sampler, pruner=pruner, seed=seed, timeout=timeout).result()


def _main(argv: list[str]) -> int:
    from optuna_guard.exceptions import ConfigError

    options = dict(zip(argv[1::2], argv[2::2]))
    if len(argv) % 2 != 1 or set(options) - {"--sampler", "--pruner", "--seed"}:
        print(
            f"usage: python -m optuna_guard.supervisor._objective_spec SPEC [--sampler S] [--pruner P] [--seed N] "
            f"({FORMAT_HINT})"
        )
        return 2
    try:
        load_objective(argv[0])
        if "--sampler" in options or "--pruner" in options:
            from optuna_guard.supervisor._study import make_pruner, make_sampler

            seed = int(options["--seed"]) if "--seed" in options else None
            make_sampler(options.get("--sampler"), seed)
            make_pruner(options.get("--pruner"))
    except ConfigError as exc:
        sys.stdout.write(f"{exc}\n")
        return 2
    except BaseException:  # pragma: no cover - anything else is a bug worth a traceback
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
