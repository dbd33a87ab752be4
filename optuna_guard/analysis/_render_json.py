"""The JSON report: ``build_report``'s dict as it is (schema in ``_summary`` and docs/analysis.md)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def render_json(report: Mapping[str, Any], *, indent: int | None = 2) -> str:
    """Strict JSON (no NaN/Infinity; ``build_report`` already turned them into null)."""
    return json.dumps(report, indent=indent, allow_nan=False, ensure_ascii=False) + "\n"
