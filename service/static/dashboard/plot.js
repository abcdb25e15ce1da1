// Line charts of one metric by training step, drawn as SVG (no library).
// The figure carries data-metric and data-points (how many points are plotted).

import { el, fmtNumber } from "./dom.js";

const NS = "http://www.w3.org/2000/svg";
const W = 440;
const H = 200;
const PAD = { left: 58, right: 14, top: 10, bottom: 28 };
const DOTS_UP_TO = 60; // fewer points than this are also drawn as dots

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

// Round tick values covering [lo, hi]: steps of 1, 2 or 5 times a power of ten.
export function niceTicks(lo, hi, count = 5) {
  if (!(hi > lo)) {
    const pad = Math.abs(lo) * 0.1 || 1;
    lo -= pad;
    hi += pad;
  }
  const rough = (hi - lo) / Math.max(1, count - 1);
  const power = 10 ** Math.floor(Math.log10(rough));
  const ratio = rough / power;
  const step = power * (ratio >= 7.5 ? 10 : ratio >= 3.5 ? 5 : ratio >= 1.5 ? 2 : 1);
  const first = Math.floor(lo / step) * step;
  const last = Math.ceil(hi / step) * step;
  const digits = Math.max(0, -Math.floor(Math.log10(step)));
  const ticks = [];
  for (let v = first; v <= last + step / 2; v += step) ticks.push(Number(v.toFixed(digits)));
  return { lo: first, hi: last, ticks };
}

export class LineChart {
  constructor(metric, onRemove = null) {
    this.metric = metric;
    this.points = [];
    this.last = el("span", { class: "last" });
    const remove = onRemove
      ? el("button", { type: "button", class: "remove", title: `Remove ${metric}`, onclick: onRemove }, "×")
      : null;
    this.svg = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "plot", role: "img", "aria-label": `${metric} by step` });
    this.axes = svg("g", { class: "axes" });
    this.line = svg("polyline", { class: "line", points: "" });
    this.dots = svg("g", { class: "dots" });
    this.hover = svg("g", { class: "hover", visibility: "hidden" });
    this.hoverDot = svg("circle", { r: 3.5 });
    this.hoverText = svg("text", { y: PAD.top + 10 });
    this.hover.append(this.hoverDot, this.hoverText);
    this.svg.append(this.axes, this.line, this.dots, this.hover);
    this.svg.addEventListener("mousemove", (ev) => this.showNearest(ev));
    this.svg.addEventListener("mouseleave", () => this.hover.setAttribute("visibility", "hidden"));
    this.root = el("figure", { class: "chart", dataset: { metric, points: "0" } },
      el("figcaption", {}, el("span", { class: "metric" }, metric), this.last, remove), this.svg);
  }

  // points: [[step, value], ...] in step order; non-finite values are left out.
  update(points) {
    this.points = points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
    const n = this.points.length;
    this.root.dataset.points = String(n);
    this.svg.setAttribute("data-points", String(n));
    this.axes.replaceChildren();
    this.dots.replaceChildren();
    if (!n) {
      this.line.setAttribute("points", "");
      this.last.textContent = "no values yet";
      this.axes.append(svg("text", { x: W / 2, y: H / 2, class: "empty" }, "no values yet"));
      return;
    }
    const [lastX, lastY] = this.points[n - 1];
    this.last.textContent = `${fmtNumber(lastY)} at step ${lastX}`;
    this.scale();
    this.drawAxes();
    this.line.setAttribute("points", this.points.map(([x, y]) => `${this.px(x)},${this.py(y)}`).join(" "));
    const dotted = n < DOTS_UP_TO ? this.points : [this.points[n - 1]];
    for (const [x, y] of dotted) this.dots.append(svg("circle", { cx: this.px(x), cy: this.py(y), r: 2.5 }));
  }

  scale() {
    const xs = this.points.map((p) => p[0]);
    const ys = this.points.map((p) => p[1]);
    this.x0 = Math.min(...xs);
    this.x1 = Math.max(...xs);
    if (this.x1 === this.x0) this.x1 = this.x0 + 1;
    this.yTicks = niceTicks(Math.min(...ys), Math.max(...ys));
    this.xTicks = niceTicks(this.x0, this.x1).ticks.filter((t) => t >= this.x0 && t <= this.x1 && Number.isInteger(t));
  }

  px(x) {
    return (PAD.left + ((x - this.x0) / (this.x1 - this.x0)) * (W - PAD.left - PAD.right)).toFixed(1);
  }

  py(y) {
    const { lo, hi } = this.yTicks;
    return (H - PAD.bottom - ((y - lo) / (hi - lo)) * (H - PAD.top - PAD.bottom)).toFixed(1);
  }

  drawAxes() {
    for (const t of this.yTicks.ticks) {
      const y = this.py(t);
      this.axes.append(svg("line", { x1: PAD.left, x2: W - PAD.right, y1: y, y2: y, class: "grid" }));
      this.axes.append(svg("text", { x: PAD.left - 6, y, class: "ytick" }, fmtNumber(t)));
    }
    for (const t of this.xTicks) {
      this.axes.append(svg("text", { x: this.px(t), y: H - PAD.bottom + 16, class: "xtick" }, String(t)));
    }
    this.axes.append(svg("text", { x: W - PAD.right, y: H - 2, class: "xlabel" }, "step"));
  }

  showNearest(ev) {
    if (!this.points.length) return;
    const box = this.svg.getBoundingClientRect();
    const vx = ((ev.clientX - box.left) / box.width) * W;
    const x = this.x0 + ((vx - PAD.left) / (W - PAD.left - PAD.right)) * (this.x1 - this.x0);
    let lo = 0;
    let hi = this.points.length - 1;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (this.points[mid][0] < x) lo = mid + 1;
      else hi = mid;
    }
    if (lo > 0 && x - this.points[lo - 1][0] < this.points[lo][0] - x) lo -= 1;
    const [sx, sy] = this.points[lo];
    this.hoverDot.setAttribute("cx", this.px(sx));
    this.hoverDot.setAttribute("cy", this.py(sy));
    this.hoverText.setAttribute("x", W - PAD.right);
    this.hoverText.textContent = `step ${sx}: ${fmtNumber(sy)}`;
    this.hover.setAttribute("visibility", "visible");
  }
}
