"""The last-known catalog, kept under `data_dir` so that an appliance started while Consul is
unreachable serves what it last saw (marked stale) instead of nothing.

One JSON file, `consul-catalog.json`, 0600, replaced atomically (written aside, fsynced,
renamed). A file that does not parse, or entries that do not validate, are skipped with a log
line: the snapshot is a cache, Consul is the record.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from discovery.catalog import IPAddress
from discovery.consul.mapping import Instance
from discovery.embedded import _Interner, parse_record, workload_record
from discovery.model import Health, WorkloadState
from discovery.statefiles import fsync_dir

log = logging.getLogger(__name__)

FILE_NAME = "consul-catalog.json"
VERSION = 1


@dataclass(frozen=True, slots=True)
class Snapshot:
    instances: list[Instance]
    vips: dict[str, IPAddress]
    saved: float


def save(path: Path, instances: list[Instance], vips: dict[str, IPAddress]) -> None:
    body = {
        "version": VERSION,
        "saved": time.time(),
        "vips": {k: str(v) for k, v in sorted(vips.items())},
        "instances": [
            {
                "name": i.consul_name, "node": i.node, "sid": i.service_id,
                "registered": i.registered, "rev": i.rev, "maintenance": i.maintenance,
                "id": i.id, "record": workload_record(i.state.workload),
                "health": i.state.health.value, "output": i.state.output,
            }
            for i in instances
        ],
    }
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(body, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def load(path: Path) -> Snapshot | None:
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.error("consul catalog snapshot unreadable, ignored",
                  extra={"path": str(path), "error": str(e)})
        return None
    if not isinstance(body, dict) or body.get("version") != VERSION:
        log.error("consul catalog snapshot of an unknown version, ignored",
                  extra={"path": str(path)})
        return None
    intern = _Interner()
    instances, skipped = [], 0
    for raw in body.get("instances") or []:
        try:
            instances.append(_instance(raw, intern))
        except (ValueError, TypeError, KeyError):
            skipped += 1
    vips: dict[str, IPAddress] = {}
    for key, value in (body.get("vips") or {}).items():
        try:
            vips[str(key)] = ipaddress.ip_address(value)
        except ValueError:
            skipped += 1
    if skipped:
        log.warning("consul catalog snapshot entries skipped",
                    extra={"path": str(path), "skipped": skipped})
    saved = body.get("saved")
    return Snapshot(instances, vips, saved if isinstance(saved, int | float) else 0.0)


def _instance(raw: Any, intern: Any) -> Instance:
    workload = parse_record(str(raw["id"]), raw["record"], intern)
    state = WorkloadState(workload, Health(raw["health"]), str(raw["output"]))
    return Instance(
        consul_name=str(raw["name"]), node=str(raw["node"]), service_id=str(raw["sid"]),
        state=state, registered=bool(raw["registered"]), rev=str(raw["rev"]),
        maintenance=bool(raw["maintenance"]),
    )
