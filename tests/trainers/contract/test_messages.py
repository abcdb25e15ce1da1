"""What users read of a run names their inputs, never the server's paths (issue 19)."""

from __future__ import annotations

import pytest

from trainers.contract.messages import Error, Event, parse_report, redact_paths


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
