// The map page: the bundle's reference map as a pan-and-zoom scatter, and new images placed on it.
// Written for this project, no libraries and nothing fetched from outside the service (lab networks are
// often offline). The map comes as one binary block (GET /map?format=binary) read as typed arrays; the
// points are drawn with WebGL where a graphics card does the work, else by the canvas 2-D renderer
// (map-render.js), darker where points overplot; hover and drawing go through a grid built once
// (map-data.js). Hover rings and placed markers are drawn on a second canvas above the points, so
// they never cost a redraw of the points. The service's journal (its placements, the review queue and
// the flagged share per day) is map-journal.js.

import {
  buildIndex, countBySlot, countInside, idOf, MapFormatError, nearest, readMap, UNLABELLED as NO_LABEL,
} from "./map-data.js";
import { addFact, element, fmt, neighbourStrip, placementFacts } from "./map-cards.js";
import { Journal } from "./map-journal.js";
import { CanvasRenderer, WebGLRenderer, hexToRgb } from "./map-render.js";

const PALETTE = [
  "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
  "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354", "#756bb1",
];
const UNLABELLED = "#9a9a9a";
const BACKGROUND = [255, 255, 255];
const FLAG_COLOURS = { in_distribution: "#2e8540", out_of_distribution: "#c2185b", artefact: "#e07000" };
const FLAG_TEXT = { in_distribution: "in distribution", out_of_distribution: "out of distribution", artefact: "artefact" };
const TOKEN_KEY = "tsimcne-token";
const HOVER_RADIUS = 7; // CSS pixels
const JOURNAL_CONTROLS = 56; // CSS pixels at the map's bottom taken by the journal layer's controls
const THUMBNAIL_CACHE = 600;
// ?renderer=webgl|canvas|auto (default auto: WebGL unless it is missing or a software emulation).
const RENDERER_CHOICE = new URLSearchParams(location.search).get("renderer") || "auto";

const $ = (id) => document.getElementById(id);
const canvas = $("map"); // the top canvas: hover ring and markers; takes the pointer events
const overlay = canvas.getContext("2d");
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  info: null,
  points: null, // {map (map-data.js), index, counts, hidden (Uint8Array per class slot)}
  view: { cx: 0, cy: 0, scale: 1, fitScale: 1 },
  hidden: new Set(), // labels hidden from the legend (-1: unlabelled)
  hover: -1,
  results: [], // placed images: {n, name, x, y, flag, card}
  highlighted: null,
  uploads: 0,
};
// Resolved once the reference ids (which the tooltip shows) have arrived, after the first drawing.
state.ids = new Promise((resolve) => {
  state.idsArrived = resolve;
});
// Read by the browser tests and the benchmark (tests/test_web_page.py, benchmarks/ui/).
const stats = {
  ready: false,
  idsReady: false,
  renderer: null,
  rendererNote: null,
  draws: 0,
  lastDrawMs: 0,
  timings: {},
  // Shown points whose centre lies on the canvas in the current view (counted when asked for).
  get drawnPoints() {
    return drawnPoints();
  },
};

// ---- talking to the service ----------------------------------------------------------------------

class ServiceError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function call(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.token) headers.set("Authorization", `Bearer ${state.token}`);
  let response;
  try {
    response = await fetch(path, { ...options, headers, cache: "no-store" });
  } catch {
    throw new ServiceError(0, "Cannot reach the service: it may be stopped or restarting, or the network is down.");
  }
  if (response.status === 401) throw new ServiceError(401, "The service needs an access token.");
  return response;
}

// The service's error body {"error": ..., "detail": [...]}, read once; a proxy's HTML page has neither.
async function readError(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    /* not JSON */
  }
  return {
    message: body?.error || `the service answered HTTP ${response.status}`,
    detail: Array.isArray(body?.detail) ? body.detail : null,
  };
}

function setStatus(kind, text) {
  const status = $("status");
  status.className = kind;
  status.textContent = text;
  status.title = text;
}

