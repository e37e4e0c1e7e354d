"""The `isthmus` command.

Commands that call the control API find it and its token as `isthmus.client` describes
(`--api`/`--token-file`, `--config`, `$ISTHMUS_API`/`$ISTHMUS_TOKEN`, `$ISTHMUS_CONFIG`,
defaults). Exit 0 on success; otherwise one line on stderr and a non-zero status.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from discovery.durations import parse_duration
from isthmus import __version__
from isthmus.client import (
    API_ENV,
    CONFIG_ENV,
    DEFAULT_API,
    TOKEN_ENV,
    ApiClient,
    ClientError,
    resolve,
)
from isthmus.render import render_policy, render_status

DOCS_HINT = "Documentation: `isthmus docs` lists the guides installed with this package."


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Help as written (epilogs keep their lines), options in one column."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34)


def _api_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "reaching the API",
        f"first match wins: --api/--token-file; --config; ${API_ENV}/${TOKEN_ENV};\n"
        f"${CONFIG_ENV}; {DEFAULT_API} with the token `isthmus run` made",
    )
    g.add_argument("--api", metavar="URL", help=f"control API URL (default {DEFAULT_API})")
    g.add_argument("--token-file", metavar="FILE", help="file holding the API token")
    g.add_argument(
        "--config",
        metavar="FILE",
        help="an appliance's config: use its api.listen and api.token_file",
    )


def _client(args: argparse.Namespace) -> ApiClient:
    target = resolve(args.api, args.token_file, args.config)
    return ApiClient(target.api, target.token)


# --- run ----------------------------------------------------------------------------------------


def _load_config(path: str | None, data_dir: str | None) -> Any:
    from isthmus import config as configmod

    overrides = {"data_dir": data_dir} if data_dir else None
    return configmod.load(path, overrides) if path else configmod.local_default(data_dir)


def _print_problems(source: str, problems: list[str]) -> None:
    print(f"isthmus: invalid configuration in {source}:", file=sys.stderr)
    for p in problems:
        print(f"  {p}", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    from isthmus import appliance, logs
    from isthmus import config as configmod

    try:
        cfg = _load_config(args.config, args.data_dir)
    except configmod.ConfigError as e:
        _print_problems(e.source, e.problems)
        return 2
    explicit = cfg.log.model_fields_set if args.config else set()
    fmt = args.log_format or (
        cfg.log.format if "format" in explicit else ("text" if sys.stderr.isatty() else "json")
    )
    logs.setup(args.log_level or cfg.log.level, fmt)
    try:
        return appliance.run(cfg, args.config)
    except appliance.StartupError as e:
        print(f"isthmus: {e}", file=sys.stderr)
        return 1


def cmd_config_check(args: argparse.Namespace) -> int:
    from isthmus import config as configmod

    try:
        cfg = configmod.load(args.file)
    except configmod.ConfigError as e:
        _print_problems(e.source, e.problems)
        return 2
    from isthmus import configcheck

    problems = configcheck.deeper_problems(cfg)
    if problems:
        _print_problems(args.file, problems)
        return 2
    print(f"{args.file}: ok")
    for line in configcheck.summary(cfg):
        print(f"  {line}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from isthmus import demo

    return demo.main(args.dir, args.base)


def cmd_version(_: argparse.Namespace) -> int:
    import platform
    from importlib import metadata

    print(f"isthmus {__version__}")
    print(f"python {platform.python_version()} ({sys.executable})")
    for dist in ("aiohttp", "dnslib", "cryptography", "pydantic", "uvloop"):
        try:
            print(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            print(f"{dist} not installed")
    return 0


def cmd_docs(args: argparse.Namespace) -> int:
    from isthmus import docs

    try:
        topics = docs.topics()
    except docs.DocsMissing as e:
        raise ClientError(str(e)) from None
    if not args.topic:
        width = max(len(t.name) for t in topics)
        for t in topics:
            print(f"{t.name.ljust(width)}  {t.title}")
        print(f"\n`isthmus docs TOPIC` prints one; they are in {topics[0].path.parent}")
        return 0
    found = next((t for t in topics if t.name == args.topic), None)
    if found is None:
        raise ClientError(
            f"no guide {args.topic!r}; there are: {', '.join(t.name for t in topics)}"
        )
    sys.stdout.write(found.path.read_text())
    return 0


def cmd_completion(args: argparse.Namespace) -> int:
    from isthmus.completion import script

    sys.stdout.write(script(build_parser(), args.shell))
    return 0


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
    note = ""
    if result["health"] == "unknown":
        interval = result.get("check", {}).get("interval")
        note = f"; first check within {interval}" if interval else "; waiting for a heartbeat"
    print(
        f"registered {result['id']}: {result['service']}.{result['namespace']} at "
        f"{result['address']} ({result['health']}{note})"
    )
    return 0


def cmd_deregister(args: argparse.Namespace) -> int:
    _client(args).request("DELETE", f"/v1/workloads/{args.id}")
    print(f"deregistered {args.id}")
    return 0


# --- traffic, tokens --------------------------------------------------------------------------


def _service_key(text: str) -> Any:
    from discovery.names import ServiceKey

    try:
        return ServiceKey.parse(text)
    except ValueError as e:
        raise ClientError(str(e)) from None


def _service_path(text: str) -> str:
    key = _service_key(text)
    return f"/v1/services/{key.namespace}/{key.name}/traffic"


def cmd_traffic_set(args: argparse.Namespace) -> int:
    weights: dict[str, Any] = {}
    for cluster, weight in _pairs(args.weights, "weight").items():
        try:
            weights[cluster] = int(weight)
        except ValueError:
            raise ClientError(
                f"{cluster}={weight}: expected CLUSTER=WEIGHT with an integer"
            ) from None
    client = _client(args)
    key = _service_key(args.service)
    if not args.force:
        try:
            client.request("GET", f"/v1/services/{key.namespace}/{key.name}")
        except ClientError as e:
            if " 404 " not in str(e):
                raise
            raise ClientError(
                f"no service {key} is registered in any cluster of the federation; check the "
                "name, or pass --force to set its policy ahead of it"
            ) from None
    body = {"weights": weights, "failover": not args.no_failover}
    policy = client.request("PUT", _service_path(args.service), body)
    for warning in policy.get("warnings", []):
        print(f"isthmus: warning: {warning}", file=sys.stderr)
    print(render_policy(policy))
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


def cmd_status(args: argparse.Namespace) -> int:
    client = _client(args)
    tty = sys.stdout.isatty()
    while True:
        status = client.request("GET", "/v1/status")
        workloads = client.request("GET", "/v1/workloads")
        if args.json:
            text = json.dumps({"status": status, "workloads": workloads}, indent=2)
        else:
            text = render_status(status, workloads, now=time.time())
        if args.watch is None:
            print(text)
            return 0
        stamp = time.strftime("%H:%M:%S")
        header = f"every {args.watch:g}s, {stamp}; Ctrl-C stops\n\n"
        # in place on a terminal: home, clear to the end, redraw; a pipe gets each round
        sys.stdout.write(("\033[H\033[2J" if tty else "\n") + header + text + "\n")
        sys.stdout.flush()
        time.sleep(args.watch)


# --- parser ---------------------------------------------------------------------------------


def _duration_arg(value: str) -> str:
    try:
        parse_duration(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _seconds_arg(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = parse_duration(value) if value[-1:].isalpha() else -1.0
    if not 0.2 <= seconds <= 3600:
        raise argparse.ArgumentTypeError(f"expected seconds from 0.2 to 3600, got {value!r}")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="isthmus",
        description="Multi-cluster gateway and service-discovery appliance",
        epilog=DOCS_HINT,
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"isthmus {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, epilog: str = DOCS_HINT) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".",
            formatter_class=_Formatter, epilog=epilog,
        )

    p = command("run", "run an appliance (roles from the config)")
    p.add_argument(
        "--config", metavar="FILE",
        help="YAML config (default: the built-in one-cluster setup on 127.0.0.1, state under "
        "~/.local/state/isthmus)",
    )
    p.add_argument("--data-dir", metavar="DIR", help="override data_dir (default: the config's)")
    p.add_argument(
        "--log-format", choices=["text", "json"],
        help="log lines as text or JSON (default: the config's log.format, else text on a "
        "terminal and json otherwise)",
    )
    p.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"],
        help="least severe level logged (default: the config's log.level, info)",
    )
    p.set_defaults(func=cmd_run)

    p = command(
        "demo", "a complete federation on loopback, with a script to try",
        epilog="The demo uses 127.N.0.0/16 for a free N (10 and up), or --base.\n" + DOCS_HINT,
    )
    p.add_argument(
        "--dir", metavar="DIR",
        help="keep the demo's state in this empty directory (default: a temporary one, removed "
        "at the end)",
    )
    p.add_argument(
        "--base", metavar="127.N",
        help="the loopback /16 to use, e.g. 127.30 (default: the first free one from 127.10)",
    )
    p.set_defaults(func=cmd_demo)

    p = command("register", "register (or replace) a workload")
    p.add_argument(
        "id", metavar="ID", help="the workload's ID (letters, digits, '.', '_', ':', '-')"
    )
    p.add_argument("--service", metavar="NAME", required=True, help="its service's name")
    p.add_argument(
        "--namespace", metavar="NS", default="default", help="its namespace (default %(default)s)"
    )
    p.add_argument(
        "--address", metavar="IP", required=True,
        help="its IPv4 or IPv6 address, which the gateways connect to",
    )
    p.add_argument(
        "--port", metavar="NAME=PORT", action="append", required=True,
        help="a named port, e.g. http=9080 (repeat for more; the name says the protocol)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--check-http", metavar="URL", help="health: GET URL passes on 2xx/3xx")
    g.add_argument("--check-tcp", metavar="HOST:PORT", help="health: a TCP connect passes")
    g.add_argument(
        "--ttl", metavar="DURATION", type=_duration_arg,
        help="health: passes while heartbeats (PUT .../heartbeat) come within DURATION",
    )
    p.add_argument(
        "--interval", metavar="DURATION", default="10s", type=_duration_arg,
        help="time between checks (default %(default)s)",
    )
    p.add_argument(
        "--timeout", metavar="DURATION", default="2s", type=_duration_arg,
        help="time a check may take (default %(default)s)",
    )
    p.add_argument(
        "--deregister-after", metavar="DURATION", type=_duration_arg,
        help="deregister once critical this long (default: never)",
    )
    p.add_argument(
        "--label", metavar="K=V", action="append", default=[],
        help="a label (repeat for more; default none)",
    )
    p.add_argument(
        "--weight", metavar="N", type=int, default=1,
        help="its share among the service's endpoints in its cluster, 0-10000 "
        "(default %(default)s)",
    )
    p.add_argument("--region", metavar="REGION", help="its locality's region (default none)")
    p.add_argument("--zone", metavar="ZONE", help="its locality's zone (default none)")
    _api_args(p)
    p.set_defaults(func=cmd_register)

    p = command("deregister", "remove a workload")
    p.add_argument("id", metavar="ID", help="the workload's ID")
    _api_args(p)
    p.set_defaults(func=cmd_deregister)

    p = command("status", "clusters, peers, nodes, services and health at a glance")
    p.add_argument("--json", action="store_true", help="raw JSON instead of tables")
    p.add_argument(
        "--watch", metavar="SECONDS", nargs="?", const=2.0, type=_seconds_arg,
        help="redraw in place every SECONDS (default 2 when given without a value)",
    )
    _api_args(p)
    p.set_defaults(func=cmd_status)

    p = command("traffic", "shift traffic between clusters")
    tsub = p.add_subparsers(dest="traffic_command", required=True, metavar="ACTION")
    t = tsub.add_parser(
        "set", help="set a service's weights per cluster", formatter_class=_Formatter,
        description="Set a service's weights per cluster; replicated to every peer.",
    )
    t.add_argument("service", metavar="NAME.NAMESPACE", help="the service, e.g. reviews.default")
    t.add_argument(
        "weights", nargs="+", metavar="CLUSTER=WEIGHT",
        help="integer weights, e.g. east=20 west=80 (at least one above 0)",
    )
    t.add_argument(
        "--no-failover", action="store_true",
        help="fail requests to a cluster with no healthy capacity (default: move them to the "
        "others)",
    )
    t.add_argument(
        "--force", action="store_true",
        help="set it even though no cluster has the service yet (default: refuse)",
    )
    _api_args(t)
    t.set_defaults(func=cmd_traffic_set)
    t = tsub.add_parser("show", help="a service's policy", formatter_class=_Formatter)
    t.add_argument("service", metavar="NAME.NAMESPACE", help="the service, e.g. reviews.default")
    _api_args(t)
    t.set_defaults(func=cmd_traffic_show)
    t = tsub.add_parser(
        "reset", help="back to default locality routing", formatter_class=_Formatter
    )
    t.add_argument("service", metavar="NAME.NAMESPACE", help="the service, e.g. reviews.default")
    _api_args(t)
    t.set_defaults(func=cmd_traffic_reset)

    p = command("token", "bootstrap tokens for agents")
    tsub = p.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    t = tsub.add_parser(
        "create", help="a one-time token for a node's first identity", formatter_class=_Formatter
    )
    t.add_argument(
        "--ttl", metavar="DURATION", default="1h", type=_duration_arg,
        help="how long it may be used (default %(default)s, at most 30d)",
    )
    t.add_argument(
        "--kind", choices=["agent", "gateway"], default="agent",
        help="the identity it mints (default %(default)s; gateway needs --node)",
    )
    t.add_argument(
        "--node", metavar="NAME", help="the only node name it mints (default: any free name)"
    )
    _api_args(t)
    t.set_defaults(func=cmd_token_create)

    p = command("config", "check a configuration file")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    t = csub.add_parser(
        "check", help="validate a config file without starting anything",
        formatter_class=_Formatter,
    )
    t.add_argument("file", metavar="FILE", help="the YAML config to check")
    t.set_defaults(func=cmd_config_check)

    p = command("version", "this release and the versions of what it runs on")
    p.set_defaults(func=cmd_version)

    p = command("docs", "the guides installed with this package")
    p.add_argument("topic", metavar="TOPIC", nargs="?", help="a guide to print (default: list)")
    p.set_defaults(func=cmd_docs)

    p = command(
        "completion", "a shell completion script",
        epilog="bash: isthmus completion bash > /etc/bash_completion.d/isthmus\n"
        "zsh:  isthmus completion zsh > \"${fpath[1]}/_isthmus\"\n" + DOCS_HINT,
    )
    p.add_argument("shell", choices=["bash", "zsh"], help="the shell")
    p.set_defaults(func=cmd_completion)

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
        return 0 if getattr(args, "watch", None) else 130
    except BrokenPipeError:  # `isthmus docs gateway | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
