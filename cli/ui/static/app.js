// The trace viewer: plain DOM, no framework, no build step.
// Text from runs is always set with textContent, never parsed as HTML.
"use strict";

const state = { runId: null, openAll: false, timer: null, config: null, open: new Map() };

function el(tag, attrs, ...kids) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const kid of kids.flat()) if (kid !== null && kid !== undefined && kid !== false) node.append(kid);
  return node;
}

async function getJSON(url) {
  const r = await fetch(url);
  if (!r.ok) throw new Error(await r.text());
  return r.json();
}

const fmtUsd = (x) => "$" + (x || 0).toFixed(4);
const fmtNum = (x) => (x || 0).toLocaleString("en-US");
const spendText = (s) => s ? `${fmtUsd(s.usd)} · ${fmtNum(s.tokens)} tokens · ${fmtNum(s.calls)} calls` : "";
const secs = (x) => (x === null || x === undefined) ? "running" : `${x.toFixed(2)} s`;
const badge = (status) => el("span", { class: "badge " + (status || ""), text: status || "?" });

// A <details> that remembers whether the user opened it across live refreshes.
function fold(key, cls, summary, body, openByDefault) {
  const open = state.openAll || (state.open.has(key) ? state.open.get(key) : openByDefault);
  const d = el("details", { class: cls, "data-key": key, open }, el("summary", {}, summary));
  d.addEventListener("toggle", () => state.open.set(key, d.open));
  if (typeof body === "function") {
    // Loaded when first opened (sub-call texts), or at once if already open.
    let loaded = false;
    const load = () => { if (!loaded && d.open) { loaded = true; body(d); } };
    d.addEventListener("toggle", load);
    if (open) queueMicrotask(load);
  } else d.append(...[body].flat().filter(Boolean));
  return d;
}

function pre(text, cls) { return el("pre", { class: cls || "" , text }); }

function chart(run) {
  const pts = run.series || [];
  if (pts.length === 0) return el("p", { class: "muted", text: "no spend yet" });
  const useUsd = pts[pts.length - 1].usd > 0;
  const t0 = Date.parse(run.started_at), t1 = Math.max(Date.parse(pts[pts.length - 1].at), t0 + 1);
  const vmax = Math.max(...pts.map((p) => (useUsd ? p.usd : p.tokens)), 1e-12);
  const W = 600, H = 100;
  const xy = [[0, H]].concat(pts.map((p) => [
    ((Date.parse(p.at) - t0) / (t1 - t0)) * W, H - ((useUsd ? p.usd : p.tokens) / vmax) * (H - 12),
  ]));
  const svgNS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(svgNS, "svg");
  svg.setAttribute("class", "chart"); svg.setAttribute("viewBox", `0 0 ${W} ${H}`); svg.setAttribute("preserveAspectRatio", "none");
  const line = document.createElementNS(svgNS, "polyline");
  line.setAttribute("points", xy.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(" "));
  svg.append(line);
  const label = `${useUsd ? fmtUsd(vmax) : fmtNum(vmax) + " tokens"} after ${((t1 - t0) / 1000).toFixed(1)} s`;
  return el("div", { class: "chart-box" }, el("div", { class: "lbl", text: "Spend over time: " + label }), svg);
}

function itemNode(run, batch, item) {
  const key = `${run.workflow_id}|${batch.id}|${item.index}`;
  if (item.child) {
    return fold(key, "child", [
      `[${item.index}] child run `, badge(item.child.status), " ", item.child.question || "",
      el("span", { class: "spend", text: "  " + spendText(item.child.spend) }),
    ], runBody(item.child), false);
  }
  const state_ = item.answer_error || item.error ? "error" : item.state;
  const head = [`[${item.index}] ${item.model || "-"} `, badge(state_), " ",
    el("span", { class: "spend", text: `${spendText(item.spend)} · ${secs(item.seconds)} · ` }),
    (item.prompt || "").slice(0, 80)];
  return fold(key, "item" + (state_ === "error" ? " bad" : ""), head, async (d) => {
    let prompt = item.prompt, reply = item.reply, error = item.answer_error || item.error;
    if (item.more) {
      const body = el("p", { class: "muted", text: "loading…" });
      d.append(body);
      try {
        const full = await getJSON(`/api/item?id=${encodeURIComponent(run.workflow_id)}&batch=${encodeURIComponent(batch.id)}&index=${item.index}`);
        prompt = full.prompt; reply = full.reply; error = full.error;
      } catch (e) { error = "could not load: " + e.message; }
      body.remove();
    }
    d.append(el("div", { class: "lbl", text: "prompt" }), pre(prompt || ""));
    if (error) d.append(el("div", { class: "lbl", text: "error" }), pre(error, "err"));
    else d.append(el("div", { class: "lbl", text: "reply" }), pre(reply || "", "reply"));
  }, false);
}

function batchNode(run, batch) {
  const call = batch.kind === "rlm" ? "rlm_query" : "llm_query";
  const head = [`${call} × ${batch.count} · ${(batch.models || []).join(", ") || "-"} · `,
    badge(batch.errors ? `${batch.errors} errors` : "ok"),
    el("span", { class: "spend", text: `  ${spendText(batch.spend)} · ${secs(batch.seconds)}` })];
  if (batch.errors) head[1].className = "badge error";
  return fold(`${run.workflow_id}|${batch.id}`, "batch", head,
    [batch.refused ? pre("refused: " + batch.refused, "err") : null, ...batch.items.map((i) => itemNode(run, batch, i))],
    batch.kind === "rlm");
}