async function askForToken(message) {
  const dialog = $("token-dialog");
  $("token-message").textContent = message;
  $("token-input").value = "";
  dialog.showModal();
  await new Promise((resolve) => dialog.addEventListener("close", resolve, { once: true }));
  state.token = $("token-input").value.trim() || null;
  if (state.token) sessionStorage.setItem(TOKEN_KEY, state.token);
}

// Calls `attempt` until it does not fail for want of a token, asking the user for one each time.
async function withToken(attempt) {
  let message = "This service needs an access token (ask whoever runs it).";
  for (;;) {
    try {
      return await attempt();
    } catch (error) {
      if (!(error instanceof ServiceError) || error.status !== 401) throw error;
      setStatus("warn", "Waiting for an access token…");
      await askForToken(message);
      message = "That token was not accepted; try again.";
    }
  }
}

async function waitUntilReady() {
  for (;;) {
    let status = 0;
    try {
      status = (await fetch("readyz", { cache: "no-store" })).status;
    } catch {
      status = 0;
    }
    if (status === 200) return;
    setStatus(
      "warn",
      status === 0
        ? "Cannot reach the service (stopped or restarting?); trying again every 2 s…"
        : `The service is not ready yet (still loading its model); trying again every 2 s…`,
    );
    await sleep(2000);
  }
}

// ---- the reference map ---------------------------------------------------------------------------

function classColour(label) {
  return label < 0 ? UNLABELLED : PALETTE[label % PALETTE.length];
}

function setPoints(map) {
  const classes = map.classNames.length;
  const slotColours = [];
  const colourIndex = new Uint8Array(classes + 1);
  for (let s = 0; s <= classes; s++) {
    const label = s === classes ? -1 : s;
    slotColours.push(hexToRgb(classColour(label)));
    colourIndex[s] = label < 0 ? PALETTE.length : label % PALETTE.length;
  }
  const started = performance.now();
  const index = buildIndex(map);
  state.points = { map, index, counts: countBySlot(map), hidden: new Uint8Array(classes + 1), slotColours, colourIndex };
  stats.timings.indexMs = performance.now() - started;
}

// The slot of a label in state.points.hidden (unlabelled: the last).
function slotOfLabel(label) {
  return label < 0 ? state.points.map.classNames.length : label;
}

const render = {
  width: 0, height: 0, dpr: 1, renderer: null, pending: false, pointsDirty: true, drawn: null, hiddenVersion: 0,
  panCarry: [0, 0], // the part of a pan below one device pixel, kept for the next one
};

// A canvas for the points under the overlay; a fresh one when the renderer changes (a canvas keeps the
// first kind of context it was asked for).
function pointsCanvas() {
  $("map-points")?.remove();
  const points = document.createElement("canvas");
  points.id = "map-points";
  points.setAttribute("aria-hidden", "true");
  canvas.before(points);
  return points;
}

function chooseRenderer() {
  let note = null;
  if (RENDERER_CHOICE !== "canvas") {
    const made = WebGLRenderer.create(pointsCanvas(), { allowSoftware: RENDERER_CHOICE === "webgl" });
    if (made.renderer) return useRenderer(made.renderer, null);
    note = made.error;
  }
  return useRenderer(new CanvasRenderer(pointsCanvas()), note);
}

function useRenderer(renderer, note) {
  render.renderer = renderer;
  stats.renderer = renderer.kind;
  stats.rendererNote = note || renderer.device || null;
  if (state.points) {
    const { map, index, slotColours, colourIndex } = state.points;
    renderer.setData(map, index, slotColours, colourIndex);
  }
  if (render.width) renderer.resize(render.width, render.height);
  render.pointsDirty = true;
  return renderer;
}

function resize() {
  const dpr = window.devicePixelRatio || 1;
  const width = Math.max(1, Math.round(canvas.clientWidth * dpr));
  const height = Math.max(1, Math.round(canvas.clientHeight * dpr));
  if (width === render.width && height === render.height && dpr === render.dpr) return;
  const hadView = render.width > 0;
  Object.assign(render, { width, height, dpr });
  canvas.width = width;
  canvas.height = height;
  render.renderer?.resize(width, height);
  if (!hadView && state.points) fitView();
  scheduleDraw();
}

function centreOn(x, y) {
  state.view.cx = x;
  state.view.cy = y;
  scheduleDraw();
}

