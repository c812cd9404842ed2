// The imgcls page: choose or drop an image, preview it, POST it to /v1/predict, draw the top classes.
// No libraries and no requests to anywhere but this server.
"use strict";

const TOP_K = 5;
const $ = (id) => document.getElementById(id);

function setStatus(text, isError = false) {
  const s = $("status");
  s.textContent = text;
  s.classList.toggle("error", isError);
}

async function showModel() {
  try {
    const res = await fetch("/v1/model");
    const m = await res.json();
    $("model-info").textContent = `${m.name} · ${m.num_classes} classes · version ${m.version}`;
  } catch (e) {
    $("model-info").textContent = "model information unavailable";
  }
}

function showPreview(file) {
  const img = $("preview-img");
  if (img.src) URL.revokeObjectURL(img.src);
  img.onload = () => resetOverlay();
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

function pct(score) {
  return `${(score * 100).toFixed(1)}%`;
}

function render(p, ms) {
  const label = $("prediction");
  label.textContent = p.label;
  label.dataset.label = p.label;
  $("score").textContent = pct(p.score);
  const bars = $("bars");
  bars.replaceChildren(...p.top_k.map((t) => {
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
    const value = document.createElement("span");
    value.className = "bar-pct";
    value.textContent = pct(t.score);
    row.append(name, bar, value);
    return row;
  }));
  $("timing").textContent = `${Math.round(ms)} ms`;
  $("result").hidden = false;
  setStatus("");
}

async function classify(file) {
  if (!file) return;
  showPreview(file);
  $("result").hidden = true;
  document.body.dataset.state = "busy";
  setStatus("Classifying…");
  const body = new FormData();
  body.append("file", file, file.name);
  const t0 = performance.now();
  try {
    const res = await fetch(`/v1/predict?top_k=${TOP_K}`, { method: "POST", body });
    const data = await res.json().catch(() => ({}));
    if (!res.ok) throw new Error(data.detail || `${res.status} ${res.statusText}`);
    render(data.predictions[0], performance.now() - t0);
    document.body.dataset.state = "done";
  } catch (e) {
    setStatus(`Could not classify this file: ${e.message}`, true);
    document.body.dataset.state = "error";
  }
}

function setUp() {
  const input = $("file-input"), zone = $("dropzone"), form = $("upload-form");
  input.addEventListener("change", () => classify(input.files[0]));
  form.addEventListener("submit", (e) => { e.preventDefault(); classify(input.files[0]); });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("dragging");
    classify(e.dataTransfer.files[0]);
  });
  document.body.dataset.state = "ready";
  showModel();
}

// For a later explanation view: the overlay canvas, sized to the image's pixels.
window.imgclsPage = { overlay: () => $("overlay"), resetOverlay };

setUp();
