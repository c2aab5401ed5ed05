"use strict";
// The lego-serve playground. It calls this server's public API only: GET /v1/model and /healthz,
// POST /v1/plan (the brick plan, nothing runs) and /v1/images, then the job's events, result and DELETE.

const TERMINAL = ["done", "failed", "cancelled", "expired"];
const STATES = ["queued", "running", ...TERMINAL];
const PLAN_DELAY_MS = 200; // ask for the plan once typing pauses, not at every key
const $ = (id) => document.getElementById(id);

let model = null; // GET /v1/model
let job = null; // the job in flight: {id, source, info}
let planTimer = null;
let planAbort = null;
let gridUrl = null;

// ---- errors: the API's own words, with its status ----------------------------------------------

async function apiError(response) {
  let message = response.statusText || "no answer";
  try {
    const data = await response.json();
    if (data && typeof data.error === "string") message = data.error;
  } catch (_) {
    // not JSON: keep the status text
  }
  return { status: response.status, message, retryAfter: response.headers.get("Retry-After") };
}

function showError(el, err) {
  const code = document.createElement("strong");
  code.textContent = err.status ? `HTTP ${err.status}` : "No answer";
  const words = document.createElement("span");
  words.className = "words";
  words.textContent = err.message;
  el.replaceChildren(code, " ", words);
  if (err.retryAfter) el.append(` (retry after ${err.retryAfter} s)`);
  el.hidden = false;
}

function clearError(el) {
  el.hidden = true;
  el.replaceChildren();
}

async function getJson(path) {
  const response = await fetch(path, { headers: { Accept: "application/json" } });
  if (!response.ok) throw await apiError(response);
  return response.json();
}

function postJson(path, body, signal) {
  return fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
    signal,
  });
}

// ---- the model and the form ------------------------------------------------------------------------

function option(value, text) {
  const el = document.createElement("option");
  el.value = String(value);
  el.textContent = text;
  return el;
}

function describeOptions(o) {
  if (!o) return "";
  const parts = [`${o.sampler} ${o.steps} steps`];
  parts.push(o.skip && o.skip !== "none" ? `skip ${o.skip}` : "every brick");
  if (o.reuse_residual) parts.push("residual reuse");
  if (o.guidance !== undefined && o.guidance !== 1) {
    parts.push(`cfg ${o.guidance}` + (o.guidance_interval ? ` at sigma ${o.guidance_interval}` : ""));
  }
  if (o.cache && o.cache !== "none") parts.push(`cache ${o.cache}`);
  return parts.join(", ");
}

function measuredText(measured) {
  if (!measured) return "";
  const parts = [];
  if (typeof measured.fid === "number") parts.push(`FID ${measured.fid.toFixed(2)}`);
  if (typeof measured.class_accuracy === "number") parts.push(`class accuracy ${(100 * measured.class_accuracy).toFixed(1)}%`);
  return parts.join(", ");
}

function fillModel(m, health) {
  model = m;
  const res = m.resolution;
  const backend = health ? `${health.backend}, ${health.config.precision}` : m.backend;
  $("model").textContent =
    `${m.name}: ${m.num_classes} classes, trained at ${res[0]}\u00d7${res[1]}, bricks of ${m.bricks.join(" / ")} px, on ${backend}`;

  const cls = $("class");
  for (let i = 0; i < m.num_classes; i++) cls.append(option(m.class_names.length ? m.class_names[i] : i, m.class_names[i] || `class ${i}`));

  $("num").max = m.limits.max_images;
  $("steps").max = m.limits.max_steps;
  for (const id of ["height", "width"]) {
    $(id).min = m.canvas_multiple;
    $(id).step = m.canvas_multiple;
    $(id).max = m.limits.max_resolution;
  }
  $("height").value = res[0];
  $("width").value = res[1];
  $("canvas-hint").textContent =
    `Sides are multiples of ${m.canvas_multiple}, at most ${m.limits.max_resolution}; wider than trained is fine.`;
  fillPresets(m);
  fillQuality(m);

  const rec = m.recommended;
  $("steps").placeholder = rec ? `${rec.options.steps} (model's setting)` : "50";
  $("cfg").placeholder = rec ? `${rec.options.guidance} (model's setting)` : "1";
  if (rec) $("steps-hint").textContent = `Empty: the model's setting (${describeOptions(rec.options)}).`;
}

