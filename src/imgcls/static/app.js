// The imgcls page: choose or drop an image, preview it, POST it to /v1/predict, draw the top classes and the Grad-CAM overlay.
// No libraries and no requests to anywhere but this server.
"use strict";

const TOP_K = 5;
// Open the page as /?coverage=0.9 to have each answer's prediction set shown too.
const COVERAGE = new URLSearchParams(window.location.search).get("coverage");
const $ = (id) => document.getElementById(id);
// A multi-label model's thresholds {label: threshold} from /v1/model (null for a single-label model),
// read once the page loads; an answer waits for them (modelReady) before it is drawn.
let THRESHOLDS = null;
let modelReady = Promise.resolve();

function setStatus(text, isError = false) {
  const s = $("status");
  s.textContent = text;
  s.classList.toggle("error", isError);
}

async function showModel() {
  try {
    const res = await fetch("/v1/model");
    const m = await res.json();
    THRESHOLDS = m.task === "multi-label" ? m.thresholds : null;
    const kind = THRESHOLDS ? "labels (multi-label)" : "classes";
    $("model-info").textContent = `${m.name} · ${m.num_classes} ${kind} · version ${m.version}`;
  } catch (e) {
    $("model-info").textContent = "model information unavailable";
  }
}

// The file on show, its answer, and a promise for its preview being loaded (the overlay needs its size).
const current = { file: null, answer: null, previewReady: Promise.resolve() };

function showPreview(file) {
  const img = $("preview-img");
  if (img.src) URL.revokeObjectURL(img.src);
  current.previewReady = new Promise((resolve) => {
    img.onload = () => { resetOverlay(); resolve(); };
    img.onerror = () => resolve();
  });
  img.src = URL.createObjectURL(file);
  $("preview").hidden = false;
}

// The overlay canvas uses the image's own pixel grid; CSS stretches it over the displayed image.
function resetOverlay() {
  const img = $("preview-img"), canvas = $("overlay");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
}

// Grad-CAM: the server's overlay (the image with the heat map over it) drawn on the canvas, shown while the toggle is on.
async function drawExplanation(explanation) {
  await current.previewReady;
  const pic = new Image();
  pic.src = `data:image/png;base64,${explanation.overlay_png_base64}`;
  await pic.decode();
  const canvas = $("overlay");
  resetOverlay();
  canvas.getContext("2d").drawImage(pic, 0, 0, canvas.width, canvas.height);
  const note = $("explain-note");
  note.replaceChildren(`evidence for “${explanation.target}”: low`, Object.assign(document.createElement("span"), { className: "heat-legend" }),
    "high");
  showOverlay();
}

function showOverlay() {
  const has = Boolean(current.answer && current.answer.explanation);
  const on = has && $("explain-toggle").checked;
  $("overlay").hidden = !on;
  document.body.dataset.overlay = has ? (on ? "shown" : "hidden") : "none";
}

function pct(score) {
  return `${(score * 100).toFixed(1)}%`;
}

// One bar row: name, bar (with a tick at the label's threshold for a multi-label model), percentage.
function barRow(t, threshold) {
  const row = document.createElement("li");
  row.className = "bar-row";
  const name = document.createElement("span");
  name.className = "bar-label";
  name.textContent = name.title = t.label;
  const bar = document.createElement("div");
  bar.className = "bar";
  const fill = document.createElement("div");
  fill.className = "bar-fill";
  fill.style.width = pct(t.score);
  bar.append(fill);
  if (threshold !== undefined) {
    row.classList.add("multi");
    row.classList.toggle("above", t.score >= threshold);
    const tick = document.createElement("div");
    tick.className = "bar-threshold";
    tick.style.left = pct(threshold);
    tick.title = `threshold ${pct(threshold)}`;
    bar.append(tick);
  }
  const value = document.createElement("span");
  value.className = "bar-pct";
  value.textContent = pct(t.score);
  row.append(name, bar, value);
  return row;
}

