"""The ``endpoint`` grader (``trainers.contract.graders.remote``) against a real loopback
server: the score is read back from the reply; timeouts and 5xx are retried, 4xx and
redirects are not; oversized, malformed and non-finite replies are endpoint errors; the
outbound policy is checked before each call; ``on_error`` 'zero' scores such samples 0
and notes them, 'error' stops grading without naming the URL or a header."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from trainers.contract.graders.remote import (
    EndpointError,
    configure,
    merge_grader_secrets,
    split_grader_secrets,
)
from trainers.contract.graders.scoring import SCORERS, grade_batch, grade_report, multi_scores
from trainers.contract.graders.spec import InvalidGrader, parse_grader
from trainers.contract.outbound import ToolPolicy

SECRET = "Bearer grader-s3cret"


class _Scorer(BaseHTTPRequestHandler):
    seen: ClassVar[list[dict]] = []
    tries: ClassVar[dict[str, int]] = {}

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.seen.append({"path": self.path, "body": body, "auth": self.headers["authorization"]})
        tries = self.tries[self.path] = self.tries.get(self.path, 0) + 1
        kind = self.path.strip("/").split("/")[0]
        if kind == "slow":
            time.sleep(1.0)
        status, reply = {
            "score": (200, json.dumps({"score": body["item"].get("score", 0.5)}).encode()),
            "slow": (200, b'{"score": 1}'),
            "flaky": (500 if tries <= 2 else 200, b'{"score": 0.25}'),
            "fail": (500, b"boom"),
            "missing": (404, b"no"),
            "big": (200, b'{"score": 1, "pad": "' + b"x" * 5000 + b'"}'),
            "text": (200, b"seven"),
            "nan": (200, b'{"score": NaN}'),
            "bool": (200, b'{"score": true}'),
            "redirect": (302, b""),
        }[kind]
        self.send_response(status)
        if kind == "redirect":
            self.send_header("location", "/score")
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        try:
            self.wfile.write(reply)
        except OSError:  # the grader stopped reading (an oversized reply, a timeout)
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Scorer)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def loopback():
    """This process's endpoint graders may call loopback (as with the setting)."""
    configure(ToolPolicy(allowed_networks="127.0.0.0/8", max_reply_bytes=1024))
    yield
    configure(ToolPolicy())


def grader(url: str, **fields) -> dict:
    return {
        "type": "endpoint",
        "name": "remote",
        "url": url,
        "headers": {"Authorization": SECRET},
        "timeout_seconds": 0.3,
        "retries": 2,
        **fields,
    }


def calls(path: str) -> int:
    return _Scorer.tries.get(path, 0)


def test_the_reply_score_is_the_reward_and_the_endpoint_sees_item_and_sample(server):
    _Scorer.seen.clear()
    items = [{"score": 0.75, "answer": "4"}, {"score": -2}]
    scores = grade_batch(grader(f"{server}/score"), items, ['{"x": 1}', "plain"])
    assert scores == [0.75, -2.0]
    bodies = sorted((s["body"] for s in _Scorer.seen), key=lambda b: b["item"]["score"])
    assert bodies[1]["item"] == items[0]
    assert bodies[1]["sample"]["output_text"] == '{"x": 1}'
    assert bodies[1]["sample"]["output_json"] == {"x": 1}
    assert bodies[0]["sample"]["output_json"] is None
    assert bodies[0]["sample"]["messages"] == [{"role": "assistant", "content": "plain"}]
    assert bodies[0]["sample"]["tool_calls"] == []
    assert {s["auth"] for s in _Scorer.seen} == {SECRET}


def test_a_500_is_retried_until_it_answers(server):
    assert grade_batch(grader(f"{server}/flaky/a"), [{}], ["s"]) == [0.25]
    assert calls("/flaky/a") == 3


