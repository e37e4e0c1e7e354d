// The service view: endpoints by cluster and locality, the traffic policy with a control to
// change it, how far a written policy has replicated, and the requests of the last minutes.
import { api } from "./api.js";
import { lineChart } from "./chart.js";
import { clear, h } from "./dom.js";

export function renderServiceList(listEl, filter, st, current) {
  const services = (st.status && st.status.services) || [];
  const q = filter.trim().toLowerCase();
  const frag = document.createDocumentFragment();
  let shown = 0;
  for (const x of services) {
    const full = `${x.name}.${x.namespace}`;
    if (q && !full.includes(q)) continue;
    shown++;
    const active = current && current.ns === x.namespace && current.name === x.name;
    frag.append(h("li", {}, h("a", {
      href: `#/services/${encodeURIComponent(x.namespace)}/${encodeURIComponent(x.name)}`,
      class: active ? "active" : null, "data-testid": `service-${full}`,
    }, full, " ", h("span", { class: "muted", text: `${Object.keys(x.clusters || {}).length} clusters` }))));
  }
  if (!shown) frag.append(h("li", { class: "muted", text: "no services" }));
  clear(listEl).append(frag);
}

/** Integer percentages summing to 100 (largest remainder). */
export function percentages(weights, clusters) {
  const total = clusters.reduce((a, c) => a + (weights[c] || 0), 0);
  if (!total) {
    const even = clusters.map(() => Math.floor(100 / clusters.length));
    for (let i = 0; i < 100 - even.reduce((a, b) => a + b, 0); i++) even[i]++;
    return Object.fromEntries(clusters.map((c, i) => [c, even[i]]));
  }
  const raw = clusters.map((c) => ((weights[c] || 0) * 100) / total);
  const out = raw.map(Math.floor);
  const order = raw.map((v, i) => [v - out[i], i]).sort((a, b) => b[0] - a[0]);
  for (let k = 0; k < 100 - out.reduce((a, b) => a + b, 0); k++) out[order[k][1]]++;
  return Object.fromEntries(clusters.map((c, i) => [c, out[i]]));
}

/** Set `changed` to `value` and share what is left among the others, keeping their ratio. */
export function rebalance(values, changed, value) {
  const others = Object.keys(values).filter((c) => c !== changed);
  const rest = Math.max(0, 100 - value);
  const shares = percentages(Object.fromEntries(others.map((c) => [c, values[c]])), others);
  const out = { [changed]: value };
  let given = 0;
  others.forEach((c, i) => {
    out[c] = i === others.length - 1 ? rest - given : Math.floor((shares[c] * rest) / 100);
    given += out[c];
  });
  return out;
}

export class ServiceView {
  constructor(root, st) {
    this.root = root;
    this.st = st;
    this.key = null;
    this.data = null;
    this.dirty = false; // the person is editing the weights: leave the editor alone
    this.ackTimer = null;
    this.message = ""; // what the last change answered (kept across re-renders)
  }

  colour(cluster) {
    const all = [this.st.status.cluster, ...(this.st.status.peers || []).map((p) => p.cluster)];
    const i = all.indexOf(cluster);
    return `c${(i < 0 ? all.length : i) % 6}`;
  }

  async show(ns, name) {
    const same = this.key && this.key.ns === ns && this.key.name === name;
    if (!same) {
      this.key = { ns, name };
      this.dirty = false;
      this.data = null;
      this.message = "";
      clearTimeout(this.ackTimer);
      clear(this.root).append(
        h("div", { id: "svc-head" }), h("div", { id: "svc-endpoints" }),
        h("div", { id: "svc-traffic" }), h("div", { id: "svc-replication" }),
        h("div", { id: "svc-chart" }));
    }
    await this.refresh();
  }

  path() {
    return `/v1/services/${encodeURIComponent(this.key.ns)}/${encodeURIComponent(this.key.name)}`;
  }

  part(id) {
    return this.root.querySelector(`#${id}`);
  }

  async refresh() {
    if (!this.key) return;
    const key = this.key;
    let res;
    try {
      res = await api(this.path());
    } catch (e) {
      if (key !== this.key) return;
      clear(this.part("svc-head")).append(h("p", { class: "error", text: e.message }));
      return;
    }
    if (key !== this.key) return;
    this.data = res.body;
    this.renderHead();
    this.renderEndpoints();
    if (!this.dirty) this.renderTraffic();
    this.renderReplication(this.data.traffic);
    await this.refreshChart();
  }