function fitView() {
  const { bounds } = state.points.map;
  const margin = 24 * render.dpr;
  const spanX = bounds.maxX - bounds.minX || 1;
  const spanY = bounds.maxY - bounds.minY || 1;
  // The journal layer's controls (two lines) sit along the bottom: the fitted map stays above them. A fixed
  // height, not theirs, so that Fit always gives the same view whatever their note says.
  const reserve = Math.min(JOURNAL_CONTROLS * render.dpr, render.height / 4);
  const scale = Math.min((render.width - 2 * margin) / spanX, (render.height - 2 * margin - reserve) / spanY);
  state.view = {
    cx: (bounds.minX + bounds.maxX) / 2,
    cy: (bounds.minY + bounds.maxY) / 2 - reserve / 2 / Math.max(scale, 1e-6),
    scale: Math.max(scale, 1e-6),
    fitScale: Math.max(scale, 1e-6),
  };
  scheduleDraw();
}

// Data -> canvas pixels (device pixels) and back; y grows upwards on the map.
function toScreen(x, y) {
  const v = state.view;
  return [(x - v.cx) * v.scale + render.width / 2, render.height / 2 - (y - v.cy) * v.scale];
}

function toData(px, py) {
  const v = state.view;
  return [(px - render.width / 2) / v.scale + v.cx, v.cy - (py - render.height / 2) / v.scale];
}

// points: whether the points must be drawn again (view, size or shown classes changed), or only the
// overlay (hover ring, markers).
function scheduleDraw(points = true) {
  if (points) render.pointsDirty = true;
  if (render.pending) return;
  render.pending = true;
  requestAnimationFrame(() => {
    render.pending = false;
    draw();
  });
}

// Point size in device pixels: 2 px at the fitted view (1 px for maps of more than 300,000 points,
// whose overplotting the density shading shows), growing as one zooms in.
function pointSize() {
  const v = state.view;
  const zoom = v.scale / v.fitScale;
  const base = state.points.map.count > 300_000 ? 1 : 2;
  return Math.max(1, Math.min(8, Math.round(render.dpr * (base + Math.log2(Math.max(zoom, 1)) * 0.75))));
}

function draw() {
  if (!render.renderer || !render.width) return;
  const started = performance.now();
  if (render.pointsDirty && state.points) {
    render.pointsDirty = false;
    const frame = {
      cx: state.view.cx,
      cy: state.view.cy,
      scale: state.view.scale,
      pointSize: pointSize(),
      hidden: state.points.hidden,
      hiddenVersion: render.hiddenVersion,
      background: BACKGROUND,
    };
    try {
      render.drawn = render.renderer.draw(frame);
    } catch (error) {
      // WebGL lost its context (driver reset, too many tabs): carry on with the 2-D renderer.
      useRenderer(new CanvasRenderer(pointsCanvas()), `WebGL failed (${error.message}); drawing on the CPU`);
      render.drawn = render.renderer.draw(frame);
    }
  }
  drawOverlay();
  stats.draws++;
  stats.lastDrawMs = performance.now() - started;
}

function drawnPoints() {
  if (!state.points || !render.width) return 0;
  if (render.drawn !== null && !render.pointsDirty) return render.drawn;
  const [x0, y1] = toData(0, 0);
  const [x1, y0] = toData(render.width, render.height);
  return countInside(state.points.index, x0, x1, y0, y1, state.points.hidden);
}

