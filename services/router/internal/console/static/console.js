// Tessera grid console: polls /console/api/state and draws it. Every text
// from the grid goes into the page as text, never as markup.
"use strict";

const POLL_MS = 1000;
const SVG = "http://www.w3.org/2000/svg";
const STAGE_COLOURS = ["#2f6fdf", "#1f9d55", "#d98b00", "#7a5af8", "#d0342c", "#0e9384", "#c11574", "#667085"];

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function bytes(n) {
  if (!n) return "0 B";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (n >= 100 || i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
}

function ago(t, now) {
  const s = Math.max(0, (now - new Date(t)) / 1000);
  if (s < 1) return "now";
  if (s < 90) return s.toFixed(0) + " s ago";
  if (s < 5400) return (s / 60).toFixed(0) + " min ago";
  return (s / 3600).toFixed(1) + " h ago";
}

function clock(t) {
  return new Date(t).toLocaleTimeString([], { hour12: false });
}

function badge(text, kind) {
  return el("span", { class: "badge " + (kind || text) }, text);
}

function bar(pct, label, cls) {
  const b = el("div", { class: "bar " + (cls || "") });
  const fill = el("i");
  fill.style.width = Math.max(0, Math.min(100, pct)).toFixed(1) + "%";
  b.append(fill, el("b", {}, label));
  return b;
}

function card(label, value, sub) {
  return el("div", { class: "card" }, el("div", { class: "label" }, label), el("div", { class: "value" }, value), el("div", { class: "sub" }, sub || ""));
}

function drawCards(st) {
  const ready = st.states.ready || 0;
  const devices = Object.entries(st.devices).map(([k, n]) => n + " " + k.toUpperCase() + (n === 1 ? "" : "s")).join(", ");
  const s = st.settlement;
  const lag = s.ok ? s.lag_events + " events" : "no answer";
  const lagSub = s.ok ? s.lag_seconds.toFixed(1) + " s behind the stream" : (s.error || "");
  const versions = st.models.filter(m => m.plan).map(m => m.id + " v" + m.plan.version).join(", ");
  const recentFailures = st.failures.length + st.dead_letters.length +
    st.membership.filter(e => e.kind !== "joined").length;
  document.getElementById("cards").replaceChildren(
    card("Nodes", ready + " / " + st.nodes.length, "ready / live"),
    card("Devices", String(Object.values(st.devices).reduce((a, b) => a + b, 0)), devices || "none"),
    card("Throughput", st.throughput.last_minute_tok_s.toFixed(1) + " tok/s", "last minute · " + st.throughput.last_10s_tok_s.toFixed(1) + " tok/s last 10 s"),
    card("Settlement lag", lag, lagSub),
    card("Plans", String(st.models.length), versions || "no plan yet"),
    card("Failures and changes", String(recentFailures), "failovers, dead letters, membership"),
  );
}

function drawNodes(st) {
  const now = new Date(st.time);
  const rows = st.nodes.map(n => {
    const devs = el("div");
    for (const d of n.devices) {
      const used = d.memory_total_bytes - d.memory_free_bytes;
      const memPct = d.memory_total_bytes ? 100 * used / d.memory_total_bytes : 0;
      devs.append(el("div", { class: "device" },
        el("span", { class: "name", title: d.name }, d.kind.toUpperCase() + " " + d.index + " · " + d.name),
        bar(d.utilization_pct, d.error ? "error: " + d.error : d.utilization_pct.toFixed(0) + "% busy"),
        bar(memPct, bytes(used) + " / " + bytes(d.memory_total_bytes), "mem")));
    }
    const state = el("td", {}, badge(n.state));
    if (n.quarantine_reason) state.append(el("div", { class: "sub" }, n.quarantine_reason));
    return el("tr", { "data-node": n.id },
      el("td", { class: "mono" }, n.id, el("div", { class: "sub" }, n.supplier)),
      state,
      el("td", {}, n.region),
      el("td", {}, devs),
      el("td", { class: "num" }, String(n.queue_depth)),
      el("td", { class: "num" }, String(n.fragments)),
      el("td", { class: "num" }, n.kv_tokens_free.toLocaleString()),
      el("td", {}, ago(n.last_seen, now)));
  });
  document.querySelector("#nodes tbody").replaceChildren(...rows);
  document.getElementById("nodes-empty").hidden = st.nodes.length > 0;
}

function drawPlan(m) {
  const p = m.plan;
  const box = el("div", { class: "plan", "data-model": m.id });
  box.append(el("h3", {}, m.id, el("small", {},
    "plan v" + p.version + " · " + p.strategy + " · " + m.layers + " layers" + (m.experts ? " · " + m.experts + " experts" : "") +
    " · expected " + p.throughput_tok_s.toFixed(0) + " tok/s" + (p.reason ? " · " + p.reason : ""))));
  const cols = m.layers + 2; // embedding, layers, head
  const cell = Math.max(8, Math.min(26, Math.floor(900 / cols)));
  const label = 130;
  const rows = [...p.assignments].sort((a, b) => a.first - b.first || a.node.localeCompare(b.node));
  const width = label + cols * cell + 260;
  const height = 22 + rows.length * (cell + 4);
  const s = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "plan of " + m.id });
  // Column heads: E, layer numbers (every few when dense), H.
  const every = cell >= 16 ? 1 : Math.ceil(16 / cell);
  s.append(svg("text", { x: label + cell / 2, y: 12, "text-anchor": "middle", class: "axis" }, "E"));
  for (let l = 0; l < m.layers; l++) {
    if (l % every === 0) s.append(svg("text", { x: label + (l + 1.5) * cell, y: 12, "text-anchor": "middle", class: "axis" }, String(l)));
  }
  s.append(svg("text", { x: label + (cols - 0.5) * cell, y: 12, "text-anchor": "middle", class: "axis" }, "H"));
  const stageOf = (first, end) => p.stages.findIndex(st => st.first === first && st.end === end);
  rows.forEach((a, i) => {
    const y = 20 + i * (cell + 4);
    const stage = stageOf(a.first, a.end);
    const colour = STAGE_COLOURS[(stage < 0 ? i : stage) % STAGE_COLOURS.length];
    s.append(svg("text", { x: 0, y: y + cell * 0.7 }, a.node));
    for (let c = 0; c < cols; c++) {
      const held = c === 0 ? a.embed : c === cols - 1 ? a.head : (c - 1 >= a.first && c - 1 < a.end);
      const r = svg("rect", { x: label + c * cell + 1, y, width: cell - 2, height: cell, rx: 2,
        fill: held ? colour : "#eef0f3" });
      if (held) r.append(svg("title", {}, a.node + (c === 0 ? " · embedding" : c === cols - 1 ? " · head" : " · layer " + (c - 1))));
      s.append(r);
    }
    const layers = a.end - a.first === 1 ? "layer " + a.first : "layers " + a.first + "–" + (a.end - 1);
    const note = layers + (a.embed ? " + embedding" : "") + (a.head ? " + head" : "") + (a.experts && a.experts.length ? " · experts " + a.experts.join(",") : "");
    s.append(svg("text", { x: label + cols * cell + 8, y: y + cell * 0.7, class: "axis" }, note));
  });
  box.append(s);
  return box;
}

