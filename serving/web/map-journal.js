// The journal on the map page: the images the service has placed (GET /placements) drawn as a layer over
// the map, a queue of flagged images not yet reviewed with buttons for a verdict (POST
// /placements/{id}/review), and the flagged share per day (GET /drift) beside the flag's target rate.
// Everything comes from the service's journal, so it is the same after a reload or on another computer;
// a service started without a journal answers 404, and the page then says so in place of the layer.

import { element, neighbourStrip, placementFacts } from "./map-cards.js";

const NO_SOURCE = "\u0000none"; // the source select's value for images sent without a source
const SETTINGS = new URLSearchParams(location.search);
// Placements per request (at most 1000, GET /placements' limit; ?journal_page=N for tests).
const PAGE = Math.min(1000, Number(SETTINGS.get("journal_page")) || 1000);
const QUEUE_PAGE = 50;
const REVIEWER_KEY = "tsimcne-reviewer";
// The most journal markers drawn (?journal_cap=N changes it, for tests and slow computers).
const CAP = Number(SETTINGS.get("journal_cap")) || 20_000;
const JOURNAL_COLOURS = { in_distribution: "#34495e", out_of_distribution: "#c2185b", artefact: "#e07000" };

const $ = (id) => document.getElementById(id);

// ISO 8601 as the journal writes it (+00:00, not Z): it compares times as text.
function isoHoursAgo(hours) {
  return new Date(Date.now() - hours * 3_600_000).toISOString().replace("Z", "+00:00");
}

// The flagged share of each day over all sources (GET /drift gives one entry per day and source).
export function sharePerDay(days) {
  const byDay = new Map();
  for (const entry of days) {
    const day = byDay.get(entry.day) || { day: entry.day, images: 0, flagged: 0 };
    day.images += entry.images;
    day.flagged += entry.flagged;
    byDay.set(entry.day, day);
  }
  return [...byDay.values()]
    .sort((a, b) => (a.day < b.day ? -1 : 1))
    .map((d) => ({ ...d, share: d.images ? d.flagged / d.images : 0 }));
}

export class Journal {
  // host: what the page lends the journal: call, readError, thumbnailUrl, redraw, centreOn, info().
  constructor(host) {
    this.host = host;
    this.rows = []; // the layer's placements on this map: {id, x, y, flag, review, filename, source, time}
    this.off = false;
    this.capped = false;
    this.otherBundle = 0; // placements on another bundle's map, not drawn
    this.loading = false;
    this.generation = 0; // a newer load makes an older one stop
    this.sources = new Set();
    this.queue = new Map(); // id -> {row, item}
    this.queueNext = null;
    this.queueLoaded = false;
    this.highlighted = null; // the row whose marker is ringed
    this.chart = null; // {days, target}
  }

  install() {
    for (const id of ["journal-range", "journal-source", "journal-flagged"]) {
      $(id).addEventListener("change", () => this.loadLayer());
    }
    $("journal-show").addEventListener("change", () => this.host.redraw());
    $("journal-reload").addEventListener("click", () => this.refresh());
    $("queue-more").addEventListener("click", () => this.loadQueue(true));
    const reviewer = $("reviewer");
    reviewer.value = localStorage.getItem(REVIEWER_KEY) || "";
    reviewer.addEventListener("change", () => localStorage.setItem(REVIEWER_KEY, reviewer.value.trim()));
    for (const tab of document.querySelectorAll("#tabs [role=tab]")) {
      tab.addEventListener("click", () => this.showTab(tab.getAttribute("aria-controls")));
    }
  }

  showTab(name) {
    for (const tab of document.querySelectorAll("#tabs [role=tab]")) {
      const chosen = tab.getAttribute("aria-controls") === name;
      tab.setAttribute("aria-selected", String(chosen));
      $(tab.getAttribute("aria-controls")).hidden = !chosen;
    }
    if (name === "review" && this.chart) this.drawChart();
  }

  // Everything again: after the page placed images (they are in the journal now) or on ↻.
  async refresh() {
    await Promise.all([this.loadLayer(), this.loadQueue(false), this.loadDrift()]);
  }

  // An answer that is not OK as a message; 404 from a journal route means the journal is off.
  async failure(response) {
    const { message } = await this.host.readError(response);
    if (response.status === 404 && /journal is off/.test(message)) this.setOff(message);
    return message;
  }

