// Forge's live view: the job list, a job's curves and evaluation, the seals, runs compared.
// Polls the read-only JSON API under ./api every second. Every string from the server is data
// (dataset text, model answers, job names): it goes on the page through textContent, never as HTML.
"use strict";

const POLL_MS = 1000;
const SETTLED_MS = 10000;  // a job that ended, or the seals: asked again now and then, not every second
const view = document.getElementById("view");
const live = document.getElementById("live");
let timer = null;
let charts = {};  // name → {plot, key}: kept between polls, so a chart gains points instead of redrawing

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "style") node.style.cssText = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const fmt = {
  num: (v, digits = 4) => (v === null || v === undefined ? "—" : Number(v).toPrecision(digits)),
  int: (v) => (v === null || v === undefined ? "—" : Math.round(v).toLocaleString("en")),
  pct: (v) => (v === null || v === undefined ? "—" : `${Number(v).toFixed(1)}%`),
  eta: (s) => {
    if (s === null || s === undefined) return "—";
    s = Math.round(s);
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
    return h ? `${h}:${String(m).padStart(2, "0")}:${String(r).padStart(2, "0")}` : `${m}:${String(r).padStart(2, "0")}`;
  },
  time: (ts) => (ts ? new Date(ts * 1000).toLocaleString("en-GB") : "—"),
  bytes: (n) => (n >= 1e9 ? `${(n / 1e9).toFixed(2)} GB` : n >= 1e6 ? `${(n / 1e6).toFixed(1)} MB` : `${n} B`),
};

// A model path as its last two parts (the whole path in the cell's title); a hub id as it is
const short = (ref) => (ref ? ref.split("/").slice(-2).join("/") : "—");

function bar(percent, big) {
  const p = Math.max(0, Math.min(100, percent || 0));
  return el("span", {class: big ? "bar big" : "bar", "data-percent": p, role: "progressbar",
                     "aria-valuenow": p, "aria-valuemin": 0, "aria-valuemax": 100},
            el("span", {style: `width:${p}%`}));
}

function status(s) { return el("span", {class: `status ${s}`}, s); }

// The view's data. The server tags each reply; asked again with the tag, it answers 304 when nothing changed,
// and the page then leaves itself as it is (throws UNCHANGED): a page open beside training costs it little.
const UNCHANGED = new Error("unchanged");
let etags = {};

async function api(path) {
  const asked = current, headers = {accept: "application/json"};
  if (etags[path] && drawn === current) headers["if-none-match"] = etags[path];  // only what the page shows
  const reply = await fetch(`api/${path}`, {headers, credentials: "same-origin"});
  if (reply.status === 304) throw UNCHANGED;
  const body = await reply.json();
  if (!reply.ok) throw new Error(typeof body.error === "string" ? body.error : (body.error && body.error.message) || reply.status);
  if (asked === current) etags[path] = reply.headers.get("etag");
  return body;
}

function table(headers, rows, attrs) {
  return el("table", attrs || {}, el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
            el("tbody", {}, rows));
}

// ---- charts ----

function union(series) {
  const steps = [...new Set(series.flatMap((s) => s.map((p) => p[0])))].sort((a, b) => a - b);
  return [steps, ...series.map((s) => { const m = new Map(s); return steps.map((x) => (m.has(x) ? m.get(x) : null)); })];
}

// An axis label: small values (a learning rate) in exponent form, others to 4 significant digits
const tick = (v) => (v === null ? "" : v !== 0 && Math.abs(v) < 0.01 ? v.toExponential(1) : String(+v.toPrecision(4)));

const COLORS = ["#0969da", "#cf222e", "#1a7f37", "#9a6700", "#8250df", "#bf3989", "#0a3069", "#57606a"];

function chart(name, title, labels, series, host) {
  const points = series.reduce((n, s) => n + s.length, 0);
  const box = el("div", {class: "chart", "data-chart": name, "data-points": points}, el("h3", {}, title));
  host.append(box);
  if (!points) { box.append(el("p", {class: "muted"}, "no points yet")); return; }
  if (typeof uPlot === "undefined") { box.append(el("p", {class: "muted"}, "chart library not installed (make install)")); return; }
  const key = labels.join("|");
  const data = union(series);
  const old = charts[name];
  const width = Math.max(300, box.clientWidth - 12);
  if (old && old.key === key) {
    old.plot.setData(data);
    box.append(old.plot.root);
    return;
  }
  if (old) old.plot.destroy();
  const opts = {width, height: 220, scales: {x: {time: false}},
                series: [{label: "step"}, ...labels.map((label, i) => ({label, stroke: COLORS[i % COLORS.length],
                                                                        width: 1.5, spanGaps: true, points: {show: series[i].length < 40}}))],
                axes: [{label: "step"}, {size: 60, values: (u, ticks) => ticks.map(tick)}]};
  charts[name] = {plot: new uPlot(opts, data, box), key};
}

