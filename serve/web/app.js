// lvlm-hallu playground (serve/playground.py, docs/playground.md). Plain browser JavaScript: no
// build step, no library, nothing fetched from outside this server. Everything the page knows of
// the interventions comes from GET /v1/interventions; absent objects are marked by the server's
// CHAIR parser (POST /v1/playground/chair), attention maps come from POST /v1/playground/inspect.
"use strict";

const MAX_CONFIGS = 3;
const KEY_STORE = "lvlm-hallu-api-key";
const INFERNO = [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
  [250, 193, 39], [252, 255, 164]];  // matplotlib's "inferno" (the colour map lvlm inspect draws with), 8 stops

const state = {
  key: sessionStorage.getItem(KEY_STORE) || "",
  needsKey: false,
  catalog: [],        // GET /v1/interventions data
  samples: [],        // GET /v1/playground/samples data
  image: null,        // data URL of the chosen image
  sample: null,       // the chosen sample (objects known) or null
  configs: [],        // column 1..3: {spec text, ...}
  results: [],        // per column: {text, report, spec}
  jobs: [],
};

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
};

// -- API -------------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(message, status, body) { super(message); this.status = status; this.body = body; }
}

function headers(json) {
  const h = {};
  if (state.key) h.Authorization = "Bearer " + state.key;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function errorOf(res) {
  let text = await res.text();
  try {
    const body = JSON.parse(text);
    if (body && body.error) return new ApiError(body.error.message || res.statusText, res.status, body.error);
  } catch (_) { /* not JSON: show the text */ }
  return new ApiError(`${res.status} ${res.statusText}${text ? ": " + text.slice(0, 300) : ""}`, res.status, null);
}

async function api(path, { method = "GET", json } = {}) {
  const res = await fetch(path, { method, headers: headers(json !== undefined),
    body: json !== undefined ? JSON.stringify(json) : undefined });
  if (!res.ok) {
    const err = await errorOf(res);
    if (res.status === 401) askKey(err.message);
    throw err;
  }
  return res.json();
}

// POST /v1/chat/completions with stream: true; calls onDelta(text) per chunk, returns the last chunk's extras.
async function streamChat(body, onDelta) {
  const res = await fetch("/v1/chat/completions", { method: "POST", headers: headers(true),
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }) });
  if (!res.ok) {
    const err = await errorOf(res);
    if (res.status === 401) askKey(err.message);
    throw err;
  }
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", out = { report: null, usage: null, finish: null, model: null };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return out;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(chunk.error.message, 0, chunk.error);  // in-band, after the headers
        out.model = chunk.model || out.model;
        if (chunk.intervention_report) out.report = chunk.intervention_report;
        if (chunk.usage) out.usage = chunk.usage;
        const choice = (chunk.choices || [])[0];
        if (choice) {
          if (choice.delta && choice.delta.content) onDelta(choice.delta.content);
          if (choice.finish_reason) out.finish = choice.finish_reason;
        }
      }
    }
  }
  return out;
}

// -- API key ---------------------------------------------------------------------------------------
function askKey(message) {
  state.needsKey = true;
  const form = $("#key-form");
  form.hidden = false;
  if (message) showBanner(message);
  $("#api-key").focus();
}

function showBanner(message) {
  const b = $("#banner");
  b.textContent = message;
  b.hidden = !message;
}

// -- image input -----------------------------------------------------------------------------------
function setImage(url, sample) {
  state.image = url;
  state.sample = sample || null;
  const img = $("#preview");
  img.src = url;
  img.hidden = false;
  img.alt = sample ? sample.name : "uploaded image";
  $("#objects").textContent = sample
    ? `Objects in this image: ${sample.objects.join(", ")}. Others an answer names are marked.`
    : "Your image: its objects are unknown, so nothing is marked.";
  if (!sample) $("#sample-select").value = "";
}

function readFile(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) { showBanner(`${file.name} is not an image`); return; }
  const reader = new FileReader();
  reader.onload = () => setImage(reader.result, null);
  reader.readAsDataURL(file);
}

