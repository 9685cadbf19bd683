// The Cairn console: a single page over the admin API, no build step and no
// third-party code (it is embedded in the host binary and works offline).
//
// Every page is a function of the location hash (`#/invocations?status=paused`),
// so a page can be linked and reloaded. Data is always put into the page as
// text, never as HTML. Requests carry the session cookie `/ui/login` set;
// a 401 sends the browser back to the sign-in page.
"use strict";

const STATUSES = ["unfinished", "scheduled", "pending", "ready", "running", "backing-off",
  "suspended", "paused", "succeeded", "failed", "killed", "cancelled"];
const FINISHED = ["succeeded", "failed", "killed", "cancelled"];
const REFRESH_MS = 2000;

let refreshTimer = null;

// ---- helpers ---------------------------------------------------------------

/** An element: h("a", {href: "#"}, "text", child, ...). */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "value") el.value = value;
    else el.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** Call the admin API; JSON in and out; throws Error(message) on failure. */
async function api(method, path, body) {
  const init = { method, headers: {}, credentials: "same-origin" };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = typeof body === "string" ? body : JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (response.status === 401) {
    location.href = "/ui";
    throw new Error("signed out");
  }
  const text = await response.text();
  const value = text ? safeJson(text) : null;
  if (!response.ok) {
    throw new Error((value && value.message) || `${method} ${path}: ${response.status}`);
  }
  return value;
}

function safeJson(text) {
  try { return JSON.parse(text); } catch (_) { return text; }
}

function badge(status) {
  return h("span", { class: `badge ${status}`, "data-status": status }, status);
}

function time(rfc3339) {
  if (!rfc3339) return "";
  return rfc3339.replace("T", " ").replace("Z", "");
}

/** JSON on one line when it is short, indented when it is not. */
function json(value) {
  if (value === undefined) return "";
  const line = JSON.stringify(value);
  return line.length <= 100 ? line : JSON.stringify(value, null, 2);
}

/** Replace the children of `el`, skipping absent ones. */
function fill(el, ...children) {
  el.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
}

function toast(message, isError) {
  const el = document.getElementById("toast");
  el.textContent = message;
  el.className = isError ? "error" : "";
  el.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { el.hidden = true; }, 4000);
}

