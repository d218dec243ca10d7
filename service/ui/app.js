// The zspace explorer: plain ES modules, no build step, nothing fetched from anywhere but this server.
// Every view keeps its state in the URL's hash (#/VIEW?key=value...), so a view can be bookmarked and shared.

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, attrs = {}, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) e.setAttribute(k, v === true ? "" : v);
  }
  for (const kid of kids.flat()) if (kid !== null && kid !== undefined) e.append(kid instanceof Node ? kid : String(kid));
  return e;
};

// ------------------------------------------------------------------ talking to the server

const TOKEN_KEY = "zspace.token";
const token = () => sessionStorage.getItem(TOKEN_KEY) || "";

class ServerError extends Error {
  constructor(status, body) {
    super(body && body.error ? body.error : `HTTP ${status}`);
    this.status = status; this.code = body && body.code; this.field = body && body.field;
  }
}

async function api(path, { method = "GET", json, form, binary = false } = {}) {
  const headers = {};
  if (token()) headers.Authorization = `Bearer ${token()}`;
  let body;
  if (json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(json); }
  if (form !== undefined) body = form;
  const r = await fetch(path, { method, headers, body });
  if (!r.ok) {
    let detail = null;
    try { detail = await r.json(); } catch (_) { /* not JSON */ }
    throw new ServerError(r.status, detail);
  }
  if (binary) return { buffer: await r.arrayBuffer(), headers: r.headers };
  return r.json();
}

function showError(err) {
  const b = $("#banner");
  b.className = "";
  if (err instanceof ServerError && err.status === 401) {
    b.textContent = "The server refused: it needs a bearer token. Enter it under Token above (it is kept for this tab only).";
    $("#token").focus();
  } else if (err instanceof ServerError) {
    b.textContent = `The server refused (${err.code || err.status}${err.field ? `, field ${err.field}` : ""}): ${err.message}`;
  } else {
    b.textContent = `Error: ${err.message || err}`;
  }
  b.hidden = false;
}
function clearBanner() { $("#banner").hidden = true; }
const guard = (fn) => async (...args) => { try { return await fn(...args); } catch (e) { showError(e); } };

const pngSrc = (b64) => `data:image/png;base64,${b64}`;
const b64bytes = (b64) => Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));

// ------------------------------------------------------------------ URL state

