// The topology view: this cluster, its peers and agents as nodes; edges labelled with the
// request rate, error rate and p99 this appliance measured; below, what each cluster exports.
import { ago, clear, fmtPercent, fmtRate, h, s } from "./dom.js";

const W = 900;
const NODE_W = 210;
const NODE_H = 78;
const PEER_GAP = 104;
const MAX_AGENT_NODES = 8;

function edgeText(arrow, e) {
  if (!e) return `${arrow} idle`;
  const p99 = e.p99_ms === null ? "-" : `${e.p99_ms} ms`;
  return `${arrow} ${fmtRate(e.rate)}/s · ${fmtPercent(e.error_rate)} err · p99 ${p99}`;
}

function node(x, y, cls, testid, state, lines) {
  const g = s("g", { class: `node ${cls}`, transform: `translate(${x},${y})`,
                     "data-testid": testid, "data-state": state });
  g.append(s("rect", { width: NODE_W, height: NODE_H, rx: 8 }));
  lines.forEach(([text, klass, agoIso], i) => {
    const t = s("text", { x: 12, y: 22 + i * 19, class: klass, text });
    if (agoIso !== undefined) t.dataset.ago = agoIso || "";
    if (agoIso !== undefined) t.dataset.prefix = text;
    g.append(t);
  });
  return g;
}

function edgeLabel(x, y, [above, below]) {
  // what this cluster sent above the line, what it served below
  return s("g", { class: "edge-labels" },
    s("text", { class: "edge-label", x, y: y - 8, "text-anchor": "middle", text: above }),
    s("text", { class: "edge-label", x, y: y + 18, "text-anchor": "middle", text: below }));
}

export function edgeIndex(edges, cluster) {
  // (gateway, source, destination) -> figures; only this appliance's own counters
  const out = { out: {}, in: {}, self: null };
  for (const e of (edges && edges.edges) || []) {
    if (e.gateway === "egress" && e.source === cluster) {
      if (e.destination === cluster) out.self = e;
      else out.out[e.destination] = e;
    } else if (e.gateway === "ingress" && e.destination === cluster) {
      out.in[e.source] = e;
    }
  }
  return out;
}

export function renderTopology(graphEl, cardsEl, summaryEl, st) {
  const status = st.status;
  if (!status) return;
  const cluster = status.cluster;
  const peers = status.peers || [];
  const agents = status.agents || [];
  const edges = edgeIndex(st.edges, cluster);
  const shownAgents = agents.slice(0, MAX_AGENT_NODES);
  const agentRows = Math.ceil(shownAgents.length / 2);
  const peersH = Math.max(1, peers.length) * PEER_GAP;
  const localX = 30;
  const localY = Math.max(10, peersH / 2 - NODE_H / 2 - 10);
  const agentsBottom = agentRows ? localY + NODE_H + 40 + agentRows * 58 : 0;
  const height = Math.max(peersH, agentsBottom) + (agents.length > MAX_AGENT_NODES ? 30 : 10);
  const svg = s("svg", { viewBox: `0 0 ${W} ${height}`, role: "img",
                         "aria-label": "federation topology" });
  const peerX = W - NODE_W - 30;
  const localServices = (status.services || []).filter((x) => x.clusters && x.clusters[cluster]);

  // edges first, so nodes draw over them
  peers.forEach((p, i) => {
    const py = 10 + i * PEER_GAP;
    const out = edges.out[p.cluster];
    const inn = edges.in[p.cluster];
    const busy = (out && out.rate > 0) || (inn && inn.rate > 0);
    const failing = (out && out.error_rate > 0.05) || (inn && inn.error_rate > 0.05);
    const x1 = localX + NODE_W, y1 = localY + NODE_H / 2, x2 = peerX, y2 = py + NODE_H / 2;
    svg.append(s("line", { class: `edge${busy ? " busy" : ""}${failing ? " failing" : ""}`,
                           x1, y1, x2, y2, "data-testid": `edge-${p.cluster}` }));
    svg.append(edgeLabel((x1 + x2) / 2, (y1 + y2) / 2,
                         [edgeText(`→ ${p.cluster}`, out), edgeText(`← ${p.cluster}`, inn)]));
  });
  svg.append(node(localX, localY, "local", `node-${cluster}`, "local", [
    [cluster, "name"],
    ["this cluster", "sub"],
    [`${localServices.length} services · ${edgeText("local", edges.self)}`, "sub"],
  ]));
  peers.forEach((p, i) => {
    svg.append(node(peerX, 10 + i * PEER_GAP, p.state, `node-${p.cluster}`, p.state, [
      [p.cluster, "name"],
      [p.state, "sub"],
      [`last sync `, "sub", p.last_sync],
    ]));
  });
  shownAgents.forEach((a, i) => {
    const ax = localX + (i % 2) * 110;
    const ay = localY + NODE_H + 40 + Math.floor(i / 2) * 58;
    svg.append(s("line", { class: "edge", x1: localX + NODE_W / 2, y1: localY + NODE_H,
                           x2: ax + 50, y2: ay }));
    const g = s("g", { class: `node agent ${a.state}`, transform: `translate(${ax},${ay})`,
                       "data-testid": `agent-${a.node}`, "data-state": a.state });
    g.append(s("rect", { width: 100, height: 44, rx: 6 }));
    g.append(s("text", { x: 8, y: 18, class: "name", text: a.node }));
    g.append(s("text", { x: 8, y: 36, class: "sub", text: `${a.workloads} workloads` }));
    svg.append(g);
  });
  if (agents.length > shownAgents.length) {
    svg.append(s("text", { x: localX, y: height - 8, class: "sub",
                           text: `+${agents.length - shownAgents.length} more agents below` }));
  }
  clear(graphEl).append(svg);

  const connected = peers.filter((p) => p.state === "connected").length;
  summaryEl.textContent = `${cluster} · ${peers.length} peers (${connected} connected) · ` +
    `${agents.length} agents · ${(status.services || []).length} services`;
  renderCards(cardsEl, status, localServices);
}

