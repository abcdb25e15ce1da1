"""Conformance: posttrain's Evals API against OpenAI's published OpenAPI document.

    python -m bench.evals_conformance --spec openapi.json      # or openapi.yaml; ~30 s
    python -m bench.evals_conformance --spec openapi.yaml --md FILE --strict-oneof

The document is OpenAI's (github.com/openai/openai-openapi, MIT); download it yourself,
this repository does not carry a copy. The script starts the real stack on a throwaway
``redis-server`` (never the machine's Redis): the API (``service.stack.start_api``) and
a Celery worker, which grades ``jsonl`` runs; a ``completions`` run is created against a
model directory that no inference worker serves, and canceled.

1. Responses. Every Evals operation of the document (``createEval``, ``listEvals``,
   ``getEval``, ``updateEval``, ``deleteEval``, ``createEvalRun``, ``getEvalRuns``,
   ``getEvalRun``, ``cancelEvalRun``, ``deleteEvalRun``, ``getEvalRunOutputItems``,
   ``getEvalRunOutputItem``) is called with ``httpx`` at the document's method and path,
   and the body is validated (``jsonschema``, JSON Schema 2020-12, which OpenAPI 3.1
   uses) against the schema the document gives for that operation and the status
   posttrain answered, its ``$ref``s resolved into ``components``. A status the document
   does not list is a failure; a 2xx body is then validated against the document's 2xx
   schema. Some operations are called twice (a page with items and an empty one; the
   error answers the document describes). One row per call: pass or FAIL and the first
   schema error (``jsonschema``'s best match).
2. Query parameters: every enum value the document lists for a query parameter of
   these operations is sent once; posttrain must answer 200.
3. Requests: request bodies in the shapes of the document (and so of the ``openai``
   SDK, generated from it) are first validated against the operation's request schema,
   then sent with the SDK (``client.evals.create``, ``client.evals.update``,
   ``client.evals.runs.create``): each must be accepted, or refused with a 400 where
   posttrain documents the departure (data stored on OpenAI's platform, graders it does
   not run). Accepted ``completions`` runs are canceled with the SDK's ``runs.cancel``.

``oneOf`` is read as the SDK's generators read it, a union (any branch may match): the
document's ``oneOf``s overlap (a ``{"role": "user", "content": "hi"}`` message is both
an ``EasyInputMessage`` and an ``EvalItem``), so strict ``oneOf`` refuses the
document's own shapes. ``--strict-oneof`` validates the responses strictly (request
bodies stay unions). Formats (``uri``, ``unixtime``) are not checked. Exit status 1
when a check fails, 2 when the run could not be made.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

OPERATIONS = (
    "createEval",
    "listEvals",
    "getEval",
    "updateEval",
    "deleteEval",
    "createEvalRun",
    "getEvalRuns",
    "getEvalRun",
    "cancelEvalRun",
    "deleteEvalRun",
    "getEvalRunOutputItems",
    "getEvalRunOutputItem",
)
ITEM_SCHEMA = {
    "type": "object",
    "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
    "required": ["question", "answer"],
}
CHECK = {
    "type": "string_check",
    "name": "exact",
    "input": "{{ sample.output_text }}",
    "reference": "{{ item.answer }}",
    "operation": "eq",
}
CLOSE = {
    "type": "text_similarity",
    "name": "close",
    "input": "{{ sample.output_text }}",
    "reference": "{{ item.answer }}",
    "evaluation_metric": "fuzzy_match",
    "pass_threshold": 0.8,
}
SOURCE = {"type": "custom", "item_schema": ITEM_SCHEMA, "include_sample_schema": True}
ROWS = [
    {
        "item": {"question": f"What is {i} plus {i}?", "answer": str(2 * i)},
        "sample": {"output_text": str(2 * i) if i % 3 else "no idea", "model": "m"},
    }
    for i in range(6)
]
TEMPLATE = [
    {"role": "system", "content": "Answer with the number only."},
    {"role": "user", "content": "{{ item.question }}"},
]
SAMPLING = {"temperature": 0.0, "top_p": 1.0, "seed": 42, "max_completion_tokens": 16}


class Failed(RuntimeError):
    pass


# --------------------------------------------------------------------------- the document
def load_spec(path: Path) -> dict:
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text)
    return json.loads(text)


class Spec:
    """The document's Evals operations and validators of their schemas."""

    def __init__(self, doc: dict, strict_oneof: bool):
        from jsonschema import Draft202012Validator, validators

        self.doc = doc
        self.ops: dict[str, tuple[str, str, dict]] = {}
        for path, item in doc.get("paths", {}).items():
            for method, op in item.items():
                if isinstance(op, dict) and op.get("operationId") in OPERATIONS:
                    self.ops[op["operationId"]] = (method.upper(), path, op)
        missing = [o for o in OPERATIONS if o not in self.ops]
        if missing:
            raise Failed(f"the document has no operation {', '.join(missing)}")
        base = Draft202012Validator
        # oneOf as a union, as the SDK generators read it
        self.union = validators.extend(base, {"oneOf": base.VALIDATORS["anyOf"]})
        self.response_cls = base if strict_oneof else self.union

    def validator(self, schema: dict, request: bool = False):
        """A validator of ``schema`` whose ``#/components/...`` refs resolve into the
        document's components (a request's: ``oneOf`` a union always)."""
        cls = self.union if request else self.response_cls
        return cls({**schema, "components": self.doc.get("components", {})})

    def component(self, name: str):
        return self.validator({"$ref": f"#/components/schemas/{name}"})

    def response_schema(self, op_id: str, status: int) -> dict | None:
        resp = self.ops[op_id][2].get("responses", {}).get(str(status)) or {}
        return ((resp.get("content") or {}).get("application/json") or {}).get("schema")

    def statuses(self, op_id: str) -> list[str]:
        return list(self.ops[op_id][2].get("responses", {}))

    def request_schema(self, op_id: str) -> dict | None:
        body = self.ops[op_id][2].get("requestBody") or {}
        return ((body.get("content") or {}).get("application/json") or {}).get("schema")

    def query_enums(self, op_id: str) -> dict[str, list]:
        out = {}
        for p in self.ops[op_id][2].get("parameters", []):
            if "$ref" in p:
                p = self.resolve(p["$ref"])
            schema = p.get("schema") or {}
            if p.get("in") == "query" and isinstance(schema.get("enum"), list):
                out[p["name"]] = schema["enum"]
        return out

    def resolve(self, ref: str) -> dict:
        node: Any = self.doc
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        return node


