// restune playground: uses only the public HTTP API (/v1/*, /readyz, /metrics).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { files: [], tuners: [], lastMetrics: null };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

async function problemText(resp) {
  try {
    const body = await resp.json();
    return `${body.code || resp.status}: ${body.detail || body.title || resp.statusText}`;
  } catch {
    return `${resp.status} ${resp.statusText}`;
  }
}

// ---- backbone and tuners -------------------------------------------------------------
async function loadReady() {
  try {
    const resp = await fetch("readyz");
    const body = await resp.json();
    const b = body.backbone || {};
    $("backbone").textContent = resp.ok
      ? `Backbone ${b.arch || "?"} on ${b.device || "?"} (${b.runtime || "?"})`
      : `Not ready: ${JSON.stringify(body.reasons || body.detail || body)}`;
  } catch (e) {
    $("backbone").textContent = `Server unreachable: ${e}`;
  }
}

async function loadTuners() {
  const resp = await fetch("v1/tuners");
  if (!resp.ok) return;
  const body = await resp.json();
  const previous = new Set(checkedTasks());
  const firstLoad = state.tuners.length === 0;
  state.tuners = body.tuners || [];
  renderTunerTable();
  renderTaskChecks(firstLoad ? null : previous);
}

function renderTunerTable() {
  const tbody = $("tuners").querySelector("tbody");
  tbody.replaceChildren();
  for (const t of state.tuners) {
    const labels = (t.labels || []).slice(0, 6).join(", ") + ((t.labels || []).length > 6 ? ", …" : "");
    const tr = t.training || {};
    const training = tr.val_metric
      ? `${tr.val_metric} ${tr.val_score != null ? Number(tr.val_score).toFixed(3) : "?"} on ${tr.data || "?"}`
      : "–";
    const versions = el("td", { class: "versions", "data-tuner": t.name, text: "…" });
    tbody.append(el("tr", {},
      el("th", { scope: "row", text: t.name }), el("td", { text: t.kind }),
      el("td", { text: String(t.version) }), versions, el("td", { text: labels || "–" }),
      el("td", { text: Number(t.params || 0).toLocaleString() }), el("td", { text: training })));
  }
  loadVersions(state.tuners.slice(0, MAX_VERSION_ROWS));
}

// One detail request per tuner: bounded, so a server with thousands of tuners is not asked
// for thousands of records on every refresh.
const MAX_VERSION_ROWS = 50;

async function loadVersions(tuners) {
  await Promise.all(tuners.map(async (t) => {
    const cell = document.querySelector(`td.versions[data-tuner="${CSS.escape(t.name)}"]`);
    if (!cell) return;
    try {
      const resp = await fetch(`v1/tuners/${encodeURIComponent(t.name)}`);
      if (!resp.ok) { cell.textContent = "–"; return; }
      cell.replaceChildren(...versionCell(await resp.json()));
    } catch {
      cell.textContent = "–";
    }
  }));
}

// "v1 · v2 (current) · v3 (staged)" and, under a canary split, "split: v1 90% · v2 10%".
function versionCell(detail) {
  const traffic = detail.traffic || {};
  const total = Object.values(traffic).reduce((a, b) => a + b, 0);
  const names = (detail.versions || []).map((v) => {
    const weight = traffic[String(v.version)] || 0;
    let role = "";
    if (v.version === detail.version) role = " (current)";
    else if (weight === 0) role = " (no traffic)";
    return el("span", { class: "version", "data-version": String(v.version), text: `v${v.version}${role}` });
  });
  const out = [];
  names.forEach((n, i) => { if (i) out.push(" · "); out.push(n); });
  const split = Object.entries(traffic).filter(([, w]) => w > 0);
  if (split.length > 1) {
    const shares = split.map(([v, w]) => `v${v} ${Math.round((1000 * w) / total) / 10}%`).join(" · ");
    out.push(el("div", { class: "split", text: `split: ${shares}` }));
  }
  return out;
}

function renderTaskChecks(keep) {
  const box = $("task-list");
  box.querySelectorAll("label").forEach((n) => n.remove());
  $("no-tasks").hidden = state.tuners.length > 0;
  for (const t of state.tuners) {
    const input = el("input", { type: "checkbox", name: "task", value: t.name });
    input.checked = keep ? keep.has(t.name) || !state.known?.has(t.name) : true;
    box.append(el("label", {}, input, t.name));
  }
  state.known = new Set(state.tuners.map((t) => t.name));
}

function checkedTasks() {
  return [...document.querySelectorAll('#task-list input[name="task"]:checked')].map((i) => i.value);
}

$("toggle-all").addEventListener("click", () => {
  const boxes = [...document.querySelectorAll('#task-list input[name="task"]')];
  const anyOn = boxes.some((b) => b.checked);
  boxes.forEach((b) => { b.checked = !anyOn; });
  $("toggle-all").textContent = anyOn ? "all" : "none";
});

// ---- images --------------------------------------------------------------------------
function setFiles(list) {
  state.files = [...list].filter((f) => f.type.startsWith("image/") || f.name);
  const thumbs = $("thumbs");
  thumbs.replaceChildren();
  state.files.forEach((f, i) => {
    thumbs.append(el("img", { src: URL.createObjectURL(f), alt: `image ${i}: ${f.name}` }));
  });
}

const drop = $("drop");
drop.addEventListener("click", () => $("files").click());
drop.addEventListener("keydown", (e) => {
  if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("files").click(); }
});
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over"); setFiles(e.dataTransfer.files);
});
$("files").addEventListener("change", (e) => setFiles(e.target.files));

