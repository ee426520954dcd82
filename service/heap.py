"""The service's C heap (glibc): few malloc arenas, and free pages handed back once the models are loaded.

glibc gives threads that allocate at once arenas of their own (up to eight per core), and what is freed in
an arena stays resident until its top is free; the service runs many threads (HTTP, request workers,
inference streams, OpenVINO's). Both levers cut the idle service's resident memory (~40 MB and ~20 MB with
both bundled models; ``BENCHMARKS.md``, Lean). Where the C library is not glibc both are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# glibc's mallopt parameter for the arena count (malloc.h). Two arenas kept the idle service 40 MB smaller than
# glibc's default (604 against 644 MB resident after a warm start, both bundled models on OpenVINO); the
# service's throughput with them is in bench/results/serve_lean.json.
M_ARENA_MAX = -8
ARENAS = 2


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def limit_arenas() -> None:
    """At most ``ARENAS`` malloc arenas for the threads started from now on (call it before any)."""
    libc = _glibc()
    if libc is not None and not libc.mallopt(M_ARENA_MAX, ARENAS):
        log.warning("mallopt(M_ARENA_MAX, %d) failed; glibc's default arenas stay", ARENAS)


def trim() -> None:
    """Hand the heap's free pages back to the system: compiling and warming engines frees tens of MB that
    would otherwise stay resident."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
