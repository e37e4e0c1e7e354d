"""A stream of traffic-policy writes to a control node's API (a program run on the control
node's network): one PUT every `--interval`, each answer a JSON line in `--out`
(`{"t", "seq", "status", "weights", "version"}`; status 0 when nothing answered). An answer 200
is an acknowledged write: the drills check that none of those is lost across a crash.

    python3 tests/e2e/writer.py --api http://127.0.0.1:15000 --token-file TOKEN \\
        --service reviews --clusters east,west --out writes.jsonl
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--api", required=True)
    p.add_argument("--token-file", required=True)
    p.add_argument("--service", default="reviews")
    p.add_argument("--namespace", default="default")
    p.add_argument("--clusters", default="east,west")
    p.add_argument("--out", required=True)
    p.add_argument("--interval", type=float, default=0.1)
    p.add_argument("--duration", type=float, default=300.0)
    args = p.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    token = Path(args.token_file).read_text().strip()
    first, second = args.clusters.split(",")
    url = f"{args.api}/v1/services/{args.namespace}/{args.service}/traffic"
    end = time.monotonic() + args.duration
    seq = 0
    with open(args.out, "a") as out:
        while not stop.is_set() and time.monotonic() < end:
            seq += 1
            share = 1 + seq % 99
            weights = {first: share, second: 100 - share}
            body = json.dumps({"weights": weights, "failover": True}).encode()
            req = urllib.request.Request(url, data=body, method="PUT", headers={
                "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
            t = time.time()
            status, version = 0, None
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    status = r.status
                    version = json.loads(r.read()).get("version")
            except urllib.error.HTTPError as e:
                status = e.code
            except (OSError, ValueError):
                status = 0
            out.write(json.dumps({"t": t, "seq": seq, "status": status, "weights": weights,
                                  "version": version}) + "\n")
            out.flush()
            stop.wait(args.interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
