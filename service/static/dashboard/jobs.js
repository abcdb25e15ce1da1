// The jobs list: every job the key's tenant may see, newest first, with status and
// progress, refreshed every few seconds.

import { get, poll } from "./api.js";
import { el, fmtTime, methodName, progress, statusBadge, table } from "./dom.js";

const PAGE = 50;
const REFRESH_MS = 3000;

function row(job) {
  const link = el("a", { href: `#/jobs/${encodeURIComponent(job.id)}` }, job.id);
  return el("tr", { dataset: { jobId: job.id, status: job.status } },
    el("td", { class: "id" }, link),
    el("td", {}, job.model),
    el("td", {}, methodName(job)),
    el("td", { class: "status-cell" }, statusBadge(job.status)),
    el("td", { class: "progress-cell" }, progress(job)),
    el("td", {}, fmtTime(job.created_at)),
    el("td", {}, fmtTime(job.finished_at)));
}

export function jobsPage(view) {
  let shown = PAGE;
  let more = false;
  const list = table("jobs", ["Job", "Model", "Method", "Status", "Progress", "Created", "Finished"]);
  const empty = el("p", { class: "empty", hidden: true }, "No fine-tuning jobs yet.");
  const moreButton = el("button", { type: "button", hidden: true, onclick: () => loadMore() }, "Show more");
  view.replaceChildren(el("h1", {}, "Fine-tuning jobs"), list.root, empty, moreButton);

  async function refresh() {
    const page = await get("/fine_tuning/jobs", { limit: shown });
    list.body.replaceChildren(...page.data.map(row));
    more = page.has_more;
    empty.hidden = page.data.length > 0;
    moreButton.hidden = !more;
    view.dataset.loaded = "true";
  }

  async function loadMore() {
    shown = Math.min(1000, shown + PAGE);
    await refresh();
  }

  // refreshed all along: jobs start, move and are created by other clients
  return poll(async () => {
    await refresh();
    return true;
  }, REFRESH_MS);
}
