// nanomorph web page: upload images to this server's /classify or /segment and show the answers.
// Plain browser JavaScript, no libraries, nothing fetched from anywhere but this server.
// Browsers cannot show DM4, MRC or 16-bit TIFF, so the picture comes from POST /preview (an 8-bit
// PNG the server makes); the segmentation overlay is painted here from the response's mask PNG.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const state = { config: { palette: [], auth: false }, files: [], results: [], runId: 0 };
const OVERLAY_ALPHA = 0.45; // as nanomorph.morphology.overlay
const DISPLAY_SIDE = 512; // CSS pixels of the picture's long side

// ---------------------------------------------------------------------------------- helpers

function fmt(x) {
  // Four significant digits, plain notation where readable; "–" for undefined numbers.
  if (x === null || x === undefined || (typeof x === "number" && !Number.isFinite(x))) return "–";
  if (typeof x === "boolean") return x ? "yes" : "no";
  if (typeof x !== "number") return String(x);
  if (Number.isInteger(x)) return String(x);
  const a = Math.abs(x);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return x.toExponential(3);
  return String(Number(x.toPrecision(4)));
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c);
  return node;
}

function numCell(value) {
  // The shown text is rounded; data-value keeps the exact number (for copying and for tests).
  return el("td", { class: "num", text: fmt(value), "data-value": JSON.stringify(value) });
}

function stem(name) {
  const base = name.split(/[\\/]/).pop();
  const dot = base.lastIndexOf(".");
  return dot > 0 ? base.slice(0, dot) : base;
}

function token() {
  return $("#token").value.trim();
}

function authHeaders() {
  const t = token();
  return t ? { Authorization: "Bearer " + t } : {};
}

function setStatus(text, isError = false) {
  const s = $("#status");
  s.textContent = text;
  s.classList.toggle("error", isError);
}

async function errorText(resp) {
  // The service answers every refusal as {"error": ..., "reason": ...}.
  try {
    const body = await resp.json();
    if (resp.status === 401) showToken();
    return `${resp.status} ${body.reason || ""}: ${body.error || resp.statusText}`;
  } catch (_) {
    return `${resp.status} ${resp.statusText}`;
  }
}

function showToken() {
  $("#token-box").hidden = false;
}

function colour(index) {
  const pal = state.config.palette;
  if (!pal.length) return [255, 0, 0];
  return index === 0 ? pal[0] : pal[1 + ((index - 1) % (pal.length - 1))];
}

function csvCell(v) {
  const s = v === null || v === undefined ? "" : typeof v === "object" ? JSON.stringify(v) : String(v);
  return /[",\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
}

function toCsv(rows) {
  if (!rows.length) return "";
  const cols = [];
  for (const r of rows) for (const k of Object.keys(r)) if (!cols.includes(k)) cols.push(k);
  return [cols.join(","), ...rows.map((r) => cols.map((c) => csvCell(r[c])).join(","))].join("\n") + "\n";
}

function blobLink(text, blob, filename) {
  const a = el("a", { text, href: URL.createObjectURL(blob) });
  a.download = filename;
  return a;
}

function loadImage(blob) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser could not show the image"));
    img.src = URL.createObjectURL(blob);
  });
}

