"""Access control and traceability over real HTTP: API keys, CORS, request ids and the access log.

Three `python -m service` processes on loopback serve one tiny random-weight MEInst graph
(tests/service_models.py), exported once here:
- "open": no keys (as before), a text access log, a queue of one on a slow 512x512 bucket (so that
  concurrent requests are shed with 503);
- "guarded": a key file and an environment key, CORS for one origin, a JSON access log;
- "strict": a key file that the tests rewrite (reload by mtime and by SIGHUP), and /metrics behind keys.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.routing import Route

from inference.runtime import export_checkpoint
from service.keys import KeyFileError, KeyStore, hash_line, parse_line
from service.launcher import ServiceProcess, free_port
from service.request_log import RequestIdFilter, RequestLogMiddleware
from service.settings import REPO, Settings
from tests.service_models import tiny_checkpoint

PHOTO = Path(
    "/usr/share/doc/labelme-examples/examples/instance_segmentation/data_dataset_coco/JPEGImages/2011_000003.jpg"
)
CPU = ["--runtime.providers", '["CPUExecutionProvider"]']
ORIGIN = "https://page.example"
ALICE_KEY = "alice-0123456789-abcdefghij"  # in the key file as its named hash
PLAIN_KEY = "plain-0123456789-klmnopqrst"  # in the key file as itself, unnamed
ENV_KEY = "envkey-0123456789-uvwxyzABCD"  # in ONESTAGE_API_KEYS, named "ci"
WRONG_KEY = "wrong-0123456789-EFGHIJKLMN"
SECRETS = (ALICE_KEY, PLAIN_KEY, ENV_KEY, WRONG_KEY)
OPEN_WARNING = "no API keys configured"
REQUEST_ID = "complaint-42.retry:1"


# ---------------------------------------------------------------- servers and helpers
@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("security")


@pytest.fixture(scope="module")
def graph(workdir: Path) -> Path:
    return export_checkpoint(tiny_checkpoint("meinst", workdir / "meinst.pt"), workdir / "meinst.onnx")


def models(graph: Path, bucket: str) -> list[str]:
    return [
        "--models",
        json.dumps([{"name": "meinst", "path": str(graph), "buckets": [bucket]}]),
        *CPU,
        "--max-batch-size",
        "1",
    ]


@pytest.fixture(scope="module")
def servers(workdir: Path, graph: Path) -> Iterator[dict[str, ServiceProcess]]:
    """The three servers, started together."""
    guarded_keys = workdir / "guarded.keys"
    guarded_keys.write_text(f"# the team's clients\n{hash_line(ALICE_KEY, 'alice')}\n\n{PLAIN_KEY}\n")
    strict_keys = workdir / "strict.keys"
    strict_keys.write_text(f"{hash_line(ALICE_KEY, 'alice')}\n")
    processes = {
        "open": ServiceProcess(
            [*models(graph, "512x512"), "--max-queue-size", "1", "--access-log"], workdir / "open.log"
        ),
        "guarded": ServiceProcess(
            [
                *models(graph, "128x192"),
                "--api-keys-file",
                str(guarded_keys),
                "--cors-origins",
                json.dumps([ORIGIN]),
                "--access-log",
                "--log-format",
                "json",
            ],
            workdir / "guarded.log",
            env={"ONESTAGE_API_KEYS": f"ci:{ENV_KEY}"},
        ),
        "strict": ServiceProcess(
            [*models(graph, "128x192"), "--api-keys-file", str(strict_keys), "--metrics-require-key"],
            workdir / "strict.log",
        ),
    }
    try:
        for process in processes.values():
            process.wait_ready()
        yield processes
    finally:
        for process in processes.values():
            process.terminate()


@pytest.fixture(scope="module")
def open_server(servers: dict[str, ServiceProcess]) -> ServiceProcess:
    return servers["open"]


@pytest.fixture(scope="module")
def guarded(servers: dict[str, ServiceProcess]) -> ServiceProcess:
    return servers["guarded"]


@pytest.fixture(scope="module")
def strict(servers: dict[str, ServiceProcess]) -> ServiceProcess:
    return servers["strict"]


def post(url: str, headers: dict[str, str] | None = None, **params: Any) -> httpx.Response:
    return httpx.post(
        f"{url}/segment",
        content=PHOTO.read_bytes(),
        headers={"Content-Type": "image/jpeg", **(headers or {})},
        params=params,
        timeout=60,
    )


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def json_lines(process: ServiceProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in process.log().splitlines() if line.startswith("{")]


def access_line(process: ServiceProcess, request_id: str, timeout: float = 5.0) -> dict[str, Any]:
    """The JSON access line of ``request_id`` (written once the response is sent, so poll briefly)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [
            line
            for line in json_lines(process)
            if line["logger"] == "service.access" and line["request_id"] == request_id
        ]
        if lines or time.monotonic() > deadline:
            assert len(lines) == 1, (request_id, lines)
            return lines[0]
        time.sleep(0.05)


