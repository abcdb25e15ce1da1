"""The second hostile-tenant probe's findings, reproduced through the real API process
(uvicorn, as deployed) and checked to hold now (issue 19, items 2, 3, 4 and 5).

* regex bombs in /graders/validate, /graders/run, GRPO regex graders and EGPO
  pattern-table judges: before, compiled inside the API (7.6 s and 1.8 GB for one,
  11 GB for another, /healthz stalled); now a 400 naming the limit, and the API's
  memory does not move while /healthz keeps answering;
* JSON bodies: a Content-Length over the limit is a 413 before the body is read, and a
  chunked body is cut off at the limit;
* stored records: a grader definition over its size limit is a 400, nothing stored;
* fair sharing: a tenant with its grader share in flight gets a 429 with Retry-After,
  and another tenant's requests are answered meanwhile.
"""

from __future__ import annotations

import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.service.liveapi import raw_request, start_live_api

pytestmark = pytest.mark.e2e

KEYS = {"a": "abuse-key-a", "b": "abuse-key-b"}
BOMBS = [
    "(((a{50}){50}){50}){50}",
    "a{4294967294}",
    "(" * 30 + "a" + ")" * 30,
    "x" * 5000,
]
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("abuse")
    keys = root / "keys.json"
    from service.auth import hash_key

    keys.write_text(json.dumps({"tenants": {n: {"keys": [hash_key(k)]} for n, k in KEYS.items()}}))
    api = start_live_api(
        root,
        POSTTRAIN_API_KEYS="",
        POSTTRAIN_API_KEYS_FILE=str(keys),
        POSTTRAIN_MAX_BODY_BYTES=str(1 << 20),
        POSTTRAIN_GRADER_RUNS_PER_TENANT="2",
    )
    yield api
    api.stop()


def client(live, who: str = "a") -> httpx.Client:
    return httpx.Client(
        base_url=live.base_url, headers={"Authorization": f"Bearer {KEYS[who]}"}, timeout=120
    )


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        line = next(x for x in fh if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def regex_grader(pattern: str) -> dict:
    return {"type": "regex", "name": "r", "input": "{{sample.output_text}}", "pattern": pattern}


def test_regex_bombs_are_refused_without_the_api_paying_for_them(live):
    c = client(live)
    fid = c.post(
        "/v1/files",
        files={"file": ("t.jsonl", json.dumps({"prompt": "p"}).encode())},
        data={"purpose": "fine-tune"},
    ).json()["id"]
    before = rss_mb(live.proc.pid)

    def requests_for(pattern: str) -> list[tuple[str, dict, str]]:
        grpo = {"type": "grpo", "grpo": {"graders": [regex_grader(pattern)]}}
        judge = {
            "type": "pattern_table",
            "classes": [{"name": "x", "pattern": pattern}],
            "preferences": [[0.5, 0.5], [0.5, 0.5]],
        }
        egpo = {"type": "egpo", "egpo": {"hyperparameters": {"judge": judge}}}
        return [
            ("/v1/fine_tuning/alpha/graders/validate", {"grader": regex_grader(pattern)},
             "grader.pattern"),
            ("/v1/fine_tuning/alpha/graders/run",
             {"grader": regex_grader(pattern), "model_sample": "aaaa"}, "grader.pattern"),
            ("/v1/fine_tuning/jobs", {"model": "tiny", "training_file": fid, "method": grpo},
             "method.grpo.graders[0].pattern"),
            ("/v1/fine_tuning/jobs", {"model": "tiny", "training_file": fid, "method": egpo},
             "method.egpo.hyperparameters.judge.classes[0].pattern"),
        ]  # fmt: skip

    answers: list[tuple[int, dict, str]] = []
    health: list[int] = []
    done = threading.Event()

    def poll_health() -> None:
        with httpx.Client(base_url=live.base_url, timeout=30) as h:
            while not done.is_set():
                health.append(h.get("/healthz").status_code)

    def send(item: tuple[str, dict, str]) -> None:
        path, body, param = item
        resp = client(live).post(path, json=body)
        answers.append((resp.status_code, resp.json(), param))

    poller = threading.Thread(target=poll_health, daemon=True)
    poller.start()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(send, [r for b in BOMBS for r in requests_for(b)]))
    done.set()
    poller.join()
    assert len(answers) == 4 * len(BOMBS)
    for status, body, param in answers:
        assert status == 400, body
        assert body["error"]["param"] == param, body
    assert health and set(health) == {200}
    assert rss_mb(live.proc.pid) - before < 100  # the bombs were never compiled here
    # a pattern that passes the shape check but does not compile: the bounded child says so
    resp = c.post(
        "/v1/fine_tuning/alpha/graders/validate", json={"grader": regex_grader("(unclosed")}
    )
    assert resp.status_code == 400
    assert "the pattern does not compile" in resp.json()["error"]["message"]
    ok = c.post(
        "/v1/fine_tuning/alpha/graders/run",
        json={"grader": regex_grader(r"^a+$"), "model_sample": "aaaa"},
    )
    assert ok.status_code == 200 and ok.json()["reward"] == 1.0