function b64ToBlob(b64, type) {
  const bin = atob(b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return new Blob([bytes], { type });
}

// ------------------------------------------------------------------------------ CSV rows

function classifyRows(r) {
  const row = {
    filename: r.filename, model: r.model, label: r.label, confidence: r.confidence,
    ood_score: r.ood_score, ood_flag: r.ood_flag,
  };
  for (const [c, p] of Object.entries(r.probabilities)) row["p_" + c] = p;
  return [row];
}

function flatten(prefix, value, out) {
  if (value && typeof value === "object" && !Array.isArray(value)) {
    for (const [k, v] of Object.entries(value)) flatten(prefix ? prefix + "." + k : k, v, out);
  } else {
    out.push([prefix, value]);
  }
}

function segmentRows(r) {
  // Long format: one row per (class, quantity), distributions flattened as name.statistic.
  const rows = [];
  for (const [cls, numbers] of Object.entries(r.morphology.classes || {})) {
    const pairs = [];
    flatten("", numbers, pairs);
    for (const [q, v] of pairs) rows.push({ filename: r.filename, model: r.model, class: cls, quantity: q, value: v });
  }
  return rows;
}

// ------------------------------------------------------------------------------ drawing

function niceLength(target) {
  const p = Math.pow(10, Math.floor(Math.log10(target)));
  for (const m of [5, 2, 1]) if (m * p <= target) return m * p;
  return p;
}

function drawScaleBar(ctx, width, height, pxPerCanvas, unit) {
  // pxPerCanvas: physical size of one canvas pixel.
  const length = niceLength(0.2 * width * pxPerCanvas);
  const barPx = length / pxPerCanvas;
  const h = Math.max(3, Math.round(height / 80));
  const margin = Math.max(6, Math.round(width / 40));
  const x = width - margin - barPx;
  const y = height - margin - h;
  ctx.fillStyle = "rgba(0,0,0,0.55)";
  const font = Math.max(11, Math.round(width / 32));
  ctx.fillRect(x - 4, y - font - 6, barPx + 8, h + font + 10);
  ctx.fillStyle = "#fff";
  ctx.fillRect(x, y, barPx, h);
  ctx.font = `${font}px system-ui, sans-serif`;
  ctx.textAlign = "center";
  ctx.fillText(`${fmt(length)} ${unit}`, x + barPx / 2, y - 4);
}

async function maskOverlay(maskB64, shape) {
  // An RGBA canvas at the mask's size: class colours where the mask is > 0, transparent elsewhere.
  const img = await loadImage(b64ToBlob(maskB64, "image/png"));
  const [h, w] = shape;
  const c = el("canvas", { width: w, height: h });
  const ctx = c.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(img, 0, 0);
  const data = ctx.getImageData(0, 0, w, h);
  const px = data.data;
  for (let i = 0; i < px.length; i += 4) {
    // Masks are palette PNGs whose colours are the overlay colours (index 0 black), so the browser
    // already decodes each class to its colour: only background needs to become transparent.
    if (px[i] === 0 && px[i + 1] === 0 && px[i + 2] === 0) {
      px[i + 3] = 0;
      continue;
    }
    px[i + 3] = Math.round(255 * OVERLAY_ALPHA);
  }
  ctx.putImageData(data, 0, 0);
  return c;
}

function render(card) {
  const { canvas, picture, overlay, showOverlay, scale } = card.view;
  // Small frames are drawn enlarged (whole pixels, no smoothing) so the scale bar stays legible.
  const k = Math.max(1, Math.floor(DISPLAY_SIDE / Math.max(picture.naturalWidth, picture.naturalHeight)));
  canvas.width = picture.naturalWidth * k;
  canvas.height = picture.naturalHeight * k;
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(picture, 0, 0, canvas.width, canvas.height);
  if (overlay && showOverlay) ctx.drawImage(overlay, 0, 0, canvas.width, canvas.height);
  if (scale) drawScaleBar(ctx, canvas.width, canvas.height, (scale.size * scale.width) / canvas.width, scale.unit);
}

// ------------------------------------------------------------------------------ results

function legendItems(ul, legend, fractions) {
  ul.replaceChildren();
  for (const { index, name } of legend) {
    const [r, g, b] = colour(index);
    const sw = el("span", { class: "swatch" });
    sw.style.background = index === 0 ? "transparent" : `rgb(${r},${g},${b})`;
    const frac = fractions[name];
    const text = index === 0 ? `${name} (not painted)` : name;
    ul.append(el("li", {}, sw, text, frac === undefined ? "" : ` ${fmt(frac * 100)} %`));
  }
}

function showClassify(card, r) {
  const box = $(".numbers", card.node);
  const line = el("p", { class: "label-line" }, "label: ", el("span", { class: "label", text: r.label }));
  const ood = el("span", {
    class: "ood " + (r.ood_flag ? "flagged" : "ok"),
    text: r.ood_flag ? "out of distribution" : "in distribution",
    "data-flag": String(r.ood_flag),
  });
  line.append(ood);
  const table = el("table", { class: "probabilities" }, el("caption", { text: "class probabilities" }));
  const sorted = Object.entries(r.probabilities).sort((a, b) => b[1] - a[1]);
  for (const [cls, p] of sorted) {
    const bar = el("span", { class: "bar" });
    bar.style.width = `${Math.round(120 * p)}px`;
    const tr = el("tr", { "data-class": cls }, el("th", { text: cls }), numCell(p), el("td", {}, bar));
    table.append(tr);
  }
  const facts = el("table", { class: "facts" });
  const addFact = (name, value, key) => facts.append(el("tr", { "data-key": key }, el("th", { text: name }), numCell(value)));
  addFact("confidence", r.confidence, "confidence");
  addFact("OOD score", r.ood_score, "ood_score");
  addFact("image size (px)", `${r.shape[0]} × ${r.shape[1]}`, "shape");
  box.replaceChildren(line, facts, table, el("p", { class: "muted", text: `model ${r.model}` }));
}

const SCALAR_ORDER = [
  "area_fraction", "n_domains", "percolates", "percolation_direction", "mean_orientation_deg", "nematic_order",
];

function morphologyTables(numbers, unitKey) {
  // Scalars first (with the physical twin of a *_px number instead of it), then distributions.
  const scalars = el("table", { class: "scalars" });
  const dists = el("table", { class: "distributions" });
  const stats = ["count", "mean", "median", "p10", "p90", "std", "min", "max"];
  dists.append(el("tr", {}, el("th", { text: "distribution" }), ...stats.map((s) => el("th", { text: s }))));
  const hasTwin = (k) => k.endsWith("_px") && unitKey && (k.slice(0, -3) + "_" + unitKey) in numbers;
  const hasTwin2 = (k) => k.endsWith("_px") && unitKey && (k.slice(0, -3) + "_" + unitKey + "2") in numbers;
  const keys = Object.keys(numbers).sort((a, b) => {
    const ia = SCALAR_ORDER.indexOf(a), ib = SCALAR_ORDER.indexOf(b);
    return (ia < 0 ? 99 : ia) - (ib < 0 ? 99 : ib);
  });
  let nd = 0;
  for (const k of keys) {
    const v = numbers[k];
    if (k === "kind" || hasTwin(k) || hasTwin2(k)) continue;
    if (v && typeof v === "object" && !Array.isArray(v)) {
      if (!("count" in v)) continue; // e.g. the orientation histogram: in the JSON and CSV
      dists.append(el("tr", { "data-key": k }, el("th", { text: k }), ...stats.map((s) => numCell(v[s]))));
      nd++;
    } else {
      const name = k.replace(/_/g, " ").replace(/([a-zA-Z])2$/, "$1²");
      scalars.append(el("tr", { "data-key": k }, el("th", { text: name }), numCell(v)));
    }
  }
  return nd ? [scalars, dists] : [scalars];
}

function showSegment(card, r) {
  const box = $(".numbers", card.node);
  const m = r.morphology || {};
  const unitKey = (m.summary || {}).unit_key;
  const parts = [];
  const cal = r.pixel_size ? `pixel size ${fmt(r.pixel_size)} ${r.pixel_unit}` : "uncalibrated (numbers in pixels)";
  parts.push(el("p", { class: "muted calibration", text: `${r.shape[0]} × ${r.shape[1]} px, ${cal}` }));
  for (const [cls, numbers] of Object.entries(m.classes || {})) {
    const section = el("section", { class: "class-numbers", "data-class": cls });
    section.append(el("h3", { text: `${cls} (${numbers.kind})` }), ...morphologyTables(numbers, unitKey));
    parts.push(section);
  }
  parts.push(el("p", { class: "muted", text: `model ${r.model}` }));
  box.replaceChildren(...parts);
}

function addDownloads(card, task, r) {
  const p = $(".downloads", card.node);
  const s = stem(r.filename);
  const links = [];
  if (task === "segment") links.push(blobLink("mask PNG", b64ToBlob(r.mask_png, "image/png"), `${s}_mask.png`));
  const rows = task === "segment" ? segmentRows(r) : classifyRows(r);
  links.push(blobLink("CSV", new Blob([toCsv(rows)], { type: "text/csv" }), `${s}_${task}.csv`));
  links.push(blobLink("JSON", new Blob([JSON.stringify(r, null, 1)], { type: "application/json" }), `${s}_${task}.json`));
  const ov = el("a", { text: "picture PNG", href: "#" });
  ov.addEventListener("click", (ev) => {
    ev.preventDefault();
    card.view.canvas.toBlob((blob) => {
      const a = blobLink("", blob, `${s}_${task === "segment" ? "overlay" : "preview"}.png`);
      a.click();
    });
  });
  links.push(ov);
  p.replaceChildren(...links.flatMap((a) => [a, " "]));
}

function updateBatchLinks(task) {
  const rows = [];
  for (const r of state.results) rows.push(...(task === "segment" ? segmentRows(r) : classifyRows(r)));
  const csv = $("#all-csv");
  const json = $("#all-json");
  for (const a of [csv, json]) if (a.href.startsWith("blob:")) URL.revokeObjectURL(a.href);
  csv.href = URL.createObjectURL(new Blob([toCsv(rows)], { type: "text/csv" }));
  csv.download = `nanomorph_${task}.csv`;
  json.href = URL.createObjectURL(new Blob([JSON.stringify(state.results, null, 1)], { type: "application/json" }));
  json.download = `nanomorph_${task}.json`;
}

// ------------------------------------------------------------------------------ running

async function preview(file) {
  const form = new FormData();
  form.append("image", file, file.name);
  const resp = await fetch("preview", { method: "POST", body: form, headers: authHeaders() });
  if (!resp.ok) throw new Error(await errorText(resp));
  const size = resp.headers.get("X-Nanomorph-Pixel-Size");
  const shape = (resp.headers.get("X-Nanomorph-Shape") || "").split("x").map(Number);
  const picture = await loadImage(await resp.blob());
  return { picture, shape, pixelSize: size ? Number(size) : null, unit: resp.headers.get("X-Nanomorph-Pixel-Unit") };
}

async function infer(task, file) {
  const form = new FormData();
  let url = task;
  if (task === "classify") {
    form.append("images", file, file.name);
  } else {
    form.append("image", file, file.name);
    const ps = $("#pixel-size").value.trim();
    if (ps) {
      form.append("pixel_size", ps);
      form.append("pixel_unit", $("#pixel-unit").value.trim() || "nm");
    }
  }
  const resp = await fetch(url, { method: "POST", body: form, headers: authHeaders() });
  if (!resp.ok) throw new Error(await errorText(resp));
  const body = await resp.json();
  return task === "classify" ? body.results[0] : body;
}

async function runOne(file, task, runId) {
  const node = $("#card-template").content.firstElementChild.cloneNode(true);
  node.dataset.task = task;
  $(".filename", node).textContent = file.name;
  $("#results").append(node);
  const card = { node, view: { canvas: $("canvas", node), showOverlay: true } };
  try {
    const [pv, r] = await Promise.all([preview(file), infer(task, file)]);
    if (runId !== state.runId) return;
    card.view.picture = pv.picture;
    let size = pv.pixelSize, unit = pv.unit;
    if (task === "segment") {
      size = r.pixel_size;
      unit = r.pixel_unit;
      const overlay = await maskOverlay(r.mask_png, r.shape);
      card.view.overlay = overlay;
      const toggle = $(".overlay-toggle", node);
      toggle.hidden = false;
      $("input", toggle).addEventListener("change", (ev) => {
        card.view.showOverlay = ev.target.checked;
        render(card);
      });
      const fractions = {};
      for (const [cls, n] of Object.entries(r.morphology.classes || {})) fractions[cls] = n.area_fraction;
      if (r.morphology.summary && r.morphology.summary.background_fraction !== undefined) {
        fractions[r.morphology.summary.background] = r.morphology.summary.background_fraction;
      }
      legendItems($(".legend", node), r.legend, fractions);
      showSegment(card, r);
    } else {
      showClassify(card, r);
    }
    if (size && pv.shape.length === 2) card.view.scale = { size, unit: unit || "nm", width: pv.shape[1] };
    render(card);
    state.results.push(r);
    addDownloads(card, task, r);
    node.dataset.status = "done";
  } catch (err) {
    if (runId !== state.runId) return;
    $(".numbers", node).replaceChildren(el("p", { class: "error-text", text: String(err.message || err) }));
    node.dataset.status = "error";
  }
}

async function run() {
  const files = state.files;
  if (!files.length) return;
  const task = document.querySelector("input[name=task]:checked").value;
  const runId = ++state.runId;
  state.results = [];
  $("#results").replaceChildren();
  $("#batch").hidden = true;
  let done = 0;
  for (const file of files) {
    setStatus(`${task}: ${done + 1} of ${files.length} — ${file.name}`);
    await runOne(file, task, runId); // one file per request: a bad file fails only its own card
    if (runId !== state.runId) return;
    done++;
  }
  const failed = document.querySelectorAll('#results .card[data-status="error"]').length;
  setStatus(`${task}: ${files.length - failed} of ${files.length} done` + (failed ? `, ${failed} failed` : ""), failed > 0);
  updateBatchLinks(task);
  $("#batch").hidden = false;
}

function takeFiles(list) {
  state.files = Array.from(list);
  run();
}

// ------------------------------------------------------------------------------ start-up

async function loadModels() {
  const resp = await fetch("models", { headers: authHeaders() });
  if (resp.status === 401) {
    showToken();
    $("#models").textContent = "enter the access token to see the models";
    return;
  }
  if (!resp.ok) {
    $("#models").textContent = await errorText(resp);
    return;
  }
  const body = await resp.json();
  const lines = [];
  for (const m of body.models) {
    const radio = document.querySelector(`input[name=task][value=${m.task}]`);
    if (radio) {
      radio.disabled = !m.available;
      radio.parentElement.title = m.available ? m.tag : `not available: ${m.error}`;
    }
    if (m.task !== "embed") lines.push(`${m.task}: ${m.available ? m.tag : "not available"}`);
  }
  const checked = document.querySelector("input[name=task]:checked");
  if (checked && checked.disabled) {
    const other = document.querySelector("input[name=task]:not(:disabled)");
    if (other) other.click();
  }
  $("#models").textContent = lines.join(" · ") + (body.ready ? "" : " (still loading)");
}

async function start() {
  try {
    const resp = await fetch("ui/config.json");
    state.config = await resp.json();
  } catch (_) {
    setStatus("could not read the page configuration from the server", true);
  }
  $("#version").textContent = state.config.version ? "v" + state.config.version : "";
  const saved = sessionStorage.getItem("nanomorph-token");
  if (saved) $("#token").value = saved;
  if (state.config.auth) showToken();
  $("#token").addEventListener("change", () => {
    sessionStorage.setItem("nanomorph-token", token());
    loadModels();
  });
  $("#files").addEventListener("change", (ev) => takeFiles(ev.target.files));
  const drop = $("#drop");
  drop.addEventListener("dragover", (ev) => {
    ev.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    takeFiles(ev.dataTransfer.files);
  });
  const pixelBox = () => {
    // The pixel size only matters to segmentation (the numbers); classify ignores it.
    $("#pixel-box").hidden = document.querySelector("input[name=task]:checked").value !== "segment";
  };
  for (const radio of document.querySelectorAll("input[name=task]")) {
    radio.addEventListener("change", () => {
      pixelBox();
      run();
    });
  }
  pixelBox();
  $("#rerun").addEventListener("click", run);
  await loadModels();
}

start();