function drawPlans(st) {
  const out = st.models.filter(m => m.plan).map(drawPlan);
  if (out.length === 0) out.push(el("p", { class: "empty" }, "No model has a plan yet."));
  document.getElementById("plans").replaceChildren(...out);
}

function drawThroughput(st) {
  const per = st.throughput.per_second;
  const w = 600, h = 120, pad = 24;
  const max = Math.max(1, ...per);
  const s = svg("svg", { width: "100%", viewBox: `0 0 ${w} ${h + 20}`, role: "img", "aria-label": "tokens per second" });
  const bw = (w - pad) / per.length;
  per.forEach((v, i) => {
    const bh = (h - 10) * v / max;
    const r = svg("rect", { x: pad + i * bw + 1, y: h - bh, width: Math.max(1, bw - 2), height: bh, fill: "#2f6fdf" });
    r.append(svg("title", {}, v + " tok/s, " + (per.length - i) + " s ago"));
    s.append(r);
  });
  s.append(svg("line", { x1: pad, y1: h, x2: w, y2: h, stroke: "#98a2b3" }));
  s.append(svg("text", { x: 0, y: 12, class: "axis" }, String(max)));
  s.append(svg("text", { x: 0, y: h, class: "axis" }, "0"));
  s.append(svg("text", { x: pad, y: h + 16, class: "axis" }, "−60 s"));
  s.append(svg("text", { x: w, y: h + 16, "text-anchor": "end", class: "axis" }, "now"));
  document.getElementById("throughput").replaceChildren(s,
    el("div", {}, st.throughput.last_minute_tok_s.toFixed(1) + " tok/s over the last minute, " + st.throughput.last_10s_tok_s.toFixed(1) + " over the last 10 s"));
}