  setOff(message) {
    this.off = true;
    this.rows = [];
    const note = $("journal-note");
    note.className = "off";
    note.textContent = "Journal off: this service keeps no record of placed images.";
    note.title = message;
    for (const id of ["journal-range", "journal-source", "journal-flagged", "journal-reload"]) $(id).disabled = true;
    $("journal-show").disabled = true;
    $("journal-show").checked = false;
    $("queue-note").className = "off";
    $("queue-note").textContent = `No review queue: ${message}.`;
    $("drift").hidden = true;
    $("reviewer-label").hidden = true;
    this.host.redraw();
  }

  layerQuery() {
    const query = new URLSearchParams({ limit: String(PAGE) });
    const hours = $("journal-range").value;
    if (hours) query.set("since", isoHoursAgo(Number(hours)));
    const source = $("journal-source").value;
    if (source) query.set("source", source === NO_SOURCE ? "" : source); // source= (empty): sent without one
    if ($("journal-flagged").checked) query.set("flagged", "true");
    return query;
  }

  // The layer's placements, a page at a time along the cursor, up to CAP markers.
  async loadLayer() {
    if (this.off) return;
    const generation = ++this.generation;
    const query = this.layerQuery();
    const rows = [];
    let otherBundle = 0;
    let capped = false;
    this.loading = true;
    this.setNote("", "Loading the journal…");
    const bundle = this.host.info().bundle_sha256;
    let restarted = false;
    try {
      for (;;) {
        const response = await this.host.call(`placements?${query}`);
        if (generation !== this.generation) return;
        if (response.status === 400 && query.has("after") && !restarted) {
          // The cursor's row was pruned meanwhile (the service says start again): once, from the start.
          restarted = true;
          query.delete("after");
          rows.length = 0;
          otherBundle = 0;
          continue;
        }
        if (!response.ok) {
          const message = await this.failure(response);
          if (!this.off) this.setNote("error", `Could not read the journal: ${message}`);
          return;
        }
        const page = await response.json();
        for (const row of page.placements) {
          this.sources.add(row.source || NO_SOURCE);
          // Positions on another bundle's map mean nothing on this one.
          if (row.bundle_sha256 !== bundle) otherBundle++;
          else rows.push(this.keep(row));
        }
        if (rows.length >= CAP) {
          capped = page.next !== null || rows.length > CAP;
          rows.length = Math.min(rows.length, CAP);
          break;
        }
        if (page.next === null || page.next === undefined) break;
        query.set("after", String(page.next));
      }
    } catch (error) {
      if (generation === this.generation) this.setNote("error", `Could not read the journal: ${error.message}`);
      return;
    } finally {
      if (generation === this.generation) this.loading = false;
    }
    Object.assign(this, { rows, capped, otherBundle });
    this.fillSources();
    this.setNote("", this.describeLayer());
    this.host.redraw();
  }

  keep(row) {
    const { id, x, y, flag, review, filename, source, time } = row;
    return { id, x, y, flag, review, filename, source, time };
  }

  describeLayer() {
    const flagged = this.rows.filter((r) => r.flag !== "in_distribution").length;
    const count = (n) => n.toLocaleString("en");
    let text = `${count(this.rows.length)} placed image(s) drawn, ${count(flagged)} flagged`;
    if (this.capped) {
      text = `Showing the first ${count(CAP)} placed images only (more match); narrow the time range or source. ` +
        `${count(flagged)} flagged`;
    }
    if (this.otherBundle) text += `; ${count(this.otherBundle)} placed on another bundle's map, not drawn`;
    return `${text}.`;
  }

  setNote(kind, text) {
    const note = $("journal-note");
    note.className = kind;
    note.textContent = text;
  }

  // The sources seen (in the layer and in /drift), keeping the chosen one.
  fillSources() {
    const select = $("journal-source");
    const chosen = select.value;
    const known = new Set([...select.options].map((o) => o.value));
    for (const source of [...this.sources].sort()) {
      if (known.has(source)) continue;
      const option = element("option", "", source === NO_SOURCE ? "(no source)" : source);
      option.value = source;
      select.append(option);
    }
    select.value = chosen;
  }

  // ---- the markers ---------------------------------------------------------------------------------

