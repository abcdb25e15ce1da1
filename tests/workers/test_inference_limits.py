"""The inference front's context limits on a real checkpoint (the tiny model's tokenizer
and context): the bound a request asks for is kept under either of OpenAI's names, and a
request without one gets what is left of the context, at most the server's bound."""

from __future__ import annotations

import asyncio

import pytest

from workers.inference.engines import Target
from workers.inference.front import Limits


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from trainers.tiny_model import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("limits") / "model"))


def apply(model: str, **body) -> dict:
    body = {"messages": [{"role": "user", "content": "hi"}], **body}
    return asyncio.run(Limits(64).apply(body, "chat", Target("http://unused", model, None)))


@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens"])
def test_the_callers_bound_is_kept_under_either_name(model, name):
    assert apply(model, **{name: 3})["max_tokens"] == 3


def test_without_a_bound_the_server_bound_applies(model):
    assert apply(model)["max_tokens"] == 64
