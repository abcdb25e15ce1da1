"""JSONL row validation: formats are detected, and bad rows name the line and field."""

from __future__ import annotations

import json

import pytest

from trainers.contract.formats import DatasetError, read_as, summarize
from trainers.contract.rows import RowFormat


def lines(*rows) -> list[str]:
    return [r if isinstance(r, str) else json.dumps(r) for r in rows]


CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
PREF = {"prompt": "q", "chosen": "a", "rejected": "b"}


@pytest.mark.parametrize(
    "row,fmt",
    [
        (CHAT, RowFormat.chat),
        ({"prompt": "2+2=", "completion": "4"}, RowFormat.prompt_completion),
        ({"prompt": "q", "chosen": "a", "rejected": "b"}, RowFormat.preference),
        (
            {
                "input": {"messages": [{"role": "user", "content": "q"}]},
                "preferred_output": [{"role": "assistant", "content": "a"}],
                "non_preferred_output": [{"role": "assistant", "content": "b"}],
            },
            RowFormat.preference,
        ),
        ({"prompt": "q", "completion": "a", "label": True}, RowFormat.unpaired_preference),
        ({"prompt": "q", "answer": "4"}, RowFormat.prompt_only),
        ({"messages": [{"role": "user", "content": "q"}]}, RowFormat.prompt_only),
        ({"prompt": "q", "response": "a", "reward": 0.5}, RowFormat.scored),
    ],
)
def test_each_shape_is_recognised(row, fmt):
    summary = summarize(lines(row, row))
    assert summary.format == fmt and summary.rows == 2


def test_blank_lines_are_skipped_and_content_parts_accepted():
    parts = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": "yo"},
        ]
    }
    assert summarize(lines(CHAT, "", "  ", parts)).rows == 2


@pytest.mark.parametrize(
    "bad,line,param,fragment",
    [
        ('{"messages": [', 2, None, "invalid JSON"),
        ("[1, 2]", 2, None, "JSON object"),
        (
            {
                "messages": [
                    {"role": "robot", "content": "x"},
                    {"role": "assistant", "content": "y"},
                ]
            },
            2,
            "messages[0].role",
            "'system'",
        ),
        ({"messages": [{"role": "assistant"}]}, 2, "messages[0].content", "required"),
        ({"foo": 1}, 2, None, "matches no known format"),
        ({"prompt": "q", "completion": "a"}, 2, None, "format"),
        (
            {
                "input": {"messages": [{"role": "user", "content": "q"}]},
                "preferred_output": [{"role": "user", "content": "a"}],
                "non_preferred_output": [{"role": "assistant", "content": "b"}],
            },
            2,
            "preferred_output",
            "assistant turns only",
        ),
        ({"prompt": "q", "chosen": "a"}, 2, "rejected", "required"),
        ({"prompt": "q", "chosen": "a", "rejected": "  "}, 2, "rejected", "empty"),
    ],
)
def test_bad_rows_name_their_line_and_field(bad, line, param, fragment):
    with pytest.raises(DatasetError) as info:
        summarize(
            lines(CHAT, bad)
            if param != "rejected" and "output" not in str(param)
            else lines(PREF, bad)
        )
    err = info.value
    assert err.line == line and err.param == param
    assert fragment in str(err) and f"line {line}" in str(err)


def test_a_row_fits_every_format_whose_fields_it_has():
    # a prompt/completion row with a non-boolean label is still a prompt/completion row...
    summary = summarize(lines({"prompt": "q", "completion": "a", "label": "maybe"}))
    assert summary.formats == [RowFormat.prompt_completion]
    # ...and read as an unpaired preference, the label is the problem, on its line
    with pytest.raises(DatasetError) as info:
        read_as(
            lines(
                {"prompt": "q", "completion": "a", "label": True},
                {"prompt": "q", "completion": "a", "label": "maybe"},
            ),
            [RowFormat.unpaired_preference],
        )
    assert info.value.param == "label" and info.value.line == 2
    # a GRPO prompt carrying grader fields is not mistaken for a preference row
    grpo = {"prompt": "2+2=", "answer": "4", "label": "4"}
    assert summarize(lines(grpo)).formats == [RowFormat.prompt_only]
    both = {"prompt": "q", "completion": "a", "label": False}
    assert summarize(lines(both)).formats == [
        RowFormat.unpaired_preference,
        RowFormat.prompt_completion,
    ]


def test_implicit_prompt_rows_split_at_the_shared_turns():
    user = {"role": "user", "content": "q"}
    row = {
        "chosen": [user, {"role": "assistant", "content": "good"}],
        "rejected": [user, {"role": "assistant", "content": "bad"}],
    }
    fmt, (parsed,) = read_as(lines(row), [RowFormat.preference])
    assert fmt == RowFormat.preference and parsed.prompt_length() == 1
    no_prompt = {"chosen": row["chosen"][1:], "rejected": row["rejected"][1:]}
    with pytest.raises(DatasetError, match="share no prompt"):
        summarize(lines(no_prompt))


def test_empty_file_and_bad_utf8_are_rejected():
    with pytest.raises(DatasetError, match="no rows"):
        summarize([])
    with pytest.raises(DatasetError, match="UTF-8"):
        summarize([json.dumps(CHAT).encode(), b"\xff\xfe"])


def test_chat_row_needs_an_assistant_turn_for_sft_but_not_as_a_prompt():
    prompt_only = {"messages": [{"role": "user", "content": "q"}]}
    assert summarize(lines(prompt_only)).format == RowFormat.prompt_only
    with pytest.raises(DatasetError, match="line 2"):
        summarize(lines(CHAT, prompt_only))


def test_a_prompt_list_ending_with_the_answer_is_not_a_prompt():
    row = {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(DatasetError, match="must not end with an assistant turn"):
        summarize(lines(row))


def test_chat_style_scored_rows_are_oreo_trajectories():
    from trainers.algorithms.oreo.method import records as oreo_records

    row = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ],
        "reward": 1,
    }
    fmt, (parsed,) = read_as(lines(row), [RowFormat.scored])
    (rec,) = oreo_records([parsed])
    assert fmt == RowFormat.scored and rec["response"] == "4" and rec["reward"] == 1.0
    assert [m["role"] for m in rec["prompt"]] == ["system", "user"]
    with pytest.raises(DatasetError, match="reward"):
        read_as(lines({**row, "reward": "high"}), [RowFormat.scored])


@pytest.mark.parametrize("reward", ["1e39", "-1e39", "3.5e38"])
def test_a_reward_outside_float32_is_refused_naming_the_line(reward):
    ok = json.dumps({"prompt": "q", "response": "a", "reward": 0.5})
    bad = ok.replace("0.5", reward).replace('"a"', '"b"')
    with pytest.raises(DatasetError, match=r"line 2.*reward.*float32"):
        read_as([ok, bad], [RowFormat.scored])
    # the edge of the range is still a number (training may still diverge on it; the
    # non-finite stop catches that)
    edge = bad.replace(reward, "3e38")
    assert read_as([ok, edge], [RowFormat.scored])[0] == RowFormat.scored