function drawOverlay() {
  const dpr = render.dpr;
  overlay.clearRect(0, 0, render.width, render.height);
  journal.draw(overlay, toScreen, dpr, render.width, render.height);
  if (state.hover >= 0 && state.points) {
    const { map } = state.points;
    const [sx, sy] = toScreen(map.xs[state.hover], map.ys[state.hover]);
    overlay.beginPath();
    overlay.arc(sx, sy, 6 * dpr, 0, 2 * Math.PI);
    overlay.lineWidth = 2 * dpr;
    overlay.strokeStyle = "#1d232a";
    overlay.stroke();
  }
  overlay.font = `bold ${10 * dpr}px system-ui, sans-serif`;
  overlay.textAlign = "center";
  overlay.textBaseline = "middle";
  for (const result of state.results) {
    if (result.x === undefined) continue;
    const [sx, sy] = toScreen(result.x, result.y);
    const highlighted = result === state.highlighted;
    const radius = (highlighted ? 11 : 8) * dpr;
    overlay.beginPath();
    overlay.arc(sx, sy, radius, 0, 2 * Math.PI);
    overlay.fillStyle = "#ffffff";
    overlay.fill();
    overlay.lineWidth = (highlighted ? 4 : 3) * dpr;
    overlay.strokeStyle = FLAG_COLOURS[result.flag] || "#1d232a";
    overlay.stroke();
    overlay.fillStyle = "#1d232a";
    overlay.fillText(String(result.n), sx, sy + 0.5 * dpr);
  }
}

// ---- pan, zoom and hover ---------------------------------------------------------------------------

function zoomAt(factor, px, py) {
  const v = state.view;
  const [x, y] = toData(px, py);
  v.scale = Math.min(Math.max(v.scale * factor, v.fitScale / 4), v.fitScale * 2000);
  // Keep the data point under the cursor where it was.
  v.cx = x - (px - render.width / 2) / v.scale;
  v.cy = y + (py - render.height / 2) / v.scale;
  scheduleDraw();
}

// Pans by whole device pixels (a remainder is carried to the next pan), so the 2-D renderer can move
// the last picture instead of drawing every point again.
function panBy(dxPixels, dyPixels) {
  const carry = render.panCarry;
  carry[0] += dxPixels;
  carry[1] += dyPixels;
  const dx = Math.round(carry[0]);
  const dy = Math.round(carry[1]);
  carry[0] -= dx;
  carry[1] -= dy;
  if (!dx && !dy) return;
  state.view.cx -= dx / state.view.scale;
  state.view.cy += dy / state.view.scale;
  scheduleDraw();
}

function canvasPosition(event) {
  const rect = canvas.getBoundingClientRect();
  return [(event.clientX - rect.left) * render.dpr, (event.clientY - rect.top) * render.dpr];
}

function nearestPoint(px, py) {
  const points = state.points;
  if (!points || points.map.count === 0) return -1;
  const radius = (HOVER_RADIUS * render.dpr) / state.view.scale; // in data units
  const [x, y] = toData(px, py);
  return nearest(points.index, x, y, radius, points.hidden);
}

function labelName(label) {
  return label === NO_LABEL ? "unlabelled" : state.points.map.classNames[label];
}

async function showTooltip(index, clientX, clientY) {
  const tooltip = $("tooltip");
  if (index < 0) {
    tooltip.hidden = true;
    return;
  }
  const { map } = state.points;
  if (!map.idsReady) {
    await state.ids; // only in the moment between the first drawing and the ids' arrival
    if (state.hover !== index) return;
  }
  tooltip.querySelector(".tip-text").innerHTML = "";
  const id = document.createElement("div");
  id.className = "tip-id";
  id.textContent = idOf(map, index);
  const label = document.createElement("div");
  label.className = "tip-label";
  label.textContent = `label: ${labelName(map.labels[index])}`;
  const number = document.createElement("div");
  number.textContent = `reference image #${index}`;
  tooltip.querySelector(".tip-text").append(id, label, number);
  const area = $("map-area").getBoundingClientRect();
  const left = Math.min(clientX - area.left + 14, area.width - 330);
  tooltip.style.left = `${Math.max(4, left)}px`;
  tooltip.style.top = `${Math.max(4, clientY - area.top + 14)}px`;
  tooltip.hidden = false;
  const image = tooltip.querySelector("img");
  image.removeAttribute("src");
  image.dataset.index = String(index);
  const url = await thumbnailUrl(index);
  if (url && image.dataset.index === String(index)) image.src = url;
}


const thumbnails = new Map(); // index -> object URL (oldest first, for eviction)

