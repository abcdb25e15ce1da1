"""Report messages: what users read of a run names their inputs, never the server's paths
(issue 19), and samples of RL rollouts stay within their bounds."""

from __future__ import annotations

import json
import re

import pytest

from trainers.contract.messages import (
    MAX_COMPLETION_CHARS,
    MAX_PROMPT_CHARS,
    MAX_SAMPLE_ROWS,
    Error,
    Event,
    InvalidReport,
    Samples,
    cut_middle,
    parse_report,
    redact_paths,
)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (
            "FileNotFoundError: [Errno 2] No such file or directory: "
            "'/srv/posttrain/jobs/ftjob-1/output/checkpoint-4/model.safetensors'",
            "FileNotFoundError: [Errno 2] No such file or directory: '…/model.safetensors'",
        ),
        ("model /srv/models/Qwen/Qwen2.5-0.5B/ does not load",
         "model …/Qwen2.5-0.5B does not load"),
        ("see http://host:8000/v1/files", "see http://host:8000/v1/files"),  # a URL stays
        ("loss 1/2 of rows, lr 5e-6/step", "loss 1/2 of rows, lr 5e-6/step"),  # no path
        ("training_file row 2: the prompt is 300 tokens",
         "training_file row 2: the prompt is 300 tokens"),
    ],
)  # fmt: skip
def test_absolute_paths_are_cut_to_their_last_part(text, shown):
    assert redact_paths(text) == shown


def test_error_and_event_messages_are_redacted_on_both_ends():
    err = Error(code="training_error", message="OSError: cannot open /data/jobs/j/plan.json")
    assert err.message == "OSError: cannot open …/plan.json"
    line = '{"type": "event", "message": "Loaded /models/secret-root/base"}'
    assert parse_report(line).message == "Loaded …/base"  # the worker's side, too
    assert Event(message="no path here").message == "no path here"


# ---- samples of RL rollouts: bounded on both ends


def _row(**extra):
    return {"prompt": "p", "completion": "c", "reward": 1.0, "rewards": {"g": 1.0}, **extra}


def test_long_sample_texts_keep_their_start_and_end_around_a_marker():
    prompt, completion = "P" * 500 + "x" * 5000 + "Q" * 500, "a" * 10_000 + "THE END"
    (row,) = Samples(step=3, rows=[_row(prompt=prompt, completion=completion)]).rows
    assert len(row.prompt) <= MAX_PROMPT_CHARS and len(row.completion) <= MAX_COMPLETION_CHARS
    assert row.prompt.startswith("P" * 500) and row.prompt.endswith("Q" * 500)
    assert row.completion.endswith("THE END")
    cut = len(completion) - (MAX_COMPLETION_CHARS - 40)
    assert f" …[{cut} characters cut]… " in row.completion
    # the worker's side reads the same message back unchanged (a cut text is within bounds)
    line = Samples(step=3, rows=[row]).model_dump_json()
    assert parse_report(line).rows[0] == row
    assert cut_middle("short", 10) == "short"


def test_sample_scores_are_numbers_or_null():
    msg = Samples(
        step=1,
        rows=[_row(reward=float("nan"), rewards={"g": float("inf"), "h": 0.5}, advantage=None)],
    )
    assert (msg.rows[0].reward, msg.rows[0].rewards) == (None, {"g": None, "h": 0.5})
    assert '"reward":null' in msg.model_dump_json()


@pytest.mark.parametrize(
    ("rows", "fragment"),
    [
        ([], "rows"),
        ([_row()] * (MAX_SAMPLE_ROWS + 1), "rows"),
        ([_row(rewards={f"g{i}": 1.0 for i in range(17)})], "rows.0.rewards"),
        ([_row(group=-1)], "rows.0.group"),
        ([_row(completion_tokens=-1)], "rows.0.completion_tokens"),
        ([_row(secret="x")], "rows.0.secret"),
    ],
)
def test_a_samples_report_out_of_bounds_is_invalid(rows, fragment):
    line = json.dumps({"type": "samples", "step": 1, "rows": rows})
    with pytest.raises(InvalidReport, match=re.escape(fragment)):
        parse_report(line)
