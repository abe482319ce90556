// The threaddispatch dashboard: plain JS over the admin API (same origin, bearer token from sessionStorage).
// Every value from the API reaches the page through textContent or an attribute, never as HTML.
"use strict";

(() => {
  const BASE = document.body.dataset.base || "";
  const TOKEN_KEY = "threaddispatch.admin.token";
  const CSRF_COOKIE = "csrftoken";  // Django's CSRF_COOKIE_NAME default
  const REFRESH_MS = 4000;
  const PAGE_SIZE = 25;
  const STATES = ["pending", "waiting", "running", "retrying", "completed", "failed", "cancelled"];
  const $ = (id) => document.getElementById(id);

  class AuthError extends Error {}

  // -- the API --------------------------------------------------------------------------------------

  // Mounted in Django behind its session login (staff mode), a mutation must send the CSRF cookie back as
  // X-CSRFToken; without that cookie (the bearer token, or another framework) there is nothing to send.
  function csrfToken() {
    for (const part of document.cookie.split(";")) {
      const [name, ...rest] = part.trim().split("=");
      if (name === CSRF_COOKIE) return decodeURIComponent(rest.join("="));
    }
    return "";
  }

  async function api(method, path, params) {
    const headers = { Accept: "application/json" };
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = "Bearer " + token;
    if (method !== "GET" && method !== "HEAD") {
      const csrf = csrfToken();
      if (csrf) headers["X-CSRFToken"] = csrf;
    }
    let url = BASE + path;
    const init = { method, headers, credentials: "same-origin", cache: "no-store", redirect: "error" };
    if (params && method === "GET") {
      const query = new URLSearchParams();
      for (const [key, value] of Object.entries(params)) {
        if (value !== null && value !== undefined && value !== "") query.set(key, String(value));
      }
      const text = query.toString();
      if (text) url += "?" + text;
    } else if (params) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(params);
    }
    const response = await fetch(url, init);
    let data = null;
    try { data = await response.json(); } catch (_ignored) { data = null; }
    if (response.status === 401) throw new AuthError("the token was refused");
    if (!response.ok) {
      const message = data && data.error ? data.error.message : response.statusText;
      const error = new Error(message || "HTTP " + response.status);
      error.status = response.status;
      throw error;
    }
    return data;
  }

  const segment = (value) => encodeURIComponent(value);

  // -- building elements (text only) ----------------------------------------------------------------

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (key === "className") node.className = value;
      else if (key === "onclick") node.addEventListener("click", value);
      else if (key === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function button(label, onclick, className) {
    return el("button", { type: "button", className: className || "", onclick }, label);
  }

  // The range Python's datetime holds (0001-01-01 to 9999-12-31 UTC): outside it the CLI shows
  // "far future (epoch 1e+15)", and so does the page (a Date there is "Invalid Date" or year 10000+).
  const FIRST_EPOCH = -62135596800;
  const LAST_EPOCH = 253402300800;

  // Python's format(x, ".6g"): six significant digits, trailing zeros dropped, exponent of two digits at least.
  function sixDigits(x) {
    if (x === 0) return "0";
    const [mantissa, exponentText] = x.toExponential(5).split("e");
    const exponent = Number(exponentText);
    const trim = (text) => (text.includes(".") ? text.replace(/0+$/, "").replace(/\.$/, "") : text);
    if (exponent >= -4 && exponent < 6) return trim(x.toFixed(5 - exponent));
    const digits = String(Math.abs(exponent)).padStart(2, "0");
    return trim(mantissa) + "e" + (exponent < 0 ? "-" : "+") + digits;
  }

  function when(seconds) {
    if (seconds === null || seconds === undefined) return "";
    if (typeof seconds !== "number" || !Number.isFinite(seconds)) return "-";
    if (seconds < FIRST_EPOCH || seconds >= LAST_EPOCH) {
      return (seconds > 0 ? "far future" : "far past") + " (epoch " + sixDigits(seconds) + ")";
    }
    return new Date(seconds * 1000).toLocaleString();
  }

  function json(value) {
    return value === undefined ? "" : JSON.stringify(value, null, 2);
  }

  function fill(tbody, rows, columns, empty) {
    tbody.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: String(columns) }, empty))]));
  }

  function setStatus(text, isError) {
    const status = $("status");
    status.textContent = text;
    status.className = isError ? "error" : "";
  }

  // -- login ----------------------------------------------------------------------------------------

  function showLogin(message) {
    $("app").hidden = true;
    $("logout").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("token").focus();
  }

  function showApp() {
    $("login").hidden = true;
    $("app").hidden = false;
    $("logout").hidden = !sessionStorage.getItem(TOKEN_KEY);
  }

  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("token").value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    $("token").value = "";
    loggedOut = false;
    refreshNow();
  });

  $("logout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    loggedOut = true;
    showLogin("");
  });

  // -- views ----------------------------------------------------------------------------------------

  const jobs = { filters: { state: "", queue: "", name: "" }, cursors: [null], index: 0, next: null };
  let detailId = null;

  async function loadCounts() {
    const data = await api("GET", "/jobs/counts");
    const cards = [el("div", { className: "card", dataset: { state: "total" } }, el("b", {}, data.total), "total")];
    for (const state of STATES) {
      cards.push(el("div", { className: "card " + state, dataset: { state } }, el("b", {}, data.counts[state] || 0), state));
    }
    $("counts").replaceChildren(...cards);
  }

  async function loadQueues() {
    const data = await api("GET", "/queues");
    const rows = data.queues.map((queue) => {
      const counts = queue.counts || {};
      const toggle = queue.paused
        ? button("Resume", () => mutate("POST", "/queues/" + segment(queue.name) + "/resume"))
        : button("Pause", () => mutate("POST", "/queues/" + segment(queue.name) + "/pause"));
      return el("tr", { dataset: { queue: queue.name } },
        el("td", {}, queue.name),
        ...STATES.map((state) => el("td", {}, counts[state] || 0)),
        el("td", { className: queue.paused ? "paused queue-state" : "queue-state" }, queue.paused ? "paused" : "active"),
        el("td", {}, toggle));
    });
    fill($("queues").tBodies[0], rows, 10, "no queues");
  }

  async function loadJobs() {
    const params = { ...jobs.filters, limit: PAGE_SIZE, cursor: jobs.cursors[jobs.index] };
    const data = await api("GET", "/jobs", params);
    jobs.next = data.next_cursor;
    const rows = data.jobs.map((job) => el("tr", { dataset: { job: job.id } },
      el("td", {}, el("a", { className: "job-link", href: "#job-" + job.id, dataset: { id: job.id },
        onclick: (event) => { event.preventDefault(); openDetail(job.id); } }, job.id)),
      el("td", { className: "job-name" }, job.name),
      el("td", {}, job.queue),
      el("td", { className: "job-state " + job.state }, job.state),
      el("td", {}, job.attempts),
      el("td", {}, when(job.created_at))));
    fill($("jobs").tBodies[0], rows, 6, "no jobs");
    $("jobs-prev").disabled = jobs.index === 0;
    $("jobs-next").disabled = !jobs.next;
    $("jobs-page").textContent = "page " + (jobs.index + 1);
  }

  async function loadDetail() {
    if (detailId === null) return;
    let job;
    try {
      job = (await api("GET", "/jobs/" + segment(detailId))).job;
    } catch (error) {
      if (error.status === 404) { closeDetail(); return; }
      throw error;
    }
    $("detail-id").textContent = job.id;
    const fields = [
      ["name", job.name], ["queue", job.queue], ["state", job.state], ["priority", job.priority],
      ["attempts", job.attempts + " of " + (job.max_retries + 1)], ["worker", job.worker_id || ""],
      ["timeout", job.timeout === null ? "none" : job.timeout + " s"], ["unique key", job.unique_key || ""],
      ["created", when(job.created_at)], ["run at", when(job.run_at)], ["started", when(job.started_at)],
      ["finished", when(job.finished_at)], ["heartbeat", when(job.heartbeat_at)], ["updated", when(job.updated_at)],
      ["depends on", (job.depends_on || []).join(", ")],
      ["waiting on", job.waiting_on ? job.waiting_on + " unfinished" : ""],
      ["lock", job.lock || ""],
    ];
    $("detail-fields").replaceChildren(...fields.flatMap(([name, value]) => [
      el("dt", {}, name), el("dd", { dataset: { field: name } }, value)]));
    $("detail-payload").textContent = json(job.payload);
    $("detail-result").textContent = json(job.result);
    $("detail-error").textContent = job.error || "";
    // The engine's rule (JobEngine.cancel / retry), as the API's and the CLI's.
    $("detail-cancel").disabled = !["pending", "waiting", "retrying", "running"].includes(job.state);
    $("detail-retry").disabled = !["failed", "cancelled"].includes(job.state);
    $("job-detail").hidden = false;
  }

  function openDetail(id) {
    detailId = id;
    refreshNow();
  }

  function closeDetail() {
    detailId = null;
    $("job-detail").hidden = true;
  }

  async function loadDeadLetters() {
    const [count, data] = await Promise.all([api("GET", "/dlq/count"), api("GET", "/dlq", { limit: PAGE_SIZE })]);
    $("dlq-count").textContent = "(" + count.count + ")";
    const rows = data.dead_letters.map((letter) => el("tr", { dataset: { deadLetter: letter.id } },
      el("td", {}, letter.id),
      el("td", {}, el("a", { className: "job-link", href: "#job-" + letter.job_id,
        onclick: (event) => { event.preventDefault(); openDetail(letter.job_id); } }, letter.job_id)),
      el("td", {}, letter.name),
      el("td", {}, letter.queue),
      el("td", {}, letter.attempts),
      el("td", { className: "error-text", title: letter.error || "" }, letter.error || ""),
      el("td", {}, when(letter.failed_at)),
      el("td", {}, button("Replay", () => mutate("POST", "/dlq/" + segment(letter.id) + "/replay"), "replay"))));
    fill($("dlq").tBodies[0], rows, 8, "no dead letters");
  }

  async function loadCrons() {
    const data = await api("GET", "/crons");
    const rows = data.crons.map((cron) => {
      const path = "/crons/" + segment(cron.name);
      return el("tr", { dataset: { cron: cron.name } },
        el("td", {}, cron.name), el("td", {}, cron.expression), el("td", {}, cron.job_name), el("td", {}, cron.queue),
        el("td", {}, when(cron.last_tick)),
        el("td", { className: "cron-state" }, cron.enabled ? "enabled" : "disabled"),
        el("td", {},
          cron.enabled ? button("Disable", () => mutate("POST", path + "/disable"))
            : button("Enable", () => mutate("POST", path + "/enable")),
          " ",
          button("Delete", () => mutate("DELETE", path, null, "Delete the cron entry " + cron.name + "?"), "danger")));
    });
    fill($("crons").tBodies[0], rows, 7, "no cron entries");
  }

  // Panels for routes an older server may lack: shown only while the route answers 200.
  async function optional(panel, load) {
    try {
      await load();
      $(panel).hidden = false;
    } catch (error) {
      if (error instanceof AuthError) throw error;
      $(panel).hidden = true;
      if (error.status !== 404) throw error;
    }
  }

  async function loadWorkers() {
    const data = await api("GET", "/workers");
    const workers = Array.isArray(data) ? data : data.workers || [];
    const rows = workers.map((worker) => {
      const id = worker.worker_id || worker.id || worker.name || "";
      return el("tr", {}, el("td", {}, id), el("td", {}, el("pre", {}, json(worker))));
    });
    fill($("workers").tBodies[0], rows, 2, "no live workers");
  }

  async function loadLocks() {
    const data = await api("GET", "/locks", { limit: PAGE_SIZE });
    const rows = data.holds.map((hold) => el("tr", { dataset: { lock: hold.lock, job: hold.job_id } },
      el("td", { className: "lock-key" }, hold.lock),
      el("td", {}, el("a", { className: "job-link", href: "#job-" + hold.job_id,
        onclick: (event) => { event.preventDefault(); openDetail(hold.job_id); } }, hold.job_id)),
      el("td", {}, hold.job_name || ""),
      el("td", { className: "job-state " + (hold.job_state || "") }, hold.job_state || "purged"),
      el("td", {}, hold.attempts),
      el("td", {}, hold.worker_id),
      el("td", {}, when(hold.held_since)),
      el("td", {}, when(hold.heartbeat_at))));
    fill($("locks").tBodies[0], rows, 8, "no lock holds");
    $("locks-more").hidden = data.total <= data.holds.length;
    $("locks-more").textContent = data.holds.length + " of " + data.total + " shown (oldest heartbeat first)";
  }

  async function loadThroughput() {
    const data = await api("GET", "/stats/throughput", { minutes: 60 });
    drawChart(data.buckets || []);
  }

  function drawChart(buckets) {
    const NS = "http://www.w3.org/2000/svg";
    const width = 600, height = 120;
    const svg = document.createElementNS(NS, "svg");
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("width", "100%");
    svg.setAttribute("height", "120");
    svg.setAttribute("role", "img");
    const top = Math.max(1, ...buckets.map((b) => b.completed + b.failed));
    const step = buckets.length ? width / buckets.length : width;
    buckets.forEach((bucket, i) => {
      let y = height;
      for (const kind of ["completed", "failed"]) {
        const h = (bucket[kind] / top) * (height - 10);
        if (h > 0) {
          const rect = document.createElementNS(NS, "rect");
          rect.setAttribute("x", String(i * step + 1));
          rect.setAttribute("width", String(Math.max(1, step - 2)));
          rect.setAttribute("y", String(y - h));
          rect.setAttribute("height", String(h));
          rect.setAttribute("class", "bar-" + kind);
          const title = document.createElementNS(NS, "title");
          title.textContent = new Date(bucket.start * 1000).toLocaleTimeString() + ": " + bucket[kind] + " " + kind;
          rect.append(title);
          svg.append(rect);
          y -= h;
        }
      }
    });
    const total = (kind) => buckets.reduce((sum, bucket) => sum + bucket[kind], 0);
    const first = buckets.length ? new Date(buckets[0].start * 1000).toLocaleTimeString() : "";
    const legend = el("p", { className: "chart-legend" },
      el("span", {}, first), el("span", {}, "peak " + top + " per minute; " + total("completed") + " completed, "
        + total("failed") + " failed"), el("span", {}, "now"));
    $("throughput").replaceChildren(svg, legend);
  }

  // -- mutations and the refresh loop ---------------------------------------------------------------

  async function mutate(method, path, params, question) {
    if (question && !window.confirm(question)) return null;
    try {
      const data = await api(method, path, params || undefined);
      setStatus(method + " " + path + ": done", false);
      refreshNow();
      return data;
    } catch (error) {
      if (error instanceof AuthError) { showLogin("Your token was refused; sign in again."); return null; }
      setStatus(method + " " + path + ": " + error.message, true);
      return null;
    }
  }

  let running = false;   // a refresh is in flight: never two at once
  let again = false;     // one more was asked for while it ran
  let timer = null;
  let loggedOut = false;

  async function refresh() {
    await loadCounts();   // first: a 401 here stops the rest
    await Promise.all([
      loadQueues(), loadJobs(), loadDetail(), loadDeadLetters(), loadCrons(),
      optional("workers-panel", loadWorkers), optional("locks-panel", loadLocks),
      optional("throughput-panel", loadThroughput),
    ]);
  }

  async function refreshNow() {
    if (running) { again = true; return; }
    if (timer !== null) { clearTimeout(timer); timer = null; }
    running = true;
    try {
      await refresh();
      showApp();
      setStatus("updated " + new Date().toLocaleTimeString(), false);
    } catch (error) {
      if (error instanceof AuthError) {
        running = false;
        again = false;
        const hadToken = Boolean(sessionStorage.getItem(TOKEN_KEY));
        sessionStorage.removeItem(TOKEN_KEY);
        showLogin(hadToken ? "That token was refused." : "");
        return;
      }
      setStatus("refresh failed: " + error.message, true);
    }
    running = false;
    if (again) { again = false; refreshNow(); return; }
    if (!loggedOut) timer = setTimeout(refreshNow, REFRESH_MS);
  }

  // -- controls -------------------------------------------------------------------------------------

  $("job-filters").addEventListener("submit", (event) => {
    event.preventDefault();
    jobs.filters = { state: $("filter-state").value, queue: $("filter-queue").value.trim(), name: $("filter-name").value.trim() };
    jobs.cursors = [null];
    jobs.index = 0;
    refreshNow();
  });
  $("jobs-next").addEventListener("click", () => {
    if (!jobs.next) return;
    jobs.cursors = jobs.cursors.slice(0, jobs.index + 1).concat([jobs.next]);
    jobs.index += 1;
    refreshNow();
  });
  $("jobs-prev").addEventListener("click", () => {
    if (jobs.index > 0) { jobs.index -= 1; refreshNow(); }
  });
  $("detail-close").addEventListener("click", closeDetail);
  $("detail-cancel").addEventListener("click", () => detailId && mutate("POST", "/jobs/" + segment(detailId) + "/cancel"));
  $("detail-retry").addEventListener("click", () => detailId && mutate("POST", "/jobs/" + segment(detailId) + "/retry"));
  $("dlq-replay-all").addEventListener("click", () => mutate("POST", "/dlq/replay-all"));
  $("dlq-purge").addEventListener("click", () => mutate("POST", "/dlq/purge", { all: true }, "Delete every dead letter? This cannot be undone."));

  refreshNow();
})();
