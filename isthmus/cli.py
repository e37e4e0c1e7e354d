"""The `isthmus` command (DESIGN §7)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from discovery.durations import parse_duration
from isthmus import __version__
from isthmus.client import DEFAULT_API, ApiClient, ClientError, resolve_token


def _api_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--api",
        default=os.environ.get("ISTHMUS_API", DEFAULT_API),
        help=f"control API URL (default {DEFAULT_API}, or $ISTHMUS_API)",
    )
    p.add_argument("--token-file", help="file holding the API token (or $ISTHMUS_TOKEN)")


def _client(args: argparse.Namespace) -> ApiClient:
    return ApiClient(args.api, resolve_token(args.token_file))


# --- run ----------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from isthmus import appliance, logs
    from isthmus import config as configmod

    try:
        if args.config:
            cfg = configmod.load(args.config)
        else:
            cfg = configmod.local_default(args.data_dir)
    except configmod.ConfigError as e:
        print(f"isthmus: invalid configuration in {e.source}:", file=sys.stderr)
        for p in e.problems:
            print(f"  {p}", file=sys.stderr)
        return 2
    if args.config and args.data_dir:
        cfg = cfg.model_copy(update={"data_dir": args.data_dir})
    logs.setup(cfg.log.level, cfg.log.format)
    try:
        return appliance.run(cfg, args.config)
    except appliance.StartupError as e:
        print(f"isthmus: {e}", file=sys.stderr)
        return 1


def cmd_demo(args: argparse.Namespace) -> int:
    from isthmus import demo

    return demo.main(args.dir)


# --- register / deregister -----------------------------------------------------------------------


def _pairs(values: list[str], what: str) -> dict[str, str]:
    out = {}
    for v in values:
        k, sep, val = v.partition("=")
        if not sep or not k:
            raise ClientError(f"{what} {v!r}: expected KEY=VALUE")
        out[k] = val
    return out


def registration_body(args: argparse.Namespace) -> dict[str, Any]:
    ports: dict[str, Any] = {}
    for name, port in _pairs(args.port, "--port").items():
        if not port.isdigit():
            raise ClientError(f"--port {name}={port}: expected NAME=PORT with a numeric port")
        ports[name] = int(port)
    body: dict[str, Any] = {
        "service": args.service,
        "namespace": args.namespace,
        "address": args.address,
        "ports": ports,
        "weight": args.weight,
    }
    if args.label:
        body["labels"] = _pairs(args.label, "--label")
    if args.region or args.zone:
        body["locality"] = {"region": args.region or "", "zone": args.zone or ""}
    check: dict[str, Any] = {}
    if args.check_http:
        check = {"http": args.check_http}
    elif args.check_tcp:
        check = {"tcp": args.check_tcp}
    elif args.ttl:
        check = {"ttl": args.ttl}
    if check and not args.ttl:
        check.update(interval=args.interval, timeout=args.timeout)
    if check and args.deregister_after:
        check["deregister_after"] = args.deregister_after
    if check:
        body["check"] = check
    return body


def cmd_register(args: argparse.Namespace) -> int:
    body = registration_body(args)
    result = _client(args).request("PUT", f"/v1/workloads/{args.id}", body)
    print(
        f"registered {result['id']}: {result['service']}.{result['namespace']} at "
        f"{result['address']} ({result['health']})"
    )
    return 0


def cmd_deregister(args: argparse.Namespace) -> int:
    _client(args).request("DELETE", f"/v1/workloads/{args.id}")
    print(f"deregistered {args.id}")
    return 0


# --- traffic, tokens --------------------------------------------------------------------------


def _service_path(text: str) -> str:
    from discovery.names import ServiceKey

    try:
        key = ServiceKey.parse(text)
    except ValueError as e:
        raise ClientError(str(e)) from None
    return f"/v1/services/{key.namespace}/{key.name}/traffic"


def render_policy(p: dict[str, Any]) -> str:
    weights = " ".join(f"{c}={w}" for c, w in sorted(p["weights"].items()))
    total = sum(p["weights"].values()) or 1
    shares = ", ".join(f"{c} {w * 100 / total:.0f}%" for c, w in sorted(p["weights"].items()))
    return (
        f"{p['service']}.{p['namespace']}: {weights} ({shares}); failover "
        f"{'on' if p['failover'] else 'off'}; version {p['version']}"
    )


def cmd_traffic_set(args: argparse.Namespace) -> int:
    weights: dict[str, Any] = {}
    for cluster, weight in _pairs(args.weights, "weight").items():
        try:
            weights[cluster] = int(weight)
        except ValueError:
            raise ClientError(
                f"{cluster}={weight}: expected CLUSTER=WEIGHT with an integer"
            ) from None
    body = {"weights": weights, "failover": not args.no_failover}
    print(render_policy(_client(args).request("PUT", _service_path(args.service), body)))
    return 0


def cmd_traffic_show(args: argparse.Namespace) -> int:
    client = _client(args)
    try:
        print(render_policy(client.request("GET", _service_path(args.service))))
    except ClientError as e:
        if " 404 " not in str(e):
            raise
        print(f"{args.service}: no traffic policy (default locality routing)")
    return 0


def cmd_traffic_reset(args: argparse.Namespace) -> int:
    _client(args).request("DELETE", _service_path(args.service))
    print(f"{args.service}: back to default locality routing")
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    body = {"ttl": args.ttl, "kind": args.kind}
    if args.node:
        body["node"] = args.node
    out = _client(args).request("POST", "/v1/bootstrap-tokens", body)
    print(out["token"])
    bound = f"node {args.node}" if args.node else "any node name not in use"
    print(f"expires {out['expires']} (single use: {args.kind}, {bound})", file=sys.stderr)
    return 0


# --- status ---------------------------------------------------------------------------------------


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def render_status(status: dict[str, Any], workloads: list[dict[str, Any]]) -> str:
    cat = status["catalog"]
    h = cat["health"]
    lines = [
        f"cluster {status['cluster']}  node {status['node']}  trust domain "
        f"{status['trust_domain']}  roles {','.join(status['roles'])}  version {status['version']}",
        f"catalog: {cat['services']} services, {cat['workloads']} workloads "
        f"({h['passing']} passing, {h['critical']} critical, {h['unknown']} unknown), "
        f"index {cat['index']}",
        "",
    ]
    rows = [["SERVICE", "VIP", "PORTS", "CLUSTER", "HEALTHY"]]
    for s in status["services"]:
        ports = ",".join(f"{k}:{v}" for k, v in sorted(s["ports"].items()))
        for cluster, c in sorted(s["clusters"].items()):
            rows.append(
                [
                    f"{s['name']}.{s['namespace']}",
                    s["vip"] or "-",
                    ports,
                    cluster,
                    f"{c['healthy']}/{c['total']}",
                ]
            )
    lines.append(table(rows) if len(rows) > 1 else "no services registered")
    if status.get("peers"):
        lines.append("")
        prow = [["PEER", "ADDRESS", "STATE", "LAST SYNC", "SERVICES"]]
        for p in status["peers"]:
            prow.append(
                [
                    p["cluster"],
                    p["address"],
                    p["state"],
                    p["last_sync"] or "never",
                    str(len(p["services"])),
                ]
            )
        lines.append(table(prow))
    if status.get("policies"):
        lines.append("")
        lines.extend("traffic " + render_policy(p) for p in status["policies"])
    if workloads:
        lines.append("")
        wrows = [["WORKLOAD", "SERVICE", "ADDRESS", "CHECK", "HEALTH"]]
        for w in workloads:
            check = w.get("check") or {}
            kind = next((k for k in ("http", "tcp", "ttl") if k in check), "none")
            wrows.append(
                [w["id"], f"{w['service']}.{w['namespace']}", w["address"], kind, w["health"]]
            )
        lines.append(table(wrows))
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    client = _client(args)
    status = client.request("GET", "/v1/status")
    workloads = client.request("GET", "/v1/workloads")
    if args.json:
        print(json.dumps({"status": status, "workloads": workloads}, indent=2))
    else:
        print(render_status(status, workloads))
    return 0


# --- parser ---------------------------------------------------------------------------------


def _duration_arg(value: str) -> str:
    try:
        parse_duration(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="isthmus", description="Multi-cluster gateway and service-discovery appliance"
    )
    parser.add_argument("--version", action="version", version=f"isthmus {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run an appliance (roles from the config)")
    p.add_argument("--config", help="YAML config file (default: one local cluster on loopback)")
    p.add_argument("--data-dir", help="override data_dir")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="a complete federation on loopback, with a script to try")
    p.add_argument("--dir", help="keep the demo's state in this (empty) directory")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("register", help="register (or replace) a workload")
    p.add_argument("id")
    p.add_argument("--service", required=True)
    p.add_argument("--namespace", default="default")
    p.add_argument("--address", required=True)
    p.add_argument("--port", action="append", required=True, metavar="NAME=PORT")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--check-http", metavar="URL")
    g.add_argument("--check-tcp", metavar="HOST:PORT")
    g.add_argument("--ttl", metavar="DURATION", type=_duration_arg)
    p.add_argument("--interval", default="10s", type=_duration_arg)
    p.add_argument("--timeout", default="2s", type=_duration_arg)
    p.add_argument("--deregister-after", type=_duration_arg, metavar="DURATION")
    p.add_argument("--label", action="append", default=[], metavar="K=V")
    p.add_argument("--weight", type=int, default=1)
    p.add_argument("--region")
    p.add_argument("--zone")
    _api_args(p)
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("deregister", help="remove a workload")
    p.add_argument("id")
    _api_args(p)
    p.set_defaults(func=cmd_deregister)

    p = sub.add_parser("status", help="clusters, services, health at a glance")
    p.add_argument("--json", action="store_true", help="raw JSON instead of tables")
    _api_args(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("traffic", help="shift traffic between clusters")
    tsub = p.add_subparsers(dest="traffic_command", required=True, metavar="ACTION")
    t = tsub.add_parser("set", help="set weights: NAME.NAMESPACE CLUSTER=WEIGHT...")
    t.add_argument("service", metavar="NAME.NAMESPACE")
    t.add_argument("weights", nargs="+", metavar="CLUSTER=WEIGHT")
    t.add_argument(
        "--no-failover",
        action="store_true",
        help="fail requests to a cluster with no healthy capacity",
    )
    _api_args(t)
    t.set_defaults(func=cmd_traffic_set)
    t = tsub.add_parser("show", help="the service's policy")
    t.add_argument("service", metavar="NAME.NAMESPACE")
    _api_args(t)
    t.set_defaults(func=cmd_traffic_show)
    t = tsub.add_parser("reset", help="back to default locality routing")
    t.add_argument("service", metavar="NAME.NAMESPACE")
    _api_args(t)
    t.set_defaults(func=cmd_traffic_reset)

    p = sub.add_parser("token", help="bootstrap tokens for agents")
    tsub = p.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    t = tsub.add_parser("create", help="a one-time token for a node's first identity")
    t.add_argument("--ttl", default="1h", type=_duration_arg)
    t.add_argument("--kind", choices=["agent", "gateway"], default="agent",
                   help="the identity it mints (default agent; gateway needs --node)")
    t.add_argument("--node", help="the only node name it mints (binding)")
    _api_args(t)
    t.set_defaults(func=cmd_token_create)

    for extension in _extensions():
        extension(sub)
    return parser


def _extensions() -> list[Any]:
    """Commands contributed by other modules of the shell (each adds its own parsers)."""
    from isthmus import cli_ca

    return [cli_ca.add_parsers]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ClientError as e:
        print(f"isthmus: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