def _post_head(port: int, path: str, length: int) -> tuple[int, dict, bytes]:
    """Send a POST's headers and none of its body: the answer must come anyway."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {KEYS['a']}\r\nContent-Length: {length}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        return raw_request(sock, head)


@pytest.mark.parametrize(
    "path",
    ["/v1/fine_tuning/jobs", "/v1/fine_tuning/alpha/graders/run", "/v1/fine_tuning/jobs/x/cancel"],
)
def test_an_oversized_content_length_is_413_before_the_body(live, path):
    for length in (99_999_999_999, (1 << 20) + 1):
        status, _, body = _post_head(live.port, path, length)  # and no body at all
        assert status == 413
        err = json.loads(body)["error"]
        assert err["code"] == "request_too_large" and str(1 << 20) in err["message"]


def test_a_chunked_body_is_cut_off_at_the_limit(live):
    chunk = b"[" + b"1," * 50_000  # ~100 KB a chunk, never valid JSON
    sent = 0

    def body():
        nonlocal sent
        for _ in range(30):  # 3 MB if it were all read
            sent += len(chunk)
            yield chunk

    with client(live) as c:
        resp = c.post("/v1/fine_tuning/jobs", content=body())
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "request_too_large"


def test_a_grader_definition_over_its_size_limit_is_refused_and_nothing_is_stored(live):
    c = client(live)
    huge = {"type": "string_check", "name": "s", "input": "{{sample.output_text}}",
            "reference": "x" * (100 << 10), "operation": "eq"}  # fmt: skip
    resp = c.post("/v1/fine_tuning/alpha/graders/validate", json={"grader": huge})
    assert resp.status_code == 400
    assert "a grader definition is" in resp.json()["error"]["message"]
    before = c.get("/v1/fine_tuning/jobs").json()["data"]
    job = c.post(
        "/v1/fine_tuning/jobs",
        json={"model": "tiny", "training_file": "file-x",
              "method": {"type": "grpo", "grpo": {"graders": [huge]}}},
    )  # fmt: skip
    assert job.status_code == 400
    err = job.json()["error"]
    assert err["param"] == "method.grpo.graders[0]" and "at most 65536" in err["message"]
    assert c.get("/v1/fine_tuning/jobs").json()["data"] == before


# Each sub-grader backtracks on "a" * 40 + "b" until the regex timeout (1 s) stops it:
# a run takes about 6 s, so every request below arrives while the first two still run.
SLOW = {
    "type": "multi",
    "name": "slow",
    "graders": {f"r{i}": {**regex_grader("(a|aa)+$"), "name": f"r{i}"} for i in range(6)},
    "calculate_output": "r0",
}


def test_a_tenant_past_its_grader_share_gets_429_and_others_are_served(live):
    """Tenant a sends four slow runs at once with a share of 2: two run, two are 429s
    with Retry-After; tenant b's grader run and file list are answered while a's run."""
    slow = {"grader": SLOW, "model_sample": "a" * 40 + "b"}
    finished: list[str] = []
    statuses: list[int] = []
    go = threading.Barrier(4)

    def slow_run() -> None:
        with client(live, "a") as c:
            go.wait()
            resp = c.post("/v1/fine_tuning/alpha/graders/run", json=slow)
        statuses.append(resp.status_code)
        if resp.status_code == 429:
            assert resp.headers["Retry-After"] == "1"
            assert resp.json()["error"]["code"] == "rate_limit_exceeded"
        else:
            finished.append("a")

    threads = [threading.Thread(target=slow_run) for _ in range(4)]
    for t in threads:
        t.start()
    with client(live, "b") as b:
        while len(statuses) < 2:  # a's two refusals: its share is now busy
            threading.Event().wait(0.05)
        assert b.get("/v1/files").status_code == 200
        quick = {"grader": regex_grader("^x$"), "model_sample": "x"}
        assert b.post("/v1/fine_tuning/alpha/graders/run", json=quick).json()["reward"] == 1.0
        finished.append("b")
    for t in threads:
        t.join()
    assert sorted(statuses) == [200, 200, 429, 429]
    assert finished[0] == "b"  # served while tenant a's runs held its share


def test_malformed_http_gets_an_openai_shaped_400(live):
    for raw in (b"GARBAGE\r\n\r\n", b"GET /v1/files HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", live.port), timeout=30) as sock:
            sock.sendall(raw)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400"), data
        assert b"content-type: application/json" in head.lower()
        err = json.loads(body)["error"]
        assert err["code"] == "malformed_request" and err["type"] == "invalid_request_error"
