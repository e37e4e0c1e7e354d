// A small line chart of requests per second over the last minutes, one line per cluster.
import { h, s } from "./dom.js";

const W = 640;
const H = 170;
const PAD = { left: 40, right: 10, top: 10, bottom: 22 };

/**
 * `series`: {cluster: {requests: [n per tick]}}, `times`: tick end times (s), `tick`: seconds,
 * `span`: seconds shown, `colour(cluster)`: a class c0..c5.
 */
export function lineChart({ series, times, tick, span, colour, label }) {
  const end = times.length ? times[times.length - 1] : Date.now() / 1000;
  const start = end - span;
  const names = Object.keys(series).sort();
  let max = 1;
  for (const n of names) for (const v of series[n].requests) max = Math.max(max, v / tick);
  const x = (t) => PAD.left + ((t - start) / span) * (W - PAD.left - PAD.right);
  const y = (v) => H - PAD.bottom - (v / max) * (H - PAD.top - PAD.bottom);
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": label });
  svg.append(s("line", { class: "axis", x1: PAD.left, y1: H - PAD.bottom, x2: W - PAD.right,
                         y2: H - PAD.bottom }));
  svg.append(s("line", { class: "axis", x1: PAD.left, y1: PAD.top, x2: PAD.left,
                         y2: H - PAD.bottom }));
  svg.append(s("text", { class: "tick", x: PAD.left - 4, y: PAD.top + 8, "text-anchor": "end",
                         text: max >= 10 ? max.toFixed(0) : max.toFixed(1) }));
  svg.append(s("text", { class: "tick", x: PAD.left - 4, y: H - PAD.bottom, "text-anchor": "end",
                         text: "0" }));
  for (let m = 0; m <= span / 60; m++) {
    const t = end - m * 60;
    svg.append(s("text", { class: "tick", x: x(t), y: H - 6, "text-anchor": "middle",
                           text: m === 0 ? "now" : `-${m}m` }));
  }
  for (const n of names) {
    const pts = series[n].requests.map((v, i) => `${x(times[i]).toFixed(1)},${y(v / tick).toFixed(1)}`);
    if (pts.length === 1) pts.unshift(`${x(times[0] - tick).toFixed(1)},${y(0)}`);
    svg.append(s("polyline", { class: `line ${colour(n)}`, points: pts.join(" "),
                               "data-cluster": n }));
  }
  const legend = h("div", { class: "legend" }, names.length ? names.map((n) => {
    const total = series[n].requests.reduce((a, b) => a + b, 0);
    const errors = (series[n].errors || []).reduce((a, b) => a + b, 0);
    return h("span", { "data-testid": `chart-${n}`, "data-requests": total },
      h("span", { class: `swatch ${colour(n)}` }), `${n}: ${total} requests, ${errors} errors`);
  }) : h("span", { class: "muted", text: "no requests in this window" }));
  return h("div", { class: "chart" }, legend, svg);
}
