// CloudAI web page: fills and refreshes the server-rendered pages from the JSON API (/v1).
// Every value from the server goes into the page with textContent / createTextNode, never innerHTML.
"use strict";

const TERMINAL = new Set(["completed", "failed", "cancelled", "timeout", "lost"]);
const GiB = 1024 ** 3;
let clockSkew = 0; // server time minus this browser's time, from the Date header

function csrfToken() {
  const meta = document.querySelector('meta[name="csrf-token"]');
  if (meta && meta.content) return meta.content;
  const m = document.cookie.match(/(?:^|;\s*)cloudai_csrf=([^;]+)/);
  return m ? decodeURIComponent(m[1]) : "";
}

// A JSON API call with the session cookie (and the CSRF header on unsafe methods); throws Error(message).
async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (method !== "GET") headers["X-CSRF-Token"] = csrfToken();
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, { method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body) });
  const date = resp.headers.get("Date");
  if (date) clockSkew = Date.parse(date) - Date.now();
  if (resp.status === 401) { location.href = "/login?next=" + encodeURIComponent(location.pathname + location.search); }
  let data = null;
  try { data = await resp.json(); } catch (e) { data = null; }
  if (!resp.ok) {
    const err = new Error((data && data.error && data.error.message) || `${resp.status} ${resp.statusText}`);
    err.status = resp.status;
    throw err;
  }
  return data;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "-";
  for (const [unit, scale] of [["TiB", 1024 ** 4], ["GiB", GiB], ["MiB", 1024 ** 2], ["KiB", 1024]]) {
    if (n >= scale) return `${+(n / scale).toPrecision(4)} ${unit}`;
  }
  return `${n} B`;
}

function fmtWhen(iso) {
  if (!iso) return "-";
  return new Date(iso).toISOString().replace("T", " ").slice(0, 19) + " UTC";
}

