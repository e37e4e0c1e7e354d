"""The federation side of a control node: policies, the routing table, the export feed and
the peer links, wired to each other.

- the routing table is rebuilt from the catalog, the peers' exports and the policies;
- every published table updates our export feed (exported local services and their health);
- every policy change (local API write or replicated) goes into our feed, so it reaches every
  peer, and triggers a rebuild;
- every peer update merges the policies it carries (last writer wins) and its exports.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from discovery.catalog import Catalog
from discovery.errors import InvalidInput
from discovery.model import Locality
from discovery.names import ServiceKey
from federation.feed import ExportedService, ExportFeed, FeedError
from federation.hlc import HybridClock, Stamp
from federation.peering import (
    UNREACHABLE_AFTER,
    FeedServer,
    PeerLink,
    PeerState,
    PeerStatus,
    StatusHandler,
    aclose_all,
)
from federation.policy import PolicyStore, TrafficPolicy, validate_weights
from federation.routing import RoutingTable, TableHolder
from federation.table import Imports, TableBuilder
from federation.trust import TlsCredentials

log = logging.getLogger(__name__)


class Federation:
    def __init__(
        self,
        *,
        cluster: str,
        trust_domain: str,
        locality: Locality,
        data_dir: str | Path,
        catalog: Catalog,
        holder: TableHolder,
        peers: Sequence[tuple[str, str]] = (),
        export: Sequence[str] = ("*.default",),
        public_address: str | None = None,
        credentials: TlsCredentials | None = None,
        peer_unreachable_after: float | None = UNREACHABLE_AFTER,
    ) -> None:
        self.cluster = cluster
        self.peer_unreachable_after = peer_unreachable_after
        self.locality = locality
        self.catalog = catalog
        self.holder = holder
        self.peer_addresses = dict(peers)
        self.export_globs = tuple(export)
        self.credentials = credentials
        self.clock = HybridClock(cluster)
        self.policies = PolicyStore(data_dir, self.clock)
        self.imports = Imports()
        self.builder = TableBuilder(
            catalog,
            holder,
            cluster=cluster,
            trust_domain=trust_domain,
            locality=locality,
            exported=self.is_exported,
            policies=self.policies,
            imports=self.imports,
            known_clusters=self.known_clusters,
        )
        self.feed = ExportFeed(
            cluster, locality.to_json(), [public_address] if public_address else []
        )
        self.feed_server = FeedServer(self.feed, cluster, lambda: self.peer_addresses.keys())
        self.links: list[PeerLink] = []
        self._exported_from: Mapping[ServiceKey, Any] = {}
        self._unsubscribe: list[Any] = []
        self._status_listeners: list[StatusHandler] = []
        # The newest version of each service's policy that each peer's own feed carries: a peer
        # republishes a policy once it has stored it, so that is its acknowledgement.
        self.acknowledged: dict[ServiceKey, dict[str, Stamp]] = {}

    def is_exported(self, service: ServiceKey) -> bool:
        name = str(service)
        return any(fnmatch.fnmatchcase(name, g) for g in self.export_globs)

    def known_clusters(self) -> frozenset[str]:
        return frozenset({self.cluster, *self.peer_addresses})

    async def start(self) -> None:
        await self.policies.open()
        for p in self.policies.all():
            self.feed.set_policy(str(p.service), p.to_json())
        self._unsubscribe.append(self.policies.subscribe(self._on_policy))
        self._unsubscribe.append(self.holder.subscribe(self._on_table))
        await self.builder.start()
        self._on_table(self.holder.current)
        if self.credentials is not None:
            for peer, address in sorted(self.peer_addresses.items()):
                link = PeerLink(
                    self.cluster, peer, address, self.credentials, self._on_peer,
                    on_status=self._on_status, unreachable_after=self.peer_unreachable_after,
                )
                link.start()
                self.links.append(link)
        elif self.peer_addresses:
            log.warning(
                "peers configured but this node has no identity: not peering",
                extra={"peers": sorted(self.peer_addresses)},
            )

    async def close_links(self) -> None:
        """End every peering stream, ours and our subscribers'."""
        await aclose_all(self.links)
        await self.feed_server.close()

    async def stop(self) -> None:
        for u in self._unsubscribe:
            u()
        await self.close_links()
        await self.builder.stop()
        await self.policies.close()

    # -- reactions ---------------------------------------------------------------------------
    def _on_table(self, table: RoutingTable) -> None:
        # Snapshots share unchanged route objects: only routes that are new objects (or gone)
        # can change what we export, so a one-service change costs one service here.
        previous = self._exported_from
        self._exported_from = table.services
        changed: dict[str, ExportedService | None] = {}
        for key, route in table.services.items():
            if previous.get(key) is route:
                continue
            local = route.destination(self.cluster)
            if route.exported and local is not None:
                changed[str(key)] = ExportedService(
                    key.name, key.namespace, dict(route.ports), local.healthy, local.total
                )
            else:
                changed[str(key)] = None
        for key in previous.keys() - table.services.keys():
            changed[str(key)] = None
        self.feed.update_services(changed)

    def _on_policy(self, policy: TrafficPolicy) -> None:
        self.feed.set_policy(str(policy.service), policy.to_json())
        self.builder.invalidate({policy.service})

    def on_peer_status(self, listener: StatusHandler) -> Callable[[], None]:
        """Call `listener` whenever a peer's status changes; returns the unsubscribe call."""
        self._status_listeners.append(listener)
        return lambda: self._status_listeners.remove(listener)

    def _on_status(self, state: PeerState, was: PeerStatus) -> None:
        for listener in list(self._status_listeners):
            listener(state, was)

    def _acknowledge(self, peer: str, policy: TrafficPolicy) -> None:
        if peer not in self.peer_addresses:
            return
        acks = self.acknowledged.setdefault(policy.service, {})
        if acks.get(peer) is None or acks[peer] < policy.stamp:
            acks[peer] = policy.stamp

    def acknowledgements(self, service: ServiceKey) -> dict[str, str | None]:
        """For each peer, the newest version of `service`'s policy its feed carries (None:
        none yet)."""
        acks = self.acknowledged.get(service, {})
        return {
            peer: (str(acks[peer]) if peer in acks else None)
            for peer in sorted(self.peer_addresses)
        }

    async def _on_peer(self, state: PeerState, msg: dict[str, Any]) -> None:
        assert state.feed is not None
        for raw in msg.get("policies", []):
            try:
                policy = TrafficPolicy.from_json(raw)
            except (ValueError, InvalidInput) as e:
                raise FeedError(f"policy from {state.cluster}: {e}") from None
            await self.policies.merge(policy)
            self._acknowledge(state.cluster, policy)
        previous = self.imports.feeds.get(state.cluster)
        self.imports.feeds[state.cluster] = (state.address, state.feed)
        if msg.get("type") == "delta" and previous is not None and "gateways" not in msg:
            keys = set()
            for name in msg.get("services", {}):
                with contextlib.suppress(ValueError):
                    keys.add(ServiceKey.parse(name))
            self.builder.invalidate(keys)
        else:
            self.builder.invalidate()

    # -- API -----------------------------------------------------------------------------------
    async def set_policy(self, service: ServiceKey, body: object) -> TrafficPolicy:
        if not isinstance(body, dict):
            raise InvalidInput("expected a JSON object body")
        unknown = set(body) - {"weights", "failover"}
        if unknown:
            field = sorted(unknown)[0]
            raise InvalidInput(f"{field}: unknown field", field=field)
        weights = validate_weights(body.get("weights"), self.known_clusters())
        failover = body.get("failover", True)
        if not isinstance(failover, bool):
            raise InvalidInput(
                f"failover: expected true or false, got {failover!r}", field="failover"
            )
        return await self.policies.set(service, weights, failover)

    def peers(self) -> list[PeerState]:
        return [link.state for link in self.links]
