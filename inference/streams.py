"""Parallel inference streams for a runtime that has none of its own: N copies, each running one batch at a time.

onnxruntime runs concurrent ``run`` calls of one session on that session's single intra-op thread pool, so
two batches in flight would share (and fight over) the same threads. N sessions with their own pools of
``threads`` threads each run N batches side by side instead; the weights are held N times (a few MB for
the CPU recipes). OpenVINO needs no such wrapper: its compiled models run several streams themselves.
"""

from __future__ import annotations

import queue
from collections.abc import Sequence
from typing import Generic, Protocol, TypeVar

import numpy as np

from export.metadata import GraphMetadata


class _GraphRuntime(Protocol):
    metadata: GraphMetadata

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]: ...


R = TypeVar("R", bound=_GraphRuntime)


class RuntimeStreams(Generic[R]):
    """Copies of one runtime behind one ``infer``: a call takes an idle copy (waiting while all are busy), so
    up to ``len(copies)`` calls from different threads run at once. Idle copies are taken in turn (FIFO)."""

    def __init__(self, copies: Sequence[R]) -> None:
        if not copies:
            raise ValueError("RuntimeStreams needs at least one runtime")
        self.copies = list(copies)
        self.metadata = self.copies[0].metadata
        self._idle: queue.SimpleQueue[R] = queue.SimpleQueue()
        for copy in self.copies:
            self._idle.put(copy)

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        runtime = self._idle.get()
        try:
            return runtime.infer(images)
        finally:
            self._idle.put(runtime)
