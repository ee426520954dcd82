"""What a cluster relies on from one replica, over real HTTP against `python -m service` on loopback.

Lean: the server never imports torch; a checkpoint is exported to ONNX in a child process on a cold start,
and a second replica on the same cache reuses the graph. Load shedding: under overload a replica refuses at
once (503 + Retry-After, before reading the body) instead of queueing without bound. Drain: after SIGTERM
readiness turns 503 while the replica still serves, then it stops listening and finishes every request it
accepted. A tiny random-weight MEInst model padded to a large bucket makes each request take a while, so
that the queue fills and the drain has work in flight.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest

from service.launcher import ServiceProcess
from tests.service_models import tiny_checkpoint
from tests.test_service import CPU, PHOTO, metrics, post, value

SLOW_BUCKET = "1024x1024"  # every image padded to it: a batch of one takes ~0.1-0.3 s on two cores
QUEUE = 2
RETRY_AFTER_S = 3
DRAIN_S = 2.0


def torch_mapped(pid: int) -> bool:
    """Whether the process has torch's shared libraries mapped, i.e. imported torch."""
    return any(
        "libtorch" in line or "/torch/lib/" in line for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
    )


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServiceProcess]]:
    """Two servers of one tiny checkpoint on one cache directory, batches of one: "shed" (a queue of 2) starts
    cold and exports the checkpoint; "drain" (a queue of 16, a drain phase of DRAIN_S) starts warm after it."""
    workdir = tmp_path_factory.mktemp("replica")
    checkpoint = tiny_checkpoint("meinst", workdir / "meinst.pt")
    models = json.dumps([{"name": "meinst", "path": str(checkpoint), "buckets": [SLOW_BUCKET]}])
    common = [
        "--models",
        models,
        "--cache-dir",
        str(workdir / "cache"),
        *CPU,
        "--max-batch-size",
        "1",
        "--runtime.streams",
        "1",
        "--runtime.threads",
        "1",
    ]
    processes = {}
    try:
        shed = ["--max-queue-size", str(QUEUE), "--retry-after-s", str(RETRY_AFTER_S)]
        processes["shed"] = ServiceProcess([*common, *shed], workdir / "shed.log")
        deadline = time.monotonic() + 300
        while not list((workdir / "cache").glob("meinst-*.onnx")) and time.monotonic() < deadline:
            assert processes["shed"].process.poll() is None, processes["shed"].log()
            time.sleep(0.1)  # the warm server starts once the cold one's export is in the cache
        drain = ["--max-queue-size", "16", "--drain-s", str(DRAIN_S)]
        processes["drain"] = ServiceProcess([*common, *drain], workdir / "drain.log")
        for process in processes.values():
            process.wait_ready()
        yield processes
    finally:
        for process in processes.values():
            process.terminate()


def test_replicas_serve_without_torch_and_reuse_the_exported_graph(servers: dict[str, ServiceProcess]) -> None:
    cold, warm = servers["shed"], servers["drain"]
    # The cold replica exports once, ahead of the loads (which then find the graph it wrote); the warm one never.
    assert cold.log().count("exporting ") == 1
    assert "using cached graph" in warm.log() and "exporting " not in warm.log()
    for server in (cold, warm):
        assert post(server.url, PHOTO.read_bytes(), model="meinst").status_code == 200
        assert not torch_mapped(server.process.pid), "the serving process loaded torch"


class Timed(NamedTuple):
    response: httpx.Response
    sent: float
    answered: float

    @property
    def seconds(self) -> float:
        return self.answered - self.sent


def timed_post(url: str, data: bytes) -> Timed:
    sent = time.monotonic()
    response = post(url, data, model="meinst")
    return Timed(response, sent, time.monotonic())


