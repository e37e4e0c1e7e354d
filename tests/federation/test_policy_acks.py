"""A written traffic policy says which peers have acknowledged it (their own feed carries it
back), and every cluster lists the write, and peer state changes, as events."""

from __future__ import annotations

from .conftest import Cluster, eventually


async def test_peers_acknowledge_a_policy_and_list_it_as_an_event(
    mesh: dict[str, Cluster],
) -> None:
    a, b = mesh["a"], mesh["b"]
    await a.register("web-a", "web")

    async def peers_up() -> bool:
        _, peers = await a.call("GET", "/v1/peers")
        return all(p["state"] == "connected" for p in peers)

    await eventually(peers_up, what="a's peers connected")
    status, policy = await a.call(
        "PUT", "/v1/services/default/web/traffic", {"weights": {"a": 10, "b": 90}}
    )
    assert status == 200, policy
    assert set(policy["replication"]) == {"b", "c"}

    async def acknowledged() -> dict | None:
        _, now = await a.call("GET", "/v1/services/default/web/traffic")
        acks = now["replication"]
        done = all(r["acknowledged"] and r["version"] == policy["version"] for r in acks.values())
        return now if done else None

    now = await eventually(acknowledged, what="b and c acknowledge the policy")
    assert now["version"] == policy["version"]
    _, svc = await a.call("GET", "/v1/services/default/web")
    assert svc["traffic"]["replication"]["b"]["acknowledged"] is True

    async def listed_on_b() -> list:
        _, body = await b.call("GET", "/v1/events")
        return [e for e in body["events"]
                if e["kind"] == "policy" and e["version"] == policy["version"]]  # fmt: skip

    (event,) = await eventually(listed_on_b, what="the replicated write in b's events")
    assert event["origin"] == "a" and event["weights"] == {"a": 10, "b": 90}
    assert "written by a" in event["message"]
    # a newer write is not acknowledged until the peers carry it back
    await mesh["c"].stop()
    status, newer = await a.call(
        "PUT", "/v1/services/default/web/traffic", {"weights": {"a": 50, "b": 50}}
    )
    assert newer["replication"]["c"]["acknowledged"] is False
    assert newer["replication"]["c"]["version"] == policy["version"]

    async def c_stale_event() -> bool:
        _, body = await a.call("GET", "/v1/events")
        return any(e["kind"] == "peer" and e["cluster"] == "c" and e["state"] == "stale"
                   for e in body["events"])  # fmt: skip

    await eventually(c_stale_event, what="c's loss in a's events")