def first_error(validator, body: Any) -> str | None:
    from jsonschema.exceptions import best_match

    err = best_match(validator.iter_errors(body))
    if err is None:
        return None
    where = err.json_path
    return f"{where}: {err.message[:300]}"


# --------------------------------------------------------------------------- the stack
class Stack:
    def __init__(self, work: Path):
        self.work = work
        self.procs: list = []
        self.redis_proc = None

    def start(self) -> None:
        from service import stack

        port = stack.free_port()
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        self.key = "sk-conformance-" + secrets.token_hex(8)
        model = self.work / "models" / "tiny"
        model.mkdir(parents=True, exist_ok=True)
        (model / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
        tag = f"evals-conformance-{os.getpid()}"
        self.env = {
            **os.environ,
            "POSTTRAIN_REDIS_URL": self.redis_url,
            "POSTTRAIN_DATA_DIR": str(self.work / "data"),
            "POSTTRAIN_MODEL_ROOTS": str(self.work / "models"),
            "POSTTRAIN_API_KEYS": self.key,
            "POSTTRAIN_QUEUE": f"posttrain.{tag}",
            "POSTTRAIN_INFERENCE_QUEUE": f"posttrain.{tag}-inference",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        self.redis_proc = stack.start_redis(self.redis_url, self.work / "redis.log")
        if self.redis_proc is None:
            raise Failed(f"something already answers at {self.redis_url}; refusing to use it")
        api_port = stack.free_port()
        self.procs.append(stack.start_api(self.env, api_port, self.work / "api.log"))
        self.procs.append(stack.start_worker(self.env, self.work / "worker.log", name=tag))
        self.url = f"http://127.0.0.1:{api_port}/v1"

    def stop(self) -> None:
        from service import stack

        for proc in reversed(self.procs):
            stack.stop(proc)
        if self.redis_proc is not None and self.redis_proc.poll() is None:
            self.redis_proc.terminate()
            self.redis_proc.wait(timeout=10)


# --------------------------------------------------------------------------- the checks
class Checker:
    def __init__(self, spec: Spec, stack: Stack):
        self.spec, self.stack = spec, stack
        self.http = httpx.Client(
            base_url=stack.url, headers={"Authorization": f"Bearer {stack.key}"}, timeout=60
        )
        from openai import OpenAI

        self.sdk = OpenAI(base_url=stack.url, api_key=stack.key, max_retries=0, timeout=60)
        self.responses: list[dict] = []
        self.queries: list[dict] = []
        self.requests: list[dict] = []

    # ---- one call of an operation, at the document's path
    def call(
        self,
        op_id: str,
        note: str = "",
        body: Any = None,
        query: dict | None = None,
        record: bool = True,
        **params: str,
    ) -> httpx.Response:
        method, path, _ = self.spec.ops[op_id]
        url = re.sub(r"\{(\w+)\}", lambda m: params[m.group(1)], path)
        if body is not None:
            self.check_request(op_id, body, note or "as sent")
        resp = self.http.request(method, url, json=body, params=query)
        if record:
            self.responses.append(self.judge(op_id, note, resp))
        return resp

    def judge(self, op_id: str, note: str, resp: httpx.Response) -> dict:
        """The answer against the document: its status, and its body against the schema
        for that status (a 2xx the document does not list: against its listed 2xx)."""
        status = resp.status_code
        listed = self.spec.statuses(op_id)
        row = {"operation": op_id, "call": note, "status": status, "spec_statuses": listed}
        row["status_error"] = row["schema_error"] = ""
        try:
            body = resp.json()
        except ValueError:
            row["schema_error"] = f"the body is not JSON: {resp.text[:200]!r}"
            return {**row, "ok": False, "error": row["schema_error"]}
        row["body"] = body
        schema = self.spec.response_schema(op_id, status)
        used = str(status)
        if used not in listed:
            row["status_error"] = f"status {status} is not one the document lists"
            ok2xx = [s for s in listed if s.startswith("2")]
            if status < 300 and ok2xx:
                used = ok2xx[0]
                schema = self.spec.response_schema(op_id, int(used))
        if schema is None:
            row["schema_error"] = f"the document gives no JSON schema for status {used}"
        else:
            error = first_error(self.spec.validator(schema), body)
            if error is not None:
                if (
                    status >= 400
                    and first_error(self.spec.component("ErrorResponse"), body) is None
                ):
                    error += " (the body is an ErrorResponse, {'error': Error})"
                row["schema_error"] = error
        row["schema_status"] = used
        row["ok"] = not (row["status_error"] or row["schema_error"])
        row["error"] = "; ".join(e for e in (row["status_error"], row["schema_error"]) if e)
        return row

    def check_request(self, op_id: str, body: Any, what: str) -> None:
        """A body this script sends must be one the document describes."""
        schema = self.spec.request_schema(op_id)
        if schema is None:
            raise Failed(f"{op_id} has no request schema in the document")
        error = first_error(self.spec.validator(schema, request=True), body)
        if error is not None:
            raise Failed(f"{op_id} ({what}): the script's own body is not the document's: {error}")

    def wait_run(self, eval_id: str, run_id: str, statuses=("completed", "failed", "canceled")):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            got = self.call("getEvalRun", record=False, eval_id=eval_id, run_id=run_id).json()
            if got.get("status") in statuses:
                return got
            time.sleep(0.2)
        raise Failed(f"run {run_id} did not finish in 120 s")

    # ---- 1. responses
    def operations(self) -> None:
        criteria = [CHECK, CLOSE]
        body = {"name": "conformance", "data_source_config": SOURCE, "testing_criteria": criteria}
        body["metadata"] = {"suite": "conformance"}
        ev = self.call("createEval", "custom, string_check + text_similarity", body=body).json()
        eid = ev["id"]
        self.call("getEval", eval_id=eid)
        self.call(
            "updateEval",
            "rename + metadata",
            body={"name": "renamed", "metadata": {"k": "v"}},
            eval_id=eid,
        )
        page = self.call("listEvals", "a page").json()
        last = page["data"][-1]["id"]
        self.call("listEvals", "an empty page (after the last)", query={"after": last})
        run_body = {
            "name": "jsonl",
            "metadata": {"k": "v"},
            "data_source": {"type": "jsonl", "source": {"type": "file_content", "content": ROWS}},
        }
        run = self.call("createEvalRun", "jsonl, file_content", body=run_body, eval_id=eid).json()
        rid = run["id"]
        self.call("getEvalRun", "just created", eval_id=eid, run_id=rid)
        self.wait_run(eid, rid)
        self.call("getEvalRun", "completed", eval_id=eid, run_id=rid)
        self.call("getEvalRuns", "a page", eval_id=eid)
        self.call(
            "getEvalRuns", "an empty page (status=failed)", query={"status": "failed"}, eval_id=eid
        )
        items = self.call("getEvalRunOutputItems", "a page", eval_id=eid, run_id=rid).json()
        self.call(
            "getEvalRunOutputItems",
            "an empty page (after the last)",
            query={"after": items["data"][-1]["id"]},
            eval_id=eid,
            run_id=rid,
        )
        self.call(
            "getEvalRunOutputItem",
            "a failed row",
            eval_id=eid,
            run_id=rid,
            output_item_id=next(i["id"] for i in items["data"] if i["status"] == "fail"),
        )
        comp_body = {
            "name": "completions",
            "data_source": {
                "type": "completions",
                "model": "tiny",
                "input_messages": {"type": "template", "template": TEMPLATE},
                "sampling_params": SAMPLING,
                "source": {"type": "file_content", "content": [{"item": r["item"]} for r in ROWS]},
            },
        }
        comp = self.call("createEvalRun", "completions, template", body=comp_body, eval_id=eid)
        cid = comp.json()["id"]
        self.call("cancelEvalRun", eval_id=eid, run_id=cid)
        self.call("getEvalRun", "canceled", eval_id=eid, run_id=cid)
        self.call("deleteEvalRun", eval_id=eid, run_id=cid)
        self.call("deleteEvalRun", "an unknown run (404)", eval_id=eid, run_id=cid)
        bad = {"data_source": {"type": "jsonl", "source": {"type": "file_content", "content": []}}}
        self.call("createEvalRun", "no rows (400)", body=bad, eval_id=eid)
        self.call("deleteEval", eval_id=eid)
        self.call("deleteEval", "an unknown eval (404)", eval_id=eid)

    # ---- 2. query parameters
    def query_parameters(self) -> None:
        ev = self.sdk.evals.create(data_source_config=SOURCE, testing_criteria=[CHECK])
        run = self.sdk.evals.runs.create(
            ev.id,
            data_source={"type": "jsonl", "source": {"type": "file_content", "content": ROWS}},
        )
        self.wait_run(ev.id, run.id)
        ids = {"eval_id": ev.id, "run_id": run.id}
        for op_id in ("listEvals", "getEvalRuns", "getEvalRunOutputItems"):
            for name, values in self.spec.query_enums(op_id).items():
                for value in values:
                    resp = self.call(op_id, query={name: value}, record=False, **ids)
                    row = {
                        "operation": op_id,
                        "param": f"{name}={value}",
                        "status": resp.status_code,
                    }
                    row["ok"] = resp.status_code == 200
                    row["error"] = "" if row["ok"] else resp.text[:300]
                    self.queries.append(row)
        self.sdk.evals.delete(ev.id)

    # ---- 3. request shapes, sent with the SDK
    def request(self, op_id: str, label: str, body: dict, expect: str, send) -> dict | None:
        """``expect``: ``accept``, or the reason posttrain documents for refusing. ``send``
        calls the SDK's ``with_raw_response`` method; an accepted body's answer is judged
        against the document's response schema as well. The answer's JSON, or None."""
        import openai

        self.check_request(op_id, body, label)
        row = {"operation": op_id, "shape": label, "expect": expect, "response": ""}
        got = None
        try:
            raw = send(body)
        except openai.APIStatusError as exc:
            err = exc.body if isinstance(exc.body, dict) else {}
            row["status"] = exc.status_code
            row["detail"] = f"{err.get('code')}: {str(err.get('message'))[:200]}"
            row["ok"] = expect != "accept" and exc.status_code == 400
        else:
            resp = raw.http_response
            judged = self.judge(op_id, label, resp)
            row["status"] = resp.status_code
            row["detail"] = ""
            row["response"] = judged["schema_error"] or "valid"
            row["ok"] = expect == "accept" and not judged["schema_error"]
            got = resp.json()
        self.requests.append(row)
        return got

    def request_shapes(self) -> None:
        sdk = self.sdk

        def create(body):
            return sdk.evals.with_raw_response.create(**body)

        def criteria(*graders, source=SOURCE):
            return {"data_source_config": source, "testing_criteria": list(graders)}

        ts = {"type": "text_similarity", "input": "{{ sample.output_text }}"}
        ts |= {"reference": "{{ item.answer }}", "pass_threshold": 0.5}
        metrics = ["fuzzy_match", "bleu", "gleu", "rouge_1", "rouge_2", "rouge_3"]
        metrics += ["rouge_4", "rouge_5", "rouge_l"]
        message = [{"role": "user", "content": "{{ item.question }}"}]
        evals = [
            ("custom data source, include_sample_schema, string_check", criteria(CHECK), "accept"),
            (
                "custom without include_sample_schema; no name, metadata null",
                {
                    **criteria(
                        {**CHECK, "input": "{{ item.answer }}"},
                        source={"type": "custom", "item_schema": ITEM_SCHEMA},
                    ),
                    "metadata": None,
                },
                "accept",
            ),
            (
                "string_check: eq, ne, like, ilike",
                criteria(
                    *(
                        {**CHECK, "name": op, "operation": op}
                        for op in ("eq", "ne", "like", "ilike")
                    )
                ),
                "accept",
            ),
            (
                "text_similarity: " + ", ".join(metrics),
                criteria(*({**ts, "name": m, "evaluation_metric": m} for m in metrics)),
                "accept",
            ),
            (
                "text_similarity meteor",
                criteria({**ts, "name": "m", "evaluation_metric": "meteor"}),
                "documented: meteor needs WordNet",
            ),
            (
                "text_similarity cosine",
                criteria({**ts, "name": "c", "evaluation_metric": "cosine"}),
                "documented: cosine needs a local embedding_model",
            ),
            (
                "score_model (a hosted model, EvalItem input, range, pass_threshold)",
                criteria(
                    {
                        "type": "score_model",
                        "name": "s",
                        "model": "gpt-4o-mini",
                        "input": [
                            {
                                "type": "message",
                                "role": "user",
                                "content": {
                                    "type": "input_text",
                                    "text": "{{ sample.output_text }}",
                                },
                            }
                        ],
                        "range": [0, 1],
                        "pass_threshold": 0.5,
                    }
                ),
                "documented: score_model is a local reward model",
            ),
            (
                "label_model",
                criteria(
                    {
                        "type": "label_model",
                        "name": "l",
                        "model": "gpt-4o-mini",
                        "input": [{"role": "user", "content": "{{ sample.output_text }}"}],
                        "labels": ["good", "bad"],
                        "passing_labels": ["good"],
                    }
                ),
                "documented: label_model not available yet",
            ),
            (
                "python",
                criteria({"type": "python", "name": "p", "source": "def grade(s, i): return 1"}),
                "documented: posttrain runs no user code",
            ),
            (
                "logs data source",
                criteria({**CHECK, "input": "x", "reference": "x"}, source={"type": "logs"}),
                "documented: data on OpenAI's platform",
            ),
            (
                "stored_completions data source",
                criteria(
                    {**CHECK, "input": "x", "reference": "x"},
                    source={"type": "stored_completions", "metadata": {}},
                ),
                "documented: data on OpenAI's platform",
            ),
        ]
        ev = None
        for label, body, expect in evals:
            got = self.request("createEval", label, body, expect, create)
            ev = ev or got
        assert ev is not None
        for label, body in (
            ("name", {"name": "n"}),
            ("metadata", {"metadata": {"a": "b"}}),
            ("name and metadata", {"name": "n2", "metadata": {"a": "c"}}),
        ):
            self.request(
                "updateEval",
                label,
                body,
                "accept",
                lambda b: sdk.evals.with_raw_response.update(ev["id"], **b),
            )

        def upload(rows):
            data = "".join(json.dumps(r) + "\n" for r in rows).encode()
            return sdk.files.create(file=("rows.jsonl", io.BytesIO(data)), purpose="evals")

        file = upload(ROWS)
        items_file = upload([{"item": r["item"]} for r in ROWS])
        chat_rows = [
            {
                "item": r["item"],
                "sample": {
                    "model": "m",
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": r["item"]["answer"]},
                        }
                    ],
                },
            }
            for r in ROWS
        ]

        def completions(template=None, reference=None, sampling=SAMPLING, source=None):
            messages = (
                {"type": "item_reference", "item_reference": reference}
                if reference
                else {"type": "template", "template": template or TEMPLATE}
            )
            return {
                "data_source": {
                    "type": "completions",
                    "model": "tiny",
                    "input_messages": messages,
                    "sampling_params": sampling,
                    "source": source
                    or {"type": "file_content", "content": [{"item": r["item"]} for r in ROWS]},
                }
            }

        runs = [
            (
                "jsonl file_content, sample.output_text, name + metadata",
                {
                    "name": "r",
                    "metadata": {"k": "v"},
                    "data_source": {
                        "type": "jsonl",
                        "source": {"type": "file_content", "content": ROWS},
                    },
                },
                "accept",
            ),
            (
                "jsonl file_content, sample as a chat completion (choices)",
                {
                    "data_source": {
                        "type": "jsonl",
                        "source": {"type": "file_content", "content": chat_rows},
                    }
                },
                "accept",
            ),
            (
                "jsonl file_id (purpose evals)",
                {"data_source": {"type": "jsonl", "source": {"type": "file_id", "id": file.id}}},
                "accept",
            ),
            ("completions, template of EasyInputMessage strings", completions(), "accept"),
            (
                "completions, template of EvalItem (type message, input_text content)",
                completions(
                    template=[
                        {
                            "type": "message",
                            "role": "developer",
                            "content": {"type": "input_text", "text": "Answer briefly."},
                        },
                        {
                            "type": "message",
                            "role": "user",
                            "content": {"type": "input_text", "text": "{{ item.question }}"},
                        },
                    ]
                ),
                "accept",
            ),
            (
                "completions, EasyInputMessage with an input_text content list",
                completions(
                    template=[
                        {
                            "role": "user",
                            "content": [{"type": "input_text", "text": "{{ item.question }}"}],
                        }
                    ]
                ),
                "accept",
            ),
            ("completions, item_reference", completions(reference="item.question"), "accept"),
            (
                "completions, file_id source",
                completions(source={"type": "file_id", "id": items_file.id}),
                "accept",
            ),
            (
                "completions, sampling_params without max_completion_tokens",
                completions(sampling={"temperature": 1.0}),
                "accept",
            ),
            (
                'completions, sampling_params.response_format {"type": "text"} (the default)',
                completions(sampling={**SAMPLING, "response_format": {"type": "text"}}),
                "accept",
            ),
            (
                "completions, sampling_params.reasoning_effort",
                completions(sampling={**SAMPLING, "reasoning_effort": "low"}),
                "documented: sampling params are temperature, top_p, seed, max_completion_tokens",
            ),
            (
                "completions, sampling_params.tools",
                completions(
                    sampling={
                        **SAMPLING,
                        "tools": [{"type": "function", "function": {"name": "f"}}],
                    }
                ),
                "documented: sampling params are temperature, top_p, seed, max_completion_tokens",
            ),
            (
                "completions, stored_completions source",
                completions(source={"type": "stored_completions", "limit": 5}),
                "documented: data on OpenAI's platform",
            ),
            (
                "responses data source",
                {
                    "data_source": {
                        "type": "responses",
                        "model": "tiny",
                        "input_messages": {"type": "template", "template": message},
                        "source": {"type": "file_content", "content": [{"item": ROWS[0]["item"]}]},
                    }
                },
                "documented: data on OpenAI's platform",
            ),
        ]
        for label, body, expect in runs:
            got = self.request(
                "createEvalRun",
                label,
                body,
                expect,
                lambda b: sdk.evals.runs.with_raw_response.create(ev["id"], **b),
            )
            if got is not None and body["data_source"]["type"] == "completions":
                sdk.evals.runs.cancel(got["id"], eval_id=ev["id"])  # the SDK's path: /cancel
        sdk.evals.delete(ev["id"])


