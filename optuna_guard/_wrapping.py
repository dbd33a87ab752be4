"""What our wrapping pruners need to know about the pruner they wrap.

Why: Optuna treats ``HyperbandPruner`` specially - ``optuna.pruners._filter_study`` checks
``isinstance(study.pruner, HyperbandPruner)`` and then shows samplers and the pruner only the
trials of the current trial's bracket. A plain wrapper hides that, so Hyperband's brackets would
silently mix. A wrapper built around a Hyperband pruner (directly or through other wrappers) is
therefore made an instance of a subclass that is also a ``HyperbandPruner`` and forwards the
bracket methods, so Optuna keeps filtering by bracket while our ``prune`` still runs first.
"""

from __future__ import annotations

from typing import Any

from optuna.pruners import BasePruner, HyperbandPruner

# attribute names under which wrappers keep the pruner they wrap (ours, Optuna's PatientPruner)
_WRAPPED_ATTRS = ("_wrapped", "_wrapped_pruner")


def inner_pruners(pruner: BasePruner | None) -> list[BasePruner]:
    """``pruner`` and every pruner it wraps, outermost first."""
    chain: list[BasePruner] = []
    while pruner is not None and pruner not in chain:
        chain.append(pruner)
        pruner = next(
            (
                vars(pruner)[a]
                for a in _WRAPPED_ATTRS
                if isinstance(vars(pruner).get(a), BasePruner)
            ),
            None,
        )
    return chain


def find_hyperband(pruner: BasePruner | None) -> HyperbandPruner | None:
    """The real ``HyperbandPruner`` inside a chain of wrappers, if any."""
    for inner in inner_pruners(pruner):
        if type(inner) is HyperbandPruner or (
            isinstance(inner, HyperbandPruner) and not isinstance(inner, _HyperbandBrackets)
        ):
            return inner
    return None


def warmup_steps(pruner: BasePruner | None) -> int:
    """The largest ``n_warmup_steps`` among the wrapped pruners (Median, Percentile, Threshold,
    Patient's inner pruner); 0 when none has one."""
    steps = [getattr(p, "_n_warmup_steps", 0) for p in inner_pruners(pruner)]
    return max([s for s in steps if isinstance(s, int)] or [0])


class _HyperbandBrackets:
    """Mixin for a wrapper whose chain contains a ``HyperbandPruner``: Optuna's bracket
    filtering works through it. Other Hyperband attributes are read from the real one."""

    def _get_bracket_id(self, study: Any, trial: Any) -> int:
        return _hyperband_of(self)._get_bracket_id(study, trial)

    def _create_bracket_study(self, study: Any, bracket_id: int) -> Any:
        # with ``self`` as the bracket study's pruner, so our prune() still runs on it
        # self is a wrapper, not a HyperbandPruner: Optuna's method only needs it as the pruner
        return HyperbandPruner._create_bracket_study(self, study, bracket_id)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:  # only for names not found normally
        if name.startswith("__") or name in _WRAPPED_ATTRS:
            raise AttributeError(name)
        return getattr(_hyperband_of(self), name)

    def __reduce__(self) -> Any:  # the dynamic subclass is not importable: rebuild from the base
        return (_rebuild, (type(self).__mro__[1], dict(vars(self))))


def _hyperband_of(wrapper: Any) -> HyperbandPruner:
    hyperband = find_hyperband(
        next((vars(wrapper)[a] for a in _WRAPPED_ATTRS if a in vars(wrapper)), None)
    )
    if hyperband is None:  # pragma: no cover - the subclass is only chosen when there is one
        raise AttributeError("no HyperbandPruner inside this wrapper")
    return hyperband


def _rebuild(base: type, state: dict[str, Any]) -> Any:
    obj: Any = base.__new__(base, state.get("_wrapped"))
    obj.__dict__.update(state)
    return obj


_SUBCLASSES: dict[type, type] = {}


def class_for(cls: type, wrapped: BasePruner | None) -> type:
    """``cls``, or its Hyperband-aware subclass when ``wrapped`` contains a HyperbandPruner."""
    if not isinstance(wrapped, BasePruner) or find_hyperband(wrapped) is None:
        return cls
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        sub = type(
            cls.__name__,
            (cls, _HyperbandBrackets, HyperbandPruner),
            {"__module__": cls.__module__, "__qualname__": cls.__qualname__},
        )
        _SUBCLASSES[cls] = sub
    return sub
