// Building the page from API data without ever parsing it as markup: every string a
// caller passes becomes a text node (or an attribute value), never HTML.

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  return append(node, children);
}

export function append(node, children) {
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function fmtNumber(value) {
  if (typeof value !== "number") return value === undefined || value === null ? "" : String(value);
  if (!Number.isFinite(value)) return String(value);
  if (Number.isInteger(value) && Math.abs(value) < 1e9) return String(value);
  const size = Math.abs(value);
  if (size !== 0 && (size >= 1e5 || size < 1e-3)) return value.toExponential(2);
  return String(Number(value.toPrecision(4)));
}

export function fmtTime(unixSeconds) {
  if (!unixSeconds) return "";
  return new Date(unixSeconds * 1000).toLocaleString();
}

// A table whose head is `columns` (strings) and whose body the caller fills.
export function table(className, columns) {
  const body = el("tbody");
  const root = el("table", { class: className },
    el("thead", {}, el("tr", {}, columns.map((c) => el("th", { scope: "col" }, c)))), body);
  return { root, body };
}

// The job's method as one word: "supervised", "grpo/xrpo", "dpo" ...
export function methodName(job) {
  const method = job.method || {};
  const type = method.type || "";
  const variant = method[type] && typeof method[type] === "object" ? method[type].variant : null;
  return variant && variant !== type ? `${type}/${variant}` : type;
}

// "12 / 60" and a bar, from the job object's step and total_steps.
export function progress(job) {
  const step = job.step ?? null;
  const total = job.total_steps ?? null;
  const text = step === null ? "–" : total ? `${step} / ${total}` : String(step);
  const bar = total ? el("progress", { max: total, value: Math.min(step ?? 0, total) }) : null;
  return el("span", { class: "progress" }, bar, el("span", { class: "progress-text" }, text));
}

export function statusBadge(status) {
  return el("span", { class: `status status-${status}` }, status);
}

export const ACTIVE = new Set(["validating_files", "queued", "running", "pausing", "paused"]);