  renderHead() {
    const d = this.data;
    const ports = Object.entries(d.ports || {}).map(([n, p]) => `${n}:${p}`).join(", ");
    clear(this.part("svc-head")).append(
      h("h2", { "data-testid": "service-title" }, `${d.name}.${d.namespace}`),
      h("div", { class: "muted" }, `VIP ${d.vip || "-"} · ports ${ports || "-"}`,
        d.exported === false ? " · not exported to peers" : ""));
  }

  renderEndpoints() {
    const d = this.data;
    const status = this.st.status;
    const peerLocality = Object.fromEntries((status.peers || []).map((p) => [p.cluster, p.locality]));
    const loc = (l) => (l ? [l.region, l.zone].filter(Boolean).join(" / ") : "") || "-";
    const rows = [];
    const clusters = Object.keys(d.clusters || {}).sort((a, b) =>
      (a === status.cluster ? -1 : b === status.cluster ? 1 : a.localeCompare(b)));
    for (const c of clusters) {
      const local = (d.endpoints || {})[c];
      if (local) {
        for (const ep of local) {
          const labels = Object.entries(ep.labels || {}).map(([k, v]) => `${k}=${v}`).join("\n");
          rows.push(h("tr", { "data-testid": `endpoint-${ep.id}` },
            h("td", { text: c }), h("td", { text: loc(ep.locality) }),
            h("td", {}, h("div", { text: ep.id }), h("div", { class: "muted",
              text: `${ep.address} ${Object.entries(ep.ports).map(([n, p]) => `${n}:${p}`).join(" ")}` })),
            h("td", {}, h("span", { class: `badge ${ep.health}`, text: ep.health })),
            h("td", { class: "output", text: ep.health_output || (ep.check ? "" : "no check") }),
            h("td", { class: "labels", "data-testid": `labels-${ep.id}`, text: labels })));
        }
      } else {
        const f = d.clusters[c];
        rows.push(h("tr", { "data-testid": `endpoint-cluster-${c}` },
          h("td", { text: c }), h("td", { text: loc(peerLocality[c]) }),
          h("td", { class: "muted", text: "through its gateway" }),
          h("td", {}, h("span", { class: `badge ${f.healthy ? "passing" : "critical"}`,
            text: `${f.healthy}/${f.total} healthy` })),
          h("td", { class: "muted", text: "checked in its cluster" }), h("td", {})));
      }
    }
    clear(this.part("svc-endpoints")).append(h("h3", { text: "Endpoints" }),
      h("table", {}, h("thead", {}, h("tr", {}, ["Cluster", "Locality", "Endpoint", "Health",
        "Last check output", "Labels"].map((t) => h("th", { text: t })))),
      h("tbody", {}, rows)));
  }

  clustersForWeights() {
    const d = this.data;
    const set = new Set(Object.keys(d.clusters || {}));
    if (d.traffic && d.traffic.weights) Object.keys(d.traffic.weights).forEach((c) => set.add(c));
    return [...set].sort();
  }