// ---- views ----

async function jobsView() {
  const {jobs} = await api("jobs");
  const chosen = new Set([...document.querySelectorAll("input[data-compare]:checked")].map((c) => c.value));
  const rows = jobs.map((j) => el("tr", {"data-job": j.id},
    el("td", {}, el("input", {type: "checkbox", value: j.id, "data-compare": "", checked: chosen.has(j.id),
                              "aria-label": "compare"})),
    el("td", {}, status(j.status)),
    el("td", {}, el("a", {href: `#/job/${encodeURIComponent(j.id)}`}, j.id)),
    el("td", {}, j.run_name || "—"), el("td", {title: j.base_model || ""}, short(j.base_model)), el("td", {}, j.stage || "—"),
    el("td", {}, bar(j.percent), " ", fmt.pct(j.percent)),
    el("td", {class: "num"}, j.total_steps ? `${j.step}/${j.total_steps}` : "—"),
    el("td", {class: "num"}, j.status === "running" ? fmt.eta(j.eta_s) : "—"),
    el("td", {class: "num"}, fmt.num(j.loss)), el("td", {class: "num"}, fmt.int(j.tokens_per_s)),
    el("td", {class: "muted"}, fmt.time(j.created_at))));
  const compare = () => {
    const ids = [...document.querySelectorAll("input[data-compare]:checked")].map((c) => c.value);
    if (ids.length) location.hash = `#/compare/${ids.map(encodeURIComponent).join(",")}`;
  };
  return [el("h1", {}, "Jobs"),
          jobs.length ? table(["", "status", "job", "run", "base model", "stage", "progress", "step", "ETA", "loss", "tok/s", "created"],
                              rows, {id: "jobs"}) : el("p", {class: "muted"}, "No jobs yet."),
          el("p", {}, el("button", {onclick: compare, id: "compare"}, "Compare loss of the selected runs"))];
}

function evaluationBlock(ev) {
  if (!ev) return [];
  const tools = ev.tool_calls || {};
  const rows = ev.table.map((r) => el("tr", {"data-model": r.model},
    el("td", {}, r.model), el("td", {class: "num"}, fmt.num(r.loss)), el("td", {class: "num"}, fmt.num(r.perplexity)),
    el("td", {class: "num"}, r.vs_base_pct !== undefined ? `${r.vs_base_pct}% vs base` :
                              r.vs_fine_tuned_pct !== undefined ? `${r.vs_fine_tuned_pct}% vs fine-tuned` : ""),
    el("td", {class: "num"}, tools[r.model] ? fmt.pct(100 * tools[r.model].accuracy) : ""),
    // what the quant lost against the f16 GGUF, the way llama.cpp measures it; and what it weighs
    el("td", {class: "num"}, r.kld_mean !== undefined ? fmt.num(r.kld_mean, 3) : ""),
    el("td", {class: "num"}, r.kld_p99 !== undefined ? fmt.num(r.kld_p99, 3) : ""),
    el("td", {class: "num"}, r.same_top_pct !== undefined ? fmt.pct(r.same_top_pct) : ""),
    el("td", {class: "num"}, r.bytes !== undefined ? `${fmt.bytes(r.bytes)} (${r.bpw} bpw)` : ""),
    el("td", {}, r.imatrix ? "imatrix" : "", r.file ? el("span", {class: "muted"}, ` ${r.file}`) : "")));
  const answers = (ev.samples || []).map((s) => el("tr", {},
    el("td", {}, s.prompt), el("td", {}, s.expected), el("td", {}, s.base ? s.base.text : ""),
    el("td", {}, s.quantized ? s.quantized.text : "")));
  const source = ev.source && typeof ev.source === "object" ? ev.source.kind || ev.source.path : ev.source;
  return [el("h2", {id: "evaluation-title"}, `Evaluation (${fmt.int(ev.tokens)} tokens of ${source || "the eval split"})`),
          table(["model", "loss", "perplexity", "change", "tool calls right", "mean KLD", "KLD p99", "same top",
                 "size", ""], rows, {id: "evaluation"}),
          ...(ev.measured_on ? [el("p", {class: "muted", id: "measured-on"}, `GGUFs against the f16: ${ev.measured_on}`)] : []),
          ...(ev.quantization && ev.quantization.auto ? [el("p", {id: "auto-choice"}, `auto: ${ev.quantization.auto.why}`)] : []),
          ...(answers.length ? [el("h2", {}, "Answers side by side"),
                                table(["prompt", "expected", "base", "quantized"], answers, {class: "answers", id: "answers"})] : []),
          ...(ev.warnings || []).map((w) => el("p", {class: "muted"}, `warning: ${w}`))];
}