async function thumbnailUrl(index) {
  if (thumbnails.has(index)) return thumbnails.get(index);
  try {
    const response = await call(`thumbnail?index=${index}&v=${state.info.bundle_sha256.slice(0, 16)}`);
    if (!response.ok) return null;
    const url = URL.createObjectURL(await response.blob());
    thumbnails.set(index, url);
    if (thumbnails.size > THUMBNAIL_CACHE) {
      const [oldest, oldUrl] = thumbnails.entries().next().value;
      thumbnails.delete(oldest);
      URL.revokeObjectURL(oldUrl);
    }
    return url;
  } catch {
    return null;
  }
}

function installMapInteraction() {
  let drag = null;
  let hoverFrame = 0;
  canvas.addEventListener("wheel", (event) => {
    event.preventDefault();
    const [px, py] = canvasPosition(event);
    const delta = event.deltaMode === 1 ? event.deltaY * 16 : event.deltaY;
    zoomAt(Math.exp(-delta * 0.0015), px, py);
  }, { passive: false });
  canvas.addEventListener("pointerdown", (event) => {
    drag = { x: event.clientX, y: event.clientY };
    try {
      canvas.setPointerCapture(event.pointerId); // keep panning when the pointer leaves the canvas
    } catch {
      /* a synthetic pointer has nothing to capture */
    }
    canvas.classList.add("dragging");
  });
  canvas.addEventListener("pointerup", (event) => {
    drag = null;
    if (canvas.hasPointerCapture(event.pointerId)) canvas.releasePointerCapture(event.pointerId);
    canvas.classList.remove("dragging");
  });
  canvas.addEventListener("pointermove", (event) => {
    if (drag) {
      panBy((event.clientX - drag.x) * render.dpr, (event.clientY - drag.y) * render.dpr);
      drag.x = event.clientX;
      drag.y = event.clientY;
      $("tooltip").hidden = true;
      return;
    }
    const { clientX, clientY } = event;
    cancelAnimationFrame(hoverFrame);
    hoverFrame = requestAnimationFrame(() => {
      const index = nearestPoint(...canvasPosition({ clientX, clientY }));
      if (index !== state.hover) {
        state.hover = index;
        scheduleDraw(false);
      }
      showTooltip(index, clientX, clientY);
    });
  });
  canvas.addEventListener("pointerleave", () => {
    state.hover = -1;
    $("tooltip").hidden = true;
    scheduleDraw(false);
  });
  canvas.addEventListener("dblclick", (event) => zoomAt(2, ...canvasPosition(event)));
  $("zoom-in").addEventListener("click", () => zoomAt(1.5, render.width / 2, render.height / 2));
  $("zoom-out").addEventListener("click", () => zoomAt(1 / 1.5, render.width / 2, render.height / 2));
  $("fit").addEventListener("click", fitView);
  new ResizeObserver(resize).observe($("map-area"));
}

function buildLegend() {
  const legend = $("legend");
  legend.innerHTML = "";
  const { map, counts } = state.points;
  const entries = map.classNames.map((name, k) => [k, name]).filter(([k]) => counts[k] > 0);
  if (counts[map.classNames.length] > 0) entries.push([-1, "unlabelled"]);
  for (const [label, name] of entries) {
    const item = document.createElement("div");
    item.className = "legend-item";
    item.dataset.label = String(label);
    item.title = "click to hide or show";
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = classColour(label);
    const text = document.createElement("span");
    text.className = "legend-name";
    text.textContent = name;
    const count = document.createElement("span");
    count.className = "legend-count";
    count.textContent = counts[slotOfLabel(label)].toLocaleString("en");
    item.append(swatch, text, count);
    item.addEventListener("click", () => {
      if (state.hidden.has(label)) state.hidden.delete(label);
      else state.hidden.add(label);
      state.points.hidden[slotOfLabel(label)] = state.hidden.has(label) ? 1 : 0;
      render.hiddenVersion++;
      item.classList.toggle("off", state.hidden.has(label));
      if (state.hover >= 0 && state.hidden.has(state.points.map.labels[state.hover] === NO_LABEL ? -1 : state.points.map.labels[state.hover])) {
        state.hover = -1;
        $("tooltip").hidden = true;
      }
      scheduleDraw();
    });
    legend.append(item);
  }
  const note = document.createElement("div");
  note.className = "legend-note";
  note.textContent = "darker: points overlap";
  note.title = "a pixel covered by several points is drawn darker, the more points the darker";
  legend.append(note);
}

