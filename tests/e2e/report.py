"""The drills' figures as the Markdown table of RELIABILITY.md, from the JSON files the drills
wrote (`ISTHMUS_E2E_RESULTS`, default /var/tmp/isthmus-e2e/results).

    python3 -m tests.e2e.report [DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .harness import RESULTS

# drill -> (the figure that says how long recovery took, what it measures)
RECOVERY = {
    "1-backends-die": ("time_to_move_s", "kill to the last answer from west"),
    "2-cluster-dark": ("time_to_move_s", "power cut to the last answer from west"),
    "3-partition": ("heal_to_converged_s", "link up to both sides on the same policy"),
    "4-control-crash": ("vm_workloads_back_s", "SIGKILL to every VM workload passing"),
    "5-rotation": ("root_rotation_s", "the whole root rotation: rotate-ca.yml start and finish"),
    "6-hostile": (None, "nothing to recover: the load never noticed"),
    "7-dns-garbage": (None, "nothing to recover: no lookup failed"),
}


def row(d: dict[str, Any]) -> str:
    f = d["figures"]
    key, _ = RECOVERY.get(d["drill"], (None, ""))
    rec = f.get(key) if key else None
    recovery = f"{rec:.2f} s" if isinstance(rec, int | float) else "-"
    retries = f.get("client_retries", f.get("lookup_retries", 0))
    p99q = f.get("p99_quiet_ms", f.get("p99_lookup_quiet_ms",
                                       d.get("windows", {}).get("quiet", {}).get("p99_ms")))
    quiet = f"{p99q:.1f}" if isinstance(p99q, int | float) else "-"
    return (f"| {d['drill']} | {f.get('requests', '-')} | {f.get('failures', '-')} "
            f"({retries}) | {recovery} | {quiet} / {f.get('p99_fault_ms', 0):.1f} | "
            f"{d['duration_s']:.0f} s |")


def table(results: Path) -> str:
    lines = ["| drill | requests | failures (client retries) | time to recover | "
             "p99 quiet / during fault (ms) | drill time |",
             "|---|---|---|---|---|---|"]
    for path in sorted(results.glob("[0-9]-*.json")):  # the drills' (not deployment.json)
        lines.append(row(json.loads(path.read_text())))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    print(table(Path(argv[0]) if argv else RESULTS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