function parseHash() {
  const [path, q = ""] = location.hash.replace(/^#\/?/, "").split("?");
  return { view: path || "models", params: new URLSearchParams(q) };
}
function setParams(updates, push = false) {
  const { view, params } = parseHash();
  for (const [k, v] of Object.entries(updates)) {
    if (v === null || v === undefined || v === "") params.delete(k); else params.set(k, v);
  }
  const url = `#/${view}?${params.toString()}`;
  if (push) location.hash = url; else history.replaceState(null, "", url);
}

// ------------------------------------------------------------------ shared pieces

let modelsCache = null, indexesCache = null;
async function models() { return modelsCache || (modelsCache = (await api("/v1/models")).models); }
async function indexes() { return indexesCache || (indexesCache = (await api("/v1/indexes")).indexes); }

function picker(label, id, options, value, onchange) {
  const sel = el("select", { id, onchange: (e) => onchange(e.target.value) },
    options.map((o) => el("option", { value: o, selected: o === value }, o)));
  return [el("label", { for: id }, label), sel];
}

function thumb(view, caption) {
  const fig = el("figure", {});
  if (view.image) fig.append(el("img", { class: "pix", src: pngSrc(view.image), alt: `${view.key} (${view.image_source || "image"})` }));
  if (view.words) fig.append(el("div", { class: "words" }, view.words.slice(0, 6).map(([w]) => el("span", {}, w))));
  // A document's decoded words say little alone: its label (where the payload has one) goes with them.
  const label = view.words && view.payload && view.payload.label !== undefined ? ` · ${view.payload.label}` : "";
  fig.append(el("figcaption", {}, `${caption ?? view.key}${label}`));
  return fig;
}

function decodedItems(answer, captionOf) {
  if (answer.png) return answer.png.map((p, i) => el("figure", {}, el("img", { class: "pix", src: pngSrc(p), alt: captionOf(i) }), el("figcaption", {}, captionOf(i))));
  if (answer.words) return answer.words.map((ws, i) => el("figure", {}, el("div", { class: "words" }, ws.slice(0, 8).map(([w]) => el("span", {}, w))), el("figcaption", {}, captionOf(i))));
  return [el("p", { class: "muted" }, "this model's outputs are vectors: nothing to draw")];
}

const decodeOptions = (model) => (model.modality === "image" ? { return_png: true, tensors: false } : model.modality === "text" ? { top_words: 8, tensors: false } : { tensors: true });

// ------------------------------------------------------------------ Models

async function viewModels(main, params) {
  const list = await models();
  if (!list.length) { main.append(el("p", {}, "No models are loaded.")); return; }
  const name = params.get("model") || list[0].name;
  const model = list.find((m) => m.name === name) || list[0];
  const version = params.get("version") || model.version;
  main.append(el("div", { class: "controls" }, picker("Model", "model-pick", list.map((m) => m.name), model.name,
    (v) => setParams({ model: v, version: null }, true))));
  const info = await api(`/v1/models/${encodeURIComponent(model.name)}/manifest?version=${version}`);
  const m = info.manifest;
  const rows = [["kind", m.kind], ["modality", m.modality], ["input", `${m.input_dim}${m.input_shape ? ` (${m.input_shape.join("×")})` : ""}`],
    ["latent dim", m.latent_dim], ["version", `${info.version} of ${model.versions.join(", ")}`], ["precision", model.precision],
    ["provider", model.execution_provider], ["prior", m.prior && m.prior.type],
    ["test squared error", m.metrics && m.metrics.test_sq_error !== undefined ? Number(m.metrics.test_sq_error).toFixed(3) : "—"]];
  const left = el("div", { class: "panel" }, el("h2", {}, `${info.name}/${info.version}`),
    el("table", { class: "kv" }, rows.map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", {}, v ?? "—")))),
    el("details", {}, el("summary", {}, "manifest.json"), el("pre", { style: "max-height:320px;overflow:auto;font-size:11px" }, JSON.stringify({ ...m, transform: m.transform && m.transform.vocab ? { ...m.transform, vocab: `${m.transform.vocab.length} words` } : m.transform }, null, 1))));
  const samples = el("div", { class: "panel", id: "samples" }, el("h3", {}, "Samples from the prior"));
  const recon = el("div", { class: "panel", id: "reconstructions" }, el("h3", {}, "Reconstructions of indexed items"));
  const figs = el("div", { class: "panel" }, el("h3", {}, "Training figures"),
    info.figures.length ? info.figures.map((f) => el("figure", { style: "margin:0 0 .75rem" }, el("img", { class: "fig", alt: f, "data-figure": f }), el("figcaption", { class: "muted" }, f))) : el("p", { class: "muted" }, "none in the bundle"));
  main.append(el("div", { class: "row" }, el("div", { style: "flex:1 1 360px" }, left, samples, recon), el("div", { style: "flex:1 1 420px" }, figs)));
  for (const img of figs.querySelectorAll("img[data-figure]")) {  // fetched with the token, shown from a blob
    api(`/v1/models/${encodeURIComponent(model.name)}/figures/${encodeURIComponent(img.dataset.figure)}?version=${version}`, { binary: true })
      .then(({ buffer }) => { img.src = URL.createObjectURL(new Blob([buffer], { type: "image/png" })); }).catch(showError);
  }
  const gen = await api(`/v1/models/${encodeURIComponent(model.name)}/generate`, { method: "POST", json: { version: Number(version), count: 24, seed: 0, ...decodeOptions(model) } });
  samples.append(el("div", { class: "grid" }, decodedItems(gen, (i) => `#${i}`)));
  const ix = (await indexes()).find((x) => x.model === model.name);
  if (!ix) { recon.append(el("p", { class: "muted" }, "no index of this model is served")); return; }
  let map;
  try { map = await api(`/v1/indexes/${encodeURIComponent(ix.name)}/map`); } catch (e) { map = null; }
  if (!map) { recon.append(el("p", { class: "muted" }, `index ${ix.name} has no map yet (zspace index map)`)); return; }
  const keys = [];
  for (let r = 0; r < map.rows && keys.length < 12; r += Math.max(1, Math.floor(map.rows / 12))) {
    try { keys.push((await api(`/v1/indexes/${encodeURIComponent(ix.name)}/map/rows/${r}`)).key); } catch (_) { /* an emptied row */ }
  }
  const views = (await api(`/v1/indexes/${encodeURIComponent(ix.name)}/views`, { method: "POST", json: { keys } })).views;
  recon.append(el("div", { class: "grid" }, views.map((v) => thumb(v))));
}

// ------------------------------------------------------------------ Map

const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
  "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5"];
const rgba = (hex, a = 255) => { const n = parseInt(hex.slice(1), 16); return (a << 24) | ((n & 255) << 16) | (((n >> 8) & 255) << 8) | (n >> 16); };
const RAMP = ["#440154", "#3b528b", "#21918c", "#5ec962", "#fde725"];
function rampColour(t) {
  if (!(t >= 0)) return rgba("#c0c0c0", 160);
  const x = Math.min(t, 1) * (RAMP.length - 1), i = Math.min(Math.floor(x), RAMP.length - 2), f = x - i;
  const a = parseInt(RAMP[i].slice(1), 16), b = parseInt(RAMP[i + 1].slice(1), 16);
  const ch = (s) => Math.round(((a >> s) & 255) * (1 - f) + ((b >> s) & 255) * f);
  return (255 << 24) | (ch(0) << 16) | (ch(8) << 8) | ch(16);
}

// What the benchmark and the tests read: draw times of the map (ms), and the first one since the page loaded.
window.zspaceStats = { draws: 0, drawMs: [], firstDrawAt: null, points: 0 };

class MapView {
  constructor(canvas, xy, rows) {
    this.canvas = canvas; this.xy = xy; this.rows = rows;
    this.colours = new Uint32Array(rows).fill(rgba("#2f5bd3", 200));
    this.mask = null; this.selected = -1; this.marked = [];
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (let i = 0; i < rows; i++) {
      const x = xy[2 * i], y = xy[2 * i + 1];
      if (x !== x) continue;  // an emptied row (NaN)
      if (x < x0) x0 = x; if (x > x1) x1 = x; if (y < y0) y0 = y; if (y > y1) y1 = y;
    }
    if (!(x1 > x0)) { x0 -= 1; x1 += 1; } if (!(y1 > y0)) { y0 -= 1; y1 += 1; }
    this.bounds = [x0, y0, x1, y1];
    this.buildGrid();
    this.reset();
  }

  // A uniform grid over the points (a counting sort of cell numbers): hover finds its nearest point in a few cells.
  buildGrid() {
    const [x0, y0, x1, y1] = this.bounds, n = this.rows;
    const g = this.g = Math.max(1, Math.min(2048, Math.ceil(Math.sqrt(n / 4))));
    const cell = new Int32Array(n), start = new Int32Array(g * g + 1);
    for (let i = 0; i < n; i++) {
      const x = this.xy[2 * i], y = this.xy[2 * i + 1];
      if (x !== x) { cell[i] = -1; continue; }
      const cx = Math.min(g - 1, Math.floor(((x - x0) / (x1 - x0)) * g)), cy = Math.min(g - 1, Math.floor(((y - y0) / (y1 - y0)) * g));
      cell[i] = cy * g + cx; start[cell[i] + 1]++;
    }
    for (let c = 0; c < g * g; c++) start[c + 1] += start[c];
    const fill = start.slice(0, g * g), order = new Int32Array(start[g * g]);
    for (let i = 0; i < n; i++) if (cell[i] >= 0) order[fill[cell[i]]++] = i;
    this.start = start; this.order = order;
  }

  reset() {
    const [x0, y0, x1, y1] = this.bounds, w = this.canvas.clientWidth || 800, h = this.canvas.clientHeight || 600;
    this.scale = 0.92 * Math.min(w / (x1 - x0), h / (y1 - y0));
    this.cx = (x0 + x1) / 2; this.cy = (y0 + y1) / 2;
  }

  toScreen(x, y) { const w = this.canvas.width, h = this.canvas.height, d = devicePixelRatio || 1; return [w / 2 + (x - this.cx) * this.scale * d, h / 2 - (y - this.cy) * this.scale * d]; }
  toData(px, py) { return [this.cx + (px - this.canvas.clientWidth / 2) / this.scale, this.cy - (py - this.canvas.clientHeight / 2) / this.scale]; }

  // Level of detail: a pixel per point when the view is crowded, bigger dots as it thins out; straight into an
  // ImageData, which draws a million points in tens of milliseconds where canvas paths would take seconds.
  draw() {
    const t0 = performance.now(), d = devicePixelRatio || 1;
    const w = this.canvas.width = Math.max(1, Math.round(this.canvas.clientWidth * d));
    const h = this.canvas.height = Math.max(1, Math.round(this.canvas.clientHeight * d));
    const ctx = this.canvas.getContext("2d"), img = ctx.createImageData(w, h), px = new Uint32Array(img.data.buffer);
    px.fill(0xffffffff);
    const visible = this.rows * Math.min(1, (w * h) / (d * d) / (this.canvas.clientWidth * this.canvas.clientHeight));
    const r = visible > 200000 ? 0 : visible > 20000 ? 1 : 2;
    const k = this.scale * d, ox = w / 2 - this.cx * k, oy = h / 2 + this.cy * k;
    const dim = rgba("#d0d4da", 255), xy = this.xy, colours = this.colours, mask = this.mask;
    for (let pass = mask ? 0 : 1; pass < 2; pass++) {  // filtered-out points first, greyed, under the matching ones
      for (let i = 0; i < this.rows; i++) {
        const x = xy[2 * i]; if (x !== x) continue;
        const match = !mask || (mask[i >> 3] >> (i & 7)) & 1;
        if ((pass === 0) === !!match) continue;
        const sx = Math.round(ox + x * k), sy = Math.round(oy - xy[2 * i + 1] * k);
        if (sx < r || sy < r || sx >= w - r || sy >= h - r) continue;
        const c = match ? colours[i] : dim;
        if (r === 0) { px[sy * w + sx] = c; continue; }
        for (let dy = -r; dy <= r; dy++) for (let dx = -r; dx <= r; dx++) px[(sy + dy) * w + sx + dx] = c;
      }
    }
    ctx.putImageData(img, 0, 0);
    ctx.lineWidth = 2 * d;
    for (const [i, colour] of [...this.marked.map((i) => [i, "#ff7f0e"]), [this.selected, "#111"]]) {
      if (i < 0) continue;
      const [sx, sy] = this.toScreen(xy[2 * i], xy[2 * i + 1]);
      ctx.strokeStyle = colour; ctx.beginPath(); ctx.arc(sx, sy, 6 * d, 0, 2 * Math.PI); ctx.stroke();
    }
    const ms = performance.now() - t0, s = window.zspaceStats;
    s.draws++; s.drawMs.push(ms); if (s.drawMs.length > 200) s.drawMs.shift();
    if (s.firstDrawAt === null) s.firstDrawAt = performance.now();
    s.points = this.rows;
    this.canvas.dataset.draws = String(s.draws);
  }

  nearest(px, py, radiusPx = 8) {
    const [x, y] = this.toData(px, py), rad = radiusPx / this.scale, [x0, y0, x1, y1] = this.bounds, g = this.g;
    const cw = (x1 - x0) / g, ch = (y1 - y0) / g;
    const ca = Math.max(0, Math.floor((x - rad - x0) / cw)), cb = Math.min(g - 1, Math.floor((x + rad - x0) / cw));
    const ra = Math.max(0, Math.floor((y - rad - y0) / ch)), rb = Math.min(g - 1, Math.floor((y + rad - y0) / ch));
    let best = -1, bestD = rad * rad, seen = 0;
    for (let cy = ra; cy <= rb && seen < 20000; cy++) for (let cx = ca; cx <= cb; cx++) {
      const c = cy * g + cx;
      for (let j = this.start[c]; j < this.start[c + 1]; j++) {
        const i = this.order[j]; seen++;
        if (this.mask && !((this.mask[i >> 3] >> (i & 7)) & 1)) continue;
        const dx = this.xy[2 * i] - x, dy = this.xy[2 * i + 1] - y, dd = dx * dx + dy * dy;
        if (dd <= bestD) { bestD = dd; best = i; }
      }
    }
    return best;
  }
}

async function viewMap(main, params) {
  const list = await indexes();
  if (!list.length) { main.append(el("p", {}, "No indexes are served.")); return; }
  const name = params.get("index") || list[0].name;
  const ix = list.find((x) => x.name === name) || list[0];
  const base = `/v1/indexes/${encodeURIComponent(ix.name)}`;
  let info;
  try { info = await api(`${base}/map`); } catch (e) {
    if (e instanceof ServerError && e.status === 404) { main.append(el("p", {}, e.message)); return; }
    throw e;
  }
  const filterInput = el("input", { type: "text", id: "map-filter", size: 28, placeholder: "label == 3 and split == test", value: params.get("where") || "" });
  const colourPick = el("select", { id: "map-colour" }, el("option", { value: "" }, "(none)"));
  const status = el("span", { class: "muted stat", id: "map-status" });
  const canvas = el("canvas", { id: "map-canvas", tabindex: 0, "aria-label": `map of index ${ix.name}: arrows pan, + and - zoom, 0 resets, Enter selects the point under the cursor` });
  const tip = el("div", { id: "tip", hidden: true });
  const legend = el("div", { class: "legend", id: "legend" });
  const detail = el("div", { id: "detail" }, el("p", { class: "muted" }, "Hover a point to see it; click to see its neighbours."));
  main.append(
    el("div", { class: "controls" }, picker("Index", "index-pick", list.map((x) => x.name), ix.name, (v) => setParams({ index: v, where: null, colour: null, sel: null }, true)),
      el("label", { for: "map-colour" }, "Colour by"), colourPick,
      el("form", { onsubmit: (e) => { e.preventDefault(); applyFilter(); } }, el("label", { for: "map-filter" }, "Filter "), filterInput, " ", el("button", { type: "submit" }, "Apply")),
      status),
    el("div", { class: "row" }, el("div", { id: "map-wrap" }, canvas, tip), el("div", { id: "side", class: "panel" }, legend, detail)));

  const { buffer, headers } = await api(`${base}/map/points`, { binary: true });
  const rows = Number(headers.get("X-Map-Rows"));
  const view = window.zspaceMap = new MapView(canvas, new Float32Array(buffer), rows);  // window: benchmarks and tests
  status.textContent = `${info.count.toLocaleString()} items · ${info.method}`;
  view.draw();
  // Redraw when the canvas changes size (the window, or a scrollbar appearing as the side panel grows): the
  // mapping from screen to map must stay the one drawn, or hover would name the wrong point.
  let drawnSize = `${canvas.clientWidth}x${canvas.clientHeight}`;
  new ResizeObserver(() => {
    const size = `${canvas.clientWidth}x${canvas.clientHeight}`;
    if (size !== drawnSize && canvas.isConnected) { drawnSize = size; view.draw(); }
  }).observe(canvas);

  // Colour: the payload fields of a first item name the choices.
  try {
    let first = 0; while (first < rows && view.xy[2 * first] !== view.xy[2 * first]) first++;
    const sample = await api(`${base}/map/rows/${first}`);
    for (const f of Object.keys(sample.payload)) colourPick.append(el("option", { value: f }, f));
  } catch (_) { /* an empty map */ }
  const colourBy = guard(async (field) => {
    setParams({ colour: field });
    legend.replaceChildren();
    if (!field) { view.colours.fill(rgba("#2f5bd3", 200)); view.draw(); return; }
    const c = await api(`${base}/map/colours?field=${encodeURIComponent(field)}`);
    if (c.kind === "category") {
      const codes = b64bytes(c.codes), table = PALETTE.map((p) => rgba(p));
      for (let i = 0; i < rows; i++) view.colours[i] = codes[i] < 254 ? table[codes[i] % table.length] : rgba("#9aa0a6", 180);
      legend.append(...c.labels.map((l, i) => el("span", {}, el("i", { style: `background:${PALETTE[i % PALETTE.length]}` }), `${l} (${c.counts[i]})`)));
      if (c.other) legend.append(el("span", {}, el("i", { style: "background:#9aa0a6" }), `other (${c.other})`));
    } else {
      const vals = new Float32Array(b64bytes(c.values).buffer), span = c.max - c.min || 1;
      for (let i = 0; i < rows; i++) view.colours[i] = rampColour((vals[i] - c.min) / span);
      legend.append(el("span", {}, `${field}: ${c.min.toPrecision(4)} `, el("i", { style: `background:linear-gradient(90deg,${RAMP.join(",")});width:80px` }), ` ${c.max.toPrecision(4)}`));
    }
    view.draw();
  });
  colourPick.addEventListener("change", (e) => colourBy(e.target.value));

  const applyFilter = guard(async () => {
    const text = filterInput.value.trim();
    setParams({ where: text });
    if (!text) { view.mask = null; view.draw(); status.textContent = `${info.count.toLocaleString()} items · ${info.method}`; return; }
    const q = text.split(/\s+and\s+|;/i).map((c) => `where=${encodeURIComponent(c.trim())}`).join("&");
    const r = await api(`${base}/map/mask?${q}`, { binary: true });
    view.mask = new Uint8Array(r.buffer);
    status.textContent = `${Number(r.headers.get("X-Matches")).toLocaleString()} of ${info.count.toLocaleString()} match`;
    clearBanner(); view.draw();
  });

  // Hover: the nearest point within a few pixels, its view fetched once (cached) and at most one request at a time.
  const cache = new Map(); let pending = null, hovered = -1, mouse = [0, 0];
  const rowView = async (i) => { if (!cache.has(i)) cache.set(i, api(`${base}/map/rows/${i}`)); return cache.get(i); };
  const showTip = guard(async (i, px, py) => {
    hovered = i;
    if (i < 0) { tip.hidden = true; return; }
    const v = await rowView(i);
    if (hovered !== i) return;
    tip.replaceChildren(thumb(v, v.key), el("div", {}, Object.entries(v.payload).slice(0, 4).map(([k, val]) => el("div", {}, `${k}: ${JSON.stringify(val)}`))));
    tip.style.left = `${Math.min(px + 14, canvas.clientWidth - 180)}px`; tip.style.top = `${py + 14}px`; tip.hidden = false;
  });
  canvas.addEventListener("mousemove", (e) => {
    mouse = [e.offsetX, e.offsetY];
    if (drag) return;
    if (pending) return;
    pending = requestAnimationFrame(() => { pending = null; const i = view.nearest(...mouse); if (i !== hovered) showTip(i, ...mouse); });
  });
  canvas.addEventListener("mouseleave", () => { tip.hidden = true; hovered = -1; });

  const select = guard(async (i) => {
    if (i < 0) return;
    view.selected = i; view.marked = []; view.draw();
    const v = await rowView(i);
    setParams({ sel: v.key });
    const k = 12, filterText = filterInput.value.trim();
    const body = { key: v.key, k: k + 1 };
    if (filterText) body.filter = filterText.split(/\s+and\s+|;/i).map((c) => c.trim());
    const hits = (await api(`${base}/search`, { method: "POST", json: body })).results[0].filter((h) => h.key !== v.key).slice(0, k);
    const views = hits.length ? (await api(`${base}/views`, { method: "POST", json: { keys: hits.map((h) => h.key) } })).views : [];
    detail.replaceChildren(el("h3", {}, "Selected"), thumb(v, v.key), el("pre", { style: "font-size:11px;white-space:pre-wrap" }, JSON.stringify(v.payload)),
      el("div", { class: "controls" }, el("button", { class: "plain", onclick: () => setParams({ a: v.key }) }, "Use as A"), el("button", { class: "plain", onclick: () => { const a = parseHash().params.get("a"); location.hash = `#/interpolate?index=${encodeURIComponent(ix.name)}&a=${encodeURIComponent(a || v.key)}&b=${encodeURIComponent(v.key)}`; } }, "Interpolate A → this")),
      el("h3", {}, `Neighbours (${hits.length})`), el("div", { class: "grid", id: "neighbours" }, views.map((nv, j) => thumb(nv, `${hits[j].distance.toFixed(3)}`))));
  });
  let drag = null;
  canvas.addEventListener("mousedown", (e) => { drag = { x: e.offsetX, y: e.offsetY, cx: view.cx, cy: view.cy, moved: false }; });
  window.addEventListener("mouseup", (e) => {
    if (!drag) return;
    const wasDrag = drag.moved; drag = null;
    if (!wasDrag && e.target === canvas) select(view.nearest(e.offsetX, e.offsetY));
  });
  canvas.addEventListener("mousemove", (e) => {
    if (!drag) return;
    const dx = e.offsetX - drag.x, dy = e.offsetY - drag.y;
    if (Math.abs(dx) + Math.abs(dy) > 3) drag.moved = true;
    if (drag.moved) { view.cx = drag.cx - dx / view.scale; view.cy = drag.cy + dy / view.scale; view.draw(); }
  });
  canvas.addEventListener("wheel", (e) => {
    e.preventDefault();
    const [x, y] = view.toData(e.offsetX, e.offsetY), f = Math.exp(-e.deltaY * 0.0015);
    view.scale *= f; view.cx = x - (x - view.cx) / f; view.cy = y - (y - view.cy) / f; view.draw();
  }, { passive: false });
  canvas.addEventListener("keydown", (e) => {
    const step = 60 / view.scale;
    const keys = { ArrowLeft: () => { view.cx -= step; }, ArrowRight: () => { view.cx += step; }, ArrowUp: () => { view.cy += step; },
      ArrowDown: () => { view.cy -= step; }, "+": () => { view.scale *= 1.25; }, "=": () => { view.scale *= 1.25; }, "-": () => { view.scale /= 1.25; }, 0: () => view.reset() };
    if (keys[e.key]) { e.preventDefault(); keys[e.key](); view.draw(); }
    else if (e.key === "Enter") { e.preventDefault(); select(hovered >= 0 ? hovered : view.nearest(canvas.clientWidth / 2, canvas.clientHeight / 2, 40)); }
    else if (e.key === "Escape") { tip.hidden = true; view.selected = -1; view.draw(); }
  });

  if (params.get("colour")) { colourPick.value = params.get("colour"); await colourBy(params.get("colour")); }
  if (params.get("where")) await applyFilter();
  if (params.get("sel")) {  // a shared URL names its selection by key; the server knows its row
    const r = await api(`${base}/map/find?key=${encodeURIComponent(params.get("sel"))}`);
    await select(r.row);
  }
}

// ------------------------------------------------------------------ Query

async function viewQuery(main, params) {
  const list = await indexes();
  if (!list.length) { main.append(el("p", {}, "No indexes are served.")); return; }
  const ix = list.find((x) => x.name === params.get("index")) || list[0];
  const model = (await models()).find((m) => m.name === ix.model);
  const base = `/v1/indexes/${encodeURIComponent(ix.name)}`;
  const out = el("div", { id: "query-out" });
  const run = guard(async (inputs, formData, file) => {
    clearBanner();
    out.replaceChildren(el("p", { class: "muted" }, "Encoding…"));
    const mbase = `/v1/models/${encodeURIComponent(ix.model)}`;
    const send = (path, extra) => (formData ? api(path, { method: "POST", form: withFields(formData, extra) }) : api(path, { method: "POST", json: { inputs, ...extra } }));
    const enc = await send(`${mbase}/encode`, { version: ix.model_version });
    const rec = await send(`${mbase}/reconstruct`, { version: ix.model_version, ...decodeOptions(model) });
    const hits = (await send(`${base}/search`, { k: 12 })).results[0];
    const views = hits.length ? (await api(`${base}/views`, { method: "POST", json: { keys: hits.map((h) => h.key) } })).views : [];
    const given = file ? el("img", { class: "pix", src: URL.createObjectURL(file), alt: file.name })
      : el("p", { class: "words", style: "max-width:260px" }, (inputs.texts[0] || "").slice(0, 200));
    out.replaceChildren(
      el("div", { class: "row" },
        el("div", { class: "panel" }, el("h3", {}, "Query"), given),
        el("div", { class: "panel" }, el("h3", {}, "Code"), el("code", { class: "z", id: "query-code" }, `[${enc.mean[0].map((v) => v.toFixed(3)).join(", ")}]`)),
        el("div", { class: "panel" }, el("h3", {}, "Reconstruction"), el("div", { class: "grid", id: "query-recon" }, decodedItems(rec, () => "decoded")))),
      el("div", { class: "panel", style: "margin-top:1rem" }, el("h3", {}, `Neighbours in ${ix.name}`), el("div", { class: "grid", id: "query-neighbours" }, views.map((v, j) => thumb(v, hits[j].distance.toFixed(3))))));
  });
  const pickers = el("div", { class: "controls" }, picker("Index", "index-pick", list.map((x) => x.name), ix.name, (v) => setParams({ index: v }, true)));
  main.append(pickers);
  if (model && model.modality === "text") {
    const ta = el("textarea", { id: "query-text", rows: 5, cols: 70, placeholder: "Paste a document" }, params.get("text") || "");
    main.append(el("form", { onsubmit: (e) => { e.preventDefault(); setParams({ text: ta.value.slice(0, 1500) }); run({ texts: [ta.value] }); } },
      el("label", { for: "query-text" }, "Document"), el("br"), ta, el("br"), el("button", { type: "submit" }, "Encode and search")));
    if (params.get("text")) run({ texts: [params.get("text")] });
  } else {
    const file = el("input", { type: "file", id: "query-file", accept: "image/png,image/jpeg", style: "display:block;margin:.5rem auto" });
    const drop = el("div", { class: "drop", id: "drop", tabindex: 0, role: "button", "aria-label": "drop an image here, or press Enter to choose a file" },
      el("p", {}, "Drop an image here (PNG or JPEG), or choose one:"), file);
    const take = (f) => { if (!f) return; const fd = new FormData(); fd.append("image", f, f.name); run(null, fd, f); };
    drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); take(e.dataTransfer.files[0]); });
    drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); file.click(); } });
    file.addEventListener("change", () => take(file.files[0]));
    main.append(drop);
  }
  main.append(out);
}

