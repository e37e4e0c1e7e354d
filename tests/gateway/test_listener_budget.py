"""The egress listener budget without sockets: which listeners fit, and which registrations the
catalog refuses because every egress would have to listen on them."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

import pytest

from discovery.embedded import EmbeddedCatalog
from discovery.errors import LimitExceeded
from discovery.model import Workload
from discovery.names import ServiceKey
from federation.routing import Destination, RoutingTable, ServiceRoute, TableHolder
from gateway.budget import ListenerAdmission, listener_budget
from gateway.vips import ListenerSpec, Mode, fit_budget

pytestmark = pytest.mark.timeout(30)


def spec(last: int, port: int) -> ListenerSpec:
    return ListenerSpec(ipaddress.ip_address(f"127.240.0.{last}"), port, Mode.L4)


def test_fit_budget_keeps_what_is_open_then_takes_addresses_in_order() -> None:
    wanted = {(s.vip, s.port): s for s in (spec(9, 1), spec(9, 2), spec(3, 2), spec(3, 1),
                                           spec(5, 1), spec(7, 1))}
    open_now = {(s.vip, s.port): s for s in (spec(9, 2), spec(7, 1))}
    chosen, skipped = fit_budget(wanted, open_now, 3)
    assert set(chosen.values()) == {spec(9, 2), spec(7, 1), spec(3, 1)}
    assert skipped == [spec(3, 2), spec(5, 1), spec(9, 1)]
    everything, none = fit_budget(wanted, {}, 10)
    assert everything == wanted and none == []


def test_the_default_budget_is_a_quarter_of_the_open_file_limit() -> None:
    assert listener_budget(None, limit=1024) == 256
    assert listener_budget(100, limit=1024) == 100
    assert listener_budget(5000, limit=1024) == 512  # never past half the limit


def workload(wid: str, service: str, ports: dict[str, int]) -> Workload:
    return Workload(wid, ServiceKey(service), "10.0.0.5", ports, "east")


async def opened(tmp_path: Path, budget: int) -> tuple[EmbeddedCatalog, TableHolder,
                                                        ListenerAdmission]:
    catalog = EmbeddedCatalog(tmp_path, "east")
    await catalog.open()
    holder = TableHolder()
    admission = ListenerAdmission(budget, "east", catalog, holder)
    catalog.admission = admission.admit
    return catalog, holder, admission


async def test_clusters_a_peer_adds_count_for_every_port(tmp_path: Path) -> None:
    """`reviews` is exported by west: its VIP and west's VIP are listened on (2 x 1 port).
    A local workload with two ports adds east's VIP and a port: 3 VIPs x 2 ports."""
    catalog, holder, admission = await opened(tmp_path, 5)
    try:
        vip = ipaddress.ip_address("127.240.0.1")
        west_vip = ipaddress.ip_address("127.240.0.2")
        route = ServiceRoute(ServiceKey("reviews"), vip, {"http": 80},
                             (Destination("west", local=False, gateways=("192.0.2.1:15443",)),),
                             cluster_vips={"west": west_vip})
        holder.publish(RoutingTable.build(1, "east", "td", [route]))
        assert admission.wanted == 2
        with pytest.raises(LimitExceeded, match="budget of 5"):
            await catalog.put(workload("r1", "reviews", {"http": 80, "tcp": 81}))
        assert catalog.workloads() == [] and admission.wanted == 2
        await catalog.put(workload("r1", "reviews", {"http": 80}))  # the same port: 3 x 1
        assert admission.wanted == 3
        admission.budget = 6
        await catalog.put(workload("r1", "reviews", {"http": 80, "tcp": 81}))
        assert admission.wanted == 6
        await catalog.delete("r1")
        assert admission.wanted == 2
    finally:
        admission.close()
        await catalog.close()


async def test_a_burst_of_registrations_cannot_slip_past_together(tmp_path: Path) -> None:
    catalog, _, admission = await opened(tmp_path, 8)
    try:
        results = await asyncio.gather(
            *(catalog.put(workload(f"w{i}", f"s{i}", {"tcp": 80})) for i in range(10)),
            return_exceptions=True,
        )
        refused = [r for r in results if isinstance(r, LimitExceeded)]
        assert len(refused) == 6 and len(catalog.workloads()) == 4  # 2 listeners each
        assert admission.wanted == 8
    finally:
        admission.close()
        await catalog.close()