@pytest.mark.parametrize(
    ("path", "tries", "says"),
    [
        ("/missing/a", 1, "answered 404"),
        ("/redirect/a", 1, "answered 302"),
        ("/fail/a", 3, "answered 500"),
        ("/slow/a", 3, "longer than 0.3 s"),
        ("/big/a", 1, "longer than 1024 bytes"),
        ("/text/a", 1, "not JSON"),
        ("/nan/a", 1, "must be finite"),
        ("/bool/a", 1, 'no number under "score"'),
    ],
)
def test_failures_are_endpoint_errors_retried_only_when_a_retry_may_help(server, path, tries, says):
    notes: list = []
    spec = parse_grader(grader(f"{server}{path}", on_error="zero"))
    assert SCORERS["endpoint"](spec, [{}], ["s"], notes) == [0.0]
    assert calls(path) == tries
    assert len(notes) == 1 and notes[0].soft and says in str(notes[0])
    assert SECRET not in str(notes[0]) and path not in str(notes[0])


def test_on_error_error_stops_grading_without_naming_url_or_secret(server):
    with pytest.raises(EndpointError) as caught:
        grade_batch(grader(f"{server}/missing/b", retries=0), [{}, {}], ["s", "t"])
    text = str(caught.value)
    assert "could not score 2 of 2 samples" in text and "answered 404" in text
    assert "/missing/b" not in text and SECRET not in text
    report = grade_report(grader(f"{server}/missing/b", retries=0), {}, "s")
    assert report.reward == 0.0 and "answered 404" in report.errors["other_error"]


def test_zero_inside_a_multi_grader_zeroes_that_sub_grader_only(server):
    multi = parse_grader(
        {
            "type": "multi",
            "name": "both",
            "graders": {
                "remote": grader(f"{server}/fail/c", on_error="zero", retries=0),
                "score": grader(f"{server}/score"),
            },
            "calculate_output": "remote + score",
        }
    )
    notes: list = []
    rewards, subs = multi_scores(multi, [{"score": 0.5}], ["s"], notes)
    assert rewards == [0.5] and subs == {"remote": [0.0], "score": [0.5]}
    assert len(notes) == 1


def test_the_address_policy_is_checked_before_each_call(server):
    configure(ToolPolicy())  # the default: public addresses only
    notes: list = []
    spec = parse_grader(grader(f"{server}/score/d", on_error="zero"))
    assert SCORERS["endpoint"](spec, [{}], ["s"], notes) == [0.0]
    assert calls("/score/d") == 0
    assert "POSTTRAIN_TOOL_ALLOWED_NETWORKS" in str(notes[0])


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"headers": {"Content-Type": "x"}}, "grader.headers"),
        ({"on_error": "skip"}, "grader.on_error"),
        ({"timeout_seconds": 0}, "grader.timeout_seconds"),
        ({"max_concurrency": 0}, "grader.max_concurrency"),
    ],
)
def test_malformed_endpoint_graders_are_refused_naming_the_field(fields, param):
    raw = grader("http://scores.example.com/", **fields)
    with pytest.raises(InvalidGrader) as caught:
        parse_grader(raw)
    assert caught.value.param == param


def test_header_values_are_split_out_and_merged_back_by_position():
    graders = [
        parse_grader(grader("http://a.example.com/")),
        parse_grader(
            {
                "type": "multi",
                "name": "m",
                "graders": {"r": grader("http://b.example.com/", headers={"X-Key": "k2"})},
                "calculate_output": "r",
            }
        ),
    ]
    stored, secrets = split_grader_secrets(graders)
    assert secrets == {"0": {"Authorization": SECRET}, "1.r": {"X-Key": "k2"}}
    assert stored[0].headers == {"Authorization": "[redacted]"}
    assert stored[1].graders["r"].headers == {"X-Key": "[redacted]"}
    assert SECRET not in json.dumps([g.model_dump() for g in stored])
    back = merge_grader_secrets(stored, secrets)
    assert back[0].headers == {"Authorization": SECRET}
    assert back[1].graders["r"].headers == {"X-Key": "k2"}
    assert merge_grader_secrets(stored, {})[0].headers is None  # never sends "[redacted]"


def test_a_grader_judge_refuses_an_endpoint_grader():
    from trainers.contract.judges.spec import parse_judge

    with pytest.raises(ValueError, match="endpoint grader grades only grpo and reinforcement"):
        parse_judge({"type": "grader", "grader": grader("http://scores.example.com/")})
