// One job's page: summary, live curves of its metrics, events tail, checkpoints, RL
// samples and eval runs. Polled every POLL_MS while the job (or an eval run of it) is
// still moving, then read once more and left alone.

import { allPages, get, poll } from "./api.js";
import { ACTIVE, el } from "./dom.js";
import { Checkpoints, EvalRuns, Events, Samples, Summary } from "./panels.js";
import { LineChart } from "./plot.js";

const POLL_MS = 2000;
const DEFAULT_CURVES = ["loss", "reward", "kl", "entropy", "learning_rate", "grad_norm"];
const RL_METHODS = new Set(["grpo", "reinforcement"]);
const RUN_ACTIVE = new Set(["queued", "in_progress"]);

// The eval runs made for this job's checkpoints: runs of the tenant's evals whose
// metadata names the job (README, "Evals during fine-tuning"), newest first.
async function evalRunsOf(jobId) {
  const evals = await allPages("/evals", { limit: 100 }, (page) => page.last_id, 10);
  const runs = [];
  for (const ev of evals) {
    const page = await get(`/evals/${encodeURIComponent(ev.id)}/runs`, { limit: 100, order: "desc" });
    runs.push(...page.data.filter((r) => (r.metadata || {}).fine_tuning_job_id === jobId));
  }
  return runs.sort((a, b) => b.created_at - a.created_at);
}

class Curves {
  constructor() {
    this.charts = new Map();
    this.grid = el("div", { class: "charts" });
    this.choice = el("select", { "aria-label": "Metric to plot" });
    const add = el("button", { type: "button", onclick: () => this.add(this.choice.value, true) }, "Plot");
    this.root = el("section", { class: "panel" }, el("h2", {}, "Curves"),
      el("div", { class: "choose" }, el("label", {}, "Metric ", this.choice), add), this.grid);
    this.rows = [];
    this.names = [];
  }

  add(metric, removable) {
    if (!metric || this.charts.has(metric)) return;
    const chart = new LineChart(metric, removable ? () => this.remove(metric) : null);
    this.charts.set(metric, chart);
    this.grid.append(chart.root);
    chart.update(this.series(metric));
  }

  remove(metric) {
    this.charts.get(metric)?.root.remove();
    this.charts.delete(metric);
  }

  series(metric) {
    return this.rows.filter((r) => typeof r[metric] === "number").map((r) => [r.step, r[metric]]);
  }

  // rows: every metrics row so far ({step, name: value...}), oldest first
  update(rows) {
    this.rows = rows;
    const names = [...new Set(rows.flatMap((r) => Object.keys(r)))].filter((k) => k !== "step").sort();
    if (names.join() !== this.names.join()) {
      this.names = names;
      const picked = this.choice.value;
      this.choice.replaceChildren(...names.map((n) => el("option", { value: n }, n)));
      if (names.includes(picked)) this.choice.value = picked;
    }
    for (const metric of DEFAULT_CURVES) if (names.includes(metric)) this.add(metric, false);
    for (const [metric, chart] of this.charts) chart.update(this.series(metric));
  }
}

export function jobPage(view, jobId) {
  const summary = new Summary();
  const curves = new Curves();
  const events = new Events();
  const checkpoints = new Checkpoints(jobId);
  const samples = new Samples();
  const evalRuns = new EvalRuns();
  const title = el("h1", {}, jobId);
  view.replaceChildren(el("p", { class: "crumbs" }, el("a", { href: "#/" }, "← all jobs")), title,
    summary.root, curves.root, events.root, checkpoints.root);

  const state = { metrics: [], sampleRows: [], sampleCursor: undefined, attempt: null, ckpts: -1, runs: [] };
  const path = `/fine_tuning/jobs/${encodeURIComponent(jobId)}`;

  async function readMetrics(job) {
    if (job.attempt !== state.attempt) { // a retried run replaces the steps it re-runs
      state.attempt = job.attempt;
      state.metrics = [];
      state.sampleRows = [];
      state.sampleCursor = undefined;
    }
    const last = state.metrics.length ? state.metrics[state.metrics.length - 1].step : undefined;
    const rows = await allPages(`${path}/metrics`, { after: last, limit: 10000 },
      (page) => page.data[page.data.length - 1].step);
    state.metrics.push(...rows);
    curves.update(state.metrics);
  }

  async function readSamples() {
    const rows = await allPages(`${path}/samples`, { after: state.sampleCursor, limit: 100 });
    if (rows.length) state.sampleCursor = rows[rows.length - 1].id;
    state.sampleRows.push(...rows);
    samples.update(state.sampleRows);
  }

  async function tick() {
    const job = await get(path);
    const moving = ACTIVE.has(job.status);
    summary.update(job);
    view.dataset.status = job.status;
    await readMetrics(job);
    events.update((await get(`${path}/events`, { limit: 50 })).data);
    const ckpts = (await get(`${path}/checkpoints`, { limit: 100 })).data;
    checkpoints.update(ckpts);
    if (RL_METHODS.has((job.method || {}).type)) {
      if (!samples.root.isConnected) events.root.before(samples.root);
      await readSamples();
    }
    const runsMoving = state.runs.some((r) => RUN_ACTIVE.has(r.status));
    if (ckpts.length !== state.ckpts || runsMoving || !moving) {
      state.ckpts = ckpts.length;
      state.runs = await evalRunsOf(jobId);
      evalRuns.update(state.runs);
      if (!evalRuns.root.isConnected) view.append(evalRuns.root);
    }
    view.dataset.loaded = "true";
    return moving || state.runs.some((r) => RUN_ACTIVE.has(r.status));
  }

  return poll(tick, POLL_MS);
}
