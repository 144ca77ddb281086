// Treaty dashboard: plain JavaScript over the admin REST API (/admin/v1). No framework and no
// build step, so that the coordinator can embed it and an operator can read it.
"use strict";

const API = "/admin/v1";
const TOKEN_KEY = "treaty-admin-token";
// The modes' own words for a transaction that turned back; with needs_operator, what the
// overview calls failures. The list filter refuses a word it does not know, so a typo shows.
const FAILED = ["compensated", "cancelled", "rolled_back", "aborted"];
const REFRESH_MS = 3000;

const ACTIONS = {
  retry: { label: "Retry now", what: "Every branch waiting out a backoff is called again at once." },
  resume: { label: "Resume", what: "Continue this transaction, which waits for an operator, with fresh attempts for the branches that exhausted theirs." },
  rollback: { label: "Force rollback", what: "Turn this transaction back now: compensate, cancel or roll back what may have run." },
  pause: { label: "Pause", what: "No replica drives this transaction until it is unpaused." },
  unpause: { label: "Unpause", what: "Let replicas drive this transaction again." },
  resolve: { label: "Mark resolved", what: "Record that this branch was fixed by hand; the transaction carries on as if it had succeeded." },
};

let me = null;       // {role, actor, open} once signed in
let timer = null;    // the current page's refresh
let generation = 0;  // bumps on navigation so late answers of an old page are dropped
let pendingSignIn = null;

// ---- DOM helpers: text only goes through textContent, never HTML.

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

const $ = (id) => document.getElementById(id);

function badge(word, extra) {
  return el("span", { class: "badge s-" + (extra || word), "data-status": word }, word.replace(/_/g, " "));
}

// when shows a time in the browser's zone as YYYY-MM-DD HH:MM:SS: unambiguous at 3 a.m.
function when(ts) {
  if (!ts) return "";
  const d = new Date(ts);
  const p = (n) => String(n).padStart(2, "0");
  return d.getFullYear() + "-" + p(d.getMonth() + 1) + "-" + p(d.getDate()) + " " + p(d.getHours()) + ":" + p(d.getMinutes()) + ":" + p(d.getSeconds());
}

function ago(ts) {
  if (!ts) return "";
  const s = Math.max(0, (Date.now() - new Date(ts).getTime()) / 1000);
  if (s < 90) return Math.round(s) + " s ago";
  if (s < 5400) return Math.round(s / 60) + " min ago";
  if (s < 129600) return Math.round(s / 3600) + " h ago";
  return Math.round(s / 86400) + " d ago";
}

// untilText says how far off a time is: "in 3 s", or "due" once it has passed.
function untilText(ts) {
  const s = (new Date(ts).getTime() - Date.now()) / 1000;
  if (s <= 0) return "due";
  if (s < 90) return "in " + Math.round(s) + " s";
  if (s < 5400) return "in " + Math.round(s / 60) + " min";
  return "in " + Math.round(s / 3600) + " h";
}

function txLink(gid) {
  return el("a", { href: "#/tx/" + encodeURIComponent(gid), class: "mono" }, gid);
}

function flash(msg) {
  const f = $("flash");
  f.textContent = msg;
  f.hidden = !msg;
}

function showError(err) {
  const e = $("error");
  e.textContent = err ? (err.code ? err.code + ": " : "") + err.message : "";
  e.hidden = !err;
}

// ---- API access. A 401 asks for a token and tries again.