function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || isNaN(seconds)) return "-";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h${String(Math.floor(s % 3600 / 60)).padStart(2, "0")}m`;
  return `${Math.floor(s / 86400)}d${Math.floor(s % 86400 / 3600)}h`;
}

function now() { return Date.now() + clockSkew; }
function since(iso) { return iso ? (now() - Date.parse(iso)) / 1000 : null; }
function duration(t) {
  if (!t.started_at) return null;
  const end = t.completed_at ? Date.parse(t.completed_at) : now();
  return (end - Date.parse(t.started_at)) / 1000;
}

function limits(t) {
  let text = `${+t.req_cpu} CPU · ${fmtBytes(t.memory_bytes)}`;
  if (t.timeout_s) text += ` · ${fmtDuration(t.timeout_s)}`;
  return text;
}

// What a finished task came to: "exit 0", "OOM (limit 64 MiB)", "timeout", the error message.
function result(t) {
  if (!TERMINAL.has(t.status)) return t.status === "pending" && t.pending_reason ? t.pending_reason : "";
  const parts = [];
  if (t.exit_code !== null && t.exit_code !== undefined) parts.push(`exit ${t.exit_code}`);
  const message = t.error && t.error.message;
  if (t.oom_killed) parts.push(`OOM (limit ${fmtBytes(t.memory_bytes)})`);
  else if (t.status === "timeout") parts.push(message || "timeout");
  // otherwise the reason, unless the exit code already said it ("exited with code 3")
  else if (message && !message.startsWith("exited with code")) parts.push(message);
  return parts.join(" · ");
}

function statusBadge(status) { return el("span", { class: `status s-${status}` }, status); }

function showError(id, message) {
  const box = document.getElementById(id);
  if (box) box.textContent = message || "";
}

// Poll fn every ms; also at once, and when the tab comes back into view.
function every(ms, fn) {
  let timer = null;
  const run = async () => {
    clearTimeout(timer);
    try { if (!document.hidden) await fn(); } finally { timer = setTimeout(run, ms); }
  };
  document.addEventListener("visibilitychange", () => { if (!document.hidden) run(); });
  run();
}

function stamp() {
  const u = document.getElementById("updated");
  if (u) u.textContent = "updated " + new Date().toLocaleTimeString();
}

// ---- tasks page ------------------------------------------------------------------------------------------
function initTasks() {
  const admin = document.body.dataset.admin === "true";
  const form = document.getElementById("filters");
  const statusSel = document.getElementById("f-status");
  const userInput = document.getElementById("f-user");
  const rows = document.getElementById("task-rows");
  const refresh = async () => {
    const q = new URLSearchParams({ limit: "200" });
    if (statusSel.value) q.set("status", statusSel.value);
    if (admin) q.set("user", (userInput.value || "all").trim());
    try {
      const tasks = await api("GET", "/v1/tasks?" + q);
      rows.replaceChildren(...tasks.map((t) => taskRow(t, admin)));
      document.getElementById("empty").hidden = tasks.length > 0;
      showError("list-error", "");
      stamp();
    } catch (e) { showError("list-error", e.message); }
  };
  const changed = () => {
    const q = new URLSearchParams();
    if (statusSel.value) q.set("status", statusSel.value);
    if (admin && userInput.value && userInput.value !== "all") q.set("user", userInput.value);
    history.replaceState(null, "", q.toString() ? "?" + q : location.pathname);
    refresh();
  };
  form.addEventListener("submit", (e) => { e.preventDefault(); changed(); });
  statusSel.addEventListener("change", changed);
  if (userInput) userInput.addEventListener("change", changed);
  every(3000, refresh);
}

function taskRow(t, admin) {
  const link = el("a", { href: "/tasks/" + encodeURIComponent(t.task_id), class: "mono" }, t.task_id);
  const cells = [
    el("td", { "data-label": "ID" }, link),
    el("td", { "data-label": "Name" }, t.name || ""),
  ];
  if (admin) cells.push(el("td", { "data-label": "User" }, t.user_id));
  cells.push(
    el("td", { "data-label": "Status" }, statusBadge(t.status)),
    el("td", { "data-label": "Worker" }, t.worker_id || "-"),
    el("td", { "data-label": "Limits" }, limits(t)),
    el("td", { "data-label": "GPUs" }, t.gpu_ids && t.gpu_ids.length ? t.gpu_ids.join(",") : String(t.req_gpu || 0)),
    el("td", { "data-label": "Age", title: fmtWhen(t.created_at) }, fmtDuration(since(t.created_at))),
    el("td", { "data-label": "Duration" }, fmtDuration(duration(t))),
    el("td", { "data-label": "Result", class: t.oom_killed || t.status === "timeout" ? "bad" : "" }, result(t)),
  );
  return el("tr", { "data-task-id": t.task_id, "data-status": t.status }, ...cells);
}

// ---- task page -------------------------------------------------------------------------------------------
function initTask() {
  const taskId = document.body.dataset.taskId;
  const base = "/v1/tasks/" + encodeURIComponent(taskId);
  const log = document.getElementById("log");
  const state = document.getElementById("log-state");
  const followBtn = document.getElementById("follow");
  const cancel = document.getElementById("cancel");
  let lastSeq = 0;
  let lines = 0;
  let ended = false;
  let source = null;
  let following = true;

  const atBottom = () => log.scrollHeight - log.scrollTop - log.clientHeight < 8;
  log.addEventListener("scroll", () => { following = atBottom(); followBtn.hidden = following; });
  followBtn.addEventListener("click", () => { following = true; log.scrollTop = log.scrollHeight; followBtn.hidden = true; });

  const setField = (name, text) => {
    for (const node of document.querySelectorAll(`[data-field="${name}"]`)) node.textContent = text;
  };
  const showTask = (t) => {
    const badge = document.querySelector('[data-field="status"]');
    badge.textContent = t.status;
    badge.className = `status s-${t.status}`;
    document.body.dataset.status = t.status;
    setField("gpu_ids", t.gpu_ids && t.gpu_ids.length ? t.gpu_ids.join(", ") : "-");
    setField("worker_id", t.worker_id || "-");
    setField("attempt", t.retries ? `${t.attempt} of ${t.retries + 1}` : String(t.attempt));
    setField("started_at", fmtWhen(t.started_at));
    setField("completed_at", fmtWhen(t.completed_at));
    setField("pending_reason", t.pending_reason || "");
    document.querySelector('[data-field="pending_box"]').hidden = !(t.status === "pending" && t.pending_reason);
    if (TERMINAL.has(t.status)) { cancel.hidden = true; banner(t); loadOutputs(); }
  };
  // the files the task's --output paths stored, once it has ended (the worker stores them before the end)
  const loadOutputs = async () => {
    const box = document.getElementById("outputs");
    if (!box || box.dataset.loaded === "true") return;
    box.dataset.loaded = "true";
    try {
      const found = await api("GET", base + "/artifacts");
      const items = found.artifacts.map((a) => el("li", {},
        el("a", { class: "mono", href: base + "/artifacts/" + a.path.replace(/^\/+/, "").split("/").map(encodeURIComponent).join("/"), download: "" }, a.path),
        " ", el("span", { class: "muted" }, `${fmtBytes(a.size)} · sha256 `, el("span", { class: "mono" }, a.sha256.slice(0, 16) + "…"))));
      document.getElementById("artifact-list").replaceChildren(...(items.length ? items : [el("li", { class: "muted" }, "nothing stored")]));
    } catch (e) { box.dataset.loaded = "false"; showError("task-error", e.message); }
  };
  const banner = (t) => {
    const box = document.getElementById("banner");
    box.className = `banner s-${t.status}`;
    const detail = result(t);
    box.replaceChildren(el("strong", {}, t.status), detail ? ` · ${detail}` : "");
    box.hidden = false;
  };
  const refreshTask = async () => {
    try { showTask(await api("GET", base)); showError("task-error", ""); }
    catch (e) { showError("task-error", e.message); }
  };

  const append = (text) => {
    const follow = following;
    log.append(document.createTextNode(text));
    if (follow) log.scrollTop = log.scrollHeight;
  };
  // The SSE stream: history then live. The browser reconnects by itself with Last-Event-ID (the server
  // resumes after it with no gap or duplicate); when it gives up (an error status), we reopen after lastSeq.
  const open = () => {
    const url = base + "/logs?follow=true" + (lastSeq ? "&after=" + lastSeq : "");
    source = new EventSource(url, { withCredentials: true });
    source.onopen = () => { state.textContent = ended ? "" : "live"; };
    source.onmessage = (ev) => {
      const seq = parseInt(ev.lastEventId, 10);
      if (!isNaN(seq)) { if (seq <= lastSeq) return; lastSeq = seq; }
      const batch = ev.data.split("\n");
      lines += batch.length;
      log.dataset.lines = String(lines);
      append(batch.join("\n") + "\n");
    };
    source.addEventListener("end", (ev) => {
      ended = true;
      source.close();
      state.textContent = `${lines} line${lines === 1 ? "" : "s"} · ended`;
      log.dataset.ended = "true";
      refreshTask();
    });
    source.onerror = () => {
      if (ended) return;
      if (source.readyState === EventSource.CLOSED) {
        // the browser gave up (an HTTP error): ask why once; a lost sign-in goes to the login page (api does),
        // a task that is gone stops here, anything else (the server restarting) is retried
        state.textContent = "disconnected; retrying…";
        api("GET", base).then(() => setTimeout(open, 2000), (err) => {
          if (err.status === 404) { state.textContent = "this task is gone"; }
          else if (err.status !== 401) { setTimeout(open, 2000); }
        });
      } else {
        state.textContent = "reconnecting…";
      }
    };
  };
  open();

  cancel.addEventListener("click", async () => {
    if (!confirm(`Cancel task ${taskId}? A running container is stopped.`)) return;
    cancel.disabled = true;
    cancel.textContent = "Cancelling…";
    try { showTask(await api("POST", base + "/cancel")); showError("task-error", ""); }
    catch (e) { showError("task-error", e.message); cancel.disabled = false; cancel.textContent = "Cancel"; }
  });
  every(2000, async () => { if (!TERMINAL.has(document.body.dataset.status)) await refreshTask(); });
}

// ---- workers page ----------------------------------------------------------------------------------------
function initWorkers() {
  const admin = document.body.dataset.admin === "true";
  const box = document.getElementById("workers");
  const refresh = async () => {
    try {
      const [workers, live] = await Promise.all([
        api("GET", "/v1/workers"),
        api("GET", "/v1/tasks?user=all&status=queued&status=running&limit=1000"),
      ]);
      const byWorker = {};
      for (const t of live) (byWorker[t.worker_id] = byWorker[t.worker_id] || []).push(t);
      box.replaceChildren(...workers.map((w) => workerCard(w, byWorker[w.worker_id] || [], admin, refresh)));
      document.getElementById("empty").hidden = workers.length > 0;
      showError("list-error", "");
      stamp();
    } catch (e) { showError("list-error", e.message); }
  };
  every(5000, refresh);
}

function meter(label, used, total, text) {
  const pct = total > 0 ? Math.min(100, (100 * used) / total) : 0;
  const fill = el("span", { class: "fill" + (pct >= 90 ? " full" : "") });
  fill.style.width = pct.toFixed(1) + "%";
  return el("div", { class: "meter-row" },
    el("span", { class: "meter-label" }, label),
    el("span", { class: "meter", role: "meter", "aria-valuemin": "0", "aria-valuemax": String(total),
      "aria-valuenow": String(used), "aria-label": label }, fill),
    el("span", { class: "meter-text" }, text));
}

function workerCard(w, tasks, admin, refresh) {
  const state = w.alive ? w.state : "offline";
  const gpus = w.gpu_ids.length;
  const head = el("div", { class: "card-head" },
    el("h2", { class: "mono" }, w.worker_id), el("span", { class: `status w-${state}` }, state),
    el("span", { class: "muted" }, `heartbeat ${fmtDuration(w.heartbeat_age_s)} ago`));
  // a user sees their own tasks' use of a worker (other users' load is theirs); an admin sees everyone's
  const yours = w.usage_of ? " (yours)" : "";
  const room = w.has_room === false ? " · full" : w.has_room ? " · has room" : "";
  const card = el("section", { class: "card worker", "data-worker-id": w.worker_id }, head,
    el("p", { class: "muted" },
      `${w.hostname} · ${w.tasks} live task${w.tasks === 1 ? "" : "s"}${w.usage_of ? " of yours" : ""}${room}`),
    meter("CPU" + yours, w.used_cpus, w.cpus, `${+w.used_cpus.toFixed(3)} / ${+w.cpus} cores`),
    meter("Memory" + yours, w.used_memory, w.memory, `${fmtBytes(w.used_memory)} / ${fmtBytes(w.memory)}`),
    meter("GPU" + yours, w.used_gpu_ids.length, gpus,
      gpus ? `${w.used_gpu_ids.length} / ${gpus} (${w.gpu_ids.join(", ")})` : "none"));
  const labels = Object.entries(w.labels || {});
  if (labels.length) {
    card.append(el("p", { class: "labels" }, ...labels.map(([k, v]) => el("span", { class: "label" }, `${k}=${v}`))));
  }
  const volumes = Object.entries(w.volumes || {});  // name and mode only: host paths never leave the worker
  if (volumes.length) {
    card.append(el("p", { class: "volumes" }, "Volumes: ",
      ...volumes.map(([name, mode]) => el("span", { class: "label volume" }, `${name} (${mode})`))));
  }
  if (tasks.length) {
    card.append(el("p", { class: "running" }, "Tasks: ",
      ...tasks.flatMap((t, i) => [i ? ", " : "",
        el("a", { href: "/tasks/" + encodeURIComponent(t.task_id), class: "mono" }, t.task_id), ` (${t.status})`])));
  }
  if (admin) {
    const draining = w.state === "draining";
    const btn = el("button", { type: "button", class: "secondary" }, draining ? "Undrain" : "Drain");
    btn.addEventListener("click", async () => {
      btn.disabled = true;
      try {
        await api("POST", `/v1/workers/${encodeURIComponent(w.worker_id)}/${draining ? "undrain" : "drain"}`);
        await refresh();
      } catch (e) { showError("list-error", e.message); btn.disabled = false; }
    });
    card.append(el("div", { class: "actions" }, btn));
  }
  return card;
}

// ---- submit page -----------------------------------------------------------------------------------------
const FIELDS = ["image", "command", "name", "cpus", "memory", "gpus", "timeout", "worker", "env", "constraints"];

// Which form field a server message is about: "invalid cpus 'x': ..." or "invalid request: cpus: ...".
// The form checks nothing itself: every value goes to the API, whose message is the CLI's for the same value.
const FIELD_OF = { constraint: "constraints" };
function fieldOf(message) {
  let m = message.match(/^invalid request: ([\w.]+):/);
  if (m) return m[1].split(".")[0];
  m = message.match(/^invalid ([\w-]+) /);
  return m ? FIELD_OF[m[1]] || m[1] : null;
}

// KEY=VALUE lines as typed (blank lines skipped); the API parses them as `cloudai submit -e` does.
function lines(text) {
  return text.split("\n").map((line) => line.trim()).filter((line) => line);
}

function initSubmit() {
  const form = document.getElementById("submit-form");
  const button = document.getElementById("submit-button");
  const errorFor = (field) => form.querySelector(`[data-error-for="${field}"]`);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    for (const f of FIELDS) { errorFor(f).textContent = ""; form.elements[f].removeAttribute("aria-invalid"); }
    showError("submit-error", "");
    const value = (f) => form.elements[f].value.trim();
    const body = { image: value("image") };
    for (const f of ["command", "name", "cpus", "memory", "gpus", "timeout", "worker"]) {
      const v = f === "command" ? form.elements.command.value : value(f);
      if (v.trim()) body[f] = v;
    }
    body.env = lines(form.elements.env.value);
    body.constraints = lines(form.elements.constraints.value);
    button.disabled = true;
    try {
      const task = await api("POST", "/v1/tasks", body);
      location.href = "/tasks/" + encodeURIComponent(task.task_id);
    } catch (err) {
      const field = fieldOf(err.message);
      if (field && FIELDS.includes(field)) {
        errorFor(field).textContent = err.message;
        form.elements[field].setAttribute("aria-invalid", "true");
        form.elements[field].focus();
      } else {
        showError("submit-error", err.message);
      }
      button.disabled = false;
    }
  });
}

// ---- sign in / out ---------------------------------------------------------------------------------------
function initLogin() {
  const form = document.getElementById("login-form");
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    showError("login-error", "");
    const resp = await fetch("/login", { method: "POST", credentials: "same-origin",
      body: new URLSearchParams({ token: form.elements.token.value }) });
    if (resp.ok) { location.href = form.elements.next.value || "/"; return; }
    let message = `${resp.status} ${resp.statusText}`;
    try { message = (await resp.json()).error.message; } catch (err) { /* not JSON */ }
    showError("login-error", message);
  });
}

function initSignout() {
  const btn = document.getElementById("signout");
  if (!btn) return;
  btn.addEventListener("click", async () => {
    await fetch("/logout", { method: "POST", credentials: "same-origin" });
    location.href = "/login";
  });
}

document.addEventListener("DOMContentLoaded", () => {
  initSignout();
  const init = { tasks: initTasks, task: initTask, workers: initWorkers, submit: initSubmit, login: initLogin };
  const fn = init[document.body.dataset.page];
  if (fn) fn();
});