function fillPresets(m) {
  const r = m.resolution[0];
  const sizes = [[r, r, "trained"], [r, 2 * r, "wide"], [r, 3 * r, "wide"], [2 * r, 2 * r, "large"]];
  const box = $("presets");
  for (const [h, w, kind] of sizes) {
    if (Math.max(h, w) > m.limits.max_resolution) continue;
    const button = document.createElement("button");
    button.type = "button";
    button.className = "preset";
    button.textContent = `${h}\u00d7${w}`;
    button.setAttribute("aria-label", `Canvas ${h} by ${w} (${kind})`);
    button.addEventListener("click", () => {
      $("height").value = h;
      $("width").value = w;
      schedulePlan();
    });
    box.append(button);
  }
}

function fillQuality(m) {
  const q = $("quality");
  q.append(option("elastic", "elastic: may step down under load"));
  q.append(option("exact", "exact: as asked, never lowered"));
  m.ladder.forEach((rung, k) => q.append(option(k, k === 0 ? "rung 0: the model's setting" : `rung ${k} or better`)));
  for (const name of Object.keys(m.points || {})) q.append(option(name, `${name} (a named point)`));
  q.addEventListener("change", qualityHint);
  qualityHint();
}

function qualityHint() {
  const value = $("quality").value;
  let text;
  if (value === "elastic") {
    const source = model.ladder[0].tuned ? "measured by lego-export tune" : "derived from the model, not tuned";
    text = `Runs as asked, or under load at a cheaper rung (${model.ladder.length - 1} below the model's setting; ${source}).`;
  } else if (value === "exact") {
    text = "Runs as asked, or is refused (429) when it cannot meet its deadline.";
  } else if (/^\d+$/.test(value)) {
    const rung = model.ladder[Number(value)];
    text = `Never below rung ${value}: ${describeOptions(rung.options)}` + (measuredText(rung.measured) ? ` (${measuredText(rung.measured)})` : "");
  } else {
    const point = model.points[value];
    text = `The model's "${value}" point: ${describeOptions(point.options)}` + (measuredText(point.measured) ? ` (${measuredText(point.measured)})` : "");
  }
  $("quality-hint").textContent = text;
}

function numberField(id) {
  const text = $(id).value.trim();
  return text === "" ? undefined : Number(text);
}

/** The JSON of the request the form describes (the same for the plan and for generation). */
function requestBody() {
  const body = {};
  const cls = $("class").value;
  if (cls !== "") body.class = model.class_names.length ? cls : Number(cls);
  for (const [id, field] of [["num", "num"], ["steps", "steps"], ["cfg", "cfg"], ["seed", "seed"]]) {
    const value = numberField(id);
    if (value !== undefined) body[field] = value;
  }
  const h = $("height").value.trim();
  const w = $("width").value.trim();
  if (h !== "" || w !== "") body.resolution = `${h}x${w}`;
  const quality = $("quality").value;
  body.quality = /^\d+$/.test(quality) ? Number(quality) : quality;
  return body;
}

// ---- the brick plan ------------------------------------------------------------------------------

function schedulePlan() {
  clearTimeout(planTimer);
  planTimer = setTimeout(showPlan, PLAN_DELAY_MS);
}

async function showPlan() {
  if (planAbort) planAbort.abort();
  planAbort = new AbortController();
  const body = requestBody();
  let response;
  try {
    response = await postJson("/v1/plan", body, planAbort.signal);
  } catch (e) {
    if (e.name !== "AbortError") showError($("plan-error"), { status: 0, message: "the server did not answer" });
    return;
  }
  if (!response.ok) {
    const err = await apiError(response);
    showError($("plan-error"), err);
    $("plan-summary").textContent = "No plan: the request would be refused.";
    $("plan-table").replaceChildren($("plan-table").querySelector("caption"));
    return;
  }
  clearError($("plan-error"));
  renderPlan(await response.json());
}

function cell(tag, text, className) {
  const el = document.createElement(tag);
  el.textContent = text;
  if (className) el.className = className;
  return el;
}

