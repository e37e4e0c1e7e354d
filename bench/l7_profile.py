"""Where the egress's CPU goes on the L7 keep-alive path: py-spy on the egress worker under wrk.

    python bench/l7_profile.py [--duration 15] [--connections 32] [--rate 200] [--out DIR]

The topology of `gateway_bench.py` (wrk -> egress VIP -> mTLS tunnel -> ingress -> nginx, one
worker per hop), with `py-spy record` attached to the egress worker for the whole wrk run.
Prints the requests per second and the egress's CPU per request (both measured while py-spy
samples, so a little above the benchmark's), then the functions with the most samples: own
time (the function was running) and total time (it was on the stack). The collapsed stacks
are kept in DIR for a flame graph (`flamegraph.pl` or speedscope). Needs py-spy (pip), wrk,
nginx; run as a user allowed to ptrace the worker (root, or ptrace_scope 0).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gateway_bench as gb  # the topology and helpers of the benchmark


def top(stacks: Path, n: int) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """(samples, own time per function, total time per function), most first."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in stacks.read_text().splitlines():
        frames_text, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in frames_text.split(";") if not f.startswith("process ")]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for f in set(frames):
            total[f] += count
    return samples, own.most_common(n), total.most_common(n)


def short(frame: str) -> str:
    """`name (path/to/file.py)` -> `name (file.py)`."""
    return re.sub(r"\(([^()]*/)?([^/()]+)\)$", r"(\2)", frame)


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=int, default=15)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--out", type=Path, default=None, help="keep the collapsed stacks here")
    args = p.parse_args()
    args.workers, args.threads = 1, 1
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        sys.exit("py-spy is not installed (pip install py-spy)")
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="l7-profile-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    stacks = out_dir / "egress.collapsed"

    with tempfile.TemporaryDirectory(prefix="isthmus-prof-") as tmp, gb.processes() as procs:
        d = Path(tmp)
        pem = gb.make_pki(d)
        body = ("0123456789abcdef" * 4)[:63]
        conf = gb.NGINX_CONF.format(workers=1, dir=d, host=gb.NGINX[0], port=gb.NGINX[1], body=body)
        (d / "nginx.conf").write_text(conf)
        gb.spawn(procs, "nginx", ["nginx", "-c", str(d / "nginx.conf"), "-g", "daemon off;"])
        gb.wait_port(*gb.NGINX)
        egress, ingress = await gb.start_isthmus(pem, args)
        url = f"http://{gb.ISTHMUS_VIP}:{gb.PORTS['http']}/"
        wrk = ["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", "--latency", url]
        try:
            subprocess.run([*wrk[:3], "-d2s", url], capture_output=True, check=True)  # warm-up
            pid = egress.pids[0]
            record = subprocess.Popen(
                [spy, "record", "--pid", str(pid), "--rate", str(args.rate), "--format", "raw",
                 "--function", "--nonblocking", "--duration", str(args.duration + 1),
                 "--output", str(stacks)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )  # fmt: skip
            await asyncio.sleep(0.5)  # py-spy attaches before the load starts
            before = gb.cpu_seconds([pid])
            out = subprocess.run(wrk, capture_output=True, text=True, check=True).stdout
            cpu = gb.cpu_seconds([pid]) - before
            _, err = record.communicate(timeout=60)
            if record.returncode != 0:
                sys.exit(f"py-spy failed: {err.decode(errors='replace')}")
        finally:
            await egress.stop(drain=0)
            await ingress.stop(drain=0)

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = rps * args.duration
    print(f"req/s {rps:.0f} (under py-spy at {args.rate} Hz); egress CPU per request "
          f"{cpu / requests * 1e6:.1f} us")  # fmt: skip
    samples, own, total = top(stacks, args.top)
    print(f"\n{samples} samples of the egress worker; stacks in {stacks}")
    for title, rows in (("own time", own), ("total time (on the stack)", total)):
        print(f"\n{title}:")
        for frame, count in rows:
            print(f"  {100 * count / samples:5.1f} %  {short(frame)}")


if __name__ == "__main__":
    asyncio.run(main())