# --------------------------------------------------------------------------- report
def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def report(ch: Checker, spec_path: Path, doc: dict, strict: bool) -> str:
    info = doc.get("info", {})
    out = [
        f"## posttrain's Evals API against OpenAI's OpenAPI document (openapi "
        f"{doc.get('openapi')}, version {info.get('version')}; `{spec_path.name}`; oneOf "
        f"{'strict' if strict else 'as a union'})",
        "",
        "Responses (the document's path for each operation, `httpx`; the body validated "
        "against the document's schema for the operation and status):",
        "",
        "| operation | call | HTTP | document lists | schema | result | first error |",
        "|---|---|--:|---|---|---|---|",
    ]
    for r in ch.responses:
        out.append(
            f"| {r['operation']} | {_cell(r['call'])} | {r['status']} | "
            f"{', '.join(r['spec_statuses'])} | {r.get('schema_status', '-')} | "
            f"{'pass' if r['ok'] else 'FAIL'} | {_cell(r['error'])} |"
        )
    covered = {r["operation"] for r in ch.responses}
    missing = [o for o in OPERATIONS if o not in covered]
    if missing:
        out.append(f"\nNot driven: {', '.join(missing)}.")
    out += [
        "",
        "Query parameters (every enum value the document lists; 200 expected):",
        "",
        "| operation | parameter | HTTP | result |",
        "|---|---|--:|---|",
    ]
    for r in ch.queries:
        out.append(
            f"| {r['operation']} | `{r['param']}` | {r['status']} | "
            f"{'pass' if r['ok'] else 'FAIL ' + _cell(r['error'])} |"
        )
    out += [
        "",
        "Requests (each body valid against the document's request schema, sent with the "
        "`openai` SDK):",
        "",
        "| operation | request shape | expected | HTTP | result | posttrain's answer | "
        "answer vs schema |",
        "|---|---|---|--:|---|---|---|",
    ]
    for r in ch.requests:
        out.append(
            f"| {r['operation']} | {_cell(r['shape'])} | {_cell(r['expect'])} | {r['status']} | "
            f"{'pass' if r['ok'] else 'FAIL'} | {_cell(r['detail'])} | "
            f"{_cell(r['response']) or '-'} |"
        )
    fails = sum(not r["ok"] for r in ch.responses + ch.queries + ch.requests)
    total = len(ch.responses + ch.queries + ch.requests)
    out += ["", f"{total - fails} of {total} checks pass; {fails} fail."]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.evals_conformance", description=__doc__.splitlines()[0]
    )
    p.add_argument("--spec", type=Path, required=True, help="OpenAI's openapi.json or .yaml")
    p.add_argument(
        "--md", dest="markdown", type=Path, default=None, help="write the tables as Markdown here"
    )
    p.add_argument("--json", type=Path, default=None, help="write every row (and body) here")
    p.add_argument("--strict-oneof", action="store_true", help="oneOf: exactly one branch")
    p.add_argument("--keep", type=Path, default=None, help="work dir to keep (logs)")
    a = p.parse_args(argv)
    try:
        import jsonschema  # noqa: F401
    except ImportError:
        print("needs jsonschema: pip install -e '.[dev]'", file=sys.stderr)
        return 2
    doc = load_spec(a.spec)
    spec = Spec(doc, a.strict_oneof)
    work = (a.keep or Path(tempfile.mkdtemp(prefix="posttrain-evals-conformance-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    stack = Stack(work)
    try:
        stack.start()
        ch = Checker(spec, stack)
        ch.operations()
        ch.query_parameters()
        ch.request_shapes()
    except Failed as exc:
        print(f"conformance run failed: {exc} (logs under {work})", file=sys.stderr)
        return 2
    finally:
        stack.stop()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = report(ch, a.spec, doc, a.strict_oneof)
    print(text)
    if md := a.markdown:
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(text + "\n")
    if a.json:
        rows = {"responses": ch.responses, "queries": ch.queries, "requests": ch.requests}
        a.json.write_text(json.dumps(rows, indent=1, default=str))
    bad = [r for r in ch.responses + ch.queries + ch.requests if not r["ok"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