def assert_unauthorized(response: httpx.Response, error: str | None = None) -> None:
    assert response.status_code == 401, (response.status_code, response.text)
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="onestage"')
    assert (f'error="{error}"' in challenge) if error else ("error=" not in challenge)
    assert set(response.json()) == {"error"} and response.headers["X-Request-ID"]


# ---------------------------------------------------------------- key files and the key tool (in process)
def test_key_lines_parse_to_hashes_names_and_line_numbered_errors() -> None:
    digest = hashlib.sha256(ALICE_KEY.encode()).digest()
    assert parse_line(f"alice:sha256:{digest.hex()}", "x").digest == digest
    assert parse_line(f"alice:sha256:{digest.hex()}", "x").name == "alice"
    assert parse_line(f"sha256:{digest.hex().upper()}", "x").name is None
    assert parse_line(f"  {ALICE_KEY}  ", "x").digest == digest  # a plain key is hashed on load
    assert parse_line(f"bob:{ALICE_KEY}", "x").name == "bob"
    assert parse_line("# a comment", "x") is None and parse_line("   ", "x") is None
    for bad in ("short-key", "sha256:abc", "bad name:" + ALICE_KEY, f"{ALICE_KEY} trailing"):
        with pytest.raises(KeyFileError) as error:
            parse_line(bad, "keys.txt line 7")
        assert "keys.txt line 7" in str(error.value) and bad not in str(error.value)


def test_key_store_keeps_its_keys_when_the_file_breaks_or_goes(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"{PLAIN_KEY}\n")
    store = KeyStore([], path)
    assert store.match(PLAIN_KEY) is not None and store.match(WRONG_KEY) is None
    path.write_text(f"{PLAIN_KEY}\nnot a key line\n")
    assert store.match(PLAIN_KEY) is not None  # a half-written file does not drop (or open) anything
    path.unlink()
    assert store.match(PLAIN_KEY) is not None
    path.write_text(f"{ALICE_KEY}\n")
    assert store.match(ALICE_KEY) is not None and store.match(PLAIN_KEY) is None
    with pytest.raises(KeyFileError, match="cannot read"):
        KeyStore([], tmp_path / "missing")


