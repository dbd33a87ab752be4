"""Make the suite's shared fixtures and helpers importable from this sub-directory."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