  // Drawn on the page's overlay, under this session's numbered upload markers: a small hollow square per
  // placement (the reference points stay visible through it), a bigger diamond in the flag's colour for a
  // flagged one, a ring around the highlighted one.
  draw(context, toScreen, dpr, width, height) {
    if ($("journal-show").checked) this.drawMarkers(context, toScreen, dpr, width, height);
    if (this.highlighted) {
      // Drawn even with the layer unticked: a click on a queued image asks where it is.
      const [sx, sy] = toScreen(this.highlighted.x, this.highlighted.y);
      context.beginPath();
      context.arc(sx, sy, 13 * dpr, 0, 2 * Math.PI);
      context.lineWidth = 3 * dpr;
      context.strokeStyle = "#3b82c4";
      context.stroke();
    }
  }

  drawMarkers(context, toScreen, dpr, width, height) {
    const margin = 10 * dpr;
    const visible = (sx, sy) => sx > -margin && sy > -margin && sx < width + margin && sy < height + margin;
    const side = Math.round(5 * dpr);
    context.strokeStyle = JOURNAL_COLOURS.in_distribution;
    context.lineWidth = Math.max(1, Math.round(dpr));
    context.globalAlpha = 0.85;
    context.beginPath();
    for (const row of this.rows) {
      if (row.flag !== "in_distribution") continue;
      const [sx, sy] = toScreen(row.x, row.y);
      // On whole pixels, so the lines are sharp.
      if (visible(sx, sy)) context.rect(Math.round(sx) - side / 2, Math.round(sy) - side / 2, side, side);
    }
    context.stroke();
    context.globalAlpha = 1;
    const size = 6 * dpr;
    context.lineWidth = 1.5 * dpr;
    context.strokeStyle = "#ffffff";
    for (const row of this.rows) {
      if (row.flag === "in_distribution") continue;
      const [sx, sy] = toScreen(row.x, row.y);
      if (!visible(sx, sy)) continue;
      context.beginPath();
      context.moveTo(sx, sy - size);
      context.lineTo(sx + size, sy);
      context.lineTo(sx, sy + size);
      context.lineTo(sx - size, sy);
      context.closePath();
      context.fillStyle = JOURNAL_COLOURS[row.flag] || JOURNAL_COLOURS.out_of_distribution;
      context.fill();
      context.stroke();
    }
  }

  highlight(row) {
    this.highlighted = row;
    for (const item of document.querySelectorAll(".queued.highlighted")) item.classList.remove("highlighted");
    if (row) this.queue.get(row.id)?.item.classList.add("highlighted");
    this.host.redraw();
  }

  // ---- the review queue ----------------------------------------------------------------------------

  async loadQueue(more) {
    if (this.off) return;
    const query = new URLSearchParams({ flagged: "true", review: "unreviewed", limit: String(QUEUE_PAGE) });
    if (more && this.queueNext !== null) query.set("after", String(this.queueNext));
    const note = $("queue-note");
    let page;
    try {
      const response = await this.host.call(`placements?${query}`);
      if (!response.ok) {
        const message = await this.failure(response);
        if (!this.off) Object.assign(note, { className: "error", textContent: `Could not read the queue: ${message}` });
        return;
      }
      page = await response.json();
    } catch (error) {
      Object.assign(note, { className: "error", textContent: `Could not read the queue: ${error.message}` });
      return;
    }
    if (!more) {
      // Items still waiting keep what was typed in them; the ones reviewed elsewhere go.
      const waiting = new Set(page.placements.map((row) => row.id));
      for (const [id, { item }] of this.queue) {
        if (!waiting.has(id)) {
          item.remove();
          this.queue.delete(id);
        }
      }
    }
    for (const row of page.placements) {
      if (!this.queue.has(row.id)) this.addQueued(row);
    }
    this.queueNext = page.next;
    this.queueLoaded = true;
    $("queue-more").hidden = page.next === null;
    this.countQueue();
  }

  countQueue() {
    const count = this.queue.size;
    const more = this.queueNext !== null ? "+" : "";
    $("queue-count").textContent = count ? `${count}${more}` : "";
    const note = $("queue-note");
    note.className = "";
    note.textContent = count ? "" : "No flagged image waits for review.";
  }

