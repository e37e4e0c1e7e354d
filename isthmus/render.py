"""`isthmus status` as text: a control node's view or an agent's, with times relative to now."""

from __future__ import annotations

import datetime as dt
from typing import Any

WHY_WIDTH = 72


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def ago(when: str | float | None, now: float) -> str:
    """'12 s ago' for an ISO stamp or epoch seconds; 'never' for None."""
    if when is None:
        return "never"
    if isinstance(when, str):
        try:
            when = dt.datetime.fromisoformat(when).timestamp()
        except ValueError:
            return when
    return f"{duration(max(0.0, now - when))} ago"


def duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def one_line(text: str, width: int = WHY_WIDTH) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def render_policy(p: dict[str, Any]) -> str:
    weights = " ".join(f"{c}={w}" for c, w in sorted(p["weights"].items()))
    total = sum(p["weights"].values()) or 1
    shares = ", ".join(f"{c} {w * 100 / total:.0f}%" for c, w in sorted(p["weights"].items()))
    return (
        f"{p['service']}.{p['namespace']}: {weights} ({shares}); failover "
        f"{'on' if p['failover'] else 'off'}; version {p['version']}"
    )


def _check_kind(w: dict[str, Any]) -> str:
    check = w.get("check") or {}
    return next((k for k in ("http", "tcp", "ttl") if k in check), "none")


def _services(status: dict[str, Any]) -> str:
    rows = [["SERVICE", "VIP", "PORTS", "CLUSTER", "HEALTHY"]]
    for s in status["services"]:
        ports = ",".join(f"{k}:{v}" for k, v in sorted(s["ports"].items()))
        for cluster, c in sorted(s["clusters"].items()):
            rows.append(
                [f"{s['name']}.{s['namespace']}", s["vip"] or "-", ports, cluster,
                 f"{c['healthy']}/{c['total']}"]
            )
    return table(rows) if len(rows) > 1 else "no services"


def _why(w: dict[str, Any]) -> str:
    if w.get("health") == "passing":
        return ""
    return one_line(w.get("health_output") or w.get("error") or "")


def render_status(status: dict[str, Any], workloads: list[dict[str, Any]], now: float) -> str:
    if "agent" in status:
        return _render_agent(status, workloads, now)
    lines = [
        f"cluster {status['cluster']}  node {status['node']}  trust domain "
        f"{status['trust_domain']}  roles {','.join(status['roles'])}  version "
        f"{status['version']}  up {duration(status.get('uptime_seconds', 0))}",
    ]
    cat = status["catalog"]
    h = cat["health"]
    listed = len(status["services"])
    local = cat["services"]
    lines.append(
        f"services: {listed} ({local} registered here, {listed - local} only from peers); "
        f"workloads here: {cat['workloads']} ({h['passing']} passing, {h['critical']} critical, "
        f"{h['unknown']} unknown); catalog index {cat['index']}"
    )
    lines += _problems(status, now)
    lines += ["", _services(status)]
    if status.get("peers"):
        rows = [["PEER", "ADDRESS", "STATE", "LAST SYNC", "SERVICES", "ERROR"]]
        for p in status["peers"]:
            rows.append(
                [p["cluster"], p["address"], p["state"], ago(p["last_sync"], now),
                 str(len(p["services"])),
                 one_line(p.get("error") or "", 60) if p["state"] != "connected" else ""]
            )
        lines += ["", table(rows)]
    rows = [["NODE", "KIND", "STATE", "SINCE", "WORKLOADS"]]
    rows.append([status["node"], "gateway", "this node",
                 ago(now - status.get("uptime_seconds", 0), now), "-"])
    for a in status.get("agents", []):
        rows.append([a["node"], "agent", a["state"], ago(a["since"], now), str(a["workloads"])])
    lines += ["", table(rows)]
    if status.get("policies"):
        lines.append("")
        lines.extend("traffic " + render_policy(p) for p in status["policies"])
    if workloads:
        rows = [["WORKLOAD", "SERVICE", "ADDRESS", "CHECK", "HEALTH", "WHY"]]
        for w in workloads:
            rows.append([w["id"], f"{w['service']}.{w['namespace']}", w["address"],
                         _check_kind(w), w["health"], _why(w)])
        lines += ["", table(rows)]
    if h["unknown"] or any(w["health"] == "unknown" for w in workloads):
        lines += ["", "unknown: not checked yet; each check runs once per interval"]
    return "\n".join(lines)


def _problems(status: dict[str, Any], now: float) -> list[str]:
    """What the appliance had to leave out: quarantined store rows, listeners past the budget,
    a catalog that is stale because its store (Consul) does not answer."""
    out = []
    cat = status.get("catalog") or {}
    consul = cat.get("consul") or {}
    if cat.get("stale"):
        since = f" since {ago(consul['since'], now)}" if consul.get("since") else ""
        why = one_line(consul.get("reason") or "not read from its store yet", 90)
        out.append(f"problem: the catalog is STALE{since}: serving the last-known one; {why}")
    elif consul:
        out.append(f"catalog: consul {consul.get('address')} (datacenter "
                   f"{consul.get('datacenter')}, node {consul.get('node')}): "
                   f"{consul.get('state')}")
    for key, name in (("catalog", "catalog.db"), ("policy_store", "federation.db")):
        rows = (status.get(key) or {}).get("quarantined") or []
        if rows:
            out.append(f"problem: {len(rows)} row(s) of {name} quarantined at start-up, e.g. "
                       f"{rows[0]['table']} {rows[0]['key']}: {one_line(rows[0]['reason'], 60)} "
                       "(`isthmus docs catalog`, 'A damaged file')")
    egress = (status.get("limits") or {}).get("egress_listeners") or {}
    if egress.get("skipped"):
        out.append(f"problem: {egress['skipped']} VIP listener(s) not opened: the egress budget "
                   f"is {egress.get('budget')} (egress.max_listeners, the open-files limit)")
    return out


def _render_agent(status: dict[str, Any], workloads: list[dict[str, Any]], now: float) -> str:
    a = status["agent"]
    lines = [
        f"agent {status['node']} of cluster {status['cluster']}  trust domain "
        f"{status['trust_domain']}  version {status['version']}  up "
        f"{duration(status.get('uptime_seconds', 0))}",
        f"control node {a['control']}: {a['state']} since {ago(a['since'], now)}"
        + (f" ({a['error']})" if a.get("error") and a["state"] != "connected" else ""),
    ]
    for p in a.get("problems", []):
        lines.append(f"problem: {p}")
    lines += ["", _services(status)]
    if workloads:
        rows = [["WORKLOAD", "SERVICE", "ADDRESS", "CHECK", "REGISTRATION", "HEALTH", "WHY"]]
        for w in workloads:
            rows.append([w["id"], f"{w['service']}.{w['namespace']}", w["address"],
                         _check_kind(w), w.get("registration", "-"), w["health"], _why(w)])
        lines += ["", table(rows)]
    return "\n".join(lines)