function wireImageInput() {
  const drop = $("#drop");
  $("#image-file").addEventListener("change", (e) => readFile(e.target.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    readFile(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData || {}).items || []].find((i) => i.type.startsWith("image/"));
    if (item) readFile(item.getAsFile());
  });
  $("#sample-select").addEventListener("change", (e) => {
    const s = state.samples.find((x) => String(x.id) === e.target.value);
    if (s) setImage(s.image, s);
  });
}

// -- configurations --------------------------------------------------------------------------------
// A column's spec: the text field is the truth (what the CLI takes); the controls write it.
function parseSpec(text) {
  const t = text.trim();
  if (!t || t === "none") return null;
  if (t.startsWith("[") || t.startsWith("{")) return JSON.parse(t);
  return t;
}

function specFromControls(card) {
  const items = [];
  let plain = true;
  for (const m of card.querySelectorAll(".method")) {
    if (!$("input.use", m).checked) continue;
    const preset = $("select.preset", m).value;
    const params = {};
    for (const input of m.querySelectorAll(".params input")) {
      if (input.value.trim() === "") continue;
      params[input.name] = input.dataset.type === "bool" ? input.value.trim() === "true"
        : input.dataset.type === "str" || Number.isNaN(Number(input.value)) ? input.value.trim() : Number(input.value);
    }
    if (Object.keys(params).length) plain = false;
    items.push({ name: m.dataset.name, preset, params });
  }
  if (plain) return items.map((i) => (i.preset === "default" ? i.name : `${i.name}:${i.preset}`)).join("+");
  return JSON.stringify(items.map((i) => ({ name: i.name, ...(i.preset !== "default" ? { preset: i.preset } : {}), ...i.params })));
}

function controlsFromSpec(card, text) {
  let items = [];
  try {
    const spec = parseSpec(text);
    if (typeof spec === "string") items = spec.split("+").map((s) => { const [name, preset] = s.trim().split(":"); return { name, preset: preset || "default" }; });
    else if (Array.isArray(spec)) items = spec.map((s) => (typeof s === "string" ? { name: s.split(":")[0], preset: s.split(":")[1] || "default" } : { preset: "default", ...s }));
  } catch (_) { return; }  // half-typed JSON: leave the controls as they are
  for (const m of card.querySelectorAll(".method")) {
    const item = items.find((i) => i.name === m.dataset.name);
    $("input.use", m).checked = !!item;
    $("select.preset", m).value = item && item.preset ? item.preset : "default";
    for (const input of m.querySelectorAll(".params input")) input.value = item && item[input.name] !== undefined ? item[input.name] : "";
    refreshSources(m);
  }
}

// The value a parameter takes and where it comes from: the request, the tuned profile, the paper.
function refreshSources(m) {
  const info = state.catalog.find((c) => c.name === m.dataset.name);
  const preset = $("select.preset", m).value;
  const values = info.preset_values || {};
  const chosen = preset === "tuned" && values.tuned ? values.tuned : values.paper || {};
  for (const input of m.querySelectorAll(".params input")) {
    const badge = input.parentElement.querySelector(`.src[data-for="${input.name}"]`) || input.nextElementSibling;
    const p = info.params.find((x) => x.name === input.name);
    let value = p.default, source = "paper";
    if (input.value.trim() !== "") { value = input.value; source = "request"; }
    else if (chosen[input.name] !== undefined && chosen[input.name] !== null) {
      value = chosen[input.name];
      source = preset === "tuned" && values.tuned ? "tuned" : "paper";
    }
    input.placeholder = value === null || value === undefined ? "auto" : JSON.stringify(value);
    badge.textContent = source;
    badge.className = "src " + source;
  }
  $("select.preset option[value=tuned]", m).disabled = info.preset_values ? !info.preset_values.tuned : false;
}