def test_key_tool_prints_lines_that_accept_the_key(tmp_path: Path) -> None:
    hashed = subprocess.run(
        [sys.executable, "-m", "service.keys", "hash", "alice"],
        input=f"{ALICE_KEY}\n",
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert hashed.stdout.strip() == hash_line(ALICE_KEY, "alice") and ALICE_KEY not in hashed.stdout
    generated = subprocess.run(
        [sys.executable, "-m", "service.keys", "generate", "bob"], cwd=REPO, capture_output=True, text=True, check=True
    )
    key, line = generated.stderr.strip(), generated.stdout.strip()
    assert len(key) >= 40 and key not in line and line.startswith("bob:sha256:")
    (tmp_path / "keys").write_text(line + "\n")
    assert KeyStore([], tmp_path / "keys").match(key).name == "bob"
    short = subprocess.run(
        [sys.executable, "-m", "service.keys", "hash"],
        input="short\n",
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert short.returncode == 2 and "at least 16 characters" in short.stderr


def test_settings_refuse_cors_origins_that_never_match() -> None:
    assert Settings(cors_origins=["https://a.example:8443", "*"]).cors_origins == ["https://a.example:8443", "*"]
    with pytest.raises(ValueError, match="trailing"):
        Settings(cors_origins=["https://a.example/"])


def test_service_refuses_to_start_with_a_bad_key(workdir: Path, graph: Path) -> None:
    keys = workdir / "bad.keys"
    keys.write_text(f"{PLAIN_KEY}\nname with spaces:{ALICE_KEY}\n")
    command = [sys.executable, "-m", "service", *models(graph, "128x192")]
    from_file = subprocess.run(
        [*command, "--api-keys-file", str(keys)], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert from_file.returncode == 2 and f"{keys} line 2" in from_file.stderr and ALICE_KEY not in from_file.stderr
    short = "tooshort1234"
    environment = {**os.environ, "ONESTAGE_API_KEYS": f"{ENV_KEY},{short}"}
    from_env = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=120, check=False, env=environment
    )
    assert from_env.returncode == 2 and "ONESTAGE_API_KEYS entry 2" in from_env.stderr
    assert short not in from_env.stderr and ENV_KEY not in from_env.stderr


# ---------------------------------------------------------------- no keys: as before, with one warning
def test_without_keys_everything_is_open_and_the_start_warns_once(open_server: ServiceProcess) -> None:
    assert post(open_server.url).status_code == 200
    assert httpx.get(f"{open_server.url}/models").status_code == 200
    assert httpx.get(f"{open_server.url}/v2/models/meinst").status_code == 200
    assert open_server.log().count(OPEN_WARNING) == 1
    schema = httpx.get(f"{open_server.url}/openapi.json").json()
    assert (
        "securitySchemes" not in schema.get("components", {}) and "security" not in schema["paths"]["/segment"]["post"]
    )


# ---------------------------------------------------------------- keys on
def test_segment_needs_a_key_in_either_header(guarded: ServiceProcess) -> None:
    assert_unauthorized(post(guarded.url))
    assert_unauthorized(post(guarded.url, {"Authorization": f"Basic {ALICE_KEY}"}))  # only Bearer counts
    wrong = post(guarded.url, bearer(WRONG_KEY))
    assert_unauthorized(wrong, "invalid_token")
    other_wrong = post(guarded.url, {"X-API-Key": ALICE_KEY[:-1] + "X"})
    assert other_wrong.json() == wrong.json()  # the same answer, however close the guess
    answers = [
        post(guarded.url, bearer(ALICE_KEY)),
        post(guarded.url, {"X-API-Key": PLAIN_KEY}),
        post(guarded.url, bearer(ENV_KEY)),
    ]
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert answers[0].json() == answers[1].json() == answers[2].json() and answers[0].json()["model"] == "meinst"
    assert OPEN_WARNING not in guarded.log()


def test_display_needs_a_key_too(guarded: ServiceProcess) -> None:
    """The page's picture of the image is the image: no key, no picture."""

    def display(headers: dict[str, str]) -> httpx.Response:
        return httpx.post(
            f"{guarded.url}/display", content=PHOTO.read_bytes(), headers={"Content-Type": "image/jpeg", **headers}
        )

    assert_unauthorized(display({}))
    shown = display({"X-API-Key": PLAIN_KEY})
    assert shown.status_code == 200 and shown.headers["content-type"] == "image/png"


def test_model_metadata_needs_a_key_and_health_metrics_docs_stay_open(guarded: ServiceProcess) -> None:
    for path in ("/models", "/v2/models/meinst", "/v2/models/unknown"):
        assert_unauthorized(httpx.get(f"{guarded.url}{path}"))  # no key: not even whether a model exists
        assert httpx.get(f"{guarded.url}{path}", headers={"X-API-Key": PLAIN_KEY}).status_code == (
            404 if "unknown" in path else 200
        )
    for path in (
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/meinst/ready",
        "/metrics",
        "/docs",
        "/openapi.json",
    ):
        assert httpx.get(f"{guarded.url}{path}").status_code == 200, path


def test_a_bad_query_without_a_key_gets_401_not_the_validation_error(guarded: ServiceProcess) -> None:
    assert_unauthorized(post(guarded.url, score_threshold="2"))
    assert post(guarded.url, bearer(ALICE_KEY), score_threshold="2").status_code == 422


def test_openapi_documents_bearer_and_api_key_on_the_protected_routes(guarded: ServiceProcess) -> None:
    schema = httpx.get(f"{guarded.url}/openapi.json").json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["bearer"] == {"type": "http", "scheme": "bearer", "description": schemes["bearer"]["description"]}
    assert (schemes["apiKey"]["in"], schemes["apiKey"]["name"]) == ("header", "X-API-Key")
    for path, method in (("/segment", "post"), ("/display", "post"), ("/models", "get"), ("/v2/models/{name}", "get")):
        assert schema["paths"][path][method]["security"] == [{"bearer": []}, {"apiKey": []}], path
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/{name}/ready", "/metrics"):
        assert "security" not in schema["paths"][path]["get"], path


def test_keys_appear_in_no_log_metric_or_body(guarded: ServiceProcess) -> None:
    bodies = [post(guarded.url, bearer(key)).text for key in SECRETS] + [
        httpx.get(f"{guarded.url}/models", headers={"X-API-Key": WRONG_KEY}).text
    ]
    exposed = "\n".join([guarded.log(), httpx.get(f"{guarded.url}/metrics").text, *bodies])
    for key in SECRETS:
        assert key not in exposed and hashlib.sha256(key.encode()).hexdigest() not in exposed


def test_requests_are_counted_per_key_name_and_refusals_by_reason(guarded: ServiceProcess) -> None:
    before = samples(httpx.get(f"{guarded.url}/metrics").text)
    post(guarded.url, bearer(ALICE_KEY))
    post(guarded.url, bearer(ALICE_KEY))
    post(guarded.url, {"X-API-Key": PLAIN_KEY})
    post(guarded.url, bearer(ENV_KEY))
    post(guarded.url, bearer(WRONG_KEY))
    post(guarded.url)
    after = samples(httpx.get(f"{guarded.url}/metrics").text)

    def delta(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("onestage_key_requests_total", key_name="alice") == 2
    assert delta("onestage_key_requests_total", key_name="_unnamed") == 1
    assert delta("onestage_key_requests_total", key_name="ci") == 1
    assert delta("onestage_auth_failures_total", reason="invalid") == 1
    assert delta("onestage_auth_failures_total", reason="missing") == 1
    assert {dict(labels)["key_name"] for name, labels in after if name == "onestage_key_requests_total"} == {
        "alice",
        "ci",
        "_unnamed",
    }


def test_metrics_behind_keys_when_asked(strict: ServiceProcess) -> None:
    assert_unauthorized(httpx.get(f"{strict.url}/metrics"))
    assert "onestage_requests_in_flight" in httpx.get(f"{strict.url}/metrics", headers={"X-API-Key": ALICE_KEY}).text
    assert httpx.get(f"{strict.url}/v2/health/ready").status_code == 200


def test_key_file_changes_apply_without_restart_and_a_broken_file_keeps_the_keys(
    strict: ServiceProcess, workdir: Path
) -> None:
    keys = workdir / "strict.keys"
    # Rotation: the new key joins, clients move over, the old key leaves (each write swaps the file atomically).
    staged = workdir / "strict.keys.new"
    staged.write_text(f"{hash_line(ALICE_KEY, 'alice')}\n{hash_line(PLAIN_KEY, 'bob')}\n")
    os.replace(staged, keys)
    assert (
        post(strict.url, bearer(PLAIN_KEY)).status_code == 200
        and post(strict.url, bearer(ALICE_KEY)).status_code == 200
    )
    staged.write_text(f"{hash_line(PLAIN_KEY, 'bob')}\n")
    os.replace(staged, keys)
    assert_unauthorized(post(strict.url, bearer(ALICE_KEY)), "invalid_token")
    assert post(strict.url, bearer(PLAIN_KEY)).status_code == 200

    # A bad line: the keys read before stay, and the error names the line (not its text) and the request.
    keys.write_text(f"{hash_line(PLAIN_KEY, 'bob')}\n{ENV_KEY} oops\n")
    triggering = post(strict.url, bearer(PLAIN_KEY), model="meinst")
    assert triggering.status_code == 200
    errors = [line for line in strict.log().splitlines() if "API key file not reloaded" in line]
    assert errors and f"{keys} line 2" in errors[-1] and ENV_KEY not in strict.log()
    assert f"[{triggering.headers['X-Request-ID']}]" in errors[-1]

    # SIGHUP re-reads a file whose mtime, size and inode did not change (a copy that kept its timestamps).
    keys.write_text(f"{hash_line(PLAIN_KEY, 'bob')}\n")
    assert post(strict.url, bearer(PLAIN_KEY)).status_code == 200
    stat = keys.stat()
    with keys.open("r+") as file:  # same inode, same size: bob's line becomes alice's
        file.write(hash_line(ALICE_KEY, "eve") + "\n")
    os.utime(keys, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (keys.stat().st_size, keys.stat().st_mtime_ns, keys.stat().st_ino) == (
        stat.st_size,
        stat.st_mtime_ns,
        stat.st_ino,
    )
    assert_unauthorized(post(strict.url, bearer(ALICE_KEY)), "invalid_token")
    strict.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while post(strict.url, bearer(ALICE_KEY)).status_code != 200:
        assert time.monotonic() < deadline, strict.log()
        time.sleep(0.1)
    assert_unauthorized(post(strict.url, bearer(PLAIN_KEY)), "invalid_token")
    assert strict.process.poll() is None  # SIGHUP's default action would have ended the process


# ---------------------------------------------------------------- CORS
def test_cors_preflight_allows_the_listed_origin_only(guarded: ServiceProcess) -> None:
    asked = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, x-api-key, x-request-id, content-type",
    }
    preflight = httpx.options(f"{guarded.url}/segment", headers=asked)
    assert preflight.status_code == 200  # no key needed: browsers send none with a preflight
    assert preflight.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    allowed = {h.strip().lower() for h in preflight.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "x-api-key", "x-request-id", "content-type"} <= allowed
    assert preflight.headers["X-Request-ID"]
    refused = httpx.options(f"{guarded.url}/segment", headers={**asked, "Origin": "https://elsewhere.example"})
    assert refused.status_code == 400 and "Access-Control-Allow-Origin" not in refused.headers

    answer = post(guarded.url, {"Origin": ORIGIN, **bearer(ALICE_KEY)})
    assert answer.status_code == 200 and answer.headers["Access-Control-Allow-Origin"] == ORIGIN
    exposed = {h.strip().lower() for h in answer.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"x-request-id", "retry-after", "www-authenticate"} <= exposed
    unauthorized = post(guarded.url, {"Origin": ORIGIN})  # the page can read the 401 and ask for a key
    assert unauthorized.status_code == 401 and unauthorized.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert (
        "Access-Control-Allow-Origin"
        not in post(guarded.url, {"Origin": "https://elsewhere.example", **bearer(ALICE_KEY)}).headers
    )


def test_cors_is_off_without_origins(open_server: ServiceProcess) -> None:
    preflight = httpx.options(
        f"{open_server.url}/segment", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    )
    assert preflight.status_code == 405 and "Access-Control-Allow-Origin" not in preflight.headers
    assert "Access-Control-Allow-Origin" not in post(open_server.url, {"Origin": ORIGIN}).headers


# ---------------------------------------------------------------- request ids and the access log
def test_every_response_carries_a_request_id(guarded: ServiceProcess) -> None:
    assert post(guarded.url, {"X-Request-ID": REQUEST_ID, **bearer(ALICE_KEY)}).headers["X-Request-ID"] == REQUEST_ID
    responses = [
        post(guarded.url),  # 401
        post(guarded.url, {"X-Request-ID": "x" * 129, **bearer(ALICE_KEY)}),  # too long: replaced
        post(
            guarded.url, {"X-Request-ID": "id with spaces", **bearer(ALICE_KEY)}, model="nope"
        ),  # unsafe: replaced; 404
        post(guarded.url, bearer(ALICE_KEY), mask_format="jpeg"),  # 422
        httpx.post(
            f"{guarded.url}/segment",
            content=b"not an image",
            headers={"Content-Type": "image/png", **bearer(ALICE_KEY)},
        ),  # 400
        httpx.get(f"{guarded.url}/no/such/route"),  # 404 from the router
        httpx.get(f"{guarded.url}/v2/health/live"),
    ]
    assert [r.status_code for r in responses] == [401, 200, 404, 422, 415, 404, 200]
    ids = [r.headers["X-Request-ID"] for r in responses]
    assert all(re.fullmatch("[0-9a-f]{32}", i) for i in ids) and len(set(ids)) == len(ids)


def test_json_access_log_has_method_route_model_status_latency_bytes_and_id(guarded: ServiceProcess) -> None:
    answer = post(guarded.url, {"X-Request-ID": "json-line-1", **bearer(ALICE_KEY)})
    line = access_line(guarded, "json-line-1")
    assert (line["method"], line["route"], line["model"], line["status"], line["key_name"]) == (
        "POST",
        "/segment",
        "meinst",
        200,
        "alice",
    )
    assert line["bytes"] == len(answer.content) and 0 < line["latency_ms"] < 60_000 and line["client"] == "127.0.0.1"
    refused = post(guarded.url, {"X-Request-ID": "json-line-2"}, model="meinst")
    line = access_line(guarded, "json-line-2")
    assert (line["status"], line["model"], line["bytes"], line["key_name"]) == (
        401,
        "meinst",
        len(refused.content),
        None,
    )
    httpx.get(f"{guarded.url}/v2/models/meinst", headers={"X-Request-ID": "json-line-3", "X-API-Key": PLAIN_KEY})
    line = access_line(guarded, "json-line-3")
    assert (line["route"], line["model"], line["status"], line["key_name"]) == (
        "/v2/models/{name}",
        "meinst",
        200,
        None,
    )
    lines = json_lines(guarded)
    assert any("Uvicorn running on" in line["message"] for line in lines)  # uvicorn's own lines are JSON too
    assert all({"time", "level", "logger", "message", "request_id"} <= set(line) for line in lines)


def test_shed_requests_get_503_with_an_id_in_the_response_and_the_log(open_server: ServiceProcess) -> None:
    shed: list[httpx.Response] = []
    with ThreadPoolExecutor(8) as pool:
        for burst in range(5):
            ids = [f"burst-{burst}-{i}" for i in range(8)]
            answers = list(pool.map(lambda request_id: post(open_server.url, {"X-Request-ID": request_id}), ids))
            shed = [r for r in answers if r.status_code == 503]
            if shed:
                break
    assert shed, "a queue of one never overflowed"
    for response in shed:
        assert response.headers["Retry-After"] and "queue is full" in response.json()["error"]
        request_id = response.headers["X-Request-ID"]
        deadline = time.monotonic() + 5
        while not any(f"[{request_id}]" in line and "status=503" in line for line in open_server.log().splitlines()):
            assert time.monotonic() < deadline, open_server.log()[-3000:]
            time.sleep(0.05)
    line = next(
        line
        for line in open_server.log().splitlines()
        if f"[{shed[0].headers['X-Request-ID']}]" in line and "status=503" in line
    )
    assert (
        'method="POST" route="/segment" model="meinst" status=503' in line
        and "latency_ms=" in line
        and "bytes=" in line
    )


def test_an_unhandled_error_becomes_json_500_with_the_request_id_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(request: Request) -> None:
        raise RuntimeError("a bug")

    # As in create_app: inside Starlette's ServerErrorMiddleware, which would answer a plain-text 500 without the id.
    app = Starlette(routes=[Route("/broken", broken)], middleware=[Middleware(RequestLogMiddleware, access_log=True)])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    caplog.set_level(logging.INFO)
    caplog.handler.addFilter(RequestIdFilter())
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        response = httpx.get(f"http://127.0.0.1:{server.config.port}/broken", headers={"X-Request-ID": REQUEST_ID})
    finally:
        server.should_exit = True
        thread.join(10)
    assert (response.status_code, response.json(), response.headers["X-Request-ID"]) == (
        500,
        {"error": "internal server error"},
        REQUEST_ID,
    )
    error = next(r for r in caplog.records if r.levelname == "ERROR")
    assert error.request_id == REQUEST_ID and error.exc_info is not None and "a bug" in str(error.exc_info[1])
    access = next(r for r in caplog.records if r.name == "service.access")
    assert access.request_id == REQUEST_ID and access.access["status"] == 500
