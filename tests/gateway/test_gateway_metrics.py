"""Data-plane metrics land in the default registry under the documented names and labels."""

from __future__ import annotations

import ipaddress
import random

from prometheus_client import REGISTRY

from discovery.names import ServiceKey
from federation.routing import Destination, ServiceRoute
from gateway.balancer import Balancer, OutlierPolicy
from gateway.metrics import GatewayKind, Outcome, ejection_listener, flow, record_rejection


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_connection_lifecycle_is_counted() -> None:
    labels = {
        "gateway": "ingress",
        "source_cluster": "m-east",
        "destination_service": "reviews.default",
        "destination_cluster": "m-west",
    }
    f = flow(GatewayKind.INGRESS, "m-east", "reviews.default", "m-west")
    assert flow(GatewayKind.INGRESS, "m-east", "reviews.default", "m-west") is f
    f.connection_opened()
    f.connection_opened()
    assert value("isthmus_active_connections", **labels) == 2
    f.connection_closed(Outcome.OK, 0.02, sent=100, received=5000)
    f.connection_closed(Outcome.IDLE_TIMEOUT, 3.0, sent=0, received=0)
    f.connection_failed(Outcome.CONNECT_ERROR, 0.001)
    assert value("isthmus_active_connections", **labels) == 0
    assert value("isthmus_connections_total", outcome="ok", **labels) == 1
    assert value("isthmus_connections_total", outcome="idle_timeout", **labels) == 1
    assert value("isthmus_connections_total", outcome="connect_error", **labels) == 1
    assert value("isthmus_bytes_sent_total", **labels) == 100
    assert value("isthmus_bytes_received_total", **labels) == 5000
    assert value("isthmus_request_duration_seconds_count", outcome="ok", **labels) == 1
    assert value("isthmus_request_duration_seconds_sum", outcome="idle_timeout", **labels) == 3.0


def test_requests_and_rejections() -> None:
    labels = {
        "gateway": "egress",
        "source_cluster": "r-east",
        "destination_service": "web.shop",
        "destination_cluster": "r-west",
    }
    f = flow(GatewayKind.EGRESS, "r-east", "web.shop", "r-west")
    f.request(Outcome.OK, 0.004)
    f.request(Outcome.HTTP_5XX, 0.5)
    assert value("isthmus_requests_total", outcome="ok", **labels) == 1
    assert value("isthmus_requests_total", outcome="5xx", **labels) == 1
    assert value("isthmus_request_duration_seconds_bucket", outcome="ok", le="0.005", **labels) == 1
    record_rejection(GatewayKind.INGRESS, "r-west", "no_sni")
    assert (
        value("isthmus_rejections_total", gateway="ingress", cluster="r-west", reason="no_sni") == 1
    )


def test_balancer_ejections_are_counted() -> None:
    route = ServiceRoute(
        ServiceKey("cart", "shop"),
        ipaddress.ip_address("127.240.0.9"),
        {"tcp": 5000},
        (Destination("e-west", False, healthy=1, total=1, gateways=("127.20.0.1:15443",)),),
    )
    balancer = Balancer(
        OutlierPolicy(consecutive_failures=2),
        random.Random(1),
        on_eject=ejection_listener("e-east"),
    )
    choice = balancer.pick(route)
    balancer.report_failure(choice)
    balancer.report_failure(choice)
    labels = {
        "source_cluster": "e-east",
        "destination_service": "cart.shop",
        "destination_cluster": "e-west",
        "target_kind": "gateway",
    }
    assert value("isthmus_ejections_total", **labels) == 1