function drawSettlement(st) {
  const s = st.settlement;
  const box = document.getElementById("settlement");
  if (!s.ok) {
    box.replaceChildren(el("div", { class: "settle" }, el("div", { class: "big down-note" }, "not answering"), el("div", {}, s.error || "")));
    return;
  }
  const dead = Object.entries(s.dead_lettered || {}).map(([r, n]) => r + " " + n).join(", ") || "none";
  const dl = el("dl");
  for (const [k, v] of [["settled events", s.settled_events.toLocaleString()], ["position (USAGE seq)", String(s.position_seq)],
    ["lag", s.lag_events + " events · " + s.lag_seconds.toFixed(1) + " s"], ["insert errors", String(s.insert_errors)], ["dead-lettered", dead]]) {
    dl.append(el("dt", {}, k), el("dd", {}, v));
  }
  box.replaceChildren(el("div", { class: "settle" },
    el("div", { class: "big" }, s.lag_events === 0 ? "up to date" : s.lag_events + " behind"), dl));
}

function drawEvents(st) {
  const now = new Date(st.time);
  const ev = [];
  for (const e of st.membership) ev.push({ t: e.time, kind: e.kind, what: "node " + e.node, detail: e.reason || "" });
  for (const e of st.plan_events) ev.push({ t: e.time, kind: "plan", label: "re-plan", what: e.model + " v" + e.version, detail: (e.reason || "") + " · " + e.nodes + " nodes · " + bytes(e.moved_bytes) + " moved" });
  for (const e of st.failures) ev.push({ t: e.time, kind: "failover", what: "request " + e.request + (e.node ? " on " + e.node : ""), detail: e.error });
  for (const e of st.dead_letters) ev.push({ t: e.time, kind: "dead-letter", label: "dead letter", what: e.service + " · " + e.reason, detail: e.error + (e.subject ? " (" + e.subject + ")" : "") });
  ev.sort((a, b) => new Date(b.t) - new Date(a.t));
  const rows = ev.slice(0, 40).map(e => el("tr", { "data-kind": e.kind },
    el("td", { title: ago(e.t, now) }, clock(e.t)), el("td", {}, badge(e.label || e.kind, e.kind)), el("td", { class: "mono" }, e.what), el("td", {}, e.detail)));
  document.querySelector("#events tbody").replaceChildren(...rows);
  document.getElementById("events-empty").hidden = rows.length > 0;
}

async function poll() {
  const status = document.getElementById("status");
  let st;
  try {
    const r = await fetch("api/state", { cache: "no-store" });
    if (!r.ok) throw new Error("HTTP " + r.status);
    st = await r.json();
  } catch (err) {
    status.className = "status down";
    status.textContent = "router not answering: " + err.message;
    setTimeout(poll, POLL_MS);
    return;
  }
  try {
    drawCards(st);
    drawNodes(st);
    drawPlans(st);
    drawThroughput(st);
    drawSettlement(st);
    drawEvents(st);
    status.className = "status live";
    status.textContent = "live · " + clock(st.time);
    document.body.dataset.updated = st.time;
  } catch (err) {
    status.className = "status down";
    status.textContent = "cannot draw the grid's state: " + err.message;
  }
  setTimeout(poll, POLL_MS);
}

poll();
