"""The console's server side: static files without a token, their headers, the new read
routes (token scopes, events, edges, per-service requests) and the figures behind them."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, generate_latest

from gateway import metrics
from gateway.metrics import GatewayKind, Outcome, flow
from isthmus import config as configmod
from isthmus.appliance import Appliance
from isthmus.console import load_console
from isthmus.events import EventLog, watch_handshakes
from isthmus.traffic import TrafficHistory, quantile

from .conftest import ApiSession, make_config


def _read_token(tmp: Path) -> tuple[Path, str]:
    path = tmp / "read-token"
    path.write_text("a-read-only-token-for-tests\n")
    path.chmod(0o600)
    return path, "a-read-only-token-for-tests"


@pytest.fixture
async def console(tmp_path: Path):
    path, read = _read_token(tmp_path)
    cfg = configmod.validate(
        make_config(tmp_path, api={"tokens": [{"token_file": str(path), "scopes": ["read"]}]})
    )
    app = Appliance(cfg)
    await app.start()
    s = ApiSession(app.api_url, Path(cfg.api.token_file).read_text().strip())
    try:
        yield app, s, read
    finally:
        await s.close()
        await app.stop()


async def test_the_console_loads_without_a_token_with_strict_headers(console) -> None:
    _app, api, _ = console
    status, body, r = await api.call("GET", "/ui/", token="")
    assert status == 200 and r.content_type == "text/html"
    assert '<script type="module" src="app.js">' in body
    csp = r.headers["Content-Security-Policy"]
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    assert "frame-ancestors 'none'" in csp
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    for name in ("app.js", "api.js", "style.css", "icon.svg"):
        status, _, r = await api.call("GET", f"/ui/{name}", token="")
        assert status == 200, name
        assert r.headers["Content-Security-Policy"] == csp
        assert r.headers["X-Content-Type-Options"] == "nosniff"
    status, _, r = await api.call("GET", "/ui/app.js", token="")
    assert r.content_type == "text/javascript"
    # ETag revalidation: an unchanged file is not sent again
    status, _, _again = await api.call(
        "GET", "/ui/app.js", token="", headers={"If-None-Match": r.headers["ETag"]}
    )
    assert status == 304
    status, _, r = await api.call("GET", "/ui", token="", allow_redirects=False)
    assert status == 301 and r.headers["Location"] == "/ui/"


async def test_the_console_holds_no_secret_and_serves_only_its_own_files(console) -> None:
    _app, api, read = console
    for asset in load_console().assets.values():
        text = asset.body.decode()
        assert api.token not in text and read not in text
        assert "innerHTML" not in text and "outerHTML" not in text  # text goes in as text
        assert not re.search(r"\beval\(|new Function\(|document\.cookie", text)
    for path in ("/ui/%2e%2e%2fapi-token", "/ui/nothing.js",
                 "/ui/.hidden", "/ui/console.py"):
        status, _body, _ = await api.call("GET", path, token="")
        assert status == 404, path
    # the API around it still needs a token
    status, _, _ = await api.call("GET", "/v1/events", token="")
    assert status == 401


async def test_the_console_can_be_turned_off(tmp_path: Path) -> None:
    cfg = configmod.validate(make_config(tmp_path, api={"console": False}))
    app = Appliance(cfg)
    await app.start()
    api = ApiSession(app.api_url, "")
    try:
        status, _, _ = await api.call("GET", "/ui/")
        assert status == 404
    finally:
        await api.close()
        await app.stop()


async def test_token_route_says_what_the_caller_may_do(console) -> None:
    _, api, read = console
    status, body, _ = await api.call("GET", "/v1/token")
    assert status == 200 and body["scopes"] == ["admin"] and body["can"]["traffic"] is True
    status, body, _ = await api.call("GET", "/v1/token", token=read)
    assert body == {"scopes": ["read"],
                    "can": {"read": True, "workloads": False, "traffic": False, "tokens": False}}
    status, _, _ = await api.call(
        "PUT", "/v1/services/default/web/traffic", {"weights": {"east": 1}}, token=read
    )
    assert status == 403


async def test_a_health_change_is_an_event_and_wakes_a_blocking_query(console) -> None:
    _, api, _ = console
    status, first, r = await api.call("GET", "/v1/events")
    assert status == 200 and first["capacity"] == 1000
    index = int(r.headers["X-Isthmus-Index"])
    status, _, _ = await api.call(
        "PUT", "/v1/workloads/web-1",
        {"service": "web", "address": "127.0.0.1", "ports": {"http": 9}, "check": {"ttl": "30s"},
         "labels": {"note": "<b>x</b>"}},
    )  # fmt: skip
    assert status == 201
    waiter = asyncio.create_task(api.call("GET", f"/v1/events?index={index}&wait=20s"))
    await asyncio.sleep(0.2)
    assert not waiter.done()  # registration alone is no event: the query is still blocking
    status, _, _ = await api.call("PUT", "/v1/workloads/web-1/heartbeat")
    assert status == 200
    status, body, _ = await asyncio.wait_for(waiter, 20)
    (event,) = body["events"]
    assert event["kind"] == "health" and event["workload"] == "web-1"
    assert (event["previous"], event["health"]) == ("unknown", "passing")
    assert event["index"] == body["index"] > index


async def test_edges_and_service_requests_are_served_as_json(console) -> None:
    _app, api, _ = console
    status, body, r = await api.call("GET", "/v1/edges?window=30s")
    assert status == 200 and body["cluster"] == "east" and isinstance(body["edges"], list)
    assert "X-Isthmus-Index" in r.headers
    status, body, _ = await api.call("GET", "/v1/edges?window=10m")
    assert status == 400 and body["field"] == "window"
    status, body, _ = await api.call("GET", "/v1/services/default/web/requests")
    assert status == 200 and set(body) >= {"times", "egress", "ingress", "tick", "span"}


# --- the figures behind them ---------------------------------------------------------------


def test_quantile_interpolates_like_prometheus() -> None:
    bounds = (0.1, 0.2, 0.4)
    assert quantile(0.5, [0, 10, 0, 0], bounds) == pytest.approx(0.15)
    assert quantile(0.99, [100, 0, 0, 0], bounds) == pytest.approx(0.099)
    assert quantile(0.99, [0, 0, 0, 5], bounds) == 0.4  # the +Inf bucket: the top bound
    assert quantile(0.99, [0, 0, 0, 0], bounds) != quantile(0.99, [0, 0, 0, 0], bounds)  # NaN


def test_history_reports_rate_errors_and_p99_of_this_clusters_edges() -> None:
    now = [1000.0]
    history = TrafficHistory("hist-a", tick=5.0, span=60.0, clock=lambda: now[0])
    history.prime()
    out = flow(GatewayKind.EGRESS, "hist-a", "web.default", "hist-b")
    for _ in range(90):
        out.request(Outcome.OK, 0.004)
    for _ in range(10):
        out.request(Outcome.HTTP_5XX, 0.2)
    out.request(Outcome.HTTP_4XX, 0.004)  # the client's answer, not an error of the path
    flow(GatewayKind.INGRESS, "hist-b", "web.default", "hist-a").connection_failed(
        Outcome.REFUSED, 0.001
    )
    flow(GatewayKind.EGRESS, "hist-z", "web.default", "hist-b").request(Outcome.OK, 1)  # not ours
    now[0] += 5
    history.sample()
    assert history.index == 1
    edges = {(e["gateway"], e["source"], e["destination"]): e for e in history.edges(60)["edges"]}
    assert set(edges) == {("egress", "hist-a", "hist-b"), ("ingress", "hist-b", "hist-a")}
    e = edges[("egress", "hist-a", "hist-b")]
    assert (e["requests"], e["errors"]) == (101, 10)
    assert e["rate"] == pytest.approx(101 / 5)
    assert e["error_rate"] == pytest.approx(10 / 101, abs=1e-4)
    assert 100 < e["p99_ms"] <= 250  # the 5xx took 200 ms: p99 falls in (100, 250] ms
    assert edges[("ingress", "hist-b", "hist-a")]["error_rate"] == 1.0
    series = history.service("web.default")
    assert series["egress"]["hist-b"]["requests"] == [101]
    assert series["ingress"]["hist-b"]["errors"] == [1]
    # quiet ticks: the figures age out and the index stops moving once nothing is left
    for _ in range(12):
        now[0] += 5
        history.sample()
    moved = history.index
    now[0] += 5
    history.sample()
    assert history.edges(60)["edges"] == [] and history.index == moved


def test_edge_metrics_are_exposed_with_bounded_labels(monkeypatch) -> None:
    flow(GatewayKind.EGRESS, "expo-a", "web.default", "expo-b").request(Outcome.OK, 0.003)
    text = generate_latest(REGISTRY).decode()
    assert ('isthmus_edge_requests_total{destination_cluster="expo-b",gateway="egress",'
            'result="ok",source_cluster="expo-a"} 1.0') in text
    assert 'isthmus_edge_request_duration_seconds_bucket{destination_cluster="expo-b"' in text
    # past MAX_EDGES, new label sets are counted under "other"
    monkeypatch.setattr(metrics, "_EDGES", {})
    monkeypatch.setattr(metrics, "MAX_EDGES", 2)
    for i in range(5):
        metrics.Flow(("egress", "cap-a", "web.default", f"cap-{i}")).request(Outcome.OK, 0.001)
    assert set(metrics.edges()) == {("egress", "cap-a", "cap-0"), ("egress", "cap-a", "cap-1"),
                                    ("egress", "other", "other")}
    assert metrics.edges()[("egress", "other", "other")][0] == 3


async def test_refused_handshakes_are_events_at_most_a_burst_per_window() -> None:
    from federation.trust import errors, observe

    now = [0.0]
    events = EventLog(50, burst=3, burst_window=10.0, clock=lambda: now[0])
    unsubscribe = watch_handshakes(events)
    try:
        for i in range(10):
            observe.count_failure(errors.UntrustedRoot(f"bad root {i}"), "server", f"10.0.0.{i}")
    finally:
        unsubscribe()
    listed, _ = events.since(0)
    assert [e.fields["peer"] for e in listed] == ["10.0.0.0", "10.0.0.1", "10.0.0.2"]
    now[0] += 11
    events.flush()
    listed, _ = events.since(3)
    assert listed[0].fields["suppressed"] == 7


def test_the_event_ring_is_bounded_and_says_what_it_lost() -> None:
    events = EventLog(10)
    for i in range(25):
        events.add("policy", f"write {i}", text="x" * 5000)
    held, truncated = events.since(0)
    assert len(held) == 10 and truncated and held[0].index == 16
    assert len(held[0].fields["text"]) < 600  # free text is clipped
    assert events.since(20) == (held[5:], False)


def test_every_console_file_is_packaged_and_served() -> None:
    """pyproject's package-data takes every file under isthmus/ui/ into the wheel, and the
    console serves each (a file missing from either is a page that breaks when installed)."""
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parents[2]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["isthmus"]
    files = sorted(p.name for p in (root / "isthmus" / "ui").iterdir() if p.is_file())
    assert files, "no console files"
    for name in files:
        assert any(fnmatch.fnmatch(f"ui/{name}", pat) for pat in patterns), name
    assert sorted(load_console().assets) == files
    # what index.html and the modules load is there
    html = (root / "isthmus" / "ui" / "index.html").read_text()
    for ref in re.findall(r'(?:src|href)="([^"#:]+)"', html):
        assert ref in files, ref
    for js in (n for n in files if n.endswith(".js")):
        for ref in re.findall(r'from "\./([^"]+)"', (root / "isthmus" / "ui" / js).read_text()):
            assert ref in files, (js, ref)