/** The hash as a page name, path parts and query. */
function route() {
  const [path, query] = location.hash.replace(/^#\/?/, "").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  return { page: parts[0] || "invocations", parts: parts.slice(1), query: new URLSearchParams(query || "") };
}

function go(hash) {
  if (location.hash === hash) render();
  else location.hash = hash;
}

function show(title, ...content) {
  const page = document.getElementById("page");
  fill(page, h("h1", {}, title), ...content);
}

/** Run `load` now and every REFRESH_MS while `live()` says so. */
function every(load, live) {
  const tick = async () => {
    try { await load(); } catch (e) { toast(e.message, true); }
    document.getElementById("host").textContent = `updated ${new Date().toLocaleTimeString()}`;
    if (live()) refreshTimer = setTimeout(tick, REFRESH_MS);
  };
  tick();
}

/** A button that runs an admin action and then `done`. */
function actionButton(label, method, path, done, cls) {
  return h("button", {
    class: cls, "data-action": label.toLowerCase(),
    onclick: async (event) => {
      event.target.disabled = true;
      try {
        await api(method, path);
        toast(`${label}: done`);
        done();
      } catch (e) {
        toast(`${label}: ${e.message}`, true);
        event.target.disabled = false;
      }
    },
  }, label);
}

/** Resume, cancel, kill or pause, as the status allows. */
function invocationActions(inv, done) {
  if (FINISHED.includes(inv.status)) return [];
  const base = `/invocations/${encodeURIComponent(inv.id)}`;
  const buttons = [];
  if (inv.status === "paused") buttons.push(actionButton("Resume", "POST", `${base}/resume`, done, "primary"));
  else buttons.push(actionButton("Pause", "POST", `${base}/pause`, done));
  buttons.push(actionButton("Cancel", "POST", `${base}/cancel`, done, "danger"));
  buttons.push(actionButton("Kill", "POST", `${base}/kill`, done, "danger"));
  return buttons;
}

// ---- invocations -----------------------------------------------------------

const FILTERS = ["service", "handler", "key", "status", "deployment", "created_after", "created_before"];

async function invocationsPage(query, fixedStatus) {
  if (fixedStatus) query.set("status", fixedStatus);
  const services = (await api("GET", "/services")).services;
  const live = h("input", { type: "checkbox", id: "live", checked: true });
  const form = h("form", { class: "filters", id: "filters" },
    h("label", {}, "Service", h("select", { name: "service", id: "filter-service" },
      h("option", { value: "" }, "any"),
      services.map((s) => h("option", { value: s.name, selected: query.get("service") === s.name }, s.name)))),
    h("label", {}, "Handler", h("input", { name: "handler", id: "filter-handler", size: 12, value: query.get("handler") || "" })),
    h("label", {}, "Key", h("input", { name: "key", id: "filter-key", size: 12, value: query.get("key") || "" })),
    fixedStatus ? null : h("label", {}, "Status", h("select", { name: "status", id: "filter-status" },
      h("option", { value: "" }, "any"),
      STATUSES.map((s) => h("option", { value: s, selected: query.get("status") === s }, s)))),
    h("label", {}, "Deployment", h("input", { name: "deployment", size: 14, value: query.get("deployment") || "" })),
    h("label", {}, "Created after", h("input", { name: "created_after", size: 20, placeholder: "2026-01-01T00:00:00Z", value: query.get("created_after") || "" })),
    h("label", {}, "Created before", h("input", { name: "created_before", size: 20, value: query.get("created_before") || "" })),
    h("button", { type: "submit", class: "primary", id: "apply-filters" }, "Filter"),
    h("label", { class: "live" }, h("span", {}, "Live"), live));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const next = new URLSearchParams();
    for (const name of FILTERS) {
      const field = form.elements[name];
      if (field && field.value) next.set(name, field.value);
    }
    go(`#/${fixedStatus ? "paused" : "invocations"}?${next}`);
  });
  const body = h("tbody", { id: "invocations" });
  const table = h("table", { id: "invocations-table" },
    h("thead", {}, h("tr", {}, ["Invocation", "Target", "Status", "Attempts", "Created", "Completed", "Last error", ""].map((t) => h("th", {}, t)))),
    body);
  const pager = h("div", { class: "pager" });
  const cursor = query.get("cursor");
  show(fixedStatus ? "Paused invocations" : "Invocations", form, table, pager);
  const load = async () => {
    const params = new URLSearchParams();
    for (const name of FILTERS) if (query.get(name)) params.set(name, query.get(name));
    params.set("limit", "50");
    if (cursor) params.set("cursor", cursor);
    const page = await api("GET", `/invocations?${params}`);
    body.replaceChildren(...page.invocations.map((inv) => h("tr", { "data-id": inv.id },
      h("td", {}, h("a", { class: "mono", href: `#/invocation/${encodeURIComponent(inv.id)}` }, inv.id)),
      h("td", { class: "mono" }, inv.target),
      h("td", {}, badge(inv.status)),
      h("td", {}, inv.attempts),
      h("td", {}, time(inv.created_at)),
      h("td", {}, time(inv.completed_at)),
      h("td", { class: "error" }, inv.last_error || (inv.failure && inv.failure.message) || ""),
      h("td", {}, fixedStatus ? h("div", { class: "actions" }, invocationActions(inv, () => load())) : null))));
    if (page.invocations.length === 0) {
      body.append(h("tr", {}, h("td", { colspan: 8, class: "muted", id: "empty" }, "No invocation matches.")));
    }
    const next = new URLSearchParams(params);
    next.delete("limit");
    fill(pager,
      cursor ? h("a", { href: `#/${route().page}?${withoutCursor(params)}` }, "First page") : null,
      page.next_cursor ? h("a", { id: "next-page", href: `#/${route().page}?${(next.set("cursor", page.next_cursor), next)}` }, "Next page") : null);
  };
  every(load, () => live.checked && document.body.contains(table));
}

function withoutCursor(params) {
  const copy = new URLSearchParams(params);
  copy.delete("cursor");
  copy.delete("limit");
  return copy;
}

