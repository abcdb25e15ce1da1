"""The inference worker's front over ``VllmEngine``, against a stand-in of vLLM's server.

The front runs in-process under uvicorn (a thread with its own event loop); every vLLM
server it starts is a real process of ``tests.workers.fake_vllm``, which logs its
command line, its environment's LoRA flag and every request it gets, so each test
asserts what posttrain sent to vLLM as well as what the caller got back.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn

from workers.inference.engines import VllmEngine
from workers.inference.front import MODEL_HEADER, create_front
from workers.inference.process import free_port

REPO = Path(__file__).resolve().parents[2]


class Front:
    """``create_front(VllmEngine(...))`` served by uvicorn on a free port, in a thread."""

    def __init__(self, engine: VllmEngine, load_wait: float = 30):
        self.engine = engine
        app = create_front(engine, load_wait=load_wait, max_tokens=64, check_seconds=3600)
        self.url = f"http://127.0.0.1:{free_port()}"
        port = int(self.url.rsplit(":", 1)[1])
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_until_complete, args=(self.serve(),), daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "front did not start"
            time.sleep(0.02)

    async def serve(self) -> None:
        await self.server.serve()
        # as asyncio.run would: what the app left running ends with its loop
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive(), "front did not stop"
        self.loop.close()

    def run(self, coro, timeout: float = 30):
        """Run ``coro`` on the front's event loop (where the engine lives)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def post(self, model: dict, body: dict, kind: str = "chat") -> httpx.Response:
        path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        headers = {MODEL_HEADER: json.dumps(model)}
        return httpx.post(self.url + path, json=body, headers=headers, timeout=60)

    def stream(self, model: dict, body: dict) -> list[str]:
        """The ``data:`` payloads of a streamed chat answer."""
        headers = {MODEL_HEADER: json.dumps(model)}
        with httpx.stream(
            "POST", self.url + "/v1/chat/completions", json=body, headers=headers, timeout=60
        ) as r:
            assert r.status_code == 200, r.read()
            return [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


class World:
    """Model directories, the fake vLLM's log, and the fronts a test starts."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.log = tmp_path / "fake_vllm.jsonl"
        self.fronts: list[Front] = []
        self.base = self.model_dir("base")
        self.ft = self.model_dir("ft")
        self.adapters = [self.adapter_dir(f"adapter-{i}") for i in range(4)]

    def model_dir(self, name: str) -> Path:
        out = self.tmp / name
        out.mkdir()
        config = {"model_type": "qwen2", "max_position_embeddings": 1024}
        (out / "config.json").write_text(json.dumps(config))
        return out

    def adapter_dir(self, name: str) -> Path:
        out = self.tmp / name
        out.mkdir()
        config = {
            "peft_type": "LORA",
            "r": 8,
            "lora_alpha": 16,
            "target_modules": ["q_proj", "v_proj"],
            "base_model_name_or_path": str(self.base),
        }
        (out / "adapter_config.json").write_text(json.dumps(config))
        return out

    # ---- what callers ask for (the X-Posttrain-Model header)
    def base_ref(self) -> dict:
        return {"name": "acme/base", "path": str(self.base), "base": None}

    def ft_ref(self) -> dict:
        return {"name": "acme/full-ft", "path": str(self.ft), "base": None}

    def adapter_ref(self, i: int) -> dict:
        return {"name": f"acme/lora-{i}", "path": str(self.adapters[i]), "base": str(self.base)}

    # ---- the engine
    def front(self, load_wait: float = 30, **kw) -> Front:
        options = dict(idle_seconds=300, max_engines=1, max_loras=2)
        options.update(kw)
        engine = VllmEngine(
            command=f"{sys.executable} -m tests.workers.fake_vllm",
            log_dir=self.tmp / "logs",
            start_timeout=30,
            **options,
        )
        front = Front(engine, load_wait)
        self.fronts.append(front)
        return front

    def events(self, event: str = "request", route: str | None = None) -> list[dict]:
        if not self.log.exists():
            return []
        out = [json.loads(line) for line in self.log.read_text().splitlines()]
        return [
            e for e in out if e["event"] == event and (route is None or e.get("route") == route)
        ]

    def starts(self) -> list[dict]:
        return self.events("start")

    def loads(self) -> list[str]:
        """The adapter paths loaded, in order (successful loads only)."""
        return [
            e["body"]["lora_path"]
            for e in self.events(route="load_lora_adapter")
            if e["status"] == 200
        ]

    def name_of(self, path: Path) -> str:
        (name,) = {
            e["body"]["lora_name"]
            for e in self.events(route="load_lora_adapter")
            if e["body"]["lora_path"] == str(path)
        }
        return name


def gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_until(check, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


@pytest.fixture
def world(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_LOG", str(tmp_path / "fake_vllm.jsonl"))
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", f"{REPO}{os.pathsep}{path}" if path else str(REPO))
    w = World(tmp_path)
    yield w
    for front in w.fronts:
        front.stop()
        assert not any(p.alive() for p in front.engine.processes())
    pids = [e["pid"] for e in w.starts()]
    wait_until(lambda: all(gone(pid) for pid in pids), timeout=10)


def chat(content: str = "Say something.", **kw) -> dict:
    return {"model": "ignored", "messages": [{"role": "user", "content": content}], **kw}


def text(answer: dict, i: int = 0) -> str:
    return answer["choices"][i]["message"]["content"]


def test_a_base_model_is_served_by_vllm_with_lora_on_and_answers_in_the_callers_name(world):
    front = world.front(max_loras=2, max_engines=2)
    r = front.post(world.base_ref(), chat(n=3, logprobs=True, top_logprobs=2, max_tokens=5))
    assert r.status_code == 200, r.text
    answer = r.json()

    (start,) = world.starts()
    argv = start["argv"]
    assert argv[:2] == ["serve", str(world.base)]
    assert "--enable-lora" in argv
    assert argv[argv.index("--max-loras") + 1] == "2"
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.450"  # 0.9 over 2 engines
    served = argv[argv.index("--served-model-name") + 1]
    assert start["env"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"

    # the caller's name, never the engine's name for it or its directory
    assert answer["model"] == "acme/base"
    assert served not in r.text and str(world.base) not in r.text
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2]
    assert len({text(answer, i) for i in range(3)}) == 3  # sampled, not copies
    for c in answer["choices"]:
        tokens = c["logprobs"]["content"]
        assert 1 <= len(tokens) <= 5
        assert all(len(t["top_logprobs"]) == 2 for t in tokens)
        assert "".join(t["token"] for t in tokens) == c["message"]["content"]
    assert answer["usage"]["completion_tokens"] == sum(
        len(c["logprobs"]["content"]) for c in answer["choices"]
    )
    assert answer["usage"]["total_tokens"] == sum(
        answer["usage"][k] for k in ("prompt_tokens", "completion_tokens")
    )
    # vLLM got the parameters themselves, once, under its served name
    (sent,) = world.events(route="chat/completions")
    assert sent["model"] == served
    assert {k: sent["body"][k] for k in ("n", "logprobs", "top_logprobs", "max_tokens")} == {
        "n": 3,
        "logprobs": True,
        "top_logprobs": 2,
        "max_tokens": 5,
    }

    # streams end with [DONE]; a usage chunk only when the caller asks for one
    plain = front.stream(world.base_ref(), chat(stream=True, max_tokens=4))
    with_usage = front.stream(
        world.base_ref(),
        chat(stream=True, max_tokens=4, stream_options={"include_usage": True}),
    )
    for events in (plain, with_usage):
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all(c["model"] == "acme/base" for c in chunks)
        assert "".join(
            ch["delta"].get("content") or "" for c in chunks for ch in c["choices"]
        ).split()
    assert not any("usage" in json.loads(e) for e in plain[:-1])
    usage = json.loads(with_usage[-2])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] >= 1
    # vLLM is always asked for usage (the front counts it); the caller decides
    for sent in world.events(route="chat/completions")[1:]:
        assert sent["body"]["stream_options"] == {"include_usage": True}

    # completions: several prompts, logprobs as a count
    r = front.post(
        world.base_ref(),
        {"model": "x", "prompt": ["one two", "three"], "logprobs": 1, "max_tokens": 3},
        kind="completion",
    )
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "acme/base"
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert all(c["logprobs"]["tokens"] and c["logprobs"]["top_logprobs"] for c in choices)
    assert len(world.starts()) == 1 and len(front.engine.processes()) == 1


def test_an_adapter_is_loaded_once_into_its_bases_server(world):
    front = world.front()
    greedy = chat("What is two plus two?", temperature=0, max_tokens=8)
    base = front.post(world.base_ref(), greedy)
    first = front.post(world.adapter_ref(0), greedy)
    second = front.post(world.adapter_ref(0), greedy)
    for r in (base, first, second):
        assert r.status_code == 200, r.text

    assert world.loads() == [str(world.adapters[0])]
    assert len(world.starts()) == 1 and len(front.engine.processes()) == 1
    assert first.json()["model"] == second.json()["model"] == "acme/lora-0"
    assert text(first.json()) == text(second.json()) != text(base.json())
    name = world.name_of(world.adapters[0])
    assert name not in first.text and str(world.adapters[0]) not in first.text
    chats = world.events(route="chat/completions")
    assert [e["model"] for e in chats[1:]] == [name, name]
    # vLLM lists the adapter under its base
    (server,) = front.engine.servers.values()
    cards = httpx.get(server.proc.url + "/v1/models").json()["data"]
    assert {c["id"]: c["parent"] for c in cards} == {server.served: None, name: server.served}


def test_adapters_beyond_max_loras_unload_the_least_recently_used(world):
    front = world.front(max_loras=2)
    for i in (0, 1, 0, 2):  # adapter 0 is used again after 1: 1 is the least recent
        r = front.post(world.adapter_ref(i), chat(max_tokens=3))
        assert r.status_code == 200, r.text
    a0, a1, a2 = (str(p) for p in world.adapters[:3])
    assert world.loads() == [a0, a1, a2]
    unloads = world.events(route="unload_lora_adapter")
    assert [e["body"]["lora_name"] for e in unloads] == [world.name_of(world.adapters[1])]
    assert all(e["status"] == 200 for e in unloads)

    # the unloaded adapter is loaded again when asked for (making room again)
    r = front.post(world.adapter_ref(1), chat(max_tokens=3))
    assert r.status_code == 200, r.text
    assert world.loads() == [a0, a1, a2, a1]
    assert [e["body"]["lora_name"] for e in world.events(route="unload_lora_adapter")] == [
        world.name_of(world.adapters[1]),
        world.name_of(world.adapters[0]),
    ]
    assert len(world.starts()) == 1


def test_a_full_fine_tune_gets_its_own_server_and_the_lru_one_stops_to_make_room(world):
    front = world.front(max_engines=1)
    assert front.post(world.base_ref(), chat(max_tokens=3)).status_code == 200
    (first,) = world.starts()

    r = front.post(world.ft_ref(), chat(max_tokens=3))
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "acme/full-ft"
    _, second = world.starts()
    assert second["argv"][:2] == ["serve", str(world.ft)]
    argv = second["argv"]
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.900"
    assert gone(first["pid"])  # stopped before the new one started
    assert [e["pid"] for e in world.events("stop")] == [first["pid"]]
    assert [s.base for s in front.engine.servers.values()] == [str(world.ft)]
    assert all(p.alive() for p in front.engine.processes())


def test_a_killed_server_is_dropped_by_check_and_the_next_request_starts_another(world):
    front = world.front()
    assert front.post(world.adapter_ref(0), chat(max_tokens=3)).status_code == 200
    (first,) = world.starts()
    (server,) = front.engine.servers.values()
    os.kill(first["pid"], signal.SIGKILL)
    wait_until(lambda: not server.proc.alive())

    front.run(front.engine.check())
    assert front.engine.servers == {}
    assert front.engine.loaded() == []

    r = front.post(world.adapter_ref(0), chat(max_tokens=3))
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "acme/lora-0"
    _, second = world.starts()
    assert second["pid"] != first["pid"] and second["argv"][:2] == ["serve", str(world.base)]
    # the new server knows no adapter: it is loaded into it again
    loads = world.events(route="load_lora_adapter")
    assert [e["pid"] for e in loads] == [first["pid"], second["pid"]]
    assert all(e["status"] == 200 for e in loads)


def test_concurrent_first_requests_for_one_adapter_share_one_load(world):
    front = world.front()
    with ThreadPoolExecutor(5) as pool:
        answers = list(
            pool.map(lambda _: front.post(world.adapter_ref(0), chat(max_tokens=3)), range(5))
        )
    assert [r.status_code for r in answers] == [200] * 5, [r.text for r in answers]
    assert len(world.starts()) == 1
    assert len(world.events(route="load_lora_adapter")) == 1
    assert len(world.events(route="chat/completions")) == 5


def test_concurrent_first_requests_for_a_base_and_its_adapters_wait_for_its_one_server(world):
    """A server still starting is not ready for another model of its base either."""
    front = world.front(max_loras=2)
    refs = [world.base_ref(), world.adapter_ref(0), world.adapter_ref(1)]
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda ref: front.post(ref, chat(max_tokens=3)), refs))
    assert [r.status_code for r in answers] == [200] * 3, [r.text for r in answers]
    assert [r.json()["model"] for r in answers] == ["acme/base", "acme/lora-0", "acme/lora-1"]
    assert len(world.starts()) == 1
    assert sorted(world.loads()) == sorted(str(p) for p in world.adapters[:2])


def test_concurrent_loads_into_a_full_server_stay_within_max_loras(world):
    front = world.front(max_loras=2)
    for i in (0, 1):
        assert front.post(world.adapter_ref(i), chat(max_tokens=3)).status_code == 200
    with ThreadPoolExecutor(2) as pool:
        answers = list(
            pool.map(lambda i: front.post(world.adapter_ref(i), chat(max_tokens=3)), (2, 3))
        )
    assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
    assert all(e["status"] == 200 for e in world.events(route="load_lora_adapter"))
    (server,) = front.engine.servers.values()
    cards = httpx.get(server.proc.url + "/v1/models").json()["data"]
    assert len(cards) == 1 + 2


def test_a_server_in_steady_use_is_not_stopped_as_idle(world):
    front = world.front(idle_seconds=1.5)
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        r = front.post(world.adapter_ref(0), chat(max_tokens=2))
        assert r.status_code == 200, r.text
        front.run(front.engine.check())
        time.sleep(0.2)
    assert len(world.starts()) == 1 and world.events("stop") == []
    assert len(world.loads()) == 1

    # unused, it is stopped after idle_seconds
    time.sleep(1.6)
    front.run(front.engine.check())
    assert front.engine.servers == {}
    wait_until(lambda: gone(world.starts()[0]["pid"]))


def test_a_server_that_dies_while_loading_an_adapter_is_a_503_and_then_restarted(
    world, monkeypatch
):
    monkeypatch.setenv("FAKE_VLLM_LOAD_DELAY", "3")
    front = world.front()
    assert front.post(world.base_ref(), chat(max_tokens=2)).status_code == 200
    (first,) = world.starts()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(front.post, world.adapter_ref(0), chat(max_tokens=2))
        time.sleep(1.0)  # the load is under way
        os.kill(first["pid"], signal.SIGKILL)
        r = pending.result()
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "engine_unavailable"
    assert r.headers["retry-after"] == "5"

    monkeypatch.setenv("FAKE_VLLM_LOAD_DELAY", "0.1")
    r = front.post(world.adapter_ref(0), chat(max_tokens=2))
    assert r.status_code == 200, r.text
    _, second = world.starts()
    loads = world.events(route="load_lora_adapter")
    assert [(e["pid"], e["status"]) for e in loads] == [(second["pid"], 200)]


def test_vllm_refusals_reach_the_caller_as_openai_errors(world):
    front = world.front()
    long = chat("word " * 1020, max_tokens=10)  # past the model's 1024-token context
    r = front.post(world.base_ref(), long)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "maximum context length is 1024" in err["message"]
    assert err["type"] == "invalid_request_error"

    missing = {"name": "acme/gone", "path": str(world.tmp / "nothing"), "base": str(world.base)}
    r = front.post(missing, chat(max_tokens=3))
    assert r.status_code == 500 and r.json()["error"]["code"] == "model_load_failed"
    assert "acme/gone" in r.json()["error"]["message"]
    assert str(world.tmp) not in r.text
    (refusal,) = world.events(route="load_lora_adapter")
    assert refusal["status"] == 404


def test_a_first_request_waits_a_bounded_time_then_503_while_the_load_goes_on(world):
    """The server takes longer to start than a request may wait: that request is told to
    come back (503 model_loading, Retry-After), the load is not abandoned, and a later
    request is answered by the server the first one started."""
    front = world.front(load_wait=0.05)
    r = front.post(world.base_ref(), chat(max_tokens=3))
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "model_loading" and r.headers["retry-after"]
    wait_until(lambda: front.post(world.base_ref(), chat(max_tokens=3)).status_code == 200)
    assert len(world.starts()) == 1  # one server: the first request's load went on


def test_an_idle_server_is_stopped_and_started_again_on_demand(world):
    front = world.front(idle_seconds=0.5)
    assert front.post(world.base_ref(), chat(max_tokens=3)).status_code == 200
    (first,) = world.starts()
    time.sleep(0.8)
    front.run(front.engine.check())
    wait_until(lambda: gone(first["pid"]))
    assert front.engine.loaded() == []
    assert front.post(world.base_ref(), chat(max_tokens=3)).status_code == 200
    assert len(world.starts()) == 2
