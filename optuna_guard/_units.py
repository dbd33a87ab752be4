"""Memory units. Every ``*_gb`` setting and tag uses GB = 2**30 bytes (what ``free -g`` and
psutil-based scripts print), so thresholds people already use keep their meaning."""

from __future__ import annotations

GB = 1024**3
MB = 1024**2


def to_gb(value_bytes: float, ndigits: int = 2) -> float:
    """Bytes to GB rounded to ``ndigits`` decimals (2 by default: the unit of every *_gb tag)."""
    return round(value_bytes / GB, ndigits)