async function api(path, opts) {
  const headers = { Accept: "application/json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  if (opts && opts.body) headers["Content-Type"] = "application/json";
  const res = await fetch(API + path, { ...opts, headers });
  let body = null;
  try { body = await res.json(); } catch (_) { body = null; }
  if (res.status === 401) {
    await signIn(body && body.message);
    return api(path, opts);
  }
  if (!res.ok) {
    const err = new Error((body && body.message) || res.status + " " + res.statusText);
    err.code = body && body.code;
    err.field = body && body.field;
    err.status = res.status;
    throw err;
  }
  return body;
}

// signIn asks for a token once, however many requests were refused at the same time.
function signIn(why) {
  if (pendingSignIn) return pendingSignIn;
  pendingSignIn = new Promise((resolve) => {
    const d = $("login");
    const err = $("login-error");
    const hadToken = !!sessionStorage.getItem(TOKEN_KEY);
    err.textContent = hadToken && why ? why : "";
    err.hidden = !err.textContent;
    sessionStorage.removeItem(TOKEN_KEY);
    $("login-token").value = "";
    $("login-form").onsubmit = () => {
      sessionStorage.setItem(TOKEN_KEY, $("login-token").value.trim());
      me = null;
      pendingSignIn = null;
      resolve();
    };
    if (!d.open) d.showModal();
  });
  return pendingSignIn;
}

async function whoami() {
  if (!me) {
    me = await api("/whoami");
    $("who").textContent = me.open ? "open (dev mode): " + me.role : me.actor + " · " + me.role;
    $("signout").hidden = me.open;
  }
  return me;
}

// ---- Pages.

async function overview(gen) {
  const [stats, needs, failed, jobs] = await Promise.all([
    api("/stats"),
    api("/transactions?status=needs_operator&limit=20"),
    api("/transactions?status=" + FAILED.join(",") + "&limit=20"),
    api("/jobs"),
  ]);
  if (gen !== generation) return;
  const cards = el("div", { class: "cards" },
    card(stats.total, "transactions"),
    card(stats.finished, "finished (estimate)"),
    card(stats.needs_operator, "need an operator", stats.needs_operator > 0, "#/transactions?status=needs_operator"),
    card(stats.due, "due now"),
    card(stats.overdue, "overdue", stats.overdue > 0),
    card(stats.oldest_running_created_at ? ago(stats.oldest_running_created_at) : "none", "oldest unfinished"),
    ...Object.entries(stats.by_mode).sort().map(([m, n]) => card(n, m, false, "#/transactions?mode=" + m)));
  const counts = table(["mode", "status", "count"], stats.counts.map((c) => [
    c.mode, badge(c.status, stateClass(c.status)),
    el("a", { href: "#/transactions?mode=" + c.mode + "&status=" + c.status }, String(c.count)),
  ]));
  render(el("h1", {}, "Overview"), cards,
    el("h2", {}, "Needs an operator"), txTable(needs.transactions, "Nothing waits for an operator."),
    el("h2", {}, "Recent failures"), txTable(failed.transactions, "No transaction turned back recently."),
    el("h2", {}, "Unfinished, by mode and status"), stats.counts.length ? counts : el("p", { class: "muted" }, "Nothing unfinished."),
    el("h2", {}, "Reconciliation jobs ", el("span", { class: "muted" }, "(last runs on replica " + jobs.replica + ")")),
    table(["job", "last run", "findings", "detail", "sample"], jobs.jobs.map((j) => [
      j.name, j.last_run ? ago(j.last_run) : "not yet",
      el("span", { class: j.findings > 0 && j.name !== "retention" ? "badge s-needs_operator" : "" }, String(j.findings)),
      el("span", { class: j.error ? "s-failed" : "" }, j.error || j.detail || ""),
      (j.sample || []).slice(0, 5).map((g) => [txLink(g), " "]),
    ])));
  schedule(gen, () => overview(gen));
}

function card(n, label, alert, href) {
  const body = [el("div", { class: "n" }, String(n)), el("div", { class: "l" }, label)];
  return href ? el("a", { class: "card" + (alert ? " alert" : ""), href }, body) : el("div", { class: "card" + (alert ? " alert" : "") }, body);
}

// stateClass picks a colour for a mode's own status word.
function stateClass(word) {
  if (word === "needs_operator") return "needs_operator";
  if (FAILED.includes(word)) return "compensated";
  if (["succeeded", "confirmed", "committed"].includes(word)) return "succeeded";
  return "running";
}

function table(head, rows) {
  return el("table", {},
    el("thead", {}, el("tr", {}, head.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows.map((r) => el("tr", {}, r.map((c) => el("td", {}, c))))));
}

function txRows(txs) {
  return txs.map((t) => el("tr", { "data-gid": t.gid },
    el("td", {}, txLink(t.gid)),
    el("td", {}, t.mode),
    el("td", {}, badge(t.status, t.state), t.paused ? [" ", badge("paused")] : null),
    el("td", { class: "wrap" }, t.reason || ""),
    el("td", {}, t.workflow_name ? t.workflow_name + " v" + t.workflow_version : ""),
    el("td", { title: when(t.created_at) }, ago(t.created_at)),
    el("td", { title: when(t.updated_at) }, ago(t.updated_at))));
}

function txTable(txs, empty) {
  if (!txs.length) return el("p", { class: "muted" }, empty);
  return el("table", { class: "txs" },
    el("thead", {}, el("tr", {}, ["gid", "mode", "status", "reason", "workflow", "created", "updated"].map((h) => el("th", {}, h)))),
    el("tbody", {}, txRows(txs)));
}

const SEARCH_FIELDS = [
  ["gid_prefix", "gid starts with", "text"],
  ["status", "status", "text"],
  ["mode", "mode", "select"],
  ["workflow", "workflow", "text"],
  ["created_after", "created after", "datetime-local"],
  ["created_before", "created before", "datetime-local"],
];

async function transactions(gen, params) {
  const form = el("form", { class: "search", id: "search" },
    SEARCH_FIELDS.map(([name, label, type]) => el("label", {}, label,
      type === "select"
        ? el("select", { name }, ["", "saga", "tcc", "2pc", "msg"].map((m) => el("option", { value: m, selected: params.get(name) === m }, m || "any")))
        : el("input", { name, type, value: fromParam(name, params.get(name)), placeholder: name === "status" ? "e.g. needs_operator" : "" }))),
    el("button", { type: "submit", class: "primary" }, "Search"));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const q = new URLSearchParams();
    for (const [name] of SEARCH_FIELDS) {
      const v = toParam(name, form.elements[name].value.trim());
      if (v) q.set(name, v);
    }
    location.hash = "#/transactions" + (q.toString() ? "?" + q : "");
  });
  const body = el("tbody", {});
  const more = el("button", { type: "button", class: "more", hidden: true }, "Load more");
  const count = el("p", { class: "muted" });
  render(el("h1", {}, "Transactions"), form, count,
    el("table", { class: "txs" },
      el("thead", {}, el("tr", {}, ["gid", "mode", "status", "reason", "workflow", "created", "updated"].map((h) => el("th", {}, h)))),
      body),
    more);
  let shown = 0;
  const load = async (cursor) => {
    const q = new URLSearchParams(params);
    q.set("limit", "50");
    if (cursor) q.set("cursor", cursor);
    const page = await api("/transactions?" + q);
    if (gen !== generation) return;
    body.append(...txRows(page.transactions));
    shown += page.transactions.length;
    count.textContent = shown ? shown + " shown, newest first" + (page.next_cursor ? "; more below" : "") : "No transaction matches.";
    more.hidden = !page.next_cursor;
    more.onclick = () => load(page.next_cursor).catch(showError);
  };
  await load("");
}