function withFields(formData, extra) {
  const fd = new FormData();
  for (const [k, v] of formData.entries()) fd.append(k, v);
  for (const [k, v] of Object.entries(extra)) fd.append(k, JSON.stringify(v));
  return fd;
}

// ------------------------------------------------------------------ Interpolate

async function viewInterpolate(main, params) {
  const list = await indexes();
  if (!list.length) { main.append(el("p", {}, "No indexes are served.")); return; }
  const ix = list.find((x) => x.name === params.get("index")) || list[0];
  const model = (await models()).find((m) => m.name === ix.model);
  const base = `/v1/indexes/${encodeURIComponent(ix.name)}`;
  const a = el("input", { type: "text", id: "interp-a", size: 26, value: params.get("a") || "" });
  const b = el("input", { type: "text", id: "interp-b", size: 26, value: params.get("b") || "" });
  const steps = el("input", { type: "number", id: "interp-steps", min: 2, max: 64, value: params.get("steps") || 10, style: "width:4.5rem" });
  const sph = el("input", { type: "checkbox", id: "interp-sph", checked: params.get("spherical") === "1" });
  const out = el("div", { class: "panel", id: "interp-out" });
  const pickRandom = guard(async (input) => {
    const info = await api(`${base}/map`);
    for (let tries = 0; tries < 8; tries++) {
      try { input.value = (await api(`${base}/map/rows/${Math.floor(Math.random() * info.rows)}`)).key; return; } catch (_) { /* an emptied row */ }
    }
  });
  const run = guard(async () => {
    clearBanner();
    setParams({ a: a.value, b: b.value, steps: steps.value, spherical: sph.checked ? "1" : null });
    const [va, vb] = await Promise.all([a.value, b.value].map((k) => api(`${base}/items/${encodeURIComponent(k)}`)));
    const ends = [va.vector, vb.vector];
    const t0 = performance.now();
    const path = await api(`/v1/models/${encodeURIComponent(ix.model)}/interpolate`, { method: "POST",
      json: { version: ix.model_version, latents: ends, steps: Number(steps.value), spherical: sph.checked, ...decodeOptions(model) } });
    const ms = performance.now() - t0;
    const views = (await api(`${base}/views`, { method: "POST", json: { keys: [a.value, b.value] } })).views;
    out.replaceChildren(el("div", { class: "strip", id: "interp-strip" }, thumb(views[0], "A"), decodedItems(path, (i) => `${i}`), thumb(views[1], "B")),
      el("p", { class: "muted stat" }, `decoded ${Number(steps.value)} points in ${ms.toFixed(0)} ms`));
  });
  main.append(el("form", { class: "controls", onsubmit: (e) => { e.preventDefault(); run(); } },
    picker("Index", "index-pick", list.map((x) => x.name), ix.name, (v) => setParams({ index: v, a: null, b: null }, true)),
    el("label", { for: "interp-a" }, "A"), a, el("button", { type: "button", class: "plain", onclick: () => pickRandom(a) }, "random"),
    el("label", { for: "interp-b" }, "B"), b, el("button", { type: "button", class: "plain", onclick: () => pickRandom(b) }, "random"),
    el("label", { for: "interp-steps" }, "steps"), steps, el("label", { for: "interp-sph" }, "spherical"), sph,
    el("button", { type: "submit", id: "interp-go" }, "Interpolate")), out);
  if (a.value && b.value) await run();
}

