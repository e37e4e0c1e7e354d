// The console's entry point: sign-in, the live feeds (blocking queries), and the views.
import { api, follow, session } from "./api.js";
import { byId, clear } from "./dom.js";
import { mergeEvents, renderEvents } from "./events.js";
import { renderServiceList, ServiceView } from "./services.js";
import { renderTopology, tickAges } from "./topology.js";

const st = { status: null, edges: null, events: [], can: {}, scopes: [], route: null };
let stops = [];
let services = null;
let ageTimer = null;

function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  if (parts[0] === "services") return { view: "services", ns: parts[1], name: parts[2] };
  if (parts[0] === "events") return { view: "events" };
  return { view: "topology" };
}

function render() {
  if (!st.status) return;
  const r = st.route || route();
  for (const v of ["topology", "services", "events"]) byId(`view-${v}`).hidden = v !== r.view;
  for (const a of byId("nav").querySelectorAll("a")) {
    a.classList.toggle("active", a.dataset.view === r.view);
  }
  if (r.view === "topology") {
    renderTopology(byId("graph"), byId("clusters"), byId("topology-summary"), st);
  } else if (r.view === "services") {
    renderServiceList(byId("service-list"), byId("service-filter").value, st, r.name ? r : null);
  } else {
    renderEvents(byId("event-rows"), byId("events-summary"), st.events);
  }
  tickAges(document, session.skew);
}

async function navigate() {
  st.route = route();
  render();
  if (st.route.view === "services" && st.route.name) {
    await services.show(st.route.ns, st.route.name);
  } else if (services.key) {
    services.close();
    clear(byId("service-detail"));
  }
}

async function refreshStatus() {
  try {
    st.status = (await api("/v1/status")).body;
    render();
  } catch {
    /* the status feed retries by itself */
  }
}

function setLive(ok) {
  byId("live").classList.toggle("down", !ok);
  byId("live").textContent = ok ? "live" : "reconnecting";
}

function start(who) {
  st.can = who.can;
  st.scopes = who.scopes;
  byId("signin").hidden = true;
  byId("nav").hidden = false;
  byId("signout").hidden = false;
  byId("live").hidden = false;
  byId("whoami").textContent = who.can.traffic ? `scopes: ${who.scopes.join(", ")}`
    : `read-only (scopes: ${who.scopes.join(", ")})`;
  byId("whoami").dataset.testid = "whoami";
  document.body.dataset.readonly = String(!who.can.traffic);
  services = new ServiceView(byId("service-detail"), st);
  stops.push(follow("/v1/status", (body) => {
    st.status = body;
    setLive(true);
    render();
    if (services.key && !services.dirty) services.refresh();
  }));
  stops.push(follow("/v1/events", (body) => {
    const fresh = body.events || [];
    st.events = mergeEvents(st.events, fresh);
    if (fresh.length) {
      // a peer, a policy or a health change moves what the other views show: read it now
      refreshStatus();
      if (services.key) services.refresh();
    }
    if ((st.route || route()).view === "events") render();
  }));
  stops.push(follow("/v1/edges?window=60s", (body) => {
    st.edges = body;
    if ((st.route || route()).view === "topology") render();
    if (services.key) services.refreshChart();
  }));
  ageTimer = setInterval(() => tickAges(document, session.skew), 1000);
  navigate();
}

function signOut(reason) {
  for (const stop of stops) stop();
  stops = [];
  clearInterval(ageTimer);
  if (services) services.close();
  session.token = null;
  st.status = null;
  st.events = [];
  for (const v of ["topology", "services", "events"]) byId(`view-${v}`).hidden = true;
  clear(byId("service-detail"));
  byId("nav").hidden = true;
  byId("signout").hidden = true;
  byId("live").hidden = true;
  byId("whoami").textContent = "";
  byId("signin").hidden = false;
  byId("signin-error").textContent = reason || "";
  byId("token").focus();
}

async function signIn(token) {
  session.token = token;
  try {
    const who = (await api("/v1/token")).body;
    start(who);
  } catch (e) {
    signOut(e.status === 401 ? "That token is not valid here." : `Cannot sign in: ${e.message}`);
  }
}

session.onUnauthorized = () => {
  if (stops.length) signOut("The appliance no longer accepts that token: sign in again.");
};

document.addEventListener("DOMContentLoaded", () => {
  byId("signin-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = byId("token");
    const token = input.value.trim();
    input.value = ""; // not left in the form
    if (token) signIn(token);
  });
  byId("signout").addEventListener("click", () => signOut());
  byId("service-filter").addEventListener("input", () => render());
  window.addEventListener("hashchange", () => { if (stops.length) navigate(); });
  if (session.token) signIn(session.token);
  else signOut();
});