function methodControls(card, info) {
  const params = el("div", { class: "params", hidden: true });
  for (const p of info.params) {
    if (p.name === "preset" || p.name.startsWith("report_")) continue;
    params.append(el("span", { title: p.doc, text: p.name }),
      el("input", { name: p.name, "data-type": p.type, title: p.doc, "aria-label": `${info.name} ${p.name}` }),
      el("span", { class: "src", "data-for": p.name }));
  }
  const presets = el("select", { class: "preset", "aria-label": `${info.name} preset` },
    ...(info.presets || ["default"]).map((p) => el("option", { value: p, text: p })));
  const use = el("input", { type: "checkbox", class: "use" });
  const m = el("div", { class: "method", "data-name": info.name },
    el("label", { class: "name" }, use, el("strong", { text: info.name }), presets,
      el("button", { type: "button", class: "link", text: "params", "aria-label": `${info.name} parameters`,
        onclick: () => { params.hidden = !params.hidden; } })),
    el("div", { class: "paper", text: `${info.summary || ""} ${info.paper ? "(" + info.paper + ")" : ""}` }), params);
  const changed = () => { refreshSources(m); $("input.spec-text", card).value = specFromControls(card); };
  use.addEventListener("change", changed);
  presets.addEventListener("change", changed);
  params.addEventListener("input", changed);
  return m;
}

function addConfig(spec = "") {
  if (state.configs.length >= MAX_CONFIGS) return;
  const n = state.configs.length + 1;
  const card = el("div", { class: "config", "data-n": n });
  const text = el("input", { type: "text", class: "spec-text", "data-testid": `config-${n}`, value: spec,
    "aria-label": `configuration ${n} interventions`, placeholder: "e.g. vhr+pai or vhr:tuned" });
  text.addEventListener("input", () => controlsFromSpec(card, text.value));
  card.append(el("div", { class: "head" }, el("strong", { text: `Column ${n}` }),
    el("button", { type: "button", text: "remove", "aria-label": `remove column ${n}`, onclick: () => removeConfig(card) })), text);
  const builder = el("details", { class: "builder" }, el("summary", { text: "build with the catalog's controls" }));
  for (const info of state.catalog) builder.append(methodControls(card, info));
  card.append(builder);
  $("#config-list").append(card);
  state.configs.push(card);
  controlsFromSpec(card, spec);
  $("#add-config").disabled = state.configs.length >= MAX_CONFIGS;
  renderColumns();
}

function removeConfig(card) {
  const specs = state.configs.filter((c) => c !== card).map((c) => $("input.spec-text", c).value);
  state.configs.forEach((c) => c.remove());
  state.configs = [];
  specs.forEach((s) => addConfig(s));
  $("#add-config").disabled = false;
  renderColumns();
}

function columnSpecs() {
  return [{ n: 0, label: "Plain", text: "none" },
    ...state.configs.map((card, i) => ({ n: i + 1, label: `Column ${i + 1}`, text: $("input.spec-text", card).value.trim() || "none" }))];
}

// -- answers ---------------------------------------------------------------------------------------
function renderColumns() {
  const box = $("#columns");
  const specs = columnSpecs();
  while (box.children.length > specs.length) box.lastChild.remove();
  specs.forEach((s, i) => {
    let col = box.children[i];
    if (!col) {
      col = $("#column-template").content.firstElementChild.cloneNode(true);
      $(".answer", col).dataset.testid = `answer-${i}`;
      $(".report", col).dataset.testid = `report-${i}`;
      const button = $(".inspect", col);
      button.dataset.testid = `inspect-${i}`;
      button.addEventListener("click", () => lookInside(i));
      box.append(col);
    }
    $("h3", col).textContent = s.label;
    $(".spec", col).textContent = s.n === 0 ? "no interventions" : s.text;
    $(".inspect", col).hidden = s.n === 0;
  });
}

function answerSegments(node, segments) {
  node.replaceChildren(...segments.map((s) => (s.absent ? el("mark", { class: "absent", title: "not in the image", text: s.text }) : document.createTextNode(s.text))));
}