  renderTraffic() {
    const d = this.data;
    const policy = d.traffic;
    const el = clear(this.part("svc-traffic"));
    el.append(h("h3", { text: "Traffic" }));
    const clusters = this.clustersForWeights();
    const current = policy && policy.weights ? percentages(policy.weights, clusters) : null;
    el.append(h("p", { "data-testid": "policy-summary" }, policy && policy.weights
      ? `Weights ${clusters.map((c) => `${c} ${current[c]}%`).join(", ")} · failover ` +
        `${policy.failover ? "on" : "off"} · version ${policy.version}`
      : "Default locality routing (no policy): this cluster first, then the same region, then the rest."));
    if (!this.st.can.traffic || !clusters.length) return; // read-only: no controls at all
    const values = current ? { ...current } : percentages({}, clusters);
    const grid = h("div", { class: "weights", "data-testid": "weights" });
    const inputs = {};
    const sumEl = h("span", { class: "sum", "data-testid": "weights-sum" });
    const apply = h("button", { class: "primary", type: "button", "data-testid": "apply-weights",
                                text: "Apply" });
    const failover = h("input", { type: "checkbox", "data-testid": "failover" });
    failover.checked = policy ? policy.failover : true;
    const update = () => {
      let sum = 0;
      for (const c of clusters) {
        inputs[c].range.value = values[c];
        inputs[c].number.value = values[c];
        sum += values[c];
      }
      sumEl.textContent = `sum ${sum}`;
      sumEl.classList.toggle("bad", sum !== 100);
      apply.disabled = sum !== 100 || !this.dirty;
    };
    const set = (c, v) => {
      v = Math.max(0, Math.min(100, Math.round(Number(v) || 0)));
      Object.assign(values, clusters.length === 1 ? { [c]: v } : rebalance(values, c, v));
      this.dirty = true;
      update();
    };
    for (const c of clusters) {
      const range = h("input", { type: "range", min: 0, max: 100, step: 1,
        "aria-label": `weight of ${c}`, "data-testid": `slider-${c}` });
      const number = h("input", { type: "number", min: 0, max: 100, step: 1,
        "aria-label": `weight of ${c} in percent`, "data-testid": `weight-${c}` });
      range.addEventListener("input", () => set(c, range.value));
      number.addEventListener("change", () => set(c, number.value));
      inputs[c] = { range, number };
      grid.append(h("label", { text: c }), range, number);
    }
    failover.addEventListener("change", () => { this.dirty = true; update(); });
    const message = h("span", { class: "muted", "data-testid": "traffic-message",
                                text: this.message });
    const say = (text) => { this.message = text; message.textContent = text; };
    apply.addEventListener("click", async () => {
      apply.disabled = true;
      const body = { weights: Object.fromEntries(clusters.map((c) => [c, values[c]])),
                     failover: failover.checked };
      try {
        const res = await api(`${this.path()}/traffic`, { method: "PUT", body });
        say(`stored as version ${res.body.version}` +
          (res.body.warnings ? ` (${res.body.warnings.join("; ")})` : ""));
        this.dirty = false;
        this.renderReplication(res.body);
        this.watchReplication(res.body.version);
        await this.refresh();
      } catch (e) {
        say(`refused: ${e.message}`);
        apply.disabled = false;
      }
    });
    const reset = h("button", { type: "button", "data-testid": "reset-weights",
                                text: "Reset to locality routing" });
    reset.disabled = !policy;
    reset.addEventListener("click", async () => {
      try {
        await api(`${this.path()}/traffic`, { method: "DELETE" });
        say("policy removed: locality routing");
        this.dirty = false;
        await this.refresh();
      } catch (e) {
        say(`refused: ${e.message}`);
      }
    });
    el.append(grid, h("div", { class: "controls" },
      h("label", {}, failover, " fail over when a cluster has no healthy endpoint"),
      sumEl, apply, reset, message));
    update();
  }

  renderReplication(policy) {
    const el = clear(this.part("svc-replication"));
    if (!policy || !policy.replication || !Object.keys(policy.replication).length) return;
    el.append(h("h3", { text: "Replication" }), h("ul", { "data-testid": "replication" },
      Object.entries(policy.replication).map(([peer, r]) => h("li", {
        "data-testid": `ack-${peer}`, "data-acknowledged": String(r.acknowledged) },
        `${peer}: `, h("span", { class: `badge ${r.acknowledged ? "passing" : "unknown"}`,
          text: r.acknowledged ? "acknowledged" : "waiting" }),
        h("span", { class: "muted", text: ` version ${r.version || "none yet"}` })))));
  }

  /** After a write, follow the peers' acknowledgements for a minute at most. */
  watchReplication(version) {
    clearTimeout(this.ackTimer);
    const key = this.key;
    const deadline = Date.now() + 60000;
    const poll = async () => {
      if (key !== this.key) return;
      try {
        const res = await api(`${this.path()}/traffic`);
        if (key !== this.key || res.body.version !== version) return;
        this.renderReplication(res.body);
        const all = Object.values(res.body.replication || {}).every((r) => r.acknowledged);
        if (all || Date.now() > deadline) return;
      } catch {
        return;
      }
      this.ackTimer = setTimeout(poll, 1000);
    };
    this.ackTimer = setTimeout(poll, 500);
  }

  async refreshChart() {
    if (!this.key) return;
    const key = this.key;
    let res;
    try {
      res = await api(`${this.path()}/requests`);
    } catch {
      return;
    }
    if (key !== this.key) return;
    const r = res.body;
    const egress = lineChart({ series: r.egress, times: r.times, tick: r.tick, span: r.span,
      colour: (c) => this.colour(c), label: "requests per second by destination cluster" });
    const parts = [h("h3", { text: "Requests sent from here, by destination cluster (last 5 minutes)" }),
                   egress];
    if (Object.keys(r.ingress).length) {
      parts.push(h("h3", { text: "Requests served here, by source cluster" }),
        lineChart({ series: r.ingress, times: r.times, tick: r.tick, span: r.span,
          colour: (c) => this.colour(c), label: "requests per second by source cluster" }));
    }
    clear(this.part("svc-chart")).append(...parts);
  }

  close() {
    clearTimeout(this.ackTimer);
    this.key = null;
  }
}