function serviceItem(name, health, local) {
  const [svc, ns] = name.split(".");
  return h("li", {},
    h("a", { href: `#/services/${encodeURIComponent(ns)}/${encodeURIComponent(svc)}` }, name),
    " ", h("span", { class: "badge", text: health }),
    local === false ? h("span", { class: "muted", text: " (not exported)" }) : null);
}

function renderCards(cardsEl, status, localServices) {
  const cluster = status.cluster;
  const frag = document.createDocumentFragment();
  const byName = new Map((status.services || []).map((x) => [`${x.name}.${x.namespace}`, x]));
  const health = (name, c) => {
    const x = byName.get(name);
    const f = x && x.clusters && x.clusters[c];
    return f ? `${f.healthy}/${f.total} healthy` : "?";
  };
  const local = h("div", { class: "card", "data-testid": `card-${cluster}` },
    h("h3", {}, cluster, h("span", { class: "badge local", text: "this cluster" })),
    h("div", { class: "muted", text: `${localServices.length} services with endpoints here` }),
    h("ul", {}, localServices.map((x) => serviceItem(`${x.name}.${x.namespace}`,
      health(`${x.name}.${x.namespace}`, cluster), x.exported === false ? false : undefined))));
  const agents = status.agents || [];
  if (agents.length) {
    local.append(h("h3", { text: `VM agents (${agents.length})` }),
      h("ul", { "data-testid": "agents" }, agents.map((a) => h("li", {},
        h("strong", { text: a.node }), " ",
        h("span", { class: `badge ${a.state}`, text: a.state }), " ",
        h("span", { class: "muted", text: a.address || "" }),
        h("ul", {}, (a.registered || []).map((w) => h("li", {},
          `${w.id} · ${w.service} `, h("span", { class: `badge ${w.health}`, text: w.health }))))))));
  }
  frag.append(local);
  for (const p of status.peers || []) {
    frag.append(h("div", { class: "card", "data-testid": `card-${p.cluster}` },
      h("h3", {}, p.cluster, h("span", { class: `badge ${p.state}`, text: p.state })),
      h("div", { class: "muted" },
        `${p.services.length} exported · ${p.address} · `,
        h("span", { "data-ago": p.last_sync || "", "data-prefix": "last sync " }, "")),
      p.error ? h("div", { class: "error", text: p.error }) : null,
      h("ul", {}, p.services.map((name) => serviceItem(name, health(name, p.cluster))))));
  }
  clear(cardsEl).append(frag);
}

/** Refresh every "N s ago" on the page (once a second). */
export function tickAges(root, skew) {
  for (const el of root.querySelectorAll("[data-ago]")) {
    el.textContent = (el.dataset.prefix || "") + ago(el.dataset.ago, skew);
  }
}