function outputNode(cell) {
  if (!cell.output_key) return null;
  const target = el("div");
  const link = el("a", { href: "#", text: "load the full output", onclick: async (ev) => {
    ev.preventDefault();
    const r = await fetch(`/api/text?key=${encodeURIComponent(cell.output_key)}`);
    target.replaceChildren(pre(await r.text()));
  } });
  return el("div", {}, link, target);
}

function cellNode(run, cell) {
  const st = cell.state === "running" || cell.state === "scheduled" ? "running" : cell.error ? "error" : cell.limit ? "limit" : "ok";
  const head = [`cell ${cell.id} `, badge(st), el("span", { class: "spend", text: `  ${secs(cell.duration_s ?? cell.seconds)}` +
    (cell.spend && cell.spend.calls ? " · " + spendText(cell.spend) : "") })];
  return fold(`${run.workflow_id}|${cell.id}`, "cell" + (st === "error" ? " bad" : ""), head, [
    el("div", { class: "lbl", text: "code" }), pre(cell.code || "", "code"),
    cell.output ? [el("div", { class: "lbl", text: "output" + (cell.output_cut ? " (cut)" : "") }), pre(cell.output, "out")] : null,
    outputNode(cell),
    cell.error ? [el("div", { class: "lbl", text: "error" }), pre(cell.error, "err")] : null,
    cell.limit ? [el("div", { class: "lbl", text: "limit" }), pre(cell.limit, "err")] : null,
    cell.final !== null && cell.final !== undefined ? [el("div", { class: "lbl", text: "FINAL" }), pre(cell.final)] : null,
    ...(cell.batches || []).map((b) => batchNode(run, b)),
  ].flat(), true);
}

function turnNode(run, turn) {
  const tokens = `${fmtNum(turn.prompt_tokens)} in / ${fmtNum(turn.completion_tokens)} out`;
  const head = [`Turn ${turn.turn} · ${turn.model || "-"} · ${tokens} `,
    el("span", { class: "spend", text: `  ${spendText(turn.spend)} · ${secs(turn.seconds)}` })];
  const reply = turn.error ? pre(turn.error, "err") : pre(turn.reply ?? "(waiting for the model)", "reply");
  return fold(`${run.workflow_id}|turn${turn.turn}`, "turn", head,
    [el("div", { class: "lbl", text: "reply" }), reply, ...(turn.cells || []).map((c) => cellNode(run, c))], true);
}

function runBody(run) {
  const ctx = run.context || {}, models = run.models || {}, caps = run.caps || {};
  const rows = [
    ["question", run.question], ["status", [badge(run.status), run.reason ? " " + run.reason : ""]],
    ["answer", run.answer ?? "—"], ["spend", spendText(run.spend)],
    ["context", `${fmtNum(ctx.total_chars)} chars in ${fmtNum(ctx.doc_count)} document(s)`],
    ["models", `root ${models.root}, sub ${models.sub || models.root}`],
    ["caps", Object.entries(caps).filter(([, v]) => v !== null).map(([k, v]) => `${k} ${v}`).join(", ")],
  ];
  if (run.progress) rows.push(["now", `turn ${run.progress.turn} of ${run.progress.max_turns} · ${run.progress.phase} · ${run.progress.open_subcalls || 0} sub-calls open`]);
  rows.push(["temporal", el("a", { href: run.ui, target: "_blank", rel: "noopener", text: run.workflow_id })]);
  const kv = el("div", { class: "kv" }, ...rows.flatMap(([k, v]) => [el("b", { text: k }), el("span", {}, v)]));
  return [el("div", { class: "card" }, kv, chart(run)), ...(run.turns || []).map((t) => turnNode(run, t))];
}

async function showRun(id) {
  clearTimeout(state.timer);
  const main = document.getElementById("run");
  let run;
  try { run = await getJSON(`/api/run?id=${encodeURIComponent(id)}`); }
  catch (e) { main.replaceChildren(el("p", { class: "err", text: "could not load the run: " + e.message })); return; }
  if (id !== state.runId) return;
  main.replaceChildren(el("h2", {}, "Run ", el("code", { text: run.workflow_id }), " ", badge(run.status)), ...runBody(run));
  main.dataset.status = run.status;
  document.querySelectorAll("#run-list li").forEach((li) => li.classList.toggle("sel", li.dataset.id === id));
  if (run.status === "running") state.timer = setTimeout(() => showRun(id), 2000);  // live while it runs
}

async function listRuns() {
  const ul = document.getElementById("run-list");
  try {
    const { runs } = await getJSON("/api/runs");
    ul.replaceChildren(...(runs.length ? runs.map((r) => el("li", { "data-id": r.workflow_id, class: r.workflow_id === state.runId ? "sel" : "",
      onclick: () => { location.hash = "run=" + encodeURIComponent(r.workflow_id); } },
      el("span", { class: "q", text: r.question || "(no question)" }), badge(r.status), " ", el("span", { class: "id", text: r.workflow_id })))
      : [el("li", { class: "muted", text: "no runs yet" })]));
  } catch (e) { ul.replaceChildren(el("li", { class: "muted", text: "cannot list runs: " + e.message })); }
  setTimeout(listRuns, 5000);
}

function route() {
  const params = new URLSearchParams(location.hash.slice(1));
  state.openAll = params.get("open") === "all";
  const id = params.get("run");
  if (id && id !== state.runId) { state.runId = id; state.open.clear(); showRun(id); }
}

window.addEventListener("hashchange", route);
listRuns();
route();
