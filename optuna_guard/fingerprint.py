"""Objective fingerprints: which code produced a study's trials, and whether it changed since.

A fingerprint is four SHA-256 hashes: the objective function's source (decorators included), the
file that defines it (line endings normalised, so a checkout on Windows hashes the same), the
objective spec (``file.py:function`` without the directory, or ``package.module:function``: a
checkout in another directory or on another host is the same objective), and the
``--fingerprint-extra`` inputs (a file's bytes or a plain string, e.g. a
data-set version). Its ``digest`` hashes the four together.

The source is found by parsing the file (``ast``), never by importing it: the launcher computes
the fingerprint before any worker starts, in a process that must not run user code (a module
that imports torch or allocates at import time). The standalone ``@guard`` uses the same parser
on the function's file, so both paths hash the same text.

Versions live in the study's system attrs (``VERSIONS_ATTR``: one entry per version with its
digest and parts; ``CURRENT_ATTR``: the version new trials belong to). Every trial is tagged
``objective_version``; trials made before the study had a fingerprint count as version 1.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime as _dt
import hashlib
import importlib.machinery
import inspect
import os
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from optuna_guard._logging import get_logger
from optuna_guard.exceptions import ConfigError

_log = get_logger(__name__)

VERSIONS_ATTR = "optuna_guard:objective_versions"
CURRENT_ATTR = "optuna_guard:objective_version"
OBJECTIVE_VERSION = "objective_version"  # user attr on every trial: int
UNAVAILABLE = "unavailable"


class ObjectiveChangedError(ConfigError):
    """The objective's fingerprint differs from the one recorded on the study.

    Raised when a study is resumed with changed objective code and the change is not allowed:
    ``@guard(fingerprint=True, on_changed_objective="raise")``, or ``optuna-guard run`` without
    ``--allow-changed-objective``. The message names what changed (function, file, spec,
    extra inputs) and how to allow it. A :class:`ConfigError`, so the CLI exits with 2.
    """


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """SHA-256 hex digests of what defines an objective; ``digest`` covers them all."""

    function: str
    file: str
    spec: str
    extra: tuple[tuple[str, str], ...] = ()
    file_path: str = ""
    spec_text: str = ""

    @property
    def digest(self) -> str:
        parts = [self.function, self.file, self.spec] + [
            f"{label}={value}" for label, value in self.extra
        ]
        return _sha256("\n".join(parts).encode())

    def to_dict(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "function": self.function,
            "file": self.file,
            "spec": self.spec,
            "extra": {label: value for label, value in self.extra},
            "file_path": self.file_path,
            "spec_text": self.spec_text,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Fingerprint:
        return cls(
            function=str(data.get("function", "")),
            file=str(data.get("file", "")),
            spec=str(data.get("spec", "")),
            extra=tuple(sorted((str(k), str(v)) for k, v in (data.get("extra") or {}).items())),
            file_path=str(data.get("file_path", "")),
            spec_text=str(data.get("spec_text", "")),
        )


def changes(old: Fingerprint, new: Fingerprint) -> list[str]:
    """What differs between two fingerprints, in words (empty when the digests agree)."""
    found: list[str] = []
    if old.function != new.function:
        found.append("function source")
    if old.file != new.file:
        found.append(f"defining file {new.file_path or old.file_path or '?'}")
    if old.spec != new.spec:
        found.append(f"objective spec ({old.spec_text or '?'} -> {new.spec_text or '?'})")
    before, after = dict(old.extra), dict(new.extra)
    for label in sorted(set(before) | set(after)):
        if label not in before:
            found.append(f"extra input {label!r} (added)")
        elif label not in after:
            found.append(f"extra input {label!r} (removed)")
        elif before[label] != after[label]:
            found.append(f"extra input {label!r}")
    return found


# ----------------------------------------------------------------------------------- hashing
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_source(path: str) -> str:
    with open(path, "rb") as handle:
        raw = handle.read()
    return raw.decode("utf-8", errors="surrogateescape").replace("\r\n", "\n").replace("\r", "\n")


def _definition(tree: ast.Module, qualname: str) -> ast.stmt | None:
    """The def/class (or ``name = ...`` assignment) a dotted qualname points at, as Python
    would bind it: the last definition of a name wins."""
    body: Sequence[ast.stmt] = tree.body
    node: ast.stmt | None = None
    for part in qualname.split("."):
        if part == "<locals>":
            return None
        found: ast.stmt | None = None
        for child in body:
            if (
                isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                and child.name == part
            ):
                found = child
            elif isinstance(child, (ast.Assign, ast.AnnAssign)):
                targets = child.targets if isinstance(child, ast.Assign) else [child.target]
                if any(isinstance(t, ast.Name) and t.id == part for t in targets):
                    found = child
        if found is None:
            return None
        node = found
        body = getattr(found, "body", [])
    return node


def function_source(source: str, qualname: str) -> str | None:
    """The source text of ``qualname`` in ``source`` (decorators included), or None."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    node = _definition(tree, qualname)
    if node is None:
        return None
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    lines = source.split("\n")
    return "\n".join(lines[first - 1 : node.end_lineno])