async function jobView(id) {
  const v = await api(`jobs/${encodeURIComponent(id)}`);
  const j = v.job, p = v.progress, m = v.metrics || {};
  const loss = p.loss ?? m.last_logged_loss ?? m.train_loss, tps = p.tokens_per_s ?? m.tokens_per_s;
  const grid = el("div", {class: "charts"});
  const out = [
    el("h1", {}, j.id), el("p", {}, status(j.status), " · ", j.kind, " · ", j.stage || "", " · run ", j.run_name || "—",
                           " · ", j.base_model || ""),
    bar(j.percent, true),
    el("div", {class: "summary", id: "summary"},
       el("span", {}, "progress ", el("b", {}, fmt.pct(j.percent))),
       el("span", {}, "step ", el("b", {}, p.total_steps ? `${p.step}/${p.total_steps}` : "—")),
       el("span", {}, "loss ", el("b", {}, fmt.num(loss))),
       ...(m.eval_loss !== undefined && m.eval_loss !== null ? [el("span", {}, "eval loss ", el("b", {}, fmt.num(m.eval_loss)))] : []),
       el("span", {}, "tokens/s ", el("b", {}, fmt.int(tps))),
       el("span", {}, "ETA ", el("b", {}, v.terminal ? "—" : fmt.eta(p.eta_s)))),
  ];
  if (v.error) out.push(el("div", {class: "error"}, el("b", {}, v.error.code), ": ", v.error.message || "",
                             el("br"), el("span", {class: "muted"}, v.error.hint || "")));
  out.push(el("h2", {}, "Curves"), grid);
  out.push(...evaluationBlock(v.evaluation));
  out.push(el("h2", {}, "Stages"), table(["when", "stage"], v.timeline.map((t) => el("tr", {}, el("td", {class: "muted"}, fmt.time(t.ts)), el("td", {}, t.what))), {id: "timeline"}));
  if (v.artifacts.length) out.push(el("h2", {}, "Artifacts"), table(["kind", "path", "size", "sha256"], v.artifacts.map((a) =>
    el("tr", {}, el("td", {}, a.kind), el("td", {}, a.path), el("td", {class: "num"}, fmt.bytes(a.bytes)), el("td", {class: "muted"}, a.sha256.slice(0, 16) + "…")))));
  out.push(el("h2", {}, "Events"), table(["when", "type", "data"], v.events.slice().reverse().map((e) =>
    el("tr", {}, el("td", {class: "muted"}, fmt.time(e.ts)), el("td", {}, e.type), el("td", {}, e.text))), {id: "events"}));
  out.push(el("h2", {}, "Log"), el("pre", {id: "log"}, v.log_tail || "(empty)"));
  return {nodes: out, after: () => {
    const c = v.curves;
    chart("loss", "loss (train, eval)", ["train loss", "eval loss"], [c.loss, c.eval_loss], grid);
    chart("lr", "learning rate", ["learning rate"], [c.learning_rate], grid);
    chart("tps", "tokens / s", ["tokens/s"], [c.tokens_per_s], grid);
  }, done: v.terminal};
}

