"""RL jobs' HTTP tools (``trainers.tools``) against a real loopback server.

Every failure is a result the model reads (``error: ...``) and a count, never an
exception: schema-invalid arguments are not sent, timeouts and 5xx are retried, 4xx is
not, replies over the cap or not UTF-8 are refused, the outbound policy is checked before
each try, and an episode's budget of calls holds. Secrets (headers) reach the endpoint
and appear in no result text.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from trainers.contract.outbound import ToolPolicy
from trainers.contract.tools import Tool
from trainers.tools import Episode, ToolLimits, build_tools

SECRET = "Bearer s3cret-value"


class _Handler(BaseHTTPRequestHandler):
    seen: ClassVar[list[dict]] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.seen.append({"path": self.path, "body": body, "auth": self.headers["authorization"]})
        if self.path == "/slow":
            time.sleep(1.0)
        status, reply = {
            "/ok": (200, f"value of {body.get('key')}".encode()),
            "/slow": (200, b"late"),
            "/fail": (500, b"boom"),
            "/missing": (404, b"no"),
            "/big": (200, b"x" * 5000),
            "/binary": (200, b"\xff\xfe\x00bad"),
        }[self.path]
        self.send_response(status)
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()
    srv.server_close()


LOOPBACK = ToolPolicy(allowed_networks="127.0.0.0/8")


def make(url: str, policy: ToolPolicy = LOOPBACK, **limits):
    tool = Tool.model_validate(
        {
            "function": {
                "name": "lookup",
                "description": "The value of a key.",
                "parameters": {
                    "type": "object",
                    "properties": {"key": {"type": "string"}},
                    "required": ["key"],
                    "additionalProperties": False,
                },
            },
            "endpoint": {"url": url, "headers": {"Authorization": SECRET}},
        }
    )
    limits = ToolLimits(**{"timeout": 5.0, "retries": 1, "max_reply_bytes": 1024, **limits})
    (http,), stats = build_tools([tool], policy, limits)
    return http, stats


def test_a_call_sends_the_arguments_and_headers_and_returns_the_reply(server):
    _Handler.seen.clear()
    tool, stats = make(f"{server}/ok")
    assert tool.__name__ == "lookup"
    assert tool == {  # what the chat template renders: the definition, no endpoint
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "The value of a key.",
            "parameters": tool["function"]["parameters"],
        },
    }
    assert tool(key="k7") == "value of k7"
    assert _Handler.seen == [{"path": "/ok", "body": {"key": "k7"}, "auth": SECRET}]
    assert (stats.calls, stats.errors) == (1, 0)


def test_schema_invalid_arguments_are_an_error_and_are_not_sent(server):
    _Handler.seen.clear()
    tool, stats = make(f"{server}/ok")
    assert tool(key=7).startswith("error: invalid arguments (key): 7 is not of type 'string'")
    assert tool().startswith("error: invalid arguments (arguments): 'key' is a required")
    assert tool(key="a", extra=1).startswith("error: invalid arguments")
    assert _Handler.seen == [] and (stats.calls, stats.errors) == (3, 3)


def test_a_500_is_retried_then_an_error(server):
    _Handler.seen.clear()
    tool, stats = make(f"{server}/fail", retries=2)
    assert tool(key="a") == "error: the tool answered 500"
    assert len(_Handler.seen) == 3 and stats.errors == 1


def test_a_4xx_is_not_retried(server):
    _Handler.seen.clear()
    tool, _ = make(f"{server}/missing", retries=2)
    assert tool(key="a") == "error: the tool answered 404"
    assert len(_Handler.seen) == 1


def test_a_timeout_is_an_error(server):
    tool, stats = make(f"{server}/slow", timeout=0.2, retries=0)
    assert tool(key="a") == "error: the tool took longer than 0.2 s"
    assert stats.errors == 1


def test_an_oversized_reply_is_an_error(server):
    tool, _ = make(f"{server}/big", max_reply_bytes=4096)
    assert tool(key="a") == "error: the tool's reply is longer than 4096 bytes"
    # the server's cap binds when it is the smaller one
    capped = ToolPolicy(allowed_networks="127.0.0.0/8", max_reply_bytes=100)
    tool, _ = make(f"{server}/big", capped, max_reply_bytes=100_000)
    assert tool(key="a") == "error: the tool's reply is longer than 100 bytes"


def test_a_reply_that_is_not_utf8_is_an_error(server):
    tool, _ = make(f"{server}/binary")
    assert tool(key="a") == "error: the tool's reply is not UTF-8 text"


def test_an_unreachable_tool_is_an_error(server):
    tool, _ = make("http://127.0.0.1:9/none", retries=0)
    assert tool(key="a") == "error: the tool could not be reached (ConnectError)"


def test_loopback_is_refused_unless_the_server_allows_it(server):
    _Handler.seen.clear()
    tool, stats = make(f"{server}/ok", ToolPolicy())
    result = tool(key="a")
    assert result.startswith("error: the tool's endpoint is not allowed: the host '127.0.0.1'")
    assert "POSTTRAIN_TOOL_ALLOWED_NETWORKS" in result
    prefixed = ToolPolicy(allowed_networks="127.0.0.0/8", url_prefixes=["https://tools.example/"])
    tool, _ = make(f"{server}/ok", prefixed)
    assert "POSTTRAIN_TOOL_URL_PREFIXES" in tool(key="a")
    assert _Handler.seen == [] and stats.errors == 1


def test_an_episode_makes_at_most_max_tool_calls(server):
    tool, stats = make(f"{server}/ok", max_calls=2)
    episode = Episode(tool.limits)
    call = tool.bound(episode)
    assert call.__name__ == "lookup"
    assert [call(key="a"), call(key="b")] == ["value of a", "value of b"]
    assert call(key="c").startswith("error: this episode made its 2 tool calls")
    assert tool(key="d") == "value of d"  # another episode has its own budget
    assert (stats.calls, stats.errors) == (4, 1)


def test_no_result_names_the_secret_or_the_url(server):
    results = []
    for path, extra in (("/fail", {}), ("/slow", {"timeout": 0.2}), ("/big", {})):
        tool, _ = make(f"{server}{path}?api_key=hidden", retries=0, **extra)
        results.append(tool(key="a"))
    results.append(make(f"{server}/ok?api_key=hidden", ToolPolicy())[0](key="a"))
    for text in results:
        assert text.startswith("error: ") and "s3cret" not in text and "hidden" not in text