function renderPlan(p) {
  const n = p.steps.length;
  const predicted = p.predicted_s ? `; about ${p.predicted_s.toFixed(2)} s alone` : "";
  $("plan-summary").textContent =
    `${n} steps (${p.description}): brick runs ${p.brick_runs} of ${p.brick_runs_full}, ` +
    `guided steps ${p.guided_steps} of ${n}, ${p.saving}${predicted}.`;
  $("plan-summary").dataset.brickRuns = p.brick_runs;

  const table = $("plan-table");
  const head = document.createElement("thead");
  const top = document.createElement("tr");
  top.append(cell("th", "step"));
  for (const s of p.steps) top.append(Object.assign(cell("th", String(s.step + 1)), { scope: "col" }));
  head.append(top);
  const body = document.createElement("tbody");
  const sigma = document.createElement("tr");
  sigma.append(Object.assign(cell("th", "sigma"), { scope: "row" }));
  for (const s of p.steps) sigma.append(cell("td", s.sigma.toPrecision(2), "sigma"));
  body.append(sigma);
  p.bricks.forEach((brick, k) => {
    const row = document.createElement("tr");
    row.append(Object.assign(cell("th", `${brick.name} (${brick.size} px)`), { scope: "row" }));
    for (const s of p.steps) {
      let td;
      if (s.runs.includes(k)) td = cell("td", "\u25a0", "run");
      else if (s.cached.includes(k)) td = cell("td", "\u25cb", "cached");
      else td = cell("td", "\u2013", "skip");
      td.title = `step ${s.step + 1}, ${brick.name}: ${td.className === "skip" ? "skipped" : td.className === "run" ? "runs" : "from cache"}`;
      row.append(td);
    }
    body.append(row);
  });
  const guided = document.createElement("tr");
  guided.append(Object.assign(cell("th", "guided"), { scope: "row" }));
  for (const s of p.steps) guided.append(cell("td", s.guided ? (s.halves === 2 ? "\u00d72" : "\u00d71") : "", "guided"));
  body.append(guided);
  table.replaceChildren(table.querySelector("caption"), head, body);
}

// ---- a job: submit, follow its events, cancel, show its grid and run record ---------------------

function setBusy(busy) {
  $("generate").disabled = busy;
  $("cancel").disabled = !busy;
}

async function generate(event) {
  event.preventDefault();
  if (job) return;
  clearError($("error"));
  setBusy(true);
  let response;
  try {
    response = await postJson("/v1/images", { ...requestBody(), async: true });
  } catch (e) {
    showError($("error"), { status: 0, message: "the server did not answer" });
    setBusy(false);
    return;
  }
  if (response.status !== 202) {
    showError($("error"), await apiError(response));
    $("status").textContent = "Refused.";
    setBusy(false);
    return;
  }
  startJob(await response.json());
}

function startJob(info) {
  $("events").replaceChildren();
  $("event-count").textContent = "0";
  $("result").hidden = true;
  $("record").hidden = true;
  $("progress").value = 0;
  const source = new EventSource(`/v1/jobs/${info.id}/events`);
  job = { id: info.id, source, info };
  $("job-section").dataset.job = info.id;
  for (const state of STATES) source.addEventListener(state, (e) => onEvent(JSON.parse(e.data)));
  source.onerror = () => {
    // The stream broke before the job ended (the server closes it after the last event): ask once.
    if (job && job.source === source && source.readyState === EventSource.CLOSED) {
      getJson(`/v1/jobs/${info.id}`).then(onEvent, (err) => showError($("error"), err));
    }
  };
  showStatus(info);
}

function onEvent(info) {
  if (!job || info.id !== job.id) return;
  job.info = info;
  const item = document.createElement("li");
  const progress = info.progress ? ` ${info.progress.steps_done}/${info.progress.steps}` : "";
  const where = info.queue_position !== undefined ? ` (position ${info.queue_position + 1})` : "";
  item.textContent = `${info.status}${where}${progress}`;
  item.dataset.status = info.status;
  if (info.progress) item.dataset.stepsDone = info.progress.steps_done;
  $("events").append(item);
  $("event-count").textContent = String($("events").children.length);
  showStatus(info);
  if (TERMINAL.includes(info.status)) finish(info);
}