async function compareView(ids) {
  const {runs} = await api(`compare?ids=${ids.map(encodeURIComponent).join(",")}`);
  const grid = el("div", {class: "charts"});
  return {nodes: [el("h1", {}, "Runs compared"),
                  table(["job", "run", "status"], runs.map((r) => el("tr", {}, el("td", {}, el("a", {href: `#/job/${encodeURIComponent(r.job.id)}`}, r.job.id)),
                                                                     el("td", {}, r.job.run_name || "—"), el("td", {}, status(r.job.status))))),
                  grid],
          after: () => {
            chart("compare", "train loss", runs.map((r) => r.job.run_name || r.job.id), runs.map((r) => r.loss), grid);
            chart("compare_eval", "eval loss", runs.map((r) => r.job.run_name || r.job.id), runs.map((r) => r.eval_loss), grid);
          }};
}

async function sealsView() {
  const {seals} = await api("seals");
  if (!seals.length) return [el("h1", {}, "Seals"), el("p", {class: "muted"}, "No seals yet.")];
  return [el("h1", {}, "Seals"), table(["seal", "created", "runs", "verify", "note"], seals.map((s) => el("tr", {"data-seal": s.seal_id},
      el("td", {}, s.seal_id.slice(0, 19) + "…"), el("td", {class: "muted"}, s.created_at || ""), el("td", {}, s.runs.join(", ")),
      el("td", {class: s.verify.ok ? "ok verify" : "bad verify"},
         s.verify.ok ? `OK (chain of ${s.verify.chain_length})` : s.verify.error || `MISMATCH: ${s.verify.mismatches} file(s)`),
      el("td", {}, s.note || ""))), {id: "seals"}),
    ...seals.map((s) => el("details", {"data-key": s.seal_id}, el("summary", {}, `Retrospective ${s.seal_id.slice(0, 19)}…`), el("pre", {}, s.retrospective)))];
}

// ---- routing and polling ----

// Put the new nodes on the page, keeping each old one that is the same: a table that did not change since the
// last poll is not laid out again (what a page open beside a training run costs it is the browser's time).
function patch(nodes) {
  const old = [...view.children];
  nodes.forEach((node, i) => {
    if (old[i] && old[i].isEqualNode(node)) return;
    if (old[i]) old[i].replaceWith(node); else view.append(node);
  });
  for (const extra of old.slice(nodes.length)) extra.remove();
}

async function render(generation) {
  let shown;
  try {
    const parts = decodeURIComponent(location.hash.slice(1) || "/").split("/").filter(Boolean);
    if (parts[0] === "job" && parts[1]) shown = await jobView(parts[1]);
    else if (parts[0] === "compare" && parts[1]) shown = await compareView(parts[1].split(","));
    else if (parts[0] === "seals") shown = {nodes: await sealsView(), done: true};
    else shown = await jobsView();
    live.classList.add("on");
  } catch (err) {
    if (err === UNCHANGED) { live.classList.add("on"); return settled; }
    shown = [el("div", {class: "error"}, `Could not load: ${err.message}`)];
    live.classList.remove("on");
  }
  if (generation !== current) return false;  // the view changed while this one was on its way: drop it
  const {nodes, after, done} = Array.isArray(shown) ? {nodes: shown} : shown;
  const scroll = window.scrollY;
  const open = new Set([...view.querySelectorAll("details[open]")].map((d) => d.dataset.key));
  for (const c of Object.values(charts)) c.plot.root.remove();
  patch(nodes);
  for (const d of view.querySelectorAll("details")) if (open.has(d.dataset.key)) d.open = true;
  if (after) after();
  window.scrollTo(0, scroll);
  settled = Boolean(done);
  drawn = generation;
  return settled;
}

let current = 0;  // the view's generation: a new hash starts a new one
let settled = false;  // the view on the page shows a job that ended (or the seals): asked again less often
let drawn = -1;  // the generation whose view the page shows
let busy = false, rerun = false;  // one poll at a time; a poll asked for meanwhile runs right after it

async function loop() {
  clearTimeout(timer);
  if (busy) { rerun = true; return; }
  busy = true;
  let done = false;
  try {
    if (!document.hidden) done = await render(current);  // a tab in the background asks nothing
  } finally {
    busy = false;
  }
  if (rerun) { rerun = false; loop(); return; }
  timer = setTimeout(loop, done ? SETTLED_MS : POLL_MS);
}

document.addEventListener("visibilitychange", () => { if (!document.hidden) loop(); });
window.addEventListener("hashchange", () => {
  current += 1;
  etags = {};  // the page is about to be another view: the next reply must be whole
  for (const c of Object.values(charts)) c.plot.destroy();
  charts = {};
  loop();
});
loop();
