"""The dashboard and /docs in headless Chromium against the real API and worker.

One SFT job and one GRPO job (with samples) train on the tiny model in the end-to-end
stack (keys off: dev mode); the browser opens their pages and the tests check what is
drawn: the jobs list, the status, the loss curve's points (its ``data-points``) growing
while the job runs, the events tail, checkpoint downloads, the samples table (markup in a
completion stays text), eval runs and any metric plotted on request. A second API
process on the same Redis with an API key file checks the sign-in: a wrong key is
refused on the form, one tenant's key shows none of another's jobs. /docs renders
Swagger UI's operations with no host but the API's reachable. Screenshots (PNG) go to
$POSTTRAIN_TEST_ARTIFACTS or a pytest temp dir.
"""

from __future__ import annotations

import itertools
import json
import tarfile
from importlib import resources

import httpx
import pytest
from openai import OpenAI
from selenium.webdriver.support.ui import Select

from service import stack as local_stack
from service.auth import hash_key
from tests.e2e import browser
from tests.e2e.test_sft_job import wait_done, wait_for
from workers.settings import WorkerSettings
from workers.store import JobStore

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(browser.missing() is not None, reason=browser.missing() or ""),
]
ASSETS = resources.files("trainers") / "assets"
SFT_HP = {"n_epochs": 40, "batch_size": 8, "learning_rate": 5e-3, "max_steps": 600}
GRADER = {
    "type": "string_check",
    "name": "says_answer",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "like",
}
GRPO_HP = {
    "num_generations": 4,
    "batch_size": 8,
    "max_completion_length": 8,
    "learning_rate": 5e-3,
    "max_steps": 12,
}
MARKUP = '<img src="x" onerror="window.__pwned = 1"><b>bold</b><script>window.__pwned = 2</script>'
KEY_A, KEY_B = "dash-key-default", "dash-key-other"


def _upload(base: str, name: str) -> str:
    with (ASSETS / name).open("rb") as fh:
        resp = httpx.post(
            f"{base}/v1/files", files={"file": (name, fh)}, data={"purpose": "fine-tune"}
        )
    resp.raise_for_status()
    return resp.json()["id"]


