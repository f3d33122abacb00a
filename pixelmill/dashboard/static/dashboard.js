// pixelmill dashboard: polls the JSON API (/api/...) and draws the fleet, the batches and one
// batch's view. Everything that comes from users (file names, prompts, captions, batch names,
// error text) is inserted as text (textContent, text nodes), never as HTML.
"use strict";

(function () {
  const POLL_MS = 2000;
  const PAGE = 48;
  const SVG = "http://www.w3.org/2000/svg";
  const xsrf = document.querySelector('meta[name="xsrf"]').getAttribute("content");
  const $ = (id) => document.getElementById(id);

  const view = { batch: null, offset: 0, cursor: "", seqs: null, status: "", filter: "", busy: false, again: false };

  // ---- DOM helpers (text only) ------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    return node;
  }

  function fill(parent, nodes) {
    parent.replaceChildren(...nodes);
  }

  // Table rows kept by key and made again only when their data changed, so that a poll
  // neither redraws what did not change nor swaps a row from under a click.
  function keyedRows(body, cache, items, keyOf, make) {
    const rows = items.map((item) => {
      const key = keyOf(item);
      const data = JSON.stringify(item);
      const hit = cache.get(key);
      if (hit && hit.data === data) return hit.row;
      const row = make(item);
      cache.set(key, { data: data, row: row });
      return row;
    });
    const same = body.children.length === rows.length && rows.every((r, i) => body.children[i] === r);
    if (!same) fill(body, rows);
    if (cache.size > 500) cache.clear();
  }
  const fleetRows = new Map();
  const batchRows = new Map();

  // ---- formatting -------------------------------------------------------------------------

  function rate(x) {
    if (x === null || x === undefined) return "–";
    return x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2);
  }

  function duration(s) {
    if (s === null || s === undefined) return "–";
    s = Math.round(s);
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    const h = Math.floor(s / 3600);
    return h + " h " + Math.floor((s % 3600) / 60) + " min";
  }

  function when(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    const pad = (n) => String(n).padStart(2, "0");
    return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " +
      pad(d.getHours()) + ":" + pad(d.getMinutes());
  }

  function eta(b) {
    if (b.state === "finished") return "done";
    if (b.state === "cancelled" || b.state === "paused") return "–";
    return duration(b.eta_seconds);
  }

  function shortId(id) {
    return id ? id.slice(0, 8) : "";
  }

  // ---- the API ----------------------------------------------------------------------------

  async function getText(url) {
    const r = await fetch(url, { credentials: "same-origin", cache: "no-store" });
    if (!r.ok) {
      let why = r.status + " " + r.statusText;
      try { why = (await r.json()).error || why; } catch (e) { /* not JSON */ }
      throw new Error(why);
    }
    return r.text();
  }

  // What each section last drew from: an answer that has not changed is not drawn again.
  const drawn = {};

  function drawIfNew(key, text, draw) {
    if (text === null || drawn[key] === text) return;
    drawn[key] = text;
    draw(JSON.parse(text));
  }

  async function post(url, body) {
    const r = await fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "X-XSRFToken": xsrf, "Content-Type": "application/json" },
      body: JSON.stringify(body || {}),
    });
    const data = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(data.error || r.status + " " + r.statusText);
    return data;
  }

  // ---- progress bar -----------------------------------------------------------------------

  const SEGMENTS = ["done", "reused", "failed", "cancelled", "running", "queued"];

  function segments(b) {
    return {
      done: Math.max(0, (b.done || 0) - (b.reused || 0)),
      reused: b.reused || 0,
      failed: b.failed || 0,
      cancelled: b.cancelled || 0,
      running: b.running || 0,
      queued: b.queued || 0,
    };
  }

  function progressBar(b) {
    const parts = segments(b);
    const total = Math.max(1, b.total || 0);
    const bar = el("div", { class: "bar", role: "img" });
    const said = [];
    for (const name of SEGMENTS) {
      const n = parts[name];
      if (!n) continue;
      said.push(n + " " + name);
      const seg = el("span", { class: "seg " + name });
      seg.style.width = (100 * n / total) + "%";  // CSSOM, which the page's CSP allows
      bar.append(seg);
    }
    bar.setAttribute("aria-label", said.join(", ") || "empty");
    bar.title = said.join(", ");
    const finished = (b.done || 0) + (b.failed || 0) + (b.cancelled || 0);
    return el("div", { class: "progress" }, bar,
      el("span", { class: "count", text: finished + " / " + (b.total || 0) }));
  }

  // ---- fleet ------------------------------------------------------------------------------

  function sparkline(values) {
    const w = 120, h = 24;
    const box = svg("svg", { width: w, height: h, viewBox: "0 0 " + w + " " + h, class: "spark" });
    if (!values || !values.length) return box;
    const max = Math.max(...values, 0.001);
    const step = w / Math.max(1, values.length - 1);
    const points = values.map((v, i) => (i * step).toFixed(1) + "," + (h - 1 - (v / max) * (h - 3)).toFixed(1));
    box.append(svg("polyline", { points: points.join(" "), fill: "none", class: "line" }));
    return box;
  }

  function drawFleet(data) {
    keyedRows($("fleet").tBodies[0], fleetRows, data.workers, (w) => w.name, (w) => el("tr", { class: "state-" + w.state },
      el("td", {}, el("div", { class: "strong", text: w.host }), el("div", { class: "sub", text: w.name })),
      el("td", { text: w.device }),
      el("td", {}, el("span", { class: "badge " + w.state, text: w.state })),
      el("td", { class: "models", text: (w.models || []).join(", ") || "–" }),
      el("td", { class: w.heartbeat_age > 60 ? "stale" : "", text: w.heartbeat_age === null ? "–" : duration(w.heartbeat_age) + " ago" }),
      el("td", {}, w.batch ? el("a", { href: "#/batch/" + w.batch, text: shortId(w.batch) }) : "–"),
      el("td", { class: "spark-cell" }, sparkline(w.recent), el("span", { text: rate(w.items_per_second) })),
    ));
    $("fleet-empty").hidden = data.workers.length > 0;
    const q = data.queue || {};
    const chips = [];
    if (q.error) chips.push(el("span", { class: "chip error", text: q.error }));
    for (const p of ["high", "normal", "low"]) {
      const n = (q.by_priority || {})[p];
      if (n === undefined) continue;
      chips.push(el("span", { class: "chip " + p, title: "messages waiting at priority " + p },
        el("span", { class: "k", text: p }), el("span", { class: "v", text: String(n) })));
    }
    fill($("queue"), [el("span", { class: "sub", text: "queue " + (q.name || "") }), ...chips]);
  }

  // ---- batches ----------------------------------------------------------------------------

  function drawBatches(data) {
    const items = data.batches.map((b) => Object.assign({ selected: view.batch === b.batch }, b));
    keyedRows($("batches").tBodies[0], batchRows, items, (b) => b.batch, (b) => {
      const link = el("a", { href: "#/batch/" + b.batch, class: "strong", text: b.name || shortId(b.batch) });
      return el("tr", { "data-batch": b.batch, class: b.selected ? "selected" : "" },
        el("td", {}, link, b.name ? el("div", { class: "sub", text: shortId(b.batch) }) : null),
        el("td", { text: b.task }),
        el("td", { class: "model", text: b.model }),
        el("td", { class: "nowrap", text: when(b.created) }),
        el("td", {}, el("span", { class: "badge " + b.state, text: b.state }),
          b.priority !== "normal" ? el("span", { class: "badge prio-" + b.priority, text: b.priority }) : null),
        el("td", { class: "wide" }, progressBar(b)),
        el("td", { text: rate(b.items_per_second) }),
        el("td", { class: "nowrap", text: eta(b) }),
      );
    });
    $("batches-empty").hidden = data.batches.length > 0;
  }

  // ---- one batch --------------------------------------------------------------------------

  function drawThroughput(t) {
    const w = 560, h = 140;
    const box = svg("svg", { viewBox: "0 0 " + w + " " + h, class: "bars", preserveAspectRatio: "none" });
    const values = t.per_minute || [];
    if (!values.length) {
      fill($("throughput"), [el("p", { class: "empty", text: "Nothing finished yet." })]);
      return;
    }
    const max = Math.max(...values, 1);
    const bw = w / Math.max(values.length, 30);  // a short life stays narrow, left-aligned
    values.forEach((v, i) => {
      const bh = (v / max) * (h - 4);
      const r = svg("rect", { x: (i * bw + 0.5).toFixed(2), y: (h - bh).toFixed(2), width: Math.max(1, bw - 1).toFixed(2), height: bh.toFixed(2) });
      const tip = svg("title");
      tip.textContent = v + " jobs/min";
      r.append(tip);
      box.append(r);
    });
    const peak = el("div", { class: "sub", text: "peak " + max + " jobs/min" + (t.step > 1 ? " (" + t.step + "-minute steps)" : "") + ", since " + when(t.start) });
    fill($("throughput"), [box, peak]);
  }

  function drawFailures(shown) {
    const [failures, notShown] = shown;
    const items = failures.map((f) => {
      const inputs = f.examples.map((e) => el("li", { class: "input" },
        e.input, e.detail ? el("span", { class: "detail", text: "  " + e.detail }) : null));
      const more = f.jobs - f.examples.length;
      if (more > 0) inputs.push(el("li", { class: "more", text: "… and " + more + " more" }));
      return el("li", {},
        el("div", {}, el("span", { class: "badge failed", text: "×" + f.jobs }), " ", el("span", { class: "reason", text: f.reason })),
        el("ul", { class: "inputs" }, ...inputs),
      );
    });
    if (notShown && notShown.kinds > 0) {
      items.push(el("li", { class: "more", text: "… and " + notShown.kinds + " more kind(s) of failure (" + notShown.jobs + " job(s)) not shown" }));
    }
    fill($("failures"), items);
    $("failures-empty").hidden = items.length > 0;
  }

  function caption(job) {
    if (job.status === "failed" || job.status === "cancelled") return el("div", { class: "err", text: job.error || job.status });
    if (job.labels && job.labels.length) {
      const top = job.labels[0];
      return el("div", { class: "label", text: top.label + (typeof top.score === "number" ? " (" + top.score.toFixed(2) + ")" : "") });
    }
    if (job.caption !== null && job.caption !== undefined) return el("div", { class: "label", text: job.caption });
    if (job.prompt !== null && job.prompt !== undefined) {
      return el("div", { class: "label" }, el("span", { text: job.prompt }), el("span", { class: "sub", text: " seed " + job.seed }));
    }
    return el("div", { class: "sub", text: job.status });
  }

  const cards = new Map();

  function drawSheet(data) {
    const nodes = data.jobs.map((job) => {
      let card = cards.get(job.job);
      if (!card) {
        const img = el("img", { alt: "", loading: "lazy", width: 160, height: 160 });
        card = { node: el("figure", { class: "thumb", "data-job": job.job }), img: img, key: "", src: "" };
        cards.set(job.job, card);
      }
      const key = job.status + "|" + (job.error || "") + "|" + job.artifact + "|" + JSON.stringify(job.labels) + (job.caption || "") + (job.prompt || "");
      if (card.key !== key) {
        // The input's thumbnail, or the generated image once there is one.
        const src = "/thumb/" + encodeURIComponent(job.job) + (job.artifact ? "?kind=artifact" : "");
        if (card.src !== src) { card.img.src = src; card.src = src; }
        card.node.className = "thumb " + job.status;
        fill(card.node, [card.img,
          el("figcaption", {}, caption(job), el("div", { class: "name", title: job.input, text: job.input }),
            el("span", { class: "badge " + job.status, text: job.status + (job.reused ? " · reused" : "") }))]);
        card.key = key;
      }
      return card.node;
    });
    const sheet = $("sheet");
    const same = sheet.children.length === nodes.length && nodes.every((n, i) => sheet.children[i] === n);
    if (!same) fill(sheet, nodes);  // the same cards: each was updated in place, if at all
    if (cards.size > 2000) cards.clear();
    view.seqs = data.jobs.length ? [data.jobs[0].seq, data.jobs[data.jobs.length - 1].seq] : null;
    const first = data.offset + 1, last = data.offset + data.jobs.length;
    $("page").textContent = data.jobs.length ? first + "–" + last : "no jobs";
    $("prev").disabled = data.offset === 0;
    $("next").disabled = data.jobs.length < PAGE;
  }

  // ---- search: the embedded images nearest a sentence, as a contact sheet ------------------

  async function search(e) {
    e.preventDefault();
    const q = $("search-q").value.trim();
    const source = $("search-source").value.trim();
    if (!q) { $("search-status").textContent = "Type what you are looking for."; return; }
    $("search-status").textContent = "Searching…";
    const params = new URLSearchParams({ q: q, limit: "48" });
    if (source) params.set("source", source);
    try {
      const data = JSON.parse(await getText("/api/search?" + params.toString()));
      fill($("search-hits"), data.hits.map((hit) => el("figure", { class: "thumb done", "data-job": hit.job_id },
        el("img", { alt: "", loading: "lazy", width: 160, height: 160, src: "/thumb/" + encodeURIComponent(hit.job_id) }),
        el("figcaption", {},
          el("div", { class: "label", text: "#" + hit.rank + "  " + hit.score.toFixed(3) }),
          el("div", { class: "name", title: hit.input, text: hit.input }),
          el("a", { href: "#/batch/" + encodeURIComponent(hit.batch_id), class: "sub", text: "batch " + shortId(hit.batch_id) })))));
      $("search-status").textContent = data.hits.length + " nearest to “" + data.query + "”";
    } catch (err) {
      fill($("search-hits"), []);
      $("search-status").textContent = err.message;
    }
  }

  function drawBatch(b) {
    $("batch-title").textContent = b.name || "Batch " + shortId(b.batch);
    $("batch-meta").textContent = b.batch + " · " + b.task + " · " + b.model + " · submitted " + when(b.created) + " · priority " + b.priority;
    fill($("batch-progress"), [progressBar(b)]);
    const counts = ["queued", "running", "done", "failed", "cancelled", "reused"].map((s) => (b[s] || 0) + " " + s).join(" · ");
    fill($("batch-counts"), [el("span", { class: "badge " + b.state, text: b.state }),
      " " + counts + " · " + rate(b.items_per_second) + " items/s · ETA " + (b.state === "finished" ? "done" : duration(b.eta_seconds))]);
    const select = $("priority");
    if (document.activeElement !== select) select.value = b.priority;
    for (const button of document.querySelectorAll("[data-action]")) {
      const a = button.dataset.action;
      const over = b.state === "finished" || b.state === "cancelled";
      button.disabled = (a === "pause" && (b.state === "paused" || over)) ||
        (a === "resume" && b.state !== "paused") ||
        (a === "cancel" && over) ||
        (a === "retry" && !b.failed);
    }
    select.disabled = b.state === "cancelled" || b.state === "finished";
    for (const fmt of ["jsonl", "csv", "parquet"]) {
      $("export-" + fmt).href = "/api/batches/" + encodeURIComponent(b.batch) + "/export?format=" + fmt;
    }
    drawIfNew("throughput", JSON.stringify(b.throughput), drawThroughput);
    drawIfNew("failures", JSON.stringify([b.failures, b.failures_not_shown]), drawFailures);
  }

  // ---- polling ----------------------------------------------------------------------------

  async function refresh() {
    if (view.busy) { view.again = true; return; }  // once this one is over
    view.busy = true;
    view.again = false;
    try {
      const q = encodeURIComponent(view.filter);
      const id = view.batch ? encodeURIComponent(view.batch) : null;
      const [fleet, batches, batch, page] = await Promise.all([
        getText("/api/fleet"),
        getText("/api/batches?limit=50&q=" + q),
        id ? getText("/api/batches/" + id) : null,
        id ? getText("/api/batches/" + id + "/jobs?offset=" + view.offset + view.cursor + "&limit=" + PAGE + (view.status ? "&status=" + view.status : "")) : null,
      ]);
      drawIfNew("fleet", fleet, drawFleet);
      drawIfNew("batches", batches, drawBatches);
      drawIfNew("batch", batch, drawBatch);
      drawIfNew("sheet", page, drawSheet);
      $("live").textContent = "live · " + new Date().toLocaleTimeString();
      $("live").className = "live ok";
    } catch (e) {
      $("live").textContent = "not updating: " + e.message;
      $("live").className = "live down";
    } finally {
      view.busy = false;
      if (view.again) refresh();
    }
  }

  function route() {
    const m = location.hash.match(/^#\/batch\/([0-9A-Za-z-]+)/);
    const batch = m ? m[1] : null;
    if (batch !== view.batch) {
      delete drawn.batch;
      delete drawn.sheet;
      delete drawn.throughput;
      delete drawn.failures;
      delete drawn.batches;  // the selected row
      view.batch = batch;
      view.offset = 0;
      view.cursor = "";
      cards.clear();
      fill($("sheet"), []);
      $("action-result").textContent = "";
    }
    $("batch-section").hidden = !batch;
    if (batch) $("batch-section").scrollIntoView({ block: "start" });
    refresh();
  }

  // ---- controls ---------------------------------------------------------------------------

  const confirming = new WeakMap();

  async function act(action, body) {
    const out = $("action-result");
    try {
      const r = await post("/api/batches/" + encodeURIComponent(view.batch) + "/" + action, body);
      const said = { pause: r.changed ? "paused" : "already paused", resume: "resumed (" + r.queued + " queued)",
        cancel: r.cancelled + " queued jobs cancelled", retry: r.retried + " failed jobs queued again",
        priority: "priority " + r.priority }[action];
      out.textContent = said;
      out.className = "meta ok";
    } catch (e) {
      out.textContent = action + ": " + e.message;
      out.className = "meta error";
    }
    refresh();
  }

  function setup() {
    for (const button of document.querySelectorAll("[data-action]")) {
      button.addEventListener("click", () => {
        const action = button.dataset.action;
        if (action === "cancel" && !confirming.get(button)) {
          // A second click confirms (no modal dialog).
          confirming.set(button, true);
          const label = button.textContent;
          button.textContent = "Confirm cancel";
          button.classList.add("armed");
          setTimeout(() => { confirming.delete(button); button.textContent = label; button.classList.remove("armed"); }, 4000);
          return;
        }
        if (action === "cancel") {
          confirming.delete(button);
          button.textContent = "Cancel";
          button.classList.remove("armed");
        }
        act(action);
      });
    }
    $("search-form").addEventListener("submit", search);
    $("priority").addEventListener("change", (e) => act("priority", { priority: e.target.value }));
    let typing = null;
    $("filter").addEventListener("input", (e) => {
      clearTimeout(typing);
      typing = setTimeout(() => { view.filter = e.target.value; refresh(); }, 250);
    });
    $("job-status").addEventListener("change", (e) => { view.status = e.target.value; view.offset = 0; view.cursor = ""; refresh(); });
    // Pages by the jobs' places in the batch (after the last shown, before the first), never
    // by counting the rows before: a page deep in a million jobs costs what the first does.
    $("prev").addEventListener("click", () => {
      view.offset = Math.max(0, view.offset - PAGE);
      view.cursor = view.offset && view.seqs ? "&before=" + view.seqs[0] : "";
      refresh();
    });
    $("next").addEventListener("click", () => {
      if (!view.seqs) return;
      view.offset += PAGE;
      view.cursor = "&after=" + view.seqs[1];
      refresh();
    });
    window.addEventListener("hashchange", route);
    route();
    // No polling while the tab is hidden; at once when it shows again.
    setInterval(() => { if (!document.hidden) refresh(); }, POLL_MS);
    document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
  }

  document.addEventListener("DOMContentLoaded", setup);
})();
