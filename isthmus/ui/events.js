// The events view: recent health changes, peer state changes, policy writes and refused
// handshakes, newest first, as the appliance's ring buffer pushes them.
import { clear, h } from "./dom.js";

const KEEP = 500;

export function mergeEvents(list, incoming) {
  const seen = new Set(list.map((e) => e.index));
  const out = list.concat(incoming.filter((e) => !seen.has(e.index)));
  return out.slice(-KEEP);
}

export function renderEvents(tbody, summaryEl, events) {
  const frag = document.createDocumentFragment();
  for (let i = events.length - 1; i >= 0; i--) {
    const e = events[i];
    frag.append(h("tr", { "data-kind": e.kind, "data-testid": `event-${e.index}` },
      h("td", { text: new Date(e.time).toLocaleTimeString() }),
      h("td", {}, h("span", { class: `badge ${e.state || e.health || ""}`, text: e.kind })),
      h("td", {}, h("div", { text: e.message }),
        e.output ? h("div", { class: "muted output", text: e.output }) : null,
        e.detail ? h("div", { class: "muted", text: e.detail }) : null,
        e.error ? h("div", { class: "muted", text: e.error }) : null)));
  }
  if (!events.length) frag.append(h("tr", {}, h("td", { colspan: 3, class: "muted",
    text: "nothing yet: health changes, peer state changes, policy writes and refused handshakes appear here" })));
  clear(tbody).append(frag);
  summaryEl.textContent = `${events.length} recent`;
}