function showStatus(info) {
  const status = $("status");
  status.dataset.status = info.status;
  const progress = info.progress;
  if (progress) {
    $("progress").max = progress.steps;
    $("progress").value = progress.steps_done;
  }
  let text = `Job ${info.id.slice(0, 8)}: ${info.status}`;
  if (info.status === "queued" && info.queue_position !== undefined) {
    text += info.queue_position === 0 ? ", next to run" : `, ${info.queue_position} ahead in the queue`;
  } else if (info.status === "running" && progress) {
    text += `, step ${progress.steps_done} of ${progress.steps}`;
  } else if (info.error) {
    text += ` (${info.error})`;
  }
  status.textContent = text + ".";
}

async function finish(info) {
  const { id, source } = job;
  source.close();
  job = null;
  setBusy(false);
  if (info.status === "cancelled") return;
  const response = await fetch(`/v1/jobs/${id}/result`);
  if (!response.ok) {
    showError($("error"), await apiError(response));
    return;
  }
  const run = JSON.parse(response.headers.get("X-Lego-Run") || "null");
  const timing = JSON.parse(response.headers.get("X-Lego-Timing") || "null");
  const blob = await response.blob();
  if (job) return; // a newer job started meanwhile: its own answer will be shown
  if (gridUrl) URL.revokeObjectURL(gridUrl);
  gridUrl = URL.createObjectURL(blob);
  showGrid(gridUrl, run);
  showRecord(id, run || info.run, timing);
}

function showGrid(url, run) {
  const img = $("grid");
  img.onload = () => {
    // Small images: scale up by whole pixels (sharp), as far as the column allows.
    $("result").hidden = false;
    const room = Math.min($("result").clientWidth, 1024);
    const scale = Math.max(1, Math.floor(room / img.naturalWidth));
    img.style.width = `${img.naturalWidth * scale}px`;
  };
  const canvas = run ? run.canvas.join("\u00d7") : "";
  img.alt = run ? `Grid of ${run.images} generated images, ${canvas} each` : "Generated images";
  $("grid-caption").textContent = run ? `${run.images} images, ${canvas}, seed ${run.seed}` : "";
  img.src = url;
}

function showRecord(id, run, timing) {
  const dl = $("record");
  dl.replaceChildren();
  const add = (term, value) => {
    dl.append(cell("dt", term), cell("dd", value));
  };
  add("job", id);
  if (run) {
    add("options", describeOptions(run.options) + (run.recommended ? " (the model's setting)" : ""));
    const rung = run.rung === 0 ? "0 (the model's setting)" : String(run.rung);
    add("rung", run.rung === null ? "none: the request's own options" : rung + (run.degraded ? ", lowered under load" : ""));
    add("quality asked", String(run.quality));
    add("backend", run.backend);
    add("precision", `${run.precision.files} files, ${run.precision.runtime} runtime`);
    add("canvas", `${run.canvas.join("\u00d7")}, ${run.images} images, seed ${run.seed}`);
  }
  if (timing) {
    const total = timing.queued_s + timing.service_s;
    add("seconds", `${total.toFixed(3)} (queued ${timing.queued_s.toFixed(3)}, sampling ${timing.service_s.toFixed(3)})`);
  }
  if (run && run.predicted_s) add("predicted", `${run.predicted_s.toFixed(3)} s alone`);
  dl.hidden = false;
}

async function cancel() {
  if (!job) return;
  const response = await fetch(`/v1/jobs/${job.id}`, { method: "DELETE" });
  if (!response.ok) showError($("error"), await apiError(response));
  // the job's stream brings the "cancelled" event
}

async function start() {
  try {
    const [m, health] = await Promise.all([getJson("/v1/model"), getJson("/healthz").catch(() => null)]);
    fillModel(m, health);
  } catch (err) {
    showError($("error"), err);
    return;
  }
  const form = $("request");
  form.addEventListener("submit", generate);
  form.addEventListener("input", schedulePlan);
  form.addEventListener("change", schedulePlan);
  $("cancel").addEventListener("click", cancel);
  document.body.dataset.ready = "true";
  showPlan();
}

document.addEventListener("DOMContentLoaded", start);