// datetime-local inputs speak local time without a zone; the API wants RFC 3339.
function toParam(name, v) {
  if (v && name.startsWith("created_")) return new Date(v).toISOString();
  return v;
}
function fromParam(name, v) {
  if (!v) return "";
  if (name.startsWith("created_")) {
    const d = new Date(v);
    if (isNaN(d)) return "";
    const p = (n) => String(n).padStart(2, "0");
    return d.getFullYear() + "-" + p(d.getMonth() + 1) + "-" + p(d.getDate()) + "T" + p(d.getHours()) + ":" + p(d.getMinutes());
  }
  return v;
}

async function transaction(gen, gid) {
  const t = await api("/transactions/" + encodeURIComponent(gid));
  if (gen !== generation) return;
  showTransaction(gen, t);
  if (!["succeeded", "compensated"].includes(t.state) || t.lease_owner) {
    schedule(gen, () => transaction(gen, gid));
  }
}

function showTransaction(gen, t) {
  // Offer only the actions the transaction's state machine allows now (the server lists them in
  // t.actions); it still decides when one is asked, so a button never promises more.
  const allowed = (a) => (t.actions || []).includes(a);
  const finished = ["succeeded", "compensated"].includes(t.state) && !t.paused;
  const operator = me && me.role === "operator";
  const why = finished ? "the transaction is finished" : "needs an operator token";
  const actionButtons = ["retry", "resume", "rollback", t.paused ? "unpause" : "pause"].filter(allowed).map((a) =>
    el("button", { type: "button", "data-action": a, class: a === "rollback" ? "danger" : "", disabled: !operator,
      title: operator ? ACTIONS[a].what : "needs an operator token", onclick: () => act(gen, t, a) }, ACTIONS[a].label));
  const facts = el("dl", { class: "facts" },
    fact("mode", t.mode),
    fact("status", [badge(t.status, t.state), " ", el("span", { class: "muted" }, t.state.replace(/_/g, " ")), t.paused ? [" ", badge("paused")] : null]),
    t.reason ? fact("reason", t.reason) : null,
    t.workflow_name ? fact("workflow", t.workflow_name + " v" + t.workflow_version) : null,
    fact("created", when(t.created_at)),
    fact("updated", when(t.updated_at) + " (" + ago(t.updated_at) + ")"),
    t.deadline ? fact("deadline", when(t.deadline)) : null,
    t.next_attempt_at ? fact("next attempt", when(t.next_attempt_at)) : null,
    t.lease_owner ? fact("driven by", t.lease_owner + " until " + when(t.lease_expires_at)) : null);
  const branches = table(["branch", "op", "status", "attempts", "last error", "updated", "next attempt", ""], (t.branches || []).map((b) => [
    b.name, b.op, badge(b.status), String(b.attempts), el("span", { class: "wrap" }, b.last_error || ""), ago(b.updated_at),
    b.next_attempt_at ? el("span", { class: "wrap next-attempt" }, when(b.next_attempt_at) + " (" + untilText(b.next_attempt_at) + ")",
      b.waiting_reason ? el("div", { class: "muted waiting-reason" }, b.waiting_reason) : null) : "",
    b.status === "succeeded" || b.status === "skipped" ? "" :
      el("button", { type: "button", "data-action": "resolve", "data-branch": b.name, "data-op": b.op, disabled: !operator || finished,
        title: operator && !finished ? ACTIONS.resolve.what : why,
        onclick: () => act(gen, t, "resolve", b) }, ACTIONS.resolve.label),
  ]));
  const timeline = el("ol", { class: "timeline", id: "timeline" }, (t.events || []).map((e) =>
    el("li", { class: e.kind.startsWith("operator_") ? "operator" : "", "data-kind": e.kind },
      el("span", { class: "muted at", title: e.at }, when(e.at)),
      el("span", { class: "kind" }, e.kind, e.branch ? el("span", { class: "muted" }, " " + e.op + ":" + e.branch) : null),
      el("span", { class: "wrap" }, e.detail || ""))));
  render(el("h1", {}, "Transaction ", el("code", { id: "gid" }, t.gid)), facts,
    el("div", { class: "actions" }, actionButtons),
    el("h2", {}, "Branches"), (t.branches || []).length ? branches : el("p", { class: "muted" }, "No branches."),
    el("h2", {}, "History"), timeline);
}