async function runColumn(col, spec, base) {
  const answer = $(".answer", col), marks = $(".marks", col), timings = $(".timings", col);
  const pre = $(".report pre", col);
  answer.replaceChildren();
  marks.textContent = timings.textContent = pre.textContent = "";
  $(".column-error", col)?.remove();
  answer.classList.add("streaming");
  const started = performance.now();
  let first = null, text = "", deltas = 0;
  try {
    const interventions = parseSpec(spec);
    const out = await streamChat({ ...base, interventions }, (delta) => {
      if (first === null) first = performance.now() - started;
      text += delta;
      answer.textContent = text;
      answer.dataset.deltas = String(++deltas);  // events shown one by one (tests read it: one network read can hold several)
    });
    const total = performance.now() - started;
    const r = out.report || {};
    timings.textContent = `first token ${fmt(first)} ms · total ${fmt(total)} ms · prefill ${fmt(r.prefill_ms)} ms · decode ${fmt(r.decode_ms)} ms (${fmt(r.decode_tokens_per_s, 1)} tok/s)` +
      (out.usage ? ` · ${out.usage.completion_tokens} tokens` : "");
    pre.textContent = JSON.stringify(r, null, 1);
    answer.dataset.done = "true";
    return { text, report: r };
  } catch (err) {
    answer.dataset.done = "error";
    col.insertBefore(el("p", { class: "error column-error", role: "alert", text: err.message }), answer.nextSibling);
    if (!text) answer.textContent = "(no answer)";
    return null;
  } finally {
    answer.classList.remove("streaming");
  }
}

async function markAbsent(col, text) {
  const marks = $(".marks", col);
  if (!state.sample) { marks.textContent = "objects unknown: nothing marked"; return; }
  try {
    const m = await api("/v1/playground/chair", { method: "POST", json: { text, sample: state.sample.id } });
    answerSegments($(".answer", col), m.segments);
    marks.textContent = m.absent.length ? `not in the image: ${m.absent.join(", ")}` :
      m.mentioned.length ? `names only objects in the image (${m.mentioned.join(", ")})` : "names no known object";
    $(".answer", col).dataset.marked = "true";
  } catch (err) {
    marks.textContent = "";
    col.insertBefore(el("p", { class: "error column-error", role: "alert", text: err.message }), marks);
  }
}

function fmt(v, digits = 0) { return v === null || v === undefined ? "-" : Number(v).toFixed(digits); }

async function run() {
  showBanner("");
  if (!state.image) { showBanner("Choose an image first: drop, paste or pick one, or take a shapes sample."); return; }
  renderColumns();
  const button = $("#run");
  button.disabled = true;
  const base = { model: $("#model").value || undefined, max_tokens: Number($("#max-tokens").value) || 32,
    messages: [{ role: "user", content: [{ type: "text", text: $("#prompt").value }, { type: "image_url", image_url: { url: state.image } }] }] };
  const cols = [...$("#columns").children];
  const specs = columnSpecs();
  try {
    state.results = await Promise.all(specs.map(async (s, i) => {
      const res = await runColumn(cols[i], s.text, base);
      if (res) await markAbsent(cols[i], res.text);
      return res && { ...res, spec: s.text };
    }));
  } finally {
    button.disabled = false;
  }
}

// -- look inside -----------------------------------------------------------------------------------
function colour(t) {
  const x = Math.min(Math.max(t, 0), 1) * (INFERNO.length - 1), i = Math.min(Math.floor(x), INFERNO.length - 2), f = x - i;
  return INFERNO[i].map((c, k) => Math.round(c + f * (INFERNO[i + 1][k] - c)));
}

function drawHeat(canvas, picture, map, vmax) {
  const rows = map ? map.length : 1, cols = map ? map[0].length : 1;
  const size = 192;
  canvas.width = canvas.height = size;
  const ctx = canvas.getContext("2d");
  return new Promise((resolve) => {
    const img = new Image();
    img.onload = () => {
      ctx.imageSmoothingEnabled = true;
      ctx.drawImage(img, 0, 0, size, size);
      if (map) {
        ctx.globalAlpha = 0.6;
        for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) {
          const [R, G, B] = colour(vmax > 0 ? map[r][c] / vmax : 0);
          ctx.fillStyle = `rgb(${R},${G},${B})`;
          ctx.fillRect(Math.floor(c * size / cols), Math.floor(r * size / rows), Math.ceil(size / cols), Math.ceil(size / rows));
        }
        ctx.globalAlpha = 1;
      }
      resolve();
    };
    img.src = picture;
  });
}

function scaleLegend(layer) {
  const stops = INFERNO.map((c, i) => `rgb(${c.join(",")}) ${Math.round(100 * i / (INFERNO.length - 1))}%`).join(",");
  return el("div", { class: "scale" },
    el("div", { class: "bar", style: `background: linear-gradient(90deg, ${stops})` }),
    el("span", { text: `0 … ${layer.vmax.toPrecision(2)}` }),
    el("span", { text: layer.clipped ? `${layer.clipped} patch${layer.clipped > 1 ? "es" : ""} above the scale (max ${layer.max.toPrecision(2)}) shown at its top` : "no patch above the scale" }));
}