async function invocationPage(id) {
  const facts = h("div", { class: "card", id: "invocation" });
  const actions = h("div", { class: "actions", id: "invocation-actions" });
  const timeline = h("ol", { class: "timeline", id: "journal" });
  show(`Invocation`, facts, actions, h("h2", {}, "Journal"), timeline);
  let finished = false;
  const load = async () => {
    const inv = await api("GET", `/invocations/${encodeURIComponent(id)}`);
    finished = FINISHED.includes(inv.status);
    const keyed = inv.key !== null && inv.key !== undefined;
    facts.replaceChildren(h("dl", { class: "facts" },
      h("dt", {}, "Id"), h("dd", { class: "mono" }, inv.id),
      h("dt", {}, "Target"), h("dd", { class: "mono" }, inv.target),
      h("dt", {}, "Status"), h("dd", {}, badge(inv.status)),
      h("dt", {}, "Deployment"), h("dd", { class: "mono" }, inv.deployment),
      h("dt", {}, "Attempts"), h("dd", {}, inv.attempts),
      h("dt", {}, "Created"), h("dd", {}, time(inv.created_at)),
      inv.start_at ? [h("dt", {}, "Starts at"), h("dd", {}, time(inv.start_at))] : null,
      h("dt", {}, "Completed"), h("dd", {}, time(inv.completed_at) || "not yet"),
      inv.caller ? [h("dt", {}, "Caller"), h("dd", {}, h("a", { class: "mono", href: `#/invocation/${inv.caller}` }, inv.caller))] : null,
      inv.idempotency_key ? [h("dt", {}, "Idempotency key"), h("dd", { class: "mono" }, inv.idempotency_key)] : null,
      keyed ? [h("dt", {}, "State"), h("dd", {}, h("a", { href: `#/objects/${encodeURIComponent(inv.service)}/${encodeURIComponent(inv.key)}` }, `${inv.service}/${inv.key}`))] : null,
      inv.last_error ? [h("dt", {}, "Last error"), h("dd", { class: "error", id: "last-error" }, inv.last_error)] : null,
      h("dt", {}, "Input"), h("dd", { class: "mono" }, json(inv.input)),
      h("dt", {}, "Outcome"), h("dd", { class: "mono", id: "outcome" }, inv.outcome ? json(inv.outcome) : "")));
    actions.replaceChildren(...invocationActions(inv, () => load()));
    timeline.replaceChildren(...inv.journal.map((e) => h("li", { class: e.type },
      h("span", { class: "idx" }, `#${e.index}`),
      e.type === "command" ? h("code", {}, e.command) : h("span", {}, "answers ", h("code", {}, e.answers)),
      e.value !== undefined ? h("span", { class: "value mono" }, json(e.value)) : null)));
    if (inv.journal.length === 0) timeline.append(h("li", { class: "muted" }, "Nothing journaled yet."));
  };
  every(load, () => !finished && document.body.contains(timeline));
}

// ---- services and deployments ----------------------------------------------

async function servicesPage() {
  const { services } = await api("GET", "/services");
  show("Services", h("table", { id: "services" },
    h("thead", {}, h("tr", {}, ["Service", "Kind", "Handlers", "Deployment", ""].map((t) => h("th", {}, t)))),
    h("tbody", {}, services.map((s) => h("tr", {},
      h("td", {}, h("strong", {}, s.name)),
      h("td", {}, s.kind),
      h("td", {}, s.handlers.map((hd) => h("div", {}, h("code", {}, hd.name), hd.kind ? h("span", { class: "muted" }, ` (${hd.kind})`) : null))),
      h("td", { class: "mono" }, s.deployment),
      h("td", {}, h("a", { href: `#/invocations?service=${encodeURIComponent(s.name)}` }, "invocations")))))));
}

async function deploymentsPage(id) {
  const { deployments } = await api("GET", "/deployments");
  const detail = h("pre", { class: "card mono", id: "deployment" });
  show("Deployments", h("table", { id: "deployments" },
    h("thead", {}, h("tr", {}, ["Deployment", "Created", "Services"].map((t) => h("th", {}, t)))),
    h("tbody", {}, deployments.map((d) => h("tr", {},
      h("td", {}, h("a", { class: "mono", href: `#/deployments/${encodeURIComponent(d.id)}` }, d.id)),
      h("td", {}, time(d.created_at)),
      h("td", {}, (d.services || []).map((s) => (typeof s === "string" ? s : s.name)).join(", ")))))),
    id ? detail : null);
  if (id) detail.textContent = json(await api("GET", `/deployments/${encodeURIComponent(id)}`));
}

// ---- keyed state -----------------------------------------------------------