function fact(k, v) {
  return [el("dt", {}, k), el("dd", {}, v)];
}

// act asks for a reason and a confirmation, then applies the action.
function act(gen, t, action, branch) {
  const d = $("act");
  $("act-title").textContent = ACTIONS[action].label + "?";
  $("act-what").textContent = ACTIONS[action].what;
  $("act-gid").textContent = t.gid;
  $("act-branch-line").hidden = !branch;
  $("act-branch").textContent = branch ? branch.op + ":" + branch.name : "";
  $("act-reason").value = "";
  $("act-error").hidden = true;
  $("act-confirm").textContent = "Confirm " + ACTIONS[action].label.toLowerCase();
  $("act-cancel").onclick = () => d.close();
  $("act-form").onsubmit = async (ev) => {
    ev.preventDefault();
    const reason = $("act-reason").value.trim();
    if (!reason) return;
    $("act-confirm").disabled = true;
    try {
      const body = { reason };
      if (branch) { body.branch = branch.name; body.op = branch.op; }
      const after = await api("/transactions/" + encodeURIComponent(t.gid) + "/" + action, { method: "POST", body: JSON.stringify(body) });
      d.close();
      if (after.code === "queued") {
        // Another replica drives it: that replica applies the action; the page follows.
        flash(ACTIONS[action].label + ": " + after.message);
        if (gen === generation) schedule(gen, () => transaction(gen, t.gid));
        return;
      }
      flash(ACTIONS[action].label + ": recorded in the history.");
      if (gen === generation) {
        showTransaction(gen, after);
        schedule(gen, () => transaction(gen, t.gid));
      }
    } catch (err) {
      $("act-error").textContent = (err.status === 409 ? "Not now: " : "") + err.message;
      $("act-error").hidden = false;
    } finally {
      $("act-confirm").disabled = false;
    }
  };
  d.showModal();
  $("act-reason").focus();
}