def _create(base: str, body: dict) -> str:
    resp = httpx.post(f"{base}/v1/fine_tuning/jobs", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


@pytest.fixture(scope="module")
def jobs(stack) -> dict[str, str]:
    """An SFT job long enough to be watched while it trains, then a GRPO job that records
    samples every 2 steps; the worker runs them one after the other."""
    base = stack.base_url
    sft = _create(
        base,
        {
            "model": str(stack.model_dir),
            "training_file": _upload(base, "demo_sft.jsonl"),
            "method": {"type": "supervised", "supervised": {"hyperparameters": SFT_HP}},
            "checkpoint_every_steps": 100,
        },
    )
    grpo = _create(
        base,
        {
            "model": str(stack.model_dir),
            "training_file": _upload(base, "demo_grpo.jsonl"),
            "seed": 5,
            "method": {"type": "grpo", "grpo": {"graders": [GRADER], "hyperparameters": GRPO_HP}},
            "sample_every_steps": 2,
            "sample_rows": 4,
        },
    )
    return {"sft": sft, "grpo": grpo}


@pytest.fixture(scope="module")
def sdk(stack):
    return OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    return browser.artifacts_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def chrome(tmp_path_factory):
    root = tmp_path_factory.mktemp("chromium")
    (root / "downloads").mkdir()
    driver = browser.start(root / "profile", root / "downloads", root / "chromedriver.log")
    driver.downloads = root / "downloads"
    try:
        yield driver
    finally:
        browser.stop(driver)


@pytest.fixture(scope="module")
def keyed_api(stack, tmp_path_factory):
    """A second API process on the stack's Redis, queue and data, with keys on: tenant
    'default' (whose records the keyless API wrote) and tenant 'other'."""
    root = tmp_path_factory.mktemp("keyed-api")
    keys = root / "keys.json"
    tenants = {"default": {"keys": [hash_key(KEY_A)]}, "other": {"keys": [hash_key(KEY_B)]}}
    keys.write_text(json.dumps({"tenants": tenants}))
    port = local_stack.free_port()
    proc = local_stack.start_api(
        {**stack.env, "POSTTRAIN_API_KEYS_FILE": str(keys)}, port, root / "api.log"
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        local_stack.stop(proc)


# ---- reading the page
def attr(driver, selector: str, name: str) -> str | None:
    found = driver.find_elements("css selector", selector)
    return found[0].get_attribute(name) if found else None


def points(driver, metric: str) -> int:
    return int(attr(driver, f'figure.chart[data-metric="{metric}"]', "data-points") or 0)


def texts(driver, selector: str) -> list[str]:
    return [e.get_attribute("textContent") for e in driver.find_elements("css selector", selector)]


def api(base: str, path: str, key: str | None = None, **params) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    resp = httpx.get(f"{base}/v1{path}", params=params, headers=headers, timeout=30)
    resp.raise_for_status()
    return resp.json()


def open_job(driver, base: str, job_id: str) -> None:
    driver.get(f"{base}/dashboard/#/jobs/{job_id}")
    browser.wait_until(driver, lambda d: attr(d, "#view", "data-loaded"), "the job page")


def loss_steps(base: str, job_id: str, key: str | None = None) -> int:
    rows = api(base, f"/fine_tuning/jobs/{job_id}/metrics", key, limit=10000)["data"]
    return sum("loss" in r for r in rows)


# ---- dev mode (keys off)
def test_a_running_job_draws_its_loss_live_and_ends_with_every_step(stack, jobs, chrome, shots):
    base, sft = stack.base_url, jobs["sft"]
    open_job(chrome, base, sft)
    assert not chrome.find_element("id", "login").is_displayed()  # keys off: none asked
    assert "dev mode" in chrome.find_element("id", "mode").text
    first = browser.wait_until(
        chrome,
        lambda d: attr(d, "#view", "data-status") == "running" and points(d, "loss"),
        "the running job's first loss points",
    )
    browser.screenshot(chrome, shots, "sft-running")
    # the same page, never reloaded, draws the steps that come after
    browser.wait_until(chrome, lambda d: points(d, "loss") > first, "more loss points")
    browser.wait_until(
        chrome, lambda d: attr(d, "#view", "data-status") == "succeeded", "the job to succeed"
    )
    done = loss_steps(base, sft)
    assert done == SFT_HP["max_steps"]
    browser.wait_until(chrome, lambda d: points(d, "loss") == done, f"{done} loss points")
    for metric in ("learning_rate", "grad_norm", "entropy"):
        assert points(chrome, metric) > 0, metric
    assert texts(chrome, '[data-field="progress"] .progress-text') == [f"{done} / {done}"]
    assert texts(chrome, '[data-field="status"]') == ["succeeded"]
    shown = texts(chrome, "ol.events li .message")
    said = [e["message"] for e in api(base, f"/fine_tuning/jobs/{sft}/events", limit=100)["data"]]
    assert shown and set(shown) <= set(said), (shown, said)
    assert any(m.startswith(f"Step {done}/{done}") for m in shown), shown
    browser.screenshot(chrome, shots, "sft-succeeded")


def test_the_jobs_list_shows_each_job_with_status_and_progress(stack, sdk, jobs, chrome, shots):
    grpo = wait_done(sdk, jobs["grpo"])
    assert grpo.status == "succeeded", grpo.error
    chrome.get(f"{stack.base_url}/dashboard")
    assert chrome.current_url.endswith("/dashboard/")
    for name, job_id in jobs.items():
        row = f'tr[data-job-id="{job_id}"]'
        browser.wait_until(
            chrome, lambda d, row=row: attr(d, row, "data-status") == "succeeded", f"{name} row"
        )
        total = api(stack.base_url, f"/fine_tuning/jobs/{job_id}")["total_steps"]
        assert texts(chrome, f"{row} .progress-text") == [f"{total} / {total}"], name
        assert texts(chrome, f"{row} .status") == ["succeeded"], name
    method = texts(chrome, f'tr[data-job-id="{jobs["grpo"]}"] td:nth-child(3)')
    assert method == ["grpo/grpo"] or method == ["grpo"], method
    browser.screenshot(chrome, shots, "jobs-list")


def test_the_rl_samples_table_holds_each_sample_and_shows_markup_as_text(
    stack, jobs, chrome, shots
):
    base, grpo = stack.base_url, jobs["grpo"]
    samples = api(base, f"/fine_tuning/jobs/{grpo}/samples", limit=100)["data"]
    steps = sorted({s["step"] for s in samples})  # one batch sampled every 2 steps
    assert len(steps) >= 3 and {b - a for a, b in itertools.pairwise(steps)} == {2}, steps
    assert len(samples) == 4 * len(steps)
    # a completion and an event carrying markup, written where the trainer's reports go
    store = JobStore(stack.redis, WorkerSettings().key_prefix)
    row = {**samples[-1], "completion": MARKUP, "rewards": {"says_answer": 0.0}, "reward": 0.0}
    for key in ("id", "object", "created_at", "step"):
        row.pop(key)
    store.add_samples(grpo, GRPO_HP["max_steps"] + 1, [row])
    store.add_event(grpo, f"note: {MARKUP}", level="warn")
    open_job(chrome, base, grpo)
    rows = browser.wait_until(
        chrome,
        lambda d: d.find_elements("css selector", "table.samples tbody tr"),
        "the samples table",
    )
    assert len(rows) == len(samples) + 1
    head = texts(chrome, "table.samples th")
    assert head == ["Step", "Prompt", "Completion", "reward: says_answer", "Reward", "Advantage"]
    first = rows[0]  # newest first: the one with markup
    completion = first.find_element("css selector", "pre.completion")
    assert completion.get_attribute("textContent") == MARKUP
    assert completion.find_elements("css selector", "*") == []  # text, not elements
    assert chrome.find_elements("css selector", "#view img, #view b, #view script") == []
    assert chrome.execute_script("return window.__pwned === undefined")
    assert f"note: {MARKUP}" in texts(chrome, "ol.events li .message")
    cells = [r.find_elements("css selector", "td.num") for r in rows[1:]]
    for cells_of_row, sample in zip(cells, reversed(samples), strict=True):
        reward, total, advantage = (c.get_attribute("textContent") for c in cells_of_row)
        assert float(reward) == sample["rewards"]["says_answer"]
        assert float(total) == sample["reward"]
        assert float(advantage) == pytest.approx(sample["advantage"], rel=1e-3, abs=1e-3)
    assert points(chrome, "reward") > 0 and points(chrome, "loss") > 0
    browser.screenshot(chrome, shots, "grpo-samples")


def test_any_reported_metric_can_be_plotted(stack, jobs, chrome):
    open_job(chrome, stack.base_url, jobs["grpo"])
    rows = api(stack.base_url, f"/fine_tuning/jobs/{jobs['grpo']}/metrics")["data"]
    metric = "completions/mean_length"
    want = sum(metric in r for r in rows)
    assert want > 0
    Select(chrome.find_element("css selector", ".choose select")).select_by_value(metric)
    chrome.find_element("css selector", ".choose button").click()
    browser.wait_until(chrome, lambda d: points(d, metric) == want, f"{want} points of {metric}")
    chrome.find_element("css selector", f'figure[data-metric="{metric}"] button.remove').click()
    assert not chrome.find_elements("css selector", f'figure[data-metric="{metric}"]')


def test_eval_runs_naming_the_job_are_listed(stack, sdk, jobs, chrome, shots):
    base, sft = stack.base_url, jobs["sft"]
    ev = sdk.evals.create(
        name="dashboard",
        data_source_config={
            "type": "custom",
            "item_schema": {
                "type": "object",
                "properties": {"said": {"type": "string"}, "answer": {"type": "string"}},
            },
        },
        testing_criteria=[
            {
                "type": "string_check",
                "name": "exact",
                "input": "{{ item.said }}",
                "reference": "{{ item.answer }}",
                "operation": "eq",
            }
        ],
    )
    content = [{"item": {"said": f"a{i}", "answer": "a1"}} for i in range(3)]
    ckpt = api(base, f"/fine_tuning/jobs/{sft}/checkpoints")["data"][0]
    step = str(ckpt["step_number"])
    meta = {"fine_tuning_job_id": sft, "checkpoint_id": ckpt["id"], "step": step}
    run = sdk.evals.runs.create(
        ev.id,
        name=f"{sft} step {step}",
        metadata=meta,
        data_source={"type": "jsonl", "source": {"type": "file_content", "content": content}},
    )
    wait_for(
        lambda: sdk.evals.runs.retrieve(run.id, eval_id=ev.id).status == "completed",
        120,
        "the eval run",
    )
    open_job(chrome, base, sft)
    row = f'table.evalruns tr[data-run-id="{run.id}"]'
    browser.wait_until(chrome, lambda d: attr(d, row, "data-status") == "completed", "the run")
    cells = texts(chrome, f"{row} td")
    assert cells[2:4] == [step, ckpt["id"]] and cells[-4:] == ["1", "2", "0", "3"], cells
    link = chrome.find_element("css selector", f'tr[data-checkpoint-id="{ckpt["id"]}"] a.download')
    assert link.get_attribute("href") == (
        f"{base}/v1/fine_tuning/jobs/{sft}/checkpoints/{ckpt['id']}/content"
    )
    link.click()  # keys off: the browser downloads it itself
    saved = wait_for(lambda: _downloaded(chrome, sft), 60, "the checkpoint download")
    assert tarfile.is_tarfile(saved)
    browser.screenshot(chrome, shots, "sft-checkpoints-evals")


def _downloaded(driver, job_id: str):
    done = [p for p in driver.downloads.glob(f"{job_id}-step-*.tar") if p.stat().st_size]
    partial = list(driver.downloads.glob("*.crdownload"))
    return done[0] if done and not partial else None


def test_docs_render_swagger_ui_operations_offline(stack, chrome, shots):
    chrome.get(f"{stack.base_url}/docs")
    ops = browser.wait_until(
        chrome,
        lambda d: (
            len(d.find_elements("css selector", ".opblock")) >= 20
            and d.find_elements("css selector", ".opblock")
        ),
        "Swagger UI's operations",
    )
    paths = {o.find_element("css selector", ".opblock-summary-path").text for o in ops}
    assert {"/v1/fine_tuning/jobs", "/v1/files"} <= paths, paths
    loaded = chrome.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    assert loaded and all(u.startswith(stack.base_url) for u in loaded), loaded
    browser.screenshot(chrome, shots, "docs")


# ---- keys on
def test_sign_in_refuses_a_wrong_key_and_shows_only_the_tenants_jobs(
    keyed_api, jobs, chrome, shots
):
    chrome.get(f"{keyed_api}/dashboard/")
    form = browser.wait_until(
        chrome, lambda d: d.find_element("id", "login").is_displayed(), "the sign-in form"
    )
    assert form and not chrome.find_elements("css selector", "table.jobs")
    sign_in(chrome, "not-a-key")
    error = browser.wait_until(
        chrome, lambda d: d.find_element("id", "login-error").text, "the refusal"
    )
    assert error.startswith("That key was refused: Incorrect or missing API key"), error
    browser.screenshot(chrome, shots, "login-refused")

    sign_in(chrome, KEY_B)  # tenant 'other': none of the default tenant's jobs
    browser.wait_until(chrome, lambda d: attr(d, "#view", "data-loaded"), "B's jobs list")
    assert chrome.find_elements("css selector", "table.jobs tbody tr") == []
    assert chrome.find_element("css selector", "p.empty").is_displayed()
    chrome.get(f"{keyed_api}/dashboard/#/jobs/{jobs['sft']}")  # the key stays for the tab
    browser.wait_until(chrome, lambda d: d.find_element("id", "banner").text, "a 404 for B")
    assert "No such fine-tuning job" in chrome.find_element("id", "banner").text
    chrome.find_element("id", "signout").click()

    sign_in(chrome, KEY_A)  # tenant 'default': the jobs the keyless API made
    for job_id in jobs.values():
        row = f'tr[data-job-id="{job_id}"]'
        browser.wait_until(chrome, lambda d, row=row: attr(d, row, "data-status"), job_id)
    browser.screenshot(chrome, shots, "jobs-list-keyed")
    open_job(chrome, keyed_api, jobs["sft"])
    want = loss_steps(keyed_api, jobs["sft"], KEY_A)
    browser.wait_until(chrome, lambda d: points(d, "loss") == want, "the keyed loss curve")
    for old in chrome.downloads.glob("*.tar"):
        old.unlink()
    chrome.find_element("css selector", "a.download").click()  # fetched with the key
    saved = wait_for(lambda: _downloaded(chrome, jobs["sft"]), 60, "the keyed download")
    assert tarfile.is_tarfile(saved)
    assert chrome.execute_script("return sessionStorage.getItem('posttrain.apiKey')") == KEY_A


def sign_in(driver, key: str) -> None:
    field = browser.wait_until(
        driver,
        lambda d: d.find_element("id", "key").is_displayed() and d.find_element("id", "key"),
        "the key field",
    )
    field.clear()
    field.send_keys(key)
    driver.find_element("css selector", "#login-form button[type=submit]").click()