// ---- predict -------------------------------------------------------------------------
$("predict-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  $("predict-error").textContent = "";
  const tasks = checkedTasks();
  if (!state.files.length) { $("predict-error").textContent = "Pick at least one image."; return; }
  if (!tasks.length) { $("predict-error").textContent = "Tick at least one task."; return; }
  const form = new FormData();
  state.files.forEach((f) => form.append("image", f, f.name));
  form.append("tasks", tasks.join(","));
  form.append("top_k", $("top-k").value || "3");
  $("run").disabled = true;
  try {
    const started = performance.now();
    const resp = await fetch("v1/predict", { method: "POST", body: form });
    if (!resp.ok) { $("predict-error").textContent = await problemText(resp); return; }
    const body = await resp.json();
    renderResults(body, performance.now() - started);
  } catch (err) {
    $("predict-error").textContent = String(err);
  } finally {
    $("run").disabled = false;
  }
});

function renderAnswer(name, answer) {
  const box = el("div", { class: "task", "data-task": name }, el("h4", { text: `${name} v${answer.version ?? "?"}` }));
  if (answer.error) {
    box.append(el("p", { class: "error", text: `${answer.error.code}: ${answer.error.detail}` }));
  } else if (answer.labels) {
    for (const { label, score } of answer.labels) {
      const pct = Math.max(0, Math.min(100, score * 100));
      const fill = el("span", { class: "fill" });
      fill.style.width = `${pct}%`;
      const track = el("span", { class: "track", role: "img", "aria-label": `${label} ${pct.toFixed(1)}%` },
        fill, el("span", { class: "name", text: label }));
      box.append(el("div", { class: "bar" }, track, el("span", { text: `${pct.toFixed(1)}%` })));
    }
  } else if (answer.values) {
    for (const [k, v] of Object.entries(answer.values)) {
      box.append(el("div", { text: `${k}: ${Number(v).toFixed(3)}` }));
    }
  } else if (answer.embedding) {
    box.append(el("div", { text: `embedding, ${answer.embedding.length} dims: [${answer.embedding.slice(0, 4).map((x) => x.toFixed(3)).join(", ")}, …]` }));
  }
  return box;
}

function renderResults(body, wallMs) {
  const t = body.timing || {};
  const fmt = (x) => (x == null ? "?" : `${Number(x).toFixed(1)} ms`);
  $("timing").textContent = `Backbone ${fmt(t.backbone_ms)} · bypass fan-out ${fmt(t.fanout_ms)} · queue ${fmt(t.queue_ms)} · server total ${fmt(t.total_ms)} · round trip ${wallMs.toFixed(0)} ms` +
    (t.cache_hits ? ` · ${t.cache_hits} cached` : "");
  const out = $("results");
  out.replaceChildren();
  for (const r of body.results || []) {
    const file = state.files[r.image];
    const img = file ? el("img", { src: URL.createObjectURL(file), alt: `image ${r.image}` }) : el("span");
    const tasks = el("div", { class: "tasks" });
    for (const [name, answer] of Object.entries(r.tasks || {})) tasks.append(renderAnswer(name, answer));
    out.append(el("div", { class: "result", "data-image": String(r.image) }, img, tasks));
  }
}

// ---- upload --------------------------------------------------------------------------
$("upload-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const name = $("up-name").value.trim();
  const file = $("up-file").files[0];
  const status = $("upload-status");
  status.className = "";
  status.textContent = "Uploading…";
  const query = $("up-promote").checked ? "" : "?promote=false";
  const resp = await fetch(`v1/tuners/${encodeURIComponent(name)}${query}`, {
    method: "PUT",
    headers: { "Authorization": `Bearer ${$("up-token").value}`, "Content-Type": "application/octet-stream" },
    body: file,
  });
  if (!resp.ok) { status.className = "error"; status.textContent = await problemText(resp); return; }
  const body = await resp.json();
  const live = body.current === false ? "stored, not current: give it traffic to try it" : "current";
  status.textContent = `Registered ${body.name} v${body.version} (${live}).`;
  await loadTuners();
});

// ---- live metrics --------------------------------------------------------------------
function parseMetrics(text) {
  const sums = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+([^\s]+)/);
    if (!m) continue;
    sums[m[1]] = (sums[m[1]] || 0) + Number(m[3]);
  }
  return { at: performance.now(), v: sums };
}

async function pollMetrics() {
  try {
    const resp = await fetch("metrics");
    if (!resp.ok) return;
    const now = parseMetrics(await resp.text());
    const prev = state.lastMetrics;
    const d = (k) => (now.v[k] || 0) - ((prev && prev.v[k]) || 0);
    if (prev) {
      const secs = (now.at - prev.at) / 1000;
      $("m-rps").textContent = (d("restune_requests_total") / secs).toFixed(1);
    }
    const ratio = (s, c) => (now.v[c] ? (now.v[s] / now.v[c]).toFixed(2) : "–");
    $("m-batch").textContent = ratio("restune_batch_size_images_sum", "restune_batch_size_images_count");
    $("m-tpf").textContent = ratio("restune_tasks_per_forward_sum", "restune_tasks_per_forward_count");
    const hits = now.v.restune_feature_cache_hits_total || 0;
    const misses = now.v.restune_feature_cache_misses_total || 0;
    $("m-cache").textContent = hits + misses ? `${((100 * hits) / (hits + misses)).toFixed(0)}%` : "–";
    state.lastMetrics = now;
  } catch { /* the next poll retries */ }
}

loadReady();
loadTuners();
pollMetrics();
setInterval(pollMetrics, 2000);
setInterval(loadTuners, 5000);