def hash_extra(inputs: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """``--fingerprint-extra`` values: an existing file hashes its bytes (line endings
    normalised for text), anything else hashes the string itself."""
    hashed: dict[str, str] = {}
    for item in inputs:
        if not isinstance(item, str) or not item:
            raise ConfigError(
                f"--fingerprint-extra needs a file path or a non-empty string but got {item!r}."
            )
        if os.path.isdir(item):
            raise ConfigError(
                f"--fingerprint-extra {item!r} is a directory; pass files (or a version string) instead."
            )
        if os.path.isfile(item):
            hashed[item] = _sha256(_read_source(item).encode("utf-8", errors="surrogateescape"))
        else:
            hashed[item] = _sha256(item.encode())
    return tuple(sorted(hashed.items()))


def fingerprint_file(
    path: str, qualname: str, *, spec_text: str, extra: Iterable[str] = ()
) -> Fingerprint:
    """The fingerprint of the objective ``qualname`` defined in the file ``path``."""
    try:
        source = _read_source(path)
    except OSError as exc:
        raise ConfigError(
            f"cannot read {path!r} to fingerprint the objective: {exc.strerror}."
        ) from None
    function = function_source(source, qualname)
    if function is None:
        _log.warning(
            "Objective fingerprint: %s not found in %s; only the file is hashed.", qualname, path
        )
    return Fingerprint(
        function=_sha256(function.encode("utf-8", errors="surrogateescape"))
        if function is not None
        else UNAVAILABLE,
        file=_sha256(source.encode("utf-8", errors="surrogateescape")),
        spec=_sha256(spec_text.encode()),
        extra=hash_extra(extra),
        file_path=path,
        spec_text=spec_text,
    )


def fingerprint_spec(
    spec: str, *, extra: Iterable[str] = (), search_path: Sequence[str] = ()
) -> Fingerprint:
    """The fingerprint of an OBJECTIVE spec (``path/file.py:f`` or ``package.module:f``),
    locating the module's file without importing anything."""
    from optuna_guard.supervisor._objective_spec import is_file_target, split_spec

    target, attr = split_spec(spec)
    if is_file_target(target):
        path = os.path.abspath(target)
        spec = f"{os.path.basename(path)}:{attr}"  # where the checkout lives is no change
    else:
        found = _module_file(target, search_path)
        if found is None:
            _log.warning(
                "Objective fingerprint: the source of module %r was not found; only the spec is hashed.",
                target,
            )
            return Fingerprint(
                UNAVAILABLE, UNAVAILABLE, _sha256(spec.encode()), hash_extra(extra), "", spec
            )
        path = found
    return fingerprint_file(path, attr, spec_text=spec, extra=extra)


def fingerprint_callable(func: Callable[..., Any], *, extra: Iterable[str] = ()) -> Fingerprint:
    """The fingerprint of a function object (the standalone ``@guard``); its spec part is
    ``<file name>:<qualname>``."""
    func = inspect.unwrap(func)
    if not inspect.isfunction(func) and not inspect.ismethod(func) and callable(func):
        func = type(func).__call__  # a callable instance: its class's __call__
    qualname = getattr(func, "__qualname__", repr(func))
    try:
        path = inspect.getsourcefile(func)
    except TypeError:
        path = None
    spec_text = f"{os.path.basename(path) if path else '?'}:{qualname}"
    if not path or not os.path.isfile(
        path
    ):  # a notebook cell: linecache may still have the source
        try:
            function = _sha256(inspect.getsource(func).replace("\r\n", "\n").encode())
        except (OSError, TypeError):
            function = UNAVAILABLE
        return Fingerprint(
            function, UNAVAILABLE, _sha256(spec_text.encode()), hash_extra(extra), "", spec_text
        )
    return fingerprint_file(path, qualname, spec_text=spec_text, extra=extra)


def _module_file(name: str, search_path: Sequence[str]) -> str | None:
    """The source file of a dotted module name, found like the import system would but
    without executing any package ``__init__``."""
    import sys

    path: list[str] = list(dict.fromkeys([*search_path, os.getcwd(), *sys.path]))
    found = None
    parts = name.split(".")
    for depth in range(len(parts)):
        qualified = ".".join(parts[: depth + 1])
        found = importlib.machinery.PathFinder.find_spec(qualified, path)
        if found is None:
            return None
        path = list(found.submodule_search_locations or [])
    origin = getattr(found, "origin", None)
    return origin if origin and origin.endswith(".py") and os.path.isfile(origin) else None


# ----------------------------------------------------------------------------- study versions
@dataclasses.dataclass(frozen=True)
class VersionDecision:
    """The version new trials belong to, and whether it was just recorded."""

    version: int
    digest: str
    recorded: bool


def current_version(study: Any) -> int | None:
    """The version new trials of ``study`` belong to; None when no fingerprint was recorded."""
    attrs = study._storage.get_study_system_attrs(study._study_id)
    value = attrs.get(CURRENT_ATTR)
    return None if value is None else int(value)


def resolve_version(
    study: Any, fingerprint: Fingerprint, *, allow_changed: bool, how_to_allow: str
) -> VersionDecision:
    """Record the fingerprint on a study that has none (version 1); keep the current version
    when it matches; otherwise raise ObjectiveChangedError, or with ``allow_changed`` make
    the matching earlier version current again or record a new one."""
    storage, study_id = study._storage, study._study_id
    attrs = storage.get_study_system_attrs(study_id)
    versions: list[dict[str, Any]] = list(attrs.get(VERSIONS_ATTR) or [])
    current = attrs.get(CURRENT_ATTR)
    if not versions:
        _record(storage, study_id, versions, 1, fingerprint)
        return VersionDecision(1, fingerprint.digest, recorded=True)
    latest = next((v for v in versions if v["version"] == current), versions[-1])
    if latest["fingerprint"]["digest"] == fingerprint.digest:
        return VersionDecision(int(latest["version"]), fingerprint.digest, recorded=False)
    what = tuple(changes(Fingerprint.from_dict(latest["fingerprint"]), fingerprint)) or (
        "fingerprint",
    )
    same = next((v for v in versions if v["fingerprint"]["digest"] == fingerprint.digest), None)
    new_version = int(same["version"]) if same else max(int(v["version"]) for v in versions) + 1
    if not allow_changed:
        since = str(latest.get("recorded_at", "?"))[:19]
        raise ObjectiveChangedError(
            f"the objective of study {study.study_name!r} changed since version {latest['version']} was recorded "
            f"({since}): {_and(what)} {'differ' if len(what) > 1 else 'differs'}; {how_to_allow} to record it as version {new_version} "
            f"(new trials are tagged objective_version={new_version}), or use another study name."
        )
    if same is None:
        _record(storage, study_id, versions, new_version, fingerprint)
    else:
        storage.set_study_system_attr(study_id, CURRENT_ATTR, new_version)
    _log.warning(
        "Objective of study %r changed (%s): new trials are objective_version %d.",
        study.study_name,
        ", ".join(what),
        new_version,
    )
    return VersionDecision(new_version, fingerprint.digest, recorded=same is None)


def _and(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _record(
    storage: Any,
    study_id: int,
    versions: list[dict[str, Any]],
    version: int,
    fingerprint: Fingerprint,
) -> None:
    entry = {
        "version": version,
        "fingerprint": fingerprint.to_dict(),
        "recorded_at": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
    }
    storage.set_study_system_attr(study_id, VERSIONS_ATTR, [*versions, entry])
    storage.set_study_system_attr(study_id, CURRENT_ATTR, version)


def trial_version(trial: Any) -> int:
    """A trial's ``objective_version``; untagged trials (made before the study had a
    fingerprint) are version 1."""
    value = trial.user_attrs.get(OBJECTIVE_VERSION)
    try:
        return 1 if value is None else int(value)
    except (TypeError, ValueError):
        return 1