// ---- placing new images ----------------------------------------------------------------------------

function addCard(file) {
  $("panel-empty").hidden = true;
  const result = { n: ++state.uploads, name: file.name, file, flag: null };
  const card = element("li", "result pending");
  card.dataset.n = String(result.n);
  const head = element("div", "result-head");
  const preview = element("img", "upload");
  preview.alt = "";
  preview.src = URL.createObjectURL(file);
  // Browsers cannot show every format the service reads (TIFF, for one): then no preview.
  preview.addEventListener("error", () => preview.remove(), { once: true });
  const title = element("div", "result-title");
  const name = element("div", "file-name");
  name.append(element("span", "marker-no", String(result.n)), document.createTextNode(file.name));
  title.append(name, element("span", "badge", "placing…"));
  head.append(preview, title);
  card.append(head);
  $("results").prepend(card);
  result.card = card;
  return result;
}

function fail(result, kind, message) {
  result.card.className = `result ${kind}`;
  result.card.querySelector(".badge").textContent = kind === "rejected" ? "rejected" : "not placed";
  result.card.append(element("div", "error-text", message));
}

// The whole request failed (not the files): every card and the status bar say why.
function failAll(results, message) {
  for (const result of results) fail(result, "failed", message);
  setStatus("error", message);
  return false;
}

function complete(result, placed) {
  Object.assign(result, { x: placed.x, y: placed.y, flag: placed.flag, placed });
  const card = result.card;
  card.className = `result ${placed.flag}`;
  card.querySelector(".badge").textContent = FLAG_TEXT[placed.flag] || placed.flag;
  const facts = placementFacts(placed);
  addFact(facts, "position", `${fmt(placed.x)}, ${fmt(placed.y)}`);
  card.append(facts);
  const neighbours = neighbourStrip(placed.neighbours, thumbnailUrl);
  card.append(neighbours);
  card.addEventListener("mouseenter", () => highlight(result));
  card.addEventListener("click", () => {
    highlight(result);
    state.view.cx = result.x;
    state.view.cy = result.y;
    scheduleDraw();
  });
  state.results.push(result);
  scheduleDraw(false);
}

function highlight(result) {
  for (const card of document.querySelectorAll(".result.highlighted")) card.classList.remove("highlighted");
  state.highlighted = result;
  if (result) result.card.classList.add("highlighted");
  scheduleDraw(false);
}

// Requests of at most max_images files and max_upload_bytes (less a margin for the multipart framing).
function chunked(results) {
  const limits = state.info.limits;
  const budget = limits.max_upload_bytes * 0.95 - 4096;
  const chunks = [];
  let current = [];
  let bytes = 0;
  for (const result of results) {
    const size = result.file.size + 512;
    if (current.length && (current.length >= limits.max_images || bytes + size > budget)) {
      chunks.push(current);
      current = [];
      bytes = 0;
    }
    current.push(result);
    bytes += size;
  }
  if (current.length) chunks.push(current);
  return chunks;
}

async function send(results) {
  let remaining = results;
  while (remaining.length) {
    const form = new FormData();
    for (const result of remaining) form.append("images", result.file, result.file.name);
    let response;
    try {
      response = await withToken(() => call("embed", { method: "POST", body: form }));
    } catch (error) {
      return failAll(remaining, error.message);
    }
    if (response.ok) {
      const body = await response.json();
      if (body.bundle_sha256 !== state.info.bundle_sha256) {
        // The service was restarted with another bundle: its positions belong to a map not shown here.
        const text = `The service now serves another map (bundle ${body.bundle}); reload the page to see it and place images on it.`;
        return failAll(remaining, text);
      }
      body.images.forEach((placed, k) => complete(remaining[k], placed));
      return true;
    }
    const { message, detail } = await readError(response);
    if (response.status === 422 && detail?.length) {
      // Some files are not usable images: say which and why, then place the others.
      const bad = new Map(detail.map((entry) => [entry.file, entry.error]));
      const rejected = remaining.filter((result) => bad.has(result.name));
      if (!rejected.length) break;
      for (const result of rejected) fail(result, "rejected", bad.get(result.name));
      remaining = remaining.filter((result) => !bad.has(result.name));
      continue;
    }
    if ([502, 503, 504].includes(response.status)) {
      // What a reverse proxy answers while the service is down, starting or restarting.
      const text = `The service is not available right now (HTTP ${response.status}): it may be starting or restarting; try again shortly.`;
      return failAll(remaining, text);
    }
    const kind = response.status >= 500 ? "failed" : "rejected";
    for (const result of remaining) fail(result, kind, message);
    if (response.status >= 500) setStatus("error", `The service failed: ${message}`);
    return false;
  }
  for (const result of remaining) fail(result, "rejected", "the service refused the request");
  return false;
}