  addQueued(row) {
    const item = element("li", `queued ${row.flag}`);
    item.dataset.id = String(row.id);
    const head = element("div", "result-head");
    const image = element("img", "upload");
    image.alt = row.filename;
    this.host.call(`placements/${row.id}/image`).then(async (response) => {
      if (response.ok) image.src = URL.createObjectURL(await response.blob());
    }).catch(() => {});
    const title = element("div", "result-title");
    title.append(
      element("div", "file-name", row.filename),
      element("span", "badge", row.flag.replaceAll("_", " ")),
      element("div", "queued-meta", [row.source || "no source", row.sample_id, `${row.time.slice(0, 19).replace("T", " ")} UTC`]
        .filter(Boolean).join(" · ")),
    );
    head.append(image, title);
    const facts = placementFacts(row);
    item.append(head, facts);
    const sameMap = row.bundle_sha256 === this.host.info().bundle_sha256;
    if (sameMap) {
      const neighbours = neighbourStrip(row.neighbours, (index) => this.host.thumbnailUrl(index));
      item.append(neighbours);
    } else {
      item.append(element("div", "queued-meta", "placed on another bundle's map: its neighbours are not on this one"));
    }
    item.append(this.verdictControls(row, item));
    item.addEventListener("click", (event) => {
      if (event.target.closest(".verdicts")) return;
      const kept = { x: row.x, y: row.y, id: row.id };
      this.highlight(kept);
      if (sameMap) this.host.centreOn(row.x, row.y);
    });
    this.queue.set(row.id, { row, item });
    $("queue").append(item);
  }

  verdictControls(row, item) {
    const controls = element("div", "verdicts");
    const fine = element("button", "verdict-fine", "fine");
    fine.type = "button";
    fine.title = "a clean image the map should know";
    const artefact = element("button", "verdict-artefact", "artefact");
    artefact.type = "button";
    artefact.title = "not a usable cell image";
    const label = element("select", "verdict-label");
    label.setAttribute("aria-label", "label as");
    label.append(Object.assign(element("option", "", "label as…"), { value: "" }));
    for (const name of this.host.info().classes) label.append(Object.assign(element("option", "", name), { value: name }));
    const note = element("input", "verdict-note");
    note.type = "text";
    note.maxLength = 2000;
    note.placeholder = "note (optional)";
    const send = (verdict) => this.review(row, item, verdict, note.value.trim() || null);
    fine.addEventListener("click", () => send("fine"));
    artefact.addEventListener("click", () => send("artefact"));
    label.addEventListener("change", () => {
      if (label.value) send(label.value);
    });
    controls.append(fine, artefact, label, note);
    return controls;
  }

