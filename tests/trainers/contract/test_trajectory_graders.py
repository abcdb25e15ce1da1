"""Trajectory graders: ``sample.messages``, ``sample.tool_calls``, ``sample.tool_call_count``.

A GRPO job with tools hands each grader the episode TRL built (assistant turns with
``tool_calls``, ``tool`` turns with the results); the templates read it, and a sample
without tools is one assistant message with no calls.
"""

from __future__ import annotations

import json

import pytest

from trainers.contract.graders.spec import InvalidGrader, parse_grader
from trainers.contract.graders.templates import EpisodeText, TemplateError, parse_template, render
from trainers.contract.messages import MAX_SAMPLE_TOOL_CALLS, SampleRow
from trainers.graders.reward import build_reward_function, episode_sample


def call(key: str, name: str = "lookup") -> dict:
    return {"type": "function", "function": {"name": name, "arguments": {"key": key}}}


# As TRL's tool loop leaves a completion: a turn with two calls, their results, a
# turn with a call the episode ended before running, and no final answer.
EPISODE = [
    {"role": "assistant", "content": "let me look", "tool_calls": [call("1"), call("2")]},
    {"role": "tool", "name": "lookup", "content": "7"},
    {"role": "tool", "name": "lookup", "content": "error: the tool answered 404"},
    {"role": "assistant", "content": "so 7", "tool_calls": [call("3")]},
]
ANSWERED = [
    {"role": "assistant", "content": "", "tool_calls": [call("1")]},
    {"role": "tool", "name": "lookup", "content": "7"},
    {"role": "assistant", "content": "it is 7"},
]


def test_the_episode_views_render_as_json():
    sample = episode_sample(EPISODE)
    assert sample == "let me lookso 7"  # output_text: the assistant turns' text
    calls = json.loads(render("{{sample.tool_calls}}", {}, sample))
    assert calls == [
        {"name": "lookup", "arguments": {"key": "1"}, "result": "7"},
        {"name": "lookup", "arguments": {"key": "2"}, "result": "error: the tool answered 404"},
        {"name": "lookup", "arguments": {"key": "3"}, "result": None},
    ]
    assert render("{{sample.tool_call_count}}", {}, sample) == "3"
    assert render("{{ sample.tool_calls[1].arguments.key }}", {}, sample) == "2"
    messages = json.loads(render("{{sample.messages}}", {}, sample))
    assert [m["role"] for m in messages] == ["assistant", "tool", "tool", "assistant"]
    assert messages[0]["tool_calls"][1] == {"name": "lookup", "arguments": {"key": "2"}}
    assert messages[1] == {"role": "tool", "content": "7", "name": "lookup"}
    assert render("{{sample.messages.3.content}}", {}, sample) == "so 7"


def test_a_sample_without_tools_is_one_assistant_message_and_no_calls():
    assert render("{{sample.tool_call_count}}", {}, "hi") == "0"
    assert render("{{sample.tool_calls}}", {}, "hi") == "[]"
    assert json.loads(render("{{sample.messages}}", {}, "hi")) == [
        {"role": "assistant", "content": "hi"}
    ]
    text = EpisodeText("hi", [{"role": "assistant", "content": "hi"}])
    assert render("{{sample.output_text}}", {}, text) == "hi"


@pytest.mark.parametrize(
    "template", ["{{sample.tool_call_count.0}}", "{{sample.output_text.x}}", "{{sample.calls}}"]
)
def test_bad_episode_variables_are_rejected(template):
    with pytest.raises(TemplateError):
        parse_template(template)


def copied(reference: str = "{{sample.tool_calls.0.result}}") -> dict:
    return {
        "type": "string_check",
        "name": "copied",
        "input": "{{sample.output_text}}",
        "reference": reference,
        "operation": "like",
    }


def test_a_grader_rewards_copying_the_tools_answer_and_can_count_calls():
    reward = build_reward_function(copied())
    remembered = [{"role": "assistant", "content": "it is 7"}]
    # the same answer, with and without the tool: only the episode that looked it up scores
    assert reward(completions=[ANSWERED, remembered, "it is 7"]) == [1.0, 0.0, 0.0]
    # a call the episode ended before running has no result: 0, not the text "null"
    assert reward(completions=[EPISODE]) == [1.0]  # its first call's "7" is in the answer
    last = build_reward_function(copied("{{sample.tool_calls.2.result}}"))
    assert last(completions=[EPISODE, ANSWERED]) == [0.0, 0.0]  # unanswered; no third call
    one_call = build_reward_function(
        {
            "type": "string_check",
            "name": "one_call",
            "input": "{{sample.tool_call_count}}",
            "reference": "1",
            "operation": "eq",
        }
    )
    assert one_call(completions=[ANSWERED, EPISODE, remembered]) == [1.0, 0.0, 0.0]


def test_a_multi_grader_can_penalise_calls():
    grader = {
        "type": "multi",
        "name": "answer_few_calls",
        "graders": {
            "copied": copied(),
            "many": {
                "type": "string_check",
                "name": "many",
                "input": "{{sample.tool_call_count}}",
                "reference": "1",
                "operation": "ne",
            },
        },
        "calculate_output": "copied - 0.5 * many",
    }
    parse_grader(grader)  # a valid job grader
    two_calls = [
        {"role": "assistant", "content": "", "tool_calls": [call("1"), call("1")]},
        {"role": "tool", "name": "lookup", "content": "7"},
        {"role": "tool", "name": "lookup", "content": "7"},
        {"role": "assistant", "content": "7"},
    ]
    assert build_reward_function(grader)(completions=[ANSWERED, two_calls]) == [1.0, 0.5]


def test_sample_rows_carry_the_episodes_calls_bounded():
    calls = [{"name": "lookup", "arguments": {"key": "x" * 5000}, "result": "y" * 5000}] * 20
    row = SampleRow(prompt="p", completion="c", tool_calls=calls)
    assert len(row.tool_calls) == MAX_SAMPLE_TOOL_CALLS
    dumped = row.model_dump(mode="json")["tool_calls"][0]
    assert len(dumped["result"]) <= 1000 and len(dumped["arguments"]) <= 1000
    assert SampleRow(prompt="p", completion="c").tool_calls is None
    with pytest.raises(InvalidGrader):
        parse_grader(copied("{{sample.tool_results}}"))