// ------------------------------------------------------------------ Generate

async function viewGenerate(main, params) {
  const list = await models();
  if (!list.length) { main.append(el("p", {}, "No models are loaded.")); return; }
  const model = list.find((m) => m.name === params.get("model")) || list[0];
  const mbase = `/v1/models/${encodeURIComponent(model.name)}`;
  const K = model.latent_dim;
  const z = (params.get("z") || "").split(",").map(Number).filter((v) => Number.isFinite(v));
  while (z.length < K) z.push(0); z.length = K;
  const out = el("div", { id: "gen-out", class: "grid", style: "max-width:220px" });
  const timing = el("p", { class: "muted stat", id: "gen-timing" });
  // Live decoding: one request in flight, and the latest slider position wins when it returns.
  let inFlight = false, again = false;
  const decode = guard(async () => {
    if (inFlight) { again = true; return; }
    inFlight = true;
    try {
      const t0 = performance.now();
      const r = await api(`${mbase}/decode`, { method: "POST", json: { latents: [z], ...decodeOptions(model) } });
      timing.textContent = `decoded in ${(performance.now() - t0).toFixed(0)} ms`;
      out.replaceChildren(...decodedItems(r, () => "decoded"));
      out.dataset.decodes = String(Number(out.dataset.decodes || 0) + 1);
      setParams({ z: z.map((v) => v.toFixed(2)).join(",") });
    } finally { inFlight = false; }
    if (again) { again = false; decode(); }
  });
  const sliders = el("div", { class: "sliders", role: "group", "aria-label": "latent dimensions" });
  const shown = Math.min(K, 64);
  for (let d = 0; d < shown; d++) {
    const value = el("span", { class: "stat" }, z[d].toFixed(2));
    const s = el("input", { type: "range", min: -3, max: 3, step: 0.05, value: z[d], id: `z${d}`, "aria-label": `latent dimension ${d}` });
    s.addEventListener("input", () => { z[d] = Number(s.value); value.textContent = z[d].toFixed(2); decode(); });
    sliders.append(el("label", { for: `z${d}` }, `z${d}`), s, value);
  }
  const traversal = el("div", { id: "traversal" });
  const traverse = guard(async () => {
    const steps = 9, rows = [];
    for (let d = 0; d < Math.min(K, 16); d++) for (let s = 0; s < steps; s++) { const v = z.slice(); v[d] = -3 + (6 * s) / (steps - 1); rows.push(v); }
    const r = await api(`${mbase}/decode`, { method: "POST", json: { latents: rows, ...decodeOptions(model) } });
    const items = decodedItems(r, (i) => (i % steps === 0 ? `z${Math.floor(i / steps)}` : ""));
    traversal.replaceChildren(el("h3", {}, "Traversals: each row walks one dimension from −3 to 3, the others as set"),
      el("div", { class: "grid", style: `grid-template-columns:repeat(${steps}, 72px)` }, items));
  });
  const samples = el("div", { id: "gen-samples", class: "grid" });
  const sample = guard(async () => {
    const seed = Number(params.get("seed") || Math.floor(Math.random() * 1e6));
    setParams({ seed });
    const r = await api(`${mbase}/generate`, { method: "POST", json: { count: 16, seed, ...decodeOptions(model) } });
    samples.replaceChildren(...decodedItems(r, (i) => `#${i}`));
  });
  main.append(el("div", { class: "controls" }, picker("Model", "model-pick", list.map((m) => m.name), model.name, (v) => setParams({ model: v, z: null }, true)),
    el("button", { class: "plain", onclick: () => { z.fill(0); for (let d = 0; d < shown; d++) $(`#z${d}`).value = 0; decode(); } }, "Centre"),
    el("button", { class: "plain", id: "traverse-go", onclick: traverse }, model.kind.includes("vae") ? "Traversals (what each dimension learnt)" : "Traversals"),
    el("button", { class: "plain", id: "sample-go", onclick: () => { setParams({ seed: null }); params.delete("seed"); sample(); } }, "Sample from the prior")),
  el("div", { class: "row" }, el("div", { class: "panel" }, el("h3", {}, `${K} latent dimensions${K > shown ? ` (first ${shown})` : ""}`), sliders),
    el("div", { class: "panel" }, el("h3", {}, "Decoded"), out, timing)),
  el("div", { class: "panel", style: "margin-top:1rem" }, el("h3", {}, "Samples from the prior"), samples), traversal);
  await decode();
  await sample();
}

// ------------------------------------------------------------------ routing

const VIEWS = { models: viewModels, map: viewMap, query: viewQuery, interpolate: viewInterpolate, generate: viewGenerate };
let rendering = 0;

async function render() {
  const { view, params } = parseHash();
  const main = $("#view");
  const mine = ++rendering;
  main.replaceChildren();
  clearBanner();
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.view === view);
  const fn = VIEWS[view];
  if (!fn) { main.append(el("p", {}, `No view called ${view}.`)); return; }
  main.dataset.view = view; main.dataset.ready = "0";
  try { await fn(main, params); } catch (e) { if (mine === rendering) showError(e); }
  if (mine === rendering) main.dataset.ready = "1";
}

// Parameters a view writes as it goes (history.replaceState) fire nothing; a new view, a pick or a pasted URL does.
window.addEventListener("hashchange", render);
$("#token").value = token();
$("#token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("#token").value.trim());
  modelsCache = indexesCache = null;
  render();
});
if (!location.hash) history.replaceState(null, "", "#/models");
render();
