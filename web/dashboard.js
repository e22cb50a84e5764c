"use strict";
// The token, if the server wants one: from the address's #token=… (never sent to the server as
// part of the address) or typed in, kept for this tab only.
const hash = new URLSearchParams(location.hash.slice(1));
if (hash.get("token")) { sessionStorage.setItem("rowsync-token", hash.get("token")); history.replaceState(null, "", location.pathname); }
const $ = (id) => document.getElementById(id);
const text = (value) => document.createTextNode(value == null ? "" : String(value));

function headers(json) {
  const h = {};
  const token = sessionStorage.getItem("rowsync-token");
  if (token) h["Authorization"] = "Bearer " + token;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

function ago(iso) {
  if (!iso) return "never";
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  return duration(s) + " ago";
}

function duration(s) {
  if (s == null) return "—";
  if (s < 1) return Math.round(s * 1000) + " ms";
  if (s < 90) return s.toFixed(1) + " s";
  if (s < 5400) return Math.round(s / 60) + " min";
  return (s / 3600).toFixed(1) + " h";
}

function cell(row, value, cls) {
  const td = document.createElement("td");
  if (cls) td.className = cls;
  if (value instanceof Node) td.appendChild(value); else td.appendChild(text(value));
  row.appendChild(td);
  return td;
}

function spark(values) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("viewBox", "0 0 60 20");
  svg.setAttribute("preserveAspectRatio", "none");
  const max = Math.max(1, ...values);
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", values.map((v, i) => i + "," + (19 - (v / max) * 18).toFixed(2)).join(" "));
  const title = document.createElementNS(ns, "title");
  title.textContent = "last minute " + (values[values.length - 1] || 0) + ", busiest minute " + Math.max(0, ...values);
  svg.appendChild(title);
  svg.appendChild(line);
  return svg;
}

function fill(id, rows, build, empty) {
  const body = $(id);
  body.replaceChildren();
  if (!rows.length) {
    const tr = document.createElement("tr");
    const td = cell(tr, empty, "quiet");
    td.colSpan = 9;
    body.appendChild(tr);
    return;
  }
  for (const r of rows) { const tr = document.createElement("tr"); build(tr, r); body.appendChild(tr); }
}

function render(d) {
  const s = d.status, h = d.health;
  $("health").textContent = h.status;
  $("health").className = "badge " + h.status;
  $("role").textContent = s.role;
  $("lag").textContent = duration(s.lagSeconds);
  $("sweep").textContent = ago(s.lastSyncTime);
  $("realtime").textContent = s.isRealTimeActive ? "listening" : "polling";
  $("updated").textContent = new Date().toLocaleTimeString();
  const failing = Object.entries(h.checks).filter(([, c]) => !c.ok);
  $("checks").replaceChildren();
  for (const [name, c] of failing) {
    const li = document.createElement("li");
    li.className = c.severity;
    const strong = document.createElement("strong");
    strong.textContent = name + " (" + c.severity + "): ";
    li.appendChild(strong);
    li.appendChild(text(c.message));
    $("checks").appendChild(li);
  }
  for (const advice of h.recommendations) {
    const li = document.createElement("li");
    li.className = "advice";
    li.appendChild(text("What to do: " + advice));
    $("checks").appendChild(li);
  }
  $("checks-section").style.display = failing.length ? "" : "none";

  const tables = Object.entries(s.tables).map(([name, t]) => ({ name, ...t }));
  fill("tables", tables, (tr, t) => {
    cell(tr, t.name);
    cell(tr, duration(t.lagSeconds), "num");
    cell(tr, spark(t.appliedPerMinute || []));
    cell(tr, t.pending == null ? "—" : t.pending, "num");
    cell(tr, t.unresolved, "num" + (t.unresolved ? " failing" : ""));
    cell(tr, t.created + t.updated + t.deleted, "num wide");
    cell(tr, s.owners[t.name] || "this process", "wide");
    cell(tr, t.error ? t.error : "ok", t.error ? "failing" : "quiet");
  }, "no table synced yet");

  $("retry-all").style.display = d.errors.length ? "" : "none";
  fill("errors", d.errors, (tr, e) => {
    cell(tr, e.id, "num");
    cell(tr, e.table);
    cell(tr, e.errorType);
    cell(tr, e.recordId, "key");
    cell(tr, e.message);
    cell(tr, e.retryCount, "num");
    cell(tr, ago(e.lastAttemptAt), "wide");
    const actions = document.createElement("span");
    const retry = document.createElement("button");
    retry.type = "button"; retry.textContent = "Retry now";
    retry.onclick = () => act("/api/errors/retry", { ids: [e.id] });
    const resolve = document.createElement("button");
    resolve.type = "button"; resolve.textContent = "Resolve";
    resolve.onclick = () => {
      const note = prompt("Why is error " + e.id + " resolved? (recorded with it)");
      if (note) act("/api/errors/resolve", { ids: [e.id], note });
    };
    actions.append(retry, " ", resolve);
    cell(tr, actions);
  }, d.errorsUnavailable ? "cannot read sync_errors now: " + d.errorsUnavailable : "none");

  fill("runs", d.runs, (tr, r) => {
    cell(tr, r.kind);
    cell(tr, r.table || "all tables");
    cell(tr, ago(r.startedAt));
    cell(tr, r.durationSeconds == null ? "running" : duration(r.durationSeconds), "num");
    cell(tr, r.created, "num"); cell(tr, r.updated, "num"); cell(tr, r.deleted, "num");
    cell(tr, r.failed, "num" + (r.failed ? " failing" : ""));
    cell(tr, r.error, "wide failing");
  }, d.runsUnavailable ? "cannot read sync_runs now: " + d.runsUnavailable : "none yet");
}

function notice(message) {
  $("notice").textContent = message || "";
  $("notice").style.display = message ? "block" : "none";
}

async function refresh() {
  try {
    const response = await fetch("/api/dashboard", { headers: headers(false), cache: "no-store" });
    if (response.status === 401) { $("login").style.display = "block"; notice("This rowsync wants its HEALTH_TOKEN."); return; }
    if (!response.ok) { notice("rowsync answered " + response.status); return; }
    $("login").style.display = "none";
    notice("");
    render(await response.json());
  } catch (err) {
    notice("rowsync does not answer: " + err);
  }
}

async function act(path, body) {
  const response = await fetch(path, { method: "POST", headers: headers(true), body: JSON.stringify(body) });
  const answer = await response.json().catch(() => ({}));
  if (response.status === 401) $("login").style.display = "block";
  notice(response.ok ? "" : (answer.error || answer.message || "rowsync answered " + response.status));
  refresh();
}

$("retry-all").onclick = () => act("/api/errors/retry", { all: true });
$("login").onsubmit = (event) => { event.preventDefault(); sessionStorage.setItem("rowsync-token", $("token").value); refresh(); };
refresh();
setInterval(refresh, 3000);
