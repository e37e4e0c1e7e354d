"""python3 -m tests.testbed up|down|status|prereqs|exec|ssh (run from the repository root).

  up [--topology internet|single] [--hold]   build (first removing what killed runs left)
  down [--run ID | --all]                    tear down (also: --destroy)
  status [--run ID] [--json]                 nodes, addresses, PID 1, systemd state
  prereqs [--install]                        the Debian packages it needs; install them
  exec NODE [-- CMD...]                      a command (default: a shell) inside a node
  ssh NODE [-- CMD...]                       ssh from the controller namespace, as Ansible does
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from typing import Any

from . import prereqs, runs
from .errors import TestbedError
from .nodes import Machine
from .testbed import Testbed
from .topology import TOPOLOGIES


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--destroy"]:
        argv = ["down", *argv[1:]]
    parser = argparse.ArgumentParser(prog="python3 -m tests.testbed",
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="build a testbed")
    p.add_argument("--topology", choices=sorted(TOPOLOGIES), default="internet")
    p.add_argument("--hold", action="store_true",
                   help="stay in the foreground; tear down on Ctrl-C or SIGTERM")
    p.add_argument("--json", action="store_true", help="print the status as JSON")

    p = sub.add_parser("down", help="tear down testbeds that no live process owns")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--run", metavar="ID", help="only this run (even if its owner is alive)")
    g.add_argument("--all", action="store_true", help="every run, live owners too")

    p = sub.add_parser("status", help="show a testbed")
    p.add_argument("--run", metavar="ID")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("prereqs", help="list (and install) the Debian packages needed")
    p.add_argument("--install", action="store_true")
    p.add_argument("--packages", action="store_true", help="print only the package names")

    for name in ("exec", "ssh"):
        p = sub.add_parser(name, help=f"{name} into a node")
        p.add_argument("node")
        p.add_argument("--run", metavar="ID")
        p.add_argument("cmd", nargs=argparse.REMAINDER)

    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except TestbedError as exc:
        print(f"testbed: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `... | head`: the reader left; what was done stays done
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def cmd_up(args: argparse.Namespace) -> int:
    topology = TOPOLOGIES[args.topology]()
    if args.hold:
        stop = threading.Event()
        # SIGTERM tears down as Ctrl-C does (a KeyboardInterrupt unwinds through up()).
        signal.signal(signal.SIGTERM, _raise_interrupt)
        tb = Testbed.up(topology)
        try:
            _print_up(tb, args.json)
            print(f"holding testbed {tb.run_id}; Ctrl-C or SIGTERM tears it down", flush=True)
            stop.wait()
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            tb.down()
            print(f"testbed {tb.run_id} down in {tb.timings['down']:.1f} s", flush=True)
        return 0
    tb = Testbed.up(topology, detached=True)
    _print_up(tb, args.json)
    return 0


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _print_up(tb: Testbed, as_json: bool) -> None:
    if as_json:
        print(json.dumps({**tb.describe(), "timings": tb.timings}, indent=2), flush=True)
        return
    t = tb.timings
    print(f"testbed {tb.run_id} up in {t['up']:.1f} s (cleanup {t['cleanup']:.1f}, network "
          f"{t['network']:.1f}, provision {t['provision']:.1f}, boot {t['boot']:.1f})")
    _print_nodes(tb)
    print(f"\nssh config: {tb.ssh_config}\ninventory:  {tb.inventory}")
    print(f"ssh:        python3 -m tests.testbed ssh NODE   (= ip netns exec "
          f"{tb.controller.netns} ssh -F {tb.ssh_config} NODE)")
    print("shell:      python3 -m tests.testbed exec NODE")
    print("down:       python3 -m tests.testbed down", flush=True)


def _print_nodes(tb: Testbed) -> None:
    for name, node in tb.nodes.items():
        legs = "  ".join(f"{leg.segment}={leg.address}" for leg in node.spec.legs)
        extra = ""
        if isinstance(node, Machine):
            pid1 = node.pid1
            state = tb.boot_states.get(name) or (node.system_state() if pid1 else "off")
            extra = f"  pid1={pid1}  {state}"
        print(f"  {name:<14} {legs}{extra}")


def cmd_down(args: argparse.Namespace) -> int:
    if args.run:
        targets = [args.run]
    else:
        ids = runs.run_ids(runs.remains())
        targets = sorted(ids if args.all else {i for i in ids if not runs.is_live(i)})
        skipped = sorted(runs.run_ids(runs.remains()) - set(targets))
        for rid in skipped:
            print(f"kept {rid}: its owner process is alive (use --run {rid} or --all)")
    status = 0
    for rid in targets:
        left = runs.destroy(rid)
        if left.empty():
            print(f"removed {rid}")
        else:
            print(f"testbed {rid}: left behind {left.describe()}", file=sys.stderr)
            status = 1
    if not targets:
        print("nothing to remove")
    return status


def cmd_status(args: argparse.Namespace) -> int:
    tb = Testbed.attach(args.run)
    info = tb.describe()
    live = runs.is_live(tb.run_id)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    owner = "detached (command line)" if not tb.owner else (
        f"pid {tb.owner['pid']}, {'alive' if live else 'dead: a leftover'}")
    print(f"testbed {tb.run_id}  dir {tb.dir}  owner {owner}")
    _print_nodes(tb)
    other = sorted(runs.run_ids(runs.remains()) - {tb.run_id})
    if other:
        print(f"other runs: {', '.join(other)}")
    return 0


def cmd_prereqs(args: argparse.Namespace) -> int:
    if args.packages:
        print(" ".join(prereqs.APT_PACKAGES))
        return 0
    if args.install:
        installed = prereqs.install()
        print(f"installed: {' '.join(installed)}" if installed else "nothing to install")
    print(prereqs.report())
    return 0 if prereqs.check().ok else 1


def cmd_exec(args: argparse.Namespace) -> int:
    tb = Testbed.attach(args.run)
    node = tb[args.node]
    cmd = _remainder(args.cmd) or ["bash", "-l"]
    argv = node.argv(cmd)
    env = dict(os.environ)
    if isinstance(node, Machine):
        from .commands import MACHINE_ENV

        env = {**MACHINE_ENV, "TERM": os.environ.get("TERM", "dumb")}
    os.execvpe(argv[0], argv, env)


def cmd_ssh(args: argparse.Namespace) -> int:
    tb = Testbed.attach(args.run)
    argv = tb.ssh_argv(args.node, _remainder(args.cmd))
    os.execvp(argv[0], argv)


def _remainder(cmd: list[str]) -> list[str]:
    return cmd[1:] if cmd[:1] == ["--"] else cmd


COMMANDS = {"up": cmd_up, "down": cmd_down, "status": cmd_status, "prereqs": cmd_prereqs,
            "exec": cmd_exec, "ssh": cmd_ssh}

if __name__ == "__main__":
    sys.exit(main())