// ---- Routing.

function render(...nodes) {
  $("view").replaceChildren(...nodes.flat().filter(Boolean));
}

function schedule(gen, fn) {
  clearTimeout(timer);
  timer = setTimeout(() => {
    // Do not redraw under an open dialog: the operator is typing.
    if (gen !== generation) return;
    if ($("act").open || $("login").open) return schedule(gen, fn);
    fn().catch(showError);
  }, REFRESH_MS);
}

async function route() {
  clearTimeout(timer);
  const gen = ++generation;
  showError(null);
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query] = hash.split("?");
  const params = new URLSearchParams(query || "");
  for (const a of document.querySelectorAll("[data-nav]")) {
    a.classList.toggle("active", (a.dataset.nav === "overview" && path === "/") || (a.dataset.nav === "transactions" && path.startsWith("/transactions")));
  }
  try {
    await whoami();
    if (path.startsWith("/tx/")) await transaction(gen, decodeURIComponent(path.slice(4)));
    else if (path.startsWith("/transactions")) await transactions(gen, params);
    else await overview(gen);
  } catch (err) {
    if (gen === generation) showError(err);
  }
}

window.addEventListener("hashchange", () => { flash(""); route(); });
window.addEventListener("DOMContentLoaded", () => {
  // Escape would close the sign-in dialog with nobody signed in and the page waiting.
  $("login").addEventListener("cancel", (ev) => ev.preventDefault());
  $("signout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    me = null;
    $("who").textContent = "";
    route();
  });
  route();
});

// ---- Fault-injection banner: while fault rules are live, every page says so, so that nobody
// mistakes a game day's injected failures for a real outage (or forgets to end one).

function faultLine(f) {
  const what = f.effect === "delay" ? "delay " + f.delay
    : f.effect === "status" ? "status " + f.code
    : f.effect === "lost_response" ? "lost response" : "drop";
  const scope = [f.op || "every op", f.target ? "target " + f.target : "", f.gid_prefix ? "gids " + f.gid_prefix + "*" : "", f.workflow ? "workflow " + f.workflow : ""]
    .filter(Boolean).join(", ");
  const chance = f.probability < 1 ? ", " + Math.round(f.probability * 100) + "%" : "";
  const count = f.max_count ? ", " + f.fired + "/" + f.max_count + " fired" : ", " + f.fired + " fired";
  return "rule " + f.id + ": " + what + " on " + scope + chance + count + " until " + when(f.expires_at) + " (" + f.reason + ", by " + f.created_by + ")";
}

async function faultsBanner() {
  if (!me) return; // not signed in yet: the page's own requests ask for the token
  const b = $("faults-banner");
  const list = await api("/faults");
  const live = list.faults || [];
  b.hidden = live.length === 0;
  if (b.hidden) return;
  b.replaceChildren(
    list.enabled
      ? "Fault injection is ON: " + live.length + " live rule(s) perturb participant calls."
      : live.length + " fault rule(s) are stored, but this coordinator does not apply them (started without --allow-fault-injection).",
    el("ul", {}, live.map((f) => el("li", {}, faultLine(f)))),
  );
}

window.addEventListener("DOMContentLoaded", () => {
  const tick = () => faultsBanner().catch(() => {}).finally(() => setTimeout(tick, REFRESH_MS));
  tick();
});
