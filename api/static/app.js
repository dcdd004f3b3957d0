// ckptd catalog page: runs, a run's checkpoint timeline, a metric chart, tiers, rollback.
// Plain JavaScript, no build step; talks only to /api/v1 of the server that served it.
"use strict";

const API = "/api/v1";
const state = { run: null, checkpoints: [] };
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function banner(text) {
  const b = $("banner");
  b.textContent = text;
  b.style.display = text ? "block" : "none";
}

async function api(path, options = {}) {
  const response = await fetch(API + path, options);
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (_) { /* not JSON */ }
    throw new Error(`${response.status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
  }
  return response.status === 204 ? null : response.json();
}

function formatBytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

async function loadRuns() {
  const list = $("runs");
  list.replaceChildren();
  let cursor = null, total = 0;
  do {
    const page = await api(`/runs?limit=200&sort=name${cursor ? "&cursor=" + encodeURIComponent(cursor) : ""}`);
    for (const run of page.items) {
      const li = el("li", { "data-run": run.name }, run.name, el("div", { class: "muted" },
        `${run.committed} committed · latest step ${run.latest_step ?? "–"} · ${run.status}`));
      li.addEventListener("click", () => selectRun(run.name));
      list.append(li);
      total++;
    }
    cursor = page.next_cursor;
  } while (cursor);
  $("runs-status").textContent = `${total} run${total === 1 ? "" : "s"}`;
  if (!state.run && total) await selectRun(list.firstChild.dataset.run);
}

async function selectRun(name) {
  state.run = name;
  for (const li of $("runs").children) li.classList.toggle("selected", li.dataset.run === name);
  $("run-title").textContent = name;
  const items = [];
  let cursor = null;
  do {
    const q = `/checkpoints?run=${encodeURIComponent(name)}&sort=step&limit=500` +
      (cursor ? "&cursor=" + encodeURIComponent(cursor) : "");
    const page = await api(q);
    items.push(...page.items);
    cursor = page.next_cursor;
  } while (cursor && items.length < 5000);
  state.checkpoints = items;
  const metrics = [...new Set(items.flatMap((c) => Object.keys(c.metrics)))].sort();
  const select = $("metric");
  const previous = select.value;
  select.replaceChildren(...metrics.map((m) => el("option", { value: m }, m)));
  if (metrics.includes(previous)) select.value = previous;
  renderTimeline();
  renderChart();
  await renderRollback();
}

function renderTimeline() {
  const body = $("timeline").tBodies[0];
  body.replaceChildren(...[...state.checkpoints].reverse().map((c) => {
    const tiers = el("td");
    for (const loc of c.locations) tiers.append(el("span", { class: "tier", title: loc.uri }, loc.tier));
    const action = el("td");
    if (c.state === "committed") {
      const b = el("button", { "data-checkpoint": c.id }, "roll back here");
      b.addEventListener("click", () => rollback(c));
      action.append(b);
    }
    const metrics = Object.entries(c.metrics).map(([k, v]) => `${k}=${Number(v).toPrecision(4)}`).join(" ");
    return el("tr", { "data-step": c.step }, el("td", {}, c.step),
      el("td", { class: "state-" + c.state }, c.state), tiers, el("td", {}, formatBytes(c.nbytes)),
      el("td", {}, metrics), el("td", {}, c.tags.join(", ")), action);
  }));
}

function renderChart() {
  const svg = $("chart");
  const ns = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  const metric = $("metric").value;
  const points = state.checkpoints
    .filter((c) => metric in c.metrics && c.state !== "deleted")
    .map((c) => [c.step, c.metrics[metric]]);
  svg.dataset.points = String(points.length);
  if (!points.length) return;
  const W = +svg.getAttribute("width"), H = +svg.getAttribute("height"), pad = 36;
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const sx = (x) => pad + (x1 === x0 ? 0.5 : (x - x0) / (x1 - x0)) * (W - 2 * pad);
  const sy = (y) => H - pad - (y1 === y0 ? 0.5 : (y - y0) / (y1 - y0)) * (H - 2 * pad);
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("id", "metric-line");
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", "#2456c8");
  line.setAttribute("stroke-width", "2");
  line.setAttribute("points", points.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" "));
  svg.append(line);
  for (const [x, y] of points) {
    const dot = document.createElementNS(ns, "circle");
    dot.setAttribute("cx", sx(x).toFixed(1));
    dot.setAttribute("cy", sy(y).toFixed(1));
    dot.setAttribute("r", "3");
    dot.setAttribute("fill", "#2456c8");
    svg.append(dot);
  }
  const label = (x, y, text) => {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", x); t.setAttribute("y", y); t.setAttribute("font-size", "11"); t.textContent = text;
    svg.append(t);
  };
  label(4, 14, `${metric}: ${y1.toPrecision(4)}`);
  label(4, H - pad + 4, y0.toPrecision(4));
  label(pad, H - 8, `step ${x0}`);
  label(W - pad - 60, H - 8, `step ${x1}`);
}

async function renderRollback() {
  const pointer = await api(`/runs/${encodeURIComponent(state.run)}/rollback`);
  $("rollback").textContent = pointer
    ? `rollback requested to step ${pointer.checkpoint.step} at ${pointer.requested_at}`
    : "no rollback requested";
}

async function rollback(checkpoint) {
  const token = $("token").value || sessionStorage.getItem("ckptd-token") || "";
  if (!confirm(`Roll run ${state.run} back to step ${checkpoint.step}?`)) return;
  try {
    await api(`/runs/${encodeURIComponent(state.run)}/rollback`, {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${token}` },
      body: JSON.stringify({ checkpoint_id: checkpoint.id, reason: "requested from the web page" }),
    });
    sessionStorage.setItem("ckptd-token", token);
    banner("");
    await renderRollback();
  } catch (e) {
    banner(`rollback failed: ${e.message}`);
  }
}

$("metric").addEventListener("change", renderChart);
loadRuns().catch((e) => { $("runs-status").textContent = ""; banner(`cannot load runs: ${e.message}`); });