  async review(row, item, verdict, note) {
    item.querySelector(".error-text")?.remove();
    item.classList.add("saving");
    for (const control of item.querySelectorAll(".verdicts button, .verdicts select")) control.disabled = true;
    const reviewer = $("reviewer").value.trim() || null;
    localStorage.setItem(REVIEWER_KEY, reviewer || "");
    let message = null;
    try {
      const response = await this.host.call(`placements/${row.id}/review`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ verdict, reviewer, note }),
      });
      if (response.ok) {
        const updated = await response.json();
        const drawn = this.rows.find((r) => r.id === row.id);
        if (drawn) drawn.review = updated.review;
        this.queue.delete(row.id);
        item.remove();
        if (this.highlighted?.id === row.id) this.highlight(null);
        this.countQueue();
        return;
      }
      message = (await this.host.readError(response)).message;
    } catch (error) {
      message = error.message;
    }
    item.classList.remove("saving");
    for (const control of item.querySelectorAll(".verdicts button, .verdicts select")) control.disabled = false;
    item.querySelector(".verdict-label").value = "";
    item.append(element("div", "error-text", `The verdict was not saved: ${message}`));
  }

  // ---- the flagged share per day -------------------------------------------------------------------

  async loadDrift() {
    if (this.off) return;
    const summary = $("drift-summary");
    try {
      const response = await this.host.call("drift");
      if (!response.ok) {
        const message = await this.failure(response);
        if (!this.off) summary.textContent = `(could not read: ${message})`;
        return;
      }
      const body = await response.json();
      for (const entry of body.days) this.sources.add(entry.source || NO_SOURCE);
      this.fillSources();
      const target = this.host.info().calibration?.target_false_flag_rate ?? null;
      this.chart = { days: sharePerDay(body.days), target };
    } catch (error) {
      summary.textContent = `(could not read: ${error.message})`;
      return;
    }
    const { days } = this.chart;
    const images = days.reduce((sum, d) => sum + d.images, 0);
    const flagged = days.reduce((sum, d) => sum + d.flagged, 0);
    summary.textContent = days.length
      ? `(${days.length} day(s), ${flagged} of ${images} flagged)`
      : "(nothing placed yet)";
    this.drawChart();
  }

  // Bars of the flagged share per day, oldest on the left; the calibrated target rate as a dashed line.
  drawChart() {
    const chart = $("drift-chart");
    if (chart.offsetParent === null) return; // hidden tab: drawn when shown
    const dpr = window.devicePixelRatio || 1;
    const width = chart.clientWidth;
    const height = chart.clientHeight;
    chart.width = Math.round(width * dpr);
    chart.height = Math.round(height * dpr);
    const context = chart.getContext("2d");
    context.setTransform(dpr, 0, 0, dpr, 0, 0);
    context.clearRect(0, 0, width, height);
    const { days, target } = this.chart;
    const left = 34;
    const bottom = height - 18;
    const top = 8;
    const plotWidth = width - left - 6;
    const ceiling = Math.max(0.05, target ? target * 2 : 0, ...days.map((d) => d.share)) * 1.1;
    const yOf = (share) => bottom - (share / ceiling) * (bottom - top);
    context.font = "10px system-ui, sans-serif";
    context.fillStyle = "#5b6570";
    context.strokeStyle = "#d5d9de";
    context.lineWidth = 1;
    context.textAlign = "right";
    context.textBaseline = "middle";
    for (const tick of [0, ceiling / 2, ceiling]) {
      const y = Math.round(yOf(tick)) + 0.5;
      context.beginPath();
      context.moveTo(left, y);
      context.lineTo(width - 6, y);
      context.stroke();
      context.fillText(`${(tick * 100).toFixed(tick && tick < 0.1 ? 1 : 0)} %`, left - 4, y);
    }
    const step = days.length ? plotWidth / days.length : plotWidth;
    const bar = Math.max(2, Math.min(28, step * 0.7));
    context.textAlign = "center";
    context.textBaseline = "top";
    const labelEvery = Math.ceil(days.length / 6);
    days.forEach((day, k) => {
      const x = left + step * (k + 0.5);
      const y = yOf(day.share);
      if (day.flagged) {
        context.fillStyle = "#c2185b";
        context.fillRect(x - bar / 2, y, bar, Math.max(bottom - y, 1));
      } else {
        context.fillStyle = "#aab3bc"; // a day with images, none flagged
        context.fillRect(x - bar / 2, bottom - 2, bar, 2);
      }
      if (k % labelEvery === 0) {
        context.fillStyle = "#5b6570";
        context.fillText(day.day.slice(5), x, bottom + 3);
      }
    });
    if (target) {
      const y = Math.round(yOf(target)) + 0.5;
      context.strokeStyle = "#2e8540";
      context.setLineDash([4, 3]);
      context.lineWidth = 1.5;
      context.beginPath();
      context.moveTo(left, y);
      context.lineTo(width - 6, y);
      context.stroke();
      // Its key in the top right corner, clear of the bars near the line.
      context.beginPath();
      context.moveTo(width - 92, top + 5.5);
      context.lineTo(width - 72, top + 5.5);
      context.stroke();
      context.setLineDash([]);
      context.fillStyle = "#2e8540";
      context.textAlign = "left";
      context.textBaseline = "middle";
      const percent = (target * 100).toLocaleString("en", { maximumFractionDigits: 2 });
      context.fillText(`target ${percent} %`, width - 68, top + 6);
    }
    const described = days.map((d) => `${d.day} ${(d.share * 100).toFixed(1)} %`).join(", ");
    chart.setAttribute("aria-label", `flagged share per day: ${described}`);
  }

  // For the browser tests.
  testView(toScreen, dpr) {
    return {
      off: this.off,
      loading: this.loading,
      capped: this.capped,
      markers: this.rows.map((r) => ({ id: r.id, flag: r.flag, source: r.source })),
      position: (id) => {
        const row = this.rows.find((r) => r.id === id);
        if (!row) return null;
        const [sx, sy] = toScreen(row.x, row.y);
        return [sx / dpr, sy / dpr];
      },
      highlighted: this.highlighted?.id ?? null,
      queue: [...this.queue.keys()],
      queueLoaded: this.queueLoaded,
      chart: this.chart,
    };
  }
}