async function placeFiles(fileList) {
  const files = [...fileList];
  if (!files.length) return;
  if (!state.info) {
    setStatus("warn", "The map is not loaded yet; try again once it is.");
    return;
  }
  const limit = state.info.limits.max_upload_bytes;
  const results = files.map(addCard);
  const sendable = [];
  for (const result of results) {
    if (result.file.size > limit * 0.95 - 4096) {
      fail(result, "rejected", `${result.name} is ${(result.file.size / 1048576).toFixed(1)} MiB; this service takes at most ${(limit / 1048576).toFixed(0)} MiB per request`);
    } else {
      sendable.push(result);
    }
  }
  setStatus("info", `Placing ${sendable.length} image(s)…`);
  for (const chunk of chunked(sendable)) await send(chunk);
  const placed = results.filter((r) => r.placed).length;
  const allPlaced = placed === results.length;
  const newest = [...results].reverse().find((r) => r.placed);
  if (newest) highlight(newest);
  if (placed) journal.refresh(); // they are in the journal now (when it is on)
  if (allPlaced) setStatus("ok", `Placed ${placed} image(s) on the map.`);
  else if (!$("status").classList.contains("error")) {
    setStatus("warn", `Placed ${placed} of ${results.length} image(s); see the panel for the others.`);
  }
}

function installUpload() {
  const input = $("file-input");
  input.addEventListener("change", () => {
    const files = [...input.files];
    input.value = "";
    placeFiles(files);
  });
  const area = $("map-area");
  let depth = 0;
  const hasFiles = (event) => [...(event.dataTransfer?.types || [])].includes("Files");
  area.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    depth++;
    $("drop-hint").hidden = false;
  });
  area.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) $("drop-hint").hidden = true;
  });
  area.addEventListener("dragover", (event) => {
    if (hasFiles(event)) event.preventDefault();
  });
  area.addEventListener("drop", (event) => {
    event.preventDefault();
    depth = 0;
    $("drop-hint").hidden = true;
    placeFiles(event.dataTransfer.files);
  });
  // A file dropped beside the map must not make the browser navigate away from the page.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
}

// ---- start -----------------------------------------------------------------------------------------

// What a flag means for this bundle: the target rate and, when the bundle records it, the interval the
// true false-flag rate lies in given how many calibration images set the threshold.
function showFlagNote(calibration) {
  const note = $("flag-note");
  if (!calibration || !calibration.target_false_flag_rate) {
    note.hidden = true;
    return;
  }
  const pct = (x) => `${(100 * x).toLocaleString("en", { maximumFractionDigits: 2 })} %`;
  let text = `A score above 1 is flagged: calibrated to flag ${pct(calibration.target_false_flag_rate)} of clean images`;
  const rate = calibration.false_flag_rate;
  if (rate) {
    text += `; from ${rate.images.toLocaleString("en")} calibration images, the true rate lies between ` +
      `${pct(rate.low)} and ${pct(rate.high)} (${Math.round(100 * rate.level)} % of calibration sets)`;
  }
  note.textContent = `${text}.`;
  note.hidden = false;
}