async function lookInside(n) {
  const specs = columnSpecs();
  if (!state.image) { showBanner("Choose an image first."); return; }
  const section = $("#inside");
  section.hidden = false;
  const box = $("#heatmap");
  box.dataset.ready = "false";
  box.replaceChildren(el("p", { class: "hint", text: `Inspecting column ${n} (two runs of the model)…` }));
  $("#mass").replaceChildren();
  $("#inside-title").textContent = `column ${n}: ${specs[n].text}`;
  section.scrollIntoView({ behavior: "smooth", block: "start" });
  try {
    const data = await api("/v1/playground/inspect", { method: "POST", json: {
      image: state.image, prompt: $("#prompt").value, interventions: parseSpec(specs[n].text),
      max_tokens: Math.min(Number($("#max-tokens").value) || 24, 32) } });
    box.replaceChildren(el("p", { class: "hint", text: `before: “${data.answers.before}” · after: “${data.answers.after}”` }));
    for (const layer of data.layers) {
      const row = el("div", { class: "layer" });
      for (const label of ["before", "after"]) {
        data.panels.forEach((panel, p) => {
          const canvas = el("canvas", { "aria-label": `layer ${layer.layer} ${label}` });
          const maps = layer.maps[label];
          drawHeat(canvas, panel.image, maps ? maps[p] : null, layer.vmax);
          row.append(el("figure", {}, canvas, el("figcaption", {
            text: `L${layer.layer} ${label}${data.panels.length > 1 ? " · " + panel.name : ""} · mass ${layer.mass[label].toFixed(3)}${maps ? "" : " (image tokens gone)"}` })));
        });
      }
      row.append(scaleLegend(layer));
      box.append(row);
    }
    $("#mass").replaceChildren(massChart(data.mass, specs[n].text));
    box.dataset.ready = "true";
  } catch (err) {
    box.replaceChildren(el("p", { class: "error", role: "alert", text: err.message }));
    box.dataset.ready = "error";
  }
}

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const c of children) node.append(c);
  return node;
}

function massChart(mass, spec) {
  const W = 560, H = 220, L = 44, R = 12, T = 12, B = 34;
  const n = mass.before.length, top = Math.max(...mass.before, ...mass.after, 1e-6) * 1.1;
  const x = (i) => L + (n > 1 ? i * (W - L - R) / (n - 1) : 0), y = (v) => T + (1 - v / top) * (H - T - B);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "visual attention mass per layer" });
  for (const t of [0, 0.5, 1]) {
    root.append(svg("line", { x1: L, x2: W - R, y1: y(t * top), y2: y(t * top), stroke: "#d9dee5" }));
    const lab = svg("text", { x: L - 4, y: y(t * top) + 4, "text-anchor": "end", fill: "#5c6775" }); lab.textContent = (t * top).toFixed(2); root.append(lab);
  }
  for (let i = 0; i < n; i++) { const t = svg("text", { x: x(i), y: H - B + 14, "text-anchor": "middle", fill: "#5c6775" }); t.textContent = i; root.append(t); }
  const xl = svg("text", { x: (W + L) / 2, y: H - 4, "text-anchor": "middle", fill: "#5c6775" }); xl.textContent = "layer"; root.append(xl);
  const series = [["before", "#1f77b4", "without"], ["after", "#ff7f0e", `with ${spec}`]];
  series.forEach(([key, colour, label], k) => {
    root.append(svg("polyline", { points: mass[key].map((v, i) => `${x(i)},${y(v)}`).join(" "), fill: "none", stroke: colour, "stroke-width": 2, "stroke-dasharray": k ? "5 3" : "" }));
    mass[key].forEach((v, i) => root.append(svg("circle", { cx: x(i), cy: y(v), r: 3, fill: colour })));
    root.append(svg("rect", { x: W - R - 170, y: T + k * 16, width: 10, height: 10, fill: colour }));
    const t = svg("text", { x: W - R - 155, y: T + 9 + k * 16, fill: "#1d232b" }); t.textContent = label; root.append(t);
  });
  if (mass.exit_layer !== null && mass.exit_layer !== undefined) {
    root.append(svg("line", { x1: x(mass.exit_layer + 0.5), x2: x(mass.exit_layer + 0.5), y1: T, y2: H - B, stroke: "#d62728", "stroke-dasharray": "2 2" }));
  }
  return root;
}