def test_overload_is_refused_at_once_with_retry_after(servers: dict[str, ServiceProcess]) -> None:
    """A burst of 12 against a queue of 2: a few are served, the rest get 503 + Retry-After right away, and
    no more requests are ever held than the queue slots plus the batch that runs."""
    server = servers["shed"]
    photo = PHOTO.read_bytes()
    before = metrics(server.url)
    held: list[float] = []
    stop = threading.Event()

    def watch() -> None:  # how many requests the server holds, sampled through the burst
        while not stop.is_set():
            held.append(value(metrics(server.url), "onestage_requests_in_flight", model="meinst"))

    with ThreadPoolExecutor(13) as pool:
        watcher = pool.submit(watch)
        answers = list(pool.map(lambda _: timed_post(server.url, photo), range(12)))
        stop.set()
        watcher.result()
    statuses = Counter(a.response.status_code for a in answers)
    assert set(statuses) == {200, 503} and statuses[200] >= QUEUE, statuses
    served = [a for a in answers if a.response.status_code == 200]
    refused = [a for a in answers if a.response.status_code == 503]
    for answer in refused:
        assert (
            answer.response.headers["retry-after"] == str(RETRY_AFTER_S)
            and "queue is full" in answer.response.json()["error"]
        )
    # refused without waiting for the model: faster than the quickest served request took
    assert max(a.seconds for a in refused) < min(a.seconds for a in served), (
        [a.seconds for a in refused],
        [a.seconds for a in served],
    )
    assert max(held) <= QUEUE + 1, held  # queue slots + the batch of one being run
    after = metrics(server.url)
    rejected = value(after, "onestage_failures_total", model="meinst", reason="rejected") - value(
        before, "onestage_failures_total", model="meinst", reason="rejected"
    )
    assert rejected == statuses[503]
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200


def test_sigterm_drains_then_finishes_every_accepted_request(servers: dict[str, ServiceProcess]) -> None:
    """SIGTERM with a queue's worth of requests in flight: readiness answers 503 at once while live stays 200
    and a new request is still served; after DRAIN_S the server stops listening, and every accepted request
    gets its 200."""
    server = servers["drain"]
    photo = PHOTO.read_bytes()
    single = timed_post(server.url, photo)
    # enough work that some of it outlasts the drain, however fast this machine runs a request
    count = min(16, max(4, math.ceil(2 * DRAIN_S / single.seconds)))
    with ThreadPoolExecutor(count + 1) as pool:
        accepted: list[Future[Timed]] = [pool.submit(timed_post, server.url, photo) for _ in range(count)]
        deadline = time.monotonic() + 30
        while (
            value(metrics(server.url), "onestage_requests_in_flight", model="meinst") < count
            and time.monotonic() < deadline
        ):
            time.sleep(0.01)
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        ready = httpx.get(f"{server.url}/v2/health/ready", timeout=5)
        live = httpx.get(f"{server.url}/v2/health/live", timeout=5)
        during_drain = pool.submit(timed_post, server.url, photo)
        # once the drain is over the server stops listening while accepted requests are still running
        refused_at = None
        while refused_at is None and time.monotonic() < signalled + DRAIN_S + 30:
            try:
                httpx.get(f"{server.url}/v2/health/live", timeout=1)
            except httpx.TransportError:
                refused_at = time.monotonic()
            time.sleep(0.02)
        pending_when_refused = sum(not f.done() for f in [*accepted, during_drain])
        answers = [f.result() for f in [*accepted, during_drain]]
    code = server.process.wait(30)
    assert single.response.status_code == 200
    assert ready.status_code == 503 and ready.json()["ready"] is False
    assert live.status_code == 200
    assert code in (0, -signal.SIGTERM), server.log()
    assert [a.response.status_code for a in answers] == [200] * (count + 1)
    assert all(a.response.json()["instances"] for a in answers)
    assert refused_at is not None and refused_at - signalled >= DRAIN_S, "stopped listening before the drain was over"
    assert pending_when_refused >= 1, "the drain outlasted the work: nothing was left to finish after it"
    assert max(a.answered for a in answers) > refused_at  # accepted requests answered after listening stopped
    assert "readiness is 503" in server.log()
