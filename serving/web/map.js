// The map page: the bundle's reference map as a pan-and-zoom scatter, and new images placed on it.
// Written for this project, no libraries and nothing fetched from outside the service (lab networks are
// often offline). Points are written straight into an ImageData buffer: 100,000 of them redraw in a few
// milliseconds, where one canvas path per point would take far longer.
"use strict";

(() => {
  const PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
    "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354", "#756bb1",
  ];
  const UNLABELLED = "#9a9a9a";
  const BACKGROUND = "#ffffff";
  const FLAG_COLOURS = { in_distribution: "#2e8540", out_of_distribution: "#c2185b", artefact: "#e07000" };
  const FLAG_TEXT = { in_distribution: "in distribution", out_of_distribution: "out of distribution", artefact: "artefact" };
  const TOKEN_KEY = "tsimcne-token";
  const HOVER_RADIUS = 7; // CSS pixels
  const THUMBNAIL_CACHE = 600;

  const $ = (id) => document.getElementById(id);
  const canvas = $("map");
  const context = canvas.getContext("2d");
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  const state = {
    token: sessionStorage.getItem(TOKEN_KEY),
    info: null,
    points: null, // {n, xs, ys, labels, ids, classNames, order, bounds, grid}
    view: { cx: 0, cy: 0, scale: 1, fitScale: 1 },
    hidden: new Set(),
    hover: -1,
    results: [], // placed images: {n, name, x, y, flag, card}
    highlighted: null,
    uploads: 0,
  };
  // Read by the browser tests and the benchmark (tests/test_web_page.py, benchmarks/ui/).
  const stats = { ready: false, draws: 0, lastDrawMs: 0, drawnPoints: 0, timings: {} };

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

  function hexToRgb(hex) {
    const v = parseInt(hex.slice(1), 16);
    return [(v >> 16) & 255, (v >> 8) & 255, v & 255];
  }

  // ImageData is RGBA bytes; on little-endian machines (all that run browsers) one Uint32 is ABGR.
  function packColour(hex) {
    const [r, g, b] = hexToRgb(hex);
    return ((255 << 24) | (b << 16) | (g << 8) | r) >>> 0;
  }

  function classColour(label) {
    return label < 0 ? UNLABELLED : PALETTE[label % PALETTE.length];
  }

  // A fixed shuffle of the drawing order, so that no class is always painted over the others.
  function drawingOrder(n) {
    const order = new Uint32Array(n);
    for (let i = 0; i < n; i++) order[i] = i;
    let seed = 12345;
    for (let i = n - 1; i > 0; i--) {
      seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
      const j = seed % (i + 1);
      const t = order[i];
      order[i] = order[j];
      order[j] = t;
    }
    return order;
  }

  // Uniform grid over the data for the hover search (a few cells instead of every point).
  function buildGrid(xs, ys, bounds) {
    const n = xs.length;
    const side = Math.max(1, Math.ceil(Math.sqrt(n / 8)));
    const width = bounds.maxX - bounds.minX || 1;
    const height = bounds.maxY - bounds.minY || 1;
    const cellOf = (i) => {
      const gx = Math.min(side - 1, Math.floor(((xs[i] - bounds.minX) / width) * side));
      const gy = Math.min(side - 1, Math.floor(((ys[i] - bounds.minY) / height) * side));
      return gy * side + gx;
    };
    const starts = new Int32Array(side * side + 1);
    for (let i = 0; i < n; i++) starts[cellOf(i) + 1]++;
    for (let c = 0; c < side * side; c++) starts[c + 1] += starts[c];
    const fill = starts.slice(0, side * side);
    const items = new Int32Array(n);
    for (let i = 0; i < n; i++) items[fill[cellOf(i)]++] = i;
    return { side, starts, items, cellW: width / side, cellH: height / side };
  }

  function setPoints(map) {
    const n = map.x.length;
    const xs = Float32Array.from(map.x);
    const ys = Float32Array.from(map.y);
    const labels = Int16Array.from(map.labels);
    let minX = Infinity, maxX = -Infinity, minY = Infinity, maxY = -Infinity;
    for (let i = 0; i < n; i++) {
      if (xs[i] < minX) minX = xs[i];
      if (xs[i] > maxX) maxX = xs[i];
      if (ys[i] < minY) minY = ys[i];
      if (ys[i] > maxY) maxY = ys[i];
    }
    if (n === 0) [minX, maxX, minY, maxY] = [-1, 1, -1, 1];
    const bounds = { minX, maxX, minY, maxY };
    const colours = map.class_names.map((_, k) => packColour(classColour(k)));
    state.points = {
      n, xs, ys, labels, ids: map.ids, classNames: map.class_names, colours,
      unlabelledColour: packColour(UNLABELLED), order: drawingOrder(n), bounds, grid: buildGrid(xs, ys, bounds),
    };
  }

  const render = {
    width: 0, height: 0, dpr: 1, image: null, pixels: null, pending: false, background: packColour(BACKGROUND),
  };

  function resize() {
    const dpr = window.devicePixelRatio || 1;
    const width = Math.max(1, Math.round(canvas.clientWidth * dpr));
    const height = Math.max(1, Math.round(canvas.clientHeight * dpr));
    if (width === render.width && height === render.height && dpr === render.dpr) return;
    const hadView = render.width > 0;
    Object.assign(render, { width, height, dpr });
    canvas.width = width;
    canvas.height = height;
    render.image = context.createImageData(width, height);
    render.pixels = new Uint32Array(render.image.data.buffer);
    if (!hadView && state.points) fitView();
    scheduleDraw();
  }

  function fitView() {
    const { bounds } = state.points;
    const margin = 24 * render.dpr;
    const spanX = bounds.maxX - bounds.minX || 1;
    const spanY = bounds.maxY - bounds.minY || 1;
    const scale = Math.min((render.width - 2 * margin) / spanX, (render.height - 2 * margin) / spanY);
    state.view = {
      cx: (bounds.minX + bounds.maxX) / 2,
      cy: (bounds.minY + bounds.maxY) / 2,
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

  function scheduleDraw() {
    if (render.pending) return;
    render.pending = true;
    requestAnimationFrame(() => {
      render.pending = false;
      draw();
    });
  }

  function draw() {
    if (!render.pixels) return;
    const started = performance.now();
    const { width, height, pixels } = render;
    pixels.fill(render.background);
    let drawn = 0;
    const points = state.points;
    if (points) {
      const { xs, ys, labels, order, colours, unlabelledColour } = points;
      const v = state.view;
      const zoom = v.scale / v.fitScale;
      const size = Math.max(1, Math.min(6, Math.round(render.dpr * (2 + Math.log2(Math.max(zoom, 1)) * 0.75))));
      const half = size >> 1;
      const hidden = new Uint8Array(points.classNames.length + 1); // last slot: unlabelled
      for (const label of state.hidden) hidden[label < 0 ? points.classNames.length : label] = 1;
      const ox = render.width / 2 - v.cx * v.scale;
      const oy = render.height / 2 + v.cy * v.scale;
      const maxX = width - size;
      const maxY = height - size;
      for (let k = 0; k < order.length; k++) {
        const i = order[k];
        const label = labels[i];
        if (hidden[label < 0 ? hidden.length - 1 : label]) continue;
        const px = (ox + xs[i] * v.scale - half) | 0;
        const py = (oy - ys[i] * v.scale - half) | 0;
        if (px < 0 || py < 0 || px > maxX || py > maxY) continue;
        const colour = label < 0 ? unlabelledColour : colours[label];
        let row = py * width + px;
        for (let dy = 0; dy < size; dy++, row += width) {
          for (let dx = 0; dx < size; dx++) pixels[row + dx] = colour;
        }
        drawn++;
      }
    }
    context.putImageData(render.image, 0, 0);
    drawOverlay();
    stats.draws++;
    stats.drawnPoints = drawn;
    stats.lastDrawMs = performance.now() - started;
  }

  function drawOverlay() {
    const dpr = render.dpr;
    if (state.hover >= 0 && state.points) {
      const [sx, sy] = toScreen(state.points.xs[state.hover], state.points.ys[state.hover]);
      context.beginPath();
      context.arc(sx, sy, 6 * dpr, 0, 2 * Math.PI);
      context.lineWidth = 2 * dpr;
      context.strokeStyle = "#1d232a";
      context.stroke();
    }
    context.font = `bold ${10 * dpr}px system-ui, sans-serif`;
    context.textAlign = "center";
    context.textBaseline = "middle";
    for (const result of state.results) {
      if (result.x === undefined) continue;
      const [sx, sy] = toScreen(result.x, result.y);
      const highlighted = result === state.highlighted;
      const radius = (highlighted ? 11 : 8) * dpr;
      context.beginPath();
      context.arc(sx, sy, radius, 0, 2 * Math.PI);
      context.fillStyle = "#ffffff";
      context.fill();
      context.lineWidth = (highlighted ? 4 : 3) * dpr;
      context.strokeStyle = FLAG_COLOURS[result.flag] || "#1d232a";
      context.stroke();
      context.fillStyle = "#1d232a";
      context.fillText(String(result.n), sx, sy + 0.5 * dpr);
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

  function panBy(dxPixels, dyPixels) {
    state.view.cx -= dxPixels / state.view.scale;
    state.view.cy += dyPixels / state.view.scale;
    scheduleDraw();
  }

  function canvasPosition(event) {
    const rect = canvas.getBoundingClientRect();
    return [(event.clientX - rect.left) * render.dpr, (event.clientY - rect.top) * render.dpr];
  }

  function nearestPoint(px, py) {
    const points = state.points;
    if (!points || points.n === 0) return -1;
    const { grid, bounds, xs, ys, labels } = points;
    const radius = (HOVER_RADIUS * render.dpr) / state.view.scale; // in data units
    const [x, y] = toData(px, py);
    const gx0 = Math.max(0, Math.floor((x - radius - bounds.minX) / grid.cellW));
    const gx1 = Math.min(grid.side - 1, Math.floor((x + radius - bounds.minX) / grid.cellW));
    const gy0 = Math.max(0, Math.floor((y - radius - bounds.minY) / grid.cellH));
    const gy1 = Math.min(grid.side - 1, Math.floor((y + radius - bounds.minY) / grid.cellH));
    let best = -1;
    let bestDistance = radius * radius;
    for (let gy = gy0; gy <= gy1; gy++) {
      for (let gx = gx0; gx <= gx1; gx++) {
        const cell = gy * grid.side + gx;
        for (let k = grid.starts[cell]; k < grid.starts[cell + 1]; k++) {
          const i = grid.items[k];
          if (state.hidden.has(labels[i] < 0 ? -1 : labels[i])) continue;
          const d = (xs[i] - x) ** 2 + (ys[i] - y) ** 2;
          if (d <= bestDistance) {
            bestDistance = d;
            best = i;
          }
        }
      }
    }
    return best;
  }

  function labelName(label) {
    return label < 0 ? "unlabelled" : state.points.classNames[label];
  }

  async function showTooltip(index, clientX, clientY) {
    const tooltip = $("tooltip");
    if (index < 0) {
      tooltip.hidden = true;
      return;
    }
    const points = state.points;
    tooltip.querySelector(".tip-text").innerHTML = "";
    const id = document.createElement("div");
    id.className = "tip-id";
    id.textContent = points.ids[index];
    const label = document.createElement("div");
    label.className = "tip-label";
    label.textContent = `label: ${labelName(points.labels[index])}`;
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
          scheduleDraw();
        }
        showTooltip(index, clientX, clientY);
      });
    });
    canvas.addEventListener("pointerleave", () => {
      state.hover = -1;
      $("tooltip").hidden = true;
      scheduleDraw();
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
    const { labels, classNames } = state.points;
    const counts = new Map();
    for (let i = 0; i < labels.length; i++) counts.set(labels[i], (counts.get(labels[i]) || 0) + 1);
    const entries = classNames.map((name, k) => [k, name]).filter(([k]) => counts.has(k));
    if (counts.has(-1)) entries.push([-1, "unlabelled"]);
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
      count.textContent = counts.get(label).toLocaleString("en");
      item.append(swatch, text, count);
      item.addEventListener("click", () => {
        if (state.hidden.has(label)) state.hidden.delete(label);
        else state.hidden.add(label);
        item.classList.toggle("off", state.hidden.has(label));
        scheduleDraw();
      });
      legend.append(item);
    }
  }

  // ---- placing new images ----------------------------------------------------------------------------

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

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

  function fmt(value, digits = 2) {
    return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
  }

  function complete(result, placed) {
    Object.assign(result, { x: placed.x, y: placed.y, flag: placed.flag, placed });
    const card = result.card;
    card.className = `result ${placed.flag}`;
    card.querySelector(".badge").textContent = FLAG_TEXT[placed.flag] || placed.flag;
    const facts = element("dl", "facts");
    const add = (term, value) => facts.append(element("dt", "", term), element("dd", "", value));
    add("score", `${fmt(placed.score)} (above 1 = flagged)`);
    const evidence = Object.entries(placed.evidence || {}).map(([k, v]) => `${k} ${fmt(v)}`).join(" · ");
    if (evidence) add("evidence", evidence);
    if (placed.majority_label) add("nearest label", `${placed.majority_label} (${Math.round(placed.majority_share * 100)} %)`);
    if (placed.duplicate_of) add("duplicate of", placed.duplicate_of);
    add("position", `${fmt(placed.x)}, ${fmt(placed.y)}`);
    card.append(facts);
    const neighbours = element("div", "neighbours");
    for (const neighbour of placed.neighbours) {
      const figure = element("figure", "neighbour");
      const image = element("img");
      image.alt = neighbour.id;
      image.title = `${neighbour.id} (${neighbour.label ?? "unlabelled"}), distance ${fmt(neighbour.distance, 3)}`;
      thumbnailUrl(neighbour.index).then((url) => {
        if (url) image.src = url;
      });
      figure.append(image, element("figcaption", "", neighbour.label ?? "–"), element("figcaption", "", `d ${fmt(neighbour.distance)}`));
      neighbours.append(figure);
    }
    card.append(neighbours);
    card.addEventListener("mouseenter", () => highlight(result));
    card.addEventListener("click", () => {
      highlight(result);
      state.view.cx = result.x;
      state.view.cy = result.y;
      scheduleDraw();
    });
    state.results.push(result);
    scheduleDraw();
  }

  function highlight(result) {
    for (const card of document.querySelectorAll(".result.highlighted")) card.classList.remove("highlighted");
    state.highlighted = result;
    if (result) result.card.classList.add("highlighted");
    scheduleDraw();
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

  async function loadMap() {
    const started = performance.now();
    const infoResponse = await call("info");
    if (!infoResponse.ok) throw new ServiceError(infoResponse.status, (await readError(infoResponse)).message);
    state.info = await infoResponse.json();
    const mapResponse = await call("map");
    if (!mapResponse.ok) throw new ServiceError(mapResponse.status, (await readError(mapResponse)).message);
    const text = await mapResponse.text();
    const fetched = performance.now();
    setPoints(JSON.parse(text));
    const parsed = performance.now();
    stats.timings = { fetchMs: fetched - started, parseMs: parsed - fetched, bytes: text.length };
  }

  async function start() {
    installMapInteraction();
    installUpload();
    resize();
    setStatus("info", "Connecting to the service…");
    for (;;) {
      await waitUntilReady();
      try {
        await withToken(loadMap);
        break;
      } catch (error) {
        setStatus("error", `Could not load the map: ${error.message}`);
        await sleep(3000);
      }
    }
    $("bundle-name").textContent = `${state.info.bundle} · ${state.points.n.toLocaleString("en")} images`;
    document.title = `${state.info.bundle} · tsimcne map`;
    buildLegend();
    resize();
    fitView();
    draw(); // now, not at the next frame: the first paint is what the page is waiting for
    stats.timings.firstDrawMs = stats.lastDrawMs;
    performance.mark("tsimcne-map-drawn");
    stats.ready = true;
    setStatus("ok", `Map loaded: ${state.points.n.toLocaleString("en")} reference images. Drop images on it to place them.`);
  }

  window.tsimcneMap = {
    stats,
    view: () => ({ ...state.view }),
    // Where reference image i is drawn, in CSS pixels relative to the canvas (for tests).
    screenPosition: (i) => {
      const [sx, sy] = toScreen(state.points.xs[i], state.points.ys[i]);
      return [sx / render.dpr, sy / render.dpr];
    },
    markerPosition: (n) => {
      const result = state.results.find((r) => r.n === n);
      if (!result) return null;
      const [sx, sy] = toScreen(result.x, result.y);
      return [sx / render.dpr, sy / render.dpr];
    },
    markers: () => state.results.map((r) => ({ n: r.n, name: r.name, flag: r.flag })),
    zoomAt: (factor, cssX, cssY) => zoomAt(factor, cssX * render.dpr, cssY * render.dpr),
    panBy: (dx, dy) => panBy(dx * render.dpr, dy * render.dpr),
    draw,
  };

  start();
})();
