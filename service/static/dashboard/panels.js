// The parts of a job's page below its curves: summary, events tail, checkpoints,
// RL samples and eval runs. Each holds a root element and an update(data) method;
// text from the API (events, prompts, completions) only ever lands in textContent.

import { download, report, storedKey, url } from "./api.js";
import { el, fmtNumber, fmtTime, methodName, progress, statusBadge, table } from "./dom.js";

const SAMPLES_SHOWN = 200;

function section(title, ...children) {
  return el("section", { class: "panel" }, el("h2", {}, title), ...children);
}

export class Summary {
  constructor() {
    this.list = el("dl", { class: "summary" });
    this.error = el("p", { class: "error job-error", hidden: true });
    this.root = el("div", {}, this.list, this.error);
  }

  update(job) {
    const items = [
      ["Status", statusBadge(job.status)],
      ["Progress", progress(job)],
      ["Model", job.model],
      ["Method", methodName(job)],
      ["Training type", job.training_type],
      ["Created", fmtTime(job.created_at)],
      ["Finished", fmtTime(job.finished_at)],
      ["Trained tokens", fmtNumber(job.trained_tokens)],
      ["Fine-tuned model", job.fine_tuned_model || ""],
      ["Attempt", String(job.attempt ?? 0)],
    ];
    this.list.replaceChildren(...items.flatMap(([name, value]) => [
      el("dt", {}, name),
      el("dd", { dataset: { field: name.toLowerCase().replaceAll(" ", "-") } }, value),
    ]));
    this.error.hidden = !job.error;
    this.error.textContent = job.error ? `${job.error.code}: ${job.error.message}` : "";
  }
}

export class Events {
  constructor() {
    this.list = el("ol", { class: "events" });
    this.root = section("Events (newest first)", this.list);
  }

  update(events) {
    this.list.replaceChildren(...events.map((e) => el("li", { class: `event level-${e.level}`, dataset: { eventId: e.id } },
      el("time", {}, fmtTime(e.created_at)),
      el("span", { class: "level" }, e.level),
      el("span", { class: "message" }, e.message))));
    if (!events.length) this.list.append(el("li", { class: "empty" }, "No events yet."));
  }
}

function metricsText(metrics) {
  return Object.entries(metrics || {})
    .filter(([, v]) => v !== null && v !== undefined)
    .map(([k, v]) => `${k}=${fmtNumber(v)}`)
    .join("  ");
}

export class Checkpoints {
  constructor(jobId) {
    this.jobId = jobId;
    this.list = table("checkpoints", ["Step", "Checkpoint", "Metrics", "Download"]);
    this.empty = el("p", { class: "empty" }, "No checkpoints yet.");
    this.root = section("Checkpoints", this.list.root, this.empty);
  }

  link(ckpt) {
    const path = `/fine_tuning/jobs/${encodeURIComponent(this.jobId)}/checkpoints/${encodeURIComponent(ckpt.id)}/content`;
    const name = `${this.jobId}-step-${ckpt.step_number}.tar`;
    return el("a", { class: "download", href: url(path).href, download: name, onclick: (ev) => {
      if (!storedKey()) return; // keys off: the browser streams it to disk itself
      ev.preventDefault();
      download(ev.currentTarget).catch(report);
    } }, "Download .tar");
  }

  update(checkpoints) {
    this.empty.hidden = checkpoints.length > 0;
    this.list.root.hidden = !checkpoints.length;
    this.list.body.replaceChildren(...checkpoints.map((c) => el("tr", { dataset: { checkpointId: c.id } },
      el("td", {}, String(c.step_number)),
      el("td", { class: "id" }, c.fine_tuned_model_checkpoint || c.id),
      el("td", { class: "metrics" }, metricsText(c.metrics)),
      el("td", {}, this.link(c)))));
  }
}

export class Samples {
  constructor() {
    this.body = el("div", {});
    this.note = el("p", { class: "note" });
    this.root = section("Samples", this.note, this.body);
    this.count = -1;
  }

  // rows: every sample loaded so far, oldest first; the newest SAMPLES_SHOWN are drawn.
  update(rows) {
    if (rows.length === this.count) return;
    this.count = rows.length;
    const graders = [];
    for (const r of rows) for (const name of Object.keys(r.rewards || {})) if (!graders.includes(name)) graders.push(name);
    const steps = new Set(rows.map((r) => r.step)).size;
    const shown = rows.slice(-SAMPLES_SHOWN).reverse();
    this.note.textContent = rows.length
      ? `${rows.length} samples over ${steps} steps; ${shown.length === rows.length ? "all" : `the newest ${shown.length}`} shown, newest first.`
      : "No samples yet (RL jobs record them every sample_every_steps steps).";
    const list = table("samples", ["Step", "Prompt", "Completion", ...graders.map((g) => `reward: ${g}`), "Reward", "Advantage"]);
    list.body.append(...shown.map((r) => el("tr", { dataset: { sampleId: r.id } },
      el("td", {}, String(r.step)),
      el("td", { class: "text" }, el("pre", { class: "prompt" }, r.prompt)),
      el("td", { class: "text" }, el("pre", { class: "completion" }, r.completion), r.truncated ? el("span", { class: "tag" }, "truncated") : null),
      graders.map((g) => el("td", { class: "num" }, fmtNumber((r.rewards || {})[g]))),
      el("td", { class: "num" }, fmtNumber(r.reward)),
      el("td", { class: "num" }, fmtNumber(r.advantage)))));
    this.body.replaceChildren(rows.length ? list.root : "");
  }
}

export class EvalRuns {
  constructor() {
    this.list = table("evalruns", ["Run", "Eval", "Step", "Checkpoint", "Status", "Passed", "Failed", "Errored", "Total"]);
    this.empty = el("p", { class: "empty" }, "No eval runs for this job (the job field eval runs one on each checkpoint).");
    this.root = section("Eval runs", this.list.root, this.empty);
  }

  update(runs) {
    this.empty.hidden = runs.length > 0;
    this.list.root.hidden = !runs.length;
    this.list.body.replaceChildren(...runs.map((r) => {
      const counts = r.result_counts || {};
      const meta = r.metadata || {};
      return el("tr", { dataset: { runId: r.id, status: r.status } },
        el("td", {}, r.name || r.id),
        el("td", { class: "id" }, r.eval_id),
        el("td", {}, meta.step || ""),
        el("td", { class: "id" }, meta.checkpoint_id || r.model),
        el("td", {}, statusBadge(r.status)),
        ["passed", "failed", "errored", "total"].map((k) => el("td", { class: "num" }, String(counts[k] ?? ""))));
    }));
  }
}