// A multi-label answer: the labels above their thresholds as the heading, one bar per label (highest first).
function renderLabels(p) {
  const label = $("prediction");
  label.textContent = p.labels.length ? p.labels.map((t) => t.label).join(", ") : "no label";
  label.dataset.label = p.labels.map((t) => t.label).join(";");
  $("score").textContent = p.labels.length ? "" : "(none above its threshold)";
  const note = $("pred-set");
  note.hidden = false;
  note.textContent = "Every label's score; the tick marks its threshold, labels at or above it in bold.";
  const scores = Object.entries(p.probabilities || {}).map(([l, s]) => ({ label: l, score: s }));
  scores.sort((a, b) => b.score - a.score);
  $("bars").replaceChildren(...scores.map((t) => barRow(t, (THRESHOLDS || {})[t.label])));
}

function render(p, ms) {
  if (p.labels) {
    renderLabels(p);
    $("timing").textContent = `${Math.round(ms)} ms`;
    $("result").hidden = false;
    setStatus("");
    return;
  }
  const label = $("prediction");
  label.textContent = p.label;
  label.dataset.label = p.label;
  // "unknown": the model's "unknown" rule turned the image away; its best guess is still shown.
  const guess = p.best_guess;
  $("score").textContent = guess ? `(best guess: ${guess.label} ${pct(guess.score)})` : pct(p.score);
  const set = $("pred-set");
  set.hidden = !p.set;
  set.textContent = p.set ? `${pct(Number(COVERAGE))} prediction set: ${p.set.join(", ")}` : "";
  const bars = $("bars");
  bars.replaceChildren(...p.top_k.map((t) => barRow(t)));
  $("timing").textContent = `${Math.round(ms)} ms`;
  $("result").hidden = false;
  setStatus("");
}

async function post(file, explain) {
  const body = new FormData();
  body.append("file", file, file.name);
  const coverage = COVERAGE ? `&coverage=${encodeURIComponent(COVERAGE)}` : "";
  const res = await fetch(`/v1/predict?top_k=${TOP_K}${explain ? "&explain=true" : ""}${coverage}`, { method: "POST", body });
  const data = await res.json().catch(() => ({}));
  return { res, data };
}

async function classify(file, keepPreview = false) {
  if (!file) return;
  if (!keepPreview) {
    current.file = file;
    current.answer = null;
    showPreview(file);
    $("result").hidden = true;
    $("explain-note").textContent = "";
    showOverlay();
  }
  document.body.dataset.state = "busy";
  const toggle = $("explain-toggle");
  const explain = toggle.checked && !toggle.disabled;
  setStatus(explain ? "Classifying and explaining…" : "Classifying…");
  const t0 = performance.now();
  try {
    let { res, data } = await post(file, explain);
    if (res.status === 501 && explain) {  // this server cannot explain (e.g. a bare ONNX model): classify without
      toggle.checked = false;
      toggle.disabled = true;
      $("explain-note").textContent = `Explanations unavailable: ${data.detail || res.statusText}`;
      ({ res, data } = await post(file, false));
    }
    if (!res.ok) throw new Error(data.detail || `${res.status} ${res.statusText}`);
    if (file !== current.file) return;  // another file was chosen meanwhile
    current.answer = data.predictions[0];
    await modelReady;
    render(current.answer, performance.now() - t0);
    if (current.answer.explanation) await drawExplanation(current.answer.explanation);
    showOverlay();
    document.body.dataset.state = "done";
  } catch (e) {
    setStatus(`Could not classify this file: ${e.message}`, true);
    document.body.dataset.state = "error";
  }
}

// Turning the toggle on after an answer without an explanation asks the server for one.
function onToggle() {
  if ($("explain-toggle").checked && current.file && current.answer && !current.answer.explanation) {
    classify(current.file, true);
  } else {
    showOverlay();
  }
}

function setUp() {
  const input = $("file-input"), zone = $("dropzone"), form = $("upload-form");
  input.addEventListener("change", () => classify(input.files[0]));
  $("explain-toggle").addEventListener("change", onToggle);
  form.addEventListener("submit", (e) => { e.preventDefault(); classify(input.files[0]); });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("dragging");
    classify(e.dataTransfer.files[0]);
  });
  document.body.dataset.state = "ready";
  showOverlay();
  modelReady = showModel();
}

// For tests and scripts: the overlay canvas (sized to the image's pixels) and its reset.
window.imgclsPage = { overlay: () => $("overlay"), resetOverlay };

setUp();
