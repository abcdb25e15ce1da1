"""An eval run graded by the real Celery worker of the end-to-end stack.

The task grades in a child process of the worker (a prefork pool process may not start
the bounded grading children), every grade in its own capped child: this drives that
whole path through the API with the ``openai`` SDK.
"""

from __future__ import annotations

import pytest
from openai import OpenAI

from tests.e2e.test_sft_job import wait_for

pytestmark = pytest.mark.e2e

ITEM_SCHEMA = {
    "type": "object",
    "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
    "required": ["question", "answer"],
}


@pytest.fixture(scope="module")
def sdk(stack):
    return OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0)


def test_a_jsonl_run_is_graded_by_the_worker(sdk):
    ev = sdk.evals.create(
        name="answers",
        data_source_config={
            "type": "custom",
            "item_schema": ITEM_SCHEMA,
            "include_sample_schema": True,
        },
        testing_criteria=[
            {
                "type": "string_check",
                "name": "exact",
                "input": "{{ sample.output_text }}",
                "reference": "{{ item.answer }}",
                "operation": "eq",
            }
        ],
    )
    content = [
        {
            "item": {"question": f"q{i}", "answer": f"a{i}"},
            "sample": {"output_text": f"a{i}" if i % 3 else "wrong"},
        }
        for i in range(9)
    ]
    run = sdk.evals.runs.create(
        ev.id,
        name="first",
        data_source={"type": "jsonl", "source": {"type": "file_content", "content": content}},
    )
    assert run.status in ("queued", "in_progress", "completed")
    done = wait_for(
        lambda: (
            (r := sdk.evals.runs.retrieve(run.id, eval_id=ev.id)).status in ("completed", "failed")
            and r
        ),
        120,
        "the eval run to finish",
    )
    assert done.status == "completed", done.error
    counts = done.result_counts
    assert (counts.total, counts.passed, counts.failed, counts.errored) == (9, 6, 3, 0)
    items = list(sdk.evals.runs.output_items.list(run.id, eval_id=ev.id, status="fail"))
    assert sorted(i.datasource_item_id for i in items) == [0, 3, 6]
