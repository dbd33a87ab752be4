"""Thread pools per worker: N workers that each size their BLAS/OpenMP/torch pools to every
core oversubscribe the machine N times (issue 16: torch ran 2 threads in each of 2 workers on
2 cores). Each worker gets ``cores // workers`` (at least 1) through the variables those
libraries read at import; a value the user already set is kept."""

from __future__ import annotations

import os
from collections.abc import Mapping

# torch (intra-op pool) and most OpenMP code read OMP_NUM_THREADS; the BLAS libraries their own.
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


def usable_cores() -> int:
    """Cores this process may run on (affinity / cpuset), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    return max(1, (usable_cores() if cores is None else cores) // max(1, workers))


def thread_env(
    workers: int, environ: Mapping[str, str], cores: int | None = None
) -> dict[str, str]:
    """The thread-count variables to add to a worker's environment (those not set already)."""
    count = str(threads_per_worker(workers, cores))
    return {name: count for name in THREAD_VARIABLES if not environ.get(name)}