// -- evaluation --------------------------------------------------------------------------------------
// The metrics the chart shows, by job kind: these names, for POPE in each split the job asked
// ("adversarial F1"); the values and their intervals come from the API.
const HEADLINE = { chair: ["CHAIR_s", "CHAIR_i", "Recall"], pope: ["F1", "Acc", "Yes"] };

async function startEval() {
  const status = $("#eval-status");
  const kind = $("#eval-kind").value, limit = Number($("#eval-limit").value) || 8, max_tokens = Number($("#eval-tokens").value) || 24;
  const specs = columnSpecs();
  $("#eval-start").disabled = true;
  $("#eval-chart").replaceChildren();
  status.dataset.state = "running";
  status.replaceChildren(el("p", { text: `Submitting ${specs.length} ${kind.toUpperCase()} job(s)…` }));
  try {
    const jobs = [];
    for (const s of specs) {  // same seed and limit: every job answers the same items
      const job = await api("/v1/eval/jobs", { method: "POST", json: { kind, limit, max_tokens, seed: 0, interventions: parseSpec(s.text),
        options: kind === "pope" ? { splits: ["adversarial"] } : {} } });
      jobs.push({ ...job, label: s.n === 0 ? "plain" : s.text });
    }
    state.jobs = jobs;
    await pollJobs(jobs);
  } catch (err) {
    status.dataset.state = "error";
    status.replaceChildren(el("p", { class: "error", role: "alert", text: err.message }));
  } finally {
    $("#eval-start").disabled = false;
  }
}

async function pollJobs(jobs) {
  const status = $("#eval-status");
  for (;;) {
    const now = await Promise.all(jobs.map((j) => api(`/v1/eval/jobs/${j.id}`)));
    now.forEach((j, i) => Object.assign(jobs[i], j));
    status.replaceChildren(...jobs.map((j) => el("div", { class: "job" },
      el("strong", { text: j.label }), el("progress", { max: j.progress.total || 1, value: j.progress.done }),
      el("span", { text: `${j.state} · ${j.progress.done}/${j.progress.total || "?"}` }),
      j.error ? el("span", { class: "error", text: j.error.message }) : null)));
    if (jobs.every((j) => ["succeeded", "failed", "cancelled"].includes(j.state))) break;
    await new Promise((r) => setTimeout(r, 1000));
  }
  const failed = jobs.filter((j) => j.state !== "succeeded");
  if (failed.length) {
    status.dataset.state = "error";
    status.append(el("p", { class: "error", role: "alert", text: failed.map((j) => `${j.label}: ${j.state}${j.error ? " (" + j.error.message + ")" : ""}`).join("; ") }));
    return;
  }
  let comparison = null;
  try {
    comparison = await api("/v1/playground/compare", { method: "POST", json: { jobs: jobs.map((j) => j.id) } });
  } catch (err) {
    status.append(el("p", { class: "error", role: "alert", text: `intervals unavailable: ${err.message}` }));
  }
  $("#eval-chart").replaceChildren(evalChart(jobs, comparison));
  status.dataset.state = "done";
  status.append(el("p", { text: `Done: ${jobs[0].kind.toUpperCase()} on ${jobs[0].progress.total} items per column.` }));
}