async function objectsPage(service, key) {
  const { services } = await api("GET", "/services");
  const keyed = services.filter((s) => s.kind !== "service");
  const form = h("form", { class: "filters", id: "object-form" },
    h("label", {}, "Object", h("select", { name: "service", id: "object-service" },
      keyed.map((s) => h("option", { value: s.name, selected: s.name === service }, s.name)))),
    h("label", {}, "Key", h("input", { name: "key", id: "object-key", value: key || "", required: true })),
    h("button", { class: "primary", type: "submit" }, "Show state"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    go(`#/objects/${encodeURIComponent(form.elements.service.value)}/${encodeURIComponent(form.elements.key.value)}`);
  });
  if (!service || key === undefined) {
    show("State", form, h("p", { class: "muted" }, "Pick a virtual object or workflow and a key."));
    return;
  }
  const base = `/objects/${encodeURIComponent(service)}/${encodeURIComponent(key)}/state`;
  const { state } = await api("GET", base);
  const reload = () => objectsPage(service, key);
  const save = (name, field) => async () => {
    try {
      JSON.parse(field.value);
    } catch (e) {
      toast(`${name}: not JSON (${e.message})`, true);
      return;
    }
    try {
      await api("PUT", `${base}/${encodeURIComponent(name)}`, field.value);
      toast(`${name} saved`);
      reload();
    } catch (e) { toast(e.message, true); }
  };
  const rows = Object.entries(state).map(([name, value]) => {
    const field = h("textarea", { rows: 2, "data-name": name }, json(value));
    return h("tr", { "data-name": name },
      h("td", {}, h("code", {}, name)),
      h("td", {}, field),
      h("td", {}, h("div", { class: "actions" },
        h("button", { class: "primary", onclick: save(name, field) }, "Save"),
        actionButton("Delete", "DELETE", `${base}/${encodeURIComponent(name)}`, reload, "danger"))));
  });
  const newName = h("input", { placeholder: "name", id: "new-name" });
  const newValue = h("textarea", { rows: 1, placeholder: "JSON value", id: "new-value" });
  show(`State of ${service}/${key}`, form,
    h("p", { class: "muted" }, "A change is an exclusive invocation of this key: it waits for the handler holding the key."),
    h("table", { id: "state" },
      h("thead", {}, h("tr", {}, ["Name", "Value (JSON)", ""].map((t) => h("th", {}, t)))),
      h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: 3, class: "muted" }, "No state."))),
      h("tfoot", {}, h("tr", {}, h("td", {}, newName), h("td", {}, newValue),
        h("td", {}, h("button", { onclick: () => newName.value && save(newName.value, newValue)() }, "Add"))))),
    h("p", {}, h("a", { href: `#/invocations?service=${encodeURIComponent(service)}&key=${encodeURIComponent(key)}` }, "Invocations of this key")));
}

// ---- subscriptions ---------------------------------------------------------

async function subscriptionsPage() {
  const body = h("tbody", { id: "subscriptions" });
  show("Kafka subscriptions", h("table", {},
    h("thead", {}, h("tr", {}, ["Subscription", "Source", "Sink", "State", "Ingested", "Rate /s", "In flight", "Lag", ""].map((t) => h("th", {}, t)))),
    body));
  const load = async () => {
    const { subscriptions } = await api("GET", "/subscriptions");
    body.replaceChildren(...subscriptions.map((s) => {
      const lag = Object.entries(s.lag || {});
      const total = lag.reduce((sum, [, n]) => sum + n, 0);
      const base = `/subscriptions/${encodeURIComponent(s.id)}`;
      return h("tr", { "data-id": s.id },
        h("td", { class: "mono" }, s.id),
        h("td", { class: "mono" }, s.source),
        h("td", { class: "mono" }, s.sink),
        h("td", {}, badge(s.paused ? "paused" : "running"), s.stopped ? h("div", { class: "error" }, s.stopped) : null),
        h("td", {}, s.ingested),
        h("td", {}, s.ingest_rate),
        h("td", {}, s.in_flight),
        h("td", { title: lag.map(([p, n]) => `partition ${p}: ${n}`).join("\n") }, total),
        h("td", {}, s.paused
          ? actionButton("Resume", "POST", `${base}/resume`, load, "primary")
          : actionButton("Pause", "POST", `${base}/pause`, load)));
    }));
    if (subscriptions.length === 0) body.append(h("tr", {}, h("td", { colspan: 9, class: "muted" }, "No subscription.")));
  };
  every(load, () => document.body.contains(body));
}

// ---- routing ---------------------------------------------------------------

async function render() {
  clearTimeout(refreshTimer);
  const { page, parts, query } = route();
  for (const link of document.querySelectorAll("header nav a")) {
    link.classList.toggle("active", link.dataset.page === page || (page === "invocation" && link.dataset.page === "invocations"));
  }
  try {
    switch (page) {
      case "invocations": return await invocationsPage(query);
      case "paused": return await invocationsPage(query, "paused");
      case "invocation": return await invocationPage(parts[0]);
      case "services": return await servicesPage();
      case "deployments": return await deploymentsPage(parts[0]);
      case "objects": return await objectsPage(parts[0], parts[1]);
      case "subscriptions": return await subscriptionsPage();
      default: return show("Not found", h("p", {}, `No console page ${page}.`));
    }
  } catch (e) {
    show("Error", h("p", { class: "error", id: "error" }, e.message));
  }
}

window.addEventListener("hashchange", render);
render();