async function loadMap() {
  const started = performance.now();
  const infoResponse = await call("info");
  if (!infoResponse.ok) throw new ServiceError(infoResponse.status, (await readError(infoResponse)).message);
  state.info = await infoResponse.json();
  showFlagNote(state.info.calibration);
  const infoAt = performance.now();
  const mapResponse = await call("map?format=binary");
  if (!mapResponse.ok) throw new ServiceError(mapResponse.status, (await readError(mapResponse)).message);
  stats.timings = { loadStartMs: started, infoMs: infoAt - started };
  let map;
  try {
    map = await readMap(mapResponse, async (points) => {
      // Positions and labels are in: draw the map now; the ids (for hover) follow.
      stats.timings.fetchMs = performance.now() - started;
      stats.timings.pointBytes = points.pointsEnd;
      setPoints(points);
      showMap();
      await new Promise((resolve) => requestAnimationFrame(() => setTimeout(resolve, 0)));
    });
  } catch (error) {
    if (error instanceof MapFormatError) throw error;
    throw new ServiceError(0, "the map's download was interrupted");
  }
  stats.timings.idsMs = performance.now() - started;
  stats.timings.bytes = map.idBytes.byteOffset + map.idBytes.byteLength;
  // Bytes over the wire (compressed), from the browser's resource timing when it has the entry.
  const entry = performance.getEntriesByName(mapResponse.url).at(-1);
  if (entry?.encodedBodySize) stats.timings.wireBytes = entry.encodedBodySize;
  stats.idsReady = true;
  state.idsArrived();
}

// The first drawing of the map, as soon as its positions and labels are in.
function showMap() {
  const { map, index, slotColours, colourIndex } = state.points;
  render.renderer.setData(map, index, slotColours, colourIndex);
  $("bundle-name").textContent = `${state.info.bundle} · ${map.count.toLocaleString("en")} images`;
  document.title = `${state.info.bundle} · tsimcne map`;
  buildLegend();
  resize();
  fitView();
  draw(); // now, not at the next frame: the first paint is what the page is waiting for
  stats.timings.firstDrawMs = stats.lastDrawMs;
  performance.mark("tsimcne-map-drawn");
  stats.ready = true;
  // The next animation frame: the drawn map has been handed to the screen.
  requestAnimationFrame(() => performance.mark("tsimcne-map-shown"));
  const how = render.renderer.kind === "webgl" ? "WebGL" : "2-D canvas";
  $("map-area").dataset.renderer = render.renderer.kind;
  $("map-area").title = `drawn with ${how}${stats.rendererNote ? ` (${stats.rendererNote})` : ""}`;
  setStatus("ok", `Map loaded: ${map.count.toLocaleString("en")} reference images. Drop images on it to place them.`);
}

// The journal's layer, review queue and chart; it borrows the page's service calls and view.
const journal = new Journal({
  call, readError, thumbnailUrl, centreOn, redraw: () => scheduleDraw(false), info: () => state.info,
});

async function start() {
  installMapInteraction();
  installUpload();
  journal.install();
  chooseRenderer();
  resize();
  setStatus("info", "Connecting to the service…");
  for (;;) {
    await waitUntilReady();
    try {
      await withToken(loadMap);
      journal.refresh();
      break;
    } catch (error) {
      setStatus("error", `Could not load the map: ${error.message}`);
      await sleep(3000);
    }
  }
}

window.tsimcneMap = {
  stats,
  view: () => ({ ...state.view }),
  // Where reference image i is drawn, in CSS pixels relative to the canvas (for tests).
  screenPosition: (i) => {
    const [sx, sy] = toScreen(state.points.map.xs[i], state.points.map.ys[i]);
    return [sx / render.dpr, sy / render.dpr];
  },
  markerPosition: (n) => {
    const result = state.results.find((r) => r.n === n);
    if (!result) return null;
    const [sx, sy] = toScreen(result.x, result.y);
    return [sx / render.dpr, sy / render.dpr];
  },
  markers: () => state.results.map((r) => ({ n: r.n, name: r.name, flag: r.flag })),
  journal: () => journal.testView(toScreen, render.dpr),
  zoomAt: (factor, cssX, cssY) => zoomAt(factor, cssX * render.dpr, cssY * render.dpr),
  panBy: (dx, dy) => panBy(dx * render.dpr, dy * render.dpr),
  draw,
};

start();