// One row per configuration and metric: its value, and for columns 1..3 the paired bootstrap
// interval of its difference to the plain model (from POST /v1/playground/compare).
function evalChart(jobs, comparison) {
  const kind = jobs[0].kind;
  const has = (m) => jobs.every((j) => j.metrics && typeof j.metrics[m] === "number");
  const names = Object.keys(jobs[0].metrics || {});
  let metrics = (HEADLINE[kind] || []).flatMap((h) => names.filter((m) => m === h || (kind === "pope" && m.endsWith(" " + h)))).filter(has);
  if (!metrics.length) metrics = names.filter(has).slice(0, 3);  // a kind this page does not know
  const rows = [];
  for (const m of metrics) jobs.forEach((j, i) => rows.push({ m, i, label: j.label, value: j.metrics[m],
    interval: comparison && i > 0 ? (comparison.data[i].intervals || {})[m] : null }));
  const W = 640, rowH = 22, T = 24, H = T + rows.length * rowH + 30, L = 190, R = 180;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "evaluation comparison" });
  const head = svg("text", { x: 4, y: 14, fill: "#1d232b", "font-weight": 600 });
  head.textContent = `${kind.toUpperCase()} per configuration; ` + (comparison && comparison.method
    ? `Δ [low, high] = difference to plain, ${Math.round(100 * comparison.level)}% paired bootstrap interval`
    : `no intervals (${comparison && comparison.note ? comparison.note : "comparison unavailable"})`);
  root.append(head);
  const scale = {};
  for (const m of metrics) scale[m] = Math.max(...rows.filter((r) => r.m === m).map((r) => Math.abs(r.value) + (r.interval ? Math.max(Math.abs(r.interval.low), Math.abs(r.interval.high)) : 0)), 1e-9);
  rows.forEach((r, k) => {
    const y = T + k * rowH;
    const label = svg("text", { x: 4, y: y + 14, fill: "#1d232b" }); label.textContent = `${r.m} · ${r.label}`; root.append(label);
    const w = (W - L - R) * Math.abs(r.value) / scale[r.m];
    root.append(svg("rect", { x: L, y: y + 4, width: Math.max(w, 1), height: rowH - 8, fill: r.i === 0 ? "#9aa7b8" : "#2457c5", rx: 2 }));
    if (r.interval) {
      const base = jobs[0].metrics[r.m], px = (v) => L + (W - L - R) * Math.abs(v) / scale[r.m];
      const lo = px(base + r.interval.low), hi = px(base + r.interval.high);
      root.append(svg("line", { x1: lo, x2: hi, y1: y + rowH / 2, y2: y + rowH / 2, stroke: "#1d232b", "stroke-width": 1.5 }));
      root.append(svg("line", { x1: lo, x2: lo, y1: y + 5, y2: y + rowH - 5, stroke: "#1d232b" }));
      root.append(svg("line", { x1: hi, x2: hi, y1: y + 5, y2: y + rowH - 5, stroke: "#1d232b" }));
    }
    const v = svg("text", { x: W - R + 6, y: y + 14, fill: "#1d232b" });
    v.textContent = `${r.value.toFixed(2)}` + (r.interval ? `  Δ ${r.interval.diff >= 0 ? "+" : ""}${r.interval.diff.toFixed(2)} [${r.interval.low.toFixed(2)}, ${r.interval.high.toFixed(2)}]` : "");
    root.append(v);
  });
  return root;
}

// -- start -------------------------------------------------------------------------------------------
async function load() {
  try {
    const [models, catalog, samples] = await Promise.all([api("/v1/models"), api("/v1/interventions"), api("/v1/playground/samples")]);
    $("#key-form").hidden = true;
    showBanner("");
    $("#model").replaceChildren(...models.data.map((m) => el("option", { value: m.id, text: m.id })));
    state.catalog = catalog.data;
    state.samples = samples.data;
    $("#sample-select").replaceChildren(el("option", { value: "", text: "- none: my own image -" }),
      ...samples.data.map((s) => el("option", { value: String(s.id), text: s.name })));
    if (!state.configs.length) addConfig("vhr");
    renderColumns();
    document.body.dataset.ready = "true";
  } catch (err) {
    if (err.status !== 401) showBanner(err.message);
  }
}

async function init() {
  wireImageInput();
  $("#add-config").addEventListener("click", () => addConfig(""));
  $("#run").addEventListener("click", run);
  $("#eval-start").addEventListener("click", startEval);
  $("#key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = $("#api-key").value.trim();
    sessionStorage.setItem(KEY_STORE, state.key);
    load();
  });
  renderColumns();
  let config = {};
  try { config = await (await fetch("/playground/config.json")).json(); } catch (_) { /* older server: find out on 401 */ }
  if (config.api_key && !state.key) { askKey(""); return; }
  load();
}

init();
