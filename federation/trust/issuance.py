"""Identity issuance over the control listener (`control.listen`, default 0.0.0.0:15012).

`POST /v1/identity` with `{"csr": PEM, "node": NAME, "kind": "agent"|"gateway"}` signs the CSR
for `spiffe://<td>/cluster/<this cluster>/<kind>/<node>`, authorized by either
- `Authorization: Bearer <one-time bootstrap token>` (a node's first identity): only the kind
  the token was made for, only its node if it names one, and never an identity that is live
  (see `federation.trust.live`); or
- the caller's current, valid client certificate, which may only renew its own SPIFFE ID.
Everything is checked before a token is spent, and a token is spent only with the certificate
signed. It answers `{"spiffe_id", "certificate_chain": PEM, "bundle": PEM, "expires"}`. The
private key never travels: the caller keeps it and sends only the CSR.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client import Counter

from discovery.addresses import AddressError, split_host_port
from discovery.names import LABEL_EXPECTED, is_label
from federation.trust.bundle import TrustBundle
from federation.trust.ca import (
    IDENTITY_LIFETIME,
    CertificateAuthority,
    Identity,
    PrivateKey,
    check_csr,
    make_csr,
    sign_csr,
)
from federation.trust.contexts import client_context
from federation.trust.errors import (
    BootstrapTokenRefused,
    CsrRejected,
    IssuanceError,
    PeerVerificationError,
    PkiError,
    TrustError,
)
from federation.trust.live import ISSUED_FILENAME, LiveIdentities
from federation.trust.observe import record_failure
from federation.trust.pemfiles import certs_pem
from federation.trust.spiffe import Kind, SpiffeId
from federation.trust.tokens import BootstrapTokens, TokenGrant
from federation.trust.verify import verify_chain, verify_peer

log = logging.getLogger(__name__)

ROUTE = "/v1/identity"
MAX_BODY = 64 * 1024
REQUEST_TIMEOUT = 10.0

ISSUED = Counter(
    "isthmus_identities_issued_total",
    "Identities signed by this control node, by kind and how the caller authenticated",
    ["cluster", "kind", "auth"],
)
REFUSED = Counter(
    "isthmus_identity_requests_refused_total",
    "Identity requests this control node refused, by reason",
    ["reason"],
)


@dataclass(frozen=True, slots=True)
class IssueRequest:
    csr: x509.CertificateSigningRequest
    node: str
    kind: Kind


def parse_request(body: object) -> IssueRequest:
    """Validate a request body; IssuanceError(422, field) names the first bad field."""
    if not isinstance(body, dict):
        raise IssuanceError("the body must be a JSON object", status=400)
    node, kind, csr = body.get("node"), body.get("kind", "agent"), body.get("csr")
    if not is_label(node):
        raise IssuanceError(f"node must be {LABEL_EXPECTED}", status=422, field="node")
    if kind not in {k.value for k in Kind}:
        raise IssuanceError("kind must be 'agent' or 'gateway'", status=422, field="kind")
    if not isinstance(csr, str):
        raise IssuanceError("csr must be a PEM certificate request", status=422, field="csr")
    try:
        parsed = x509.load_pem_x509_csr(csr.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise IssuanceError(
            "csr is not a PEM certificate request", status=422, field="csr"
        ) from None
    assert isinstance(node, str)
    return IssueRequest(parsed, node, Kind(kind))


class IdentityIssuer:
    """The control node's issuing state: its cluster CA (swappable after a CA re-issue),
    the current bundle, the bootstrap tokens and which identities are live.

    `own_identity`: the control node's own; its node name is never minted from a token.
    `live`: shared with the agent channel (`AgentHub(..., live=issuer.live)`) so connected
    agents count as live; by default issued identities are kept next to the tokens."""

    def __init__(
        self,
        authority: CertificateAuthority,
        tokens: BootstrapTokens,
        bundle: Callable[[], TrustBundle],
        *,
        lifetime: dt.timedelta = IDENTITY_LIFETIME,
        own_identity: SpiffeId | None = None,
        live: LiveIdentities | None = None,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.authority = authority
        self.tokens = tokens
        self.bundle = bundle
        self.lifetime = lifetime
        self.live = live or LiveIdentities(tokens.path.parent / ISSUED_FILENAME, clock=clock)
        if own_identity is not None and own_identity.node is not None:
            self.live.reserved_nodes.add(own_identity.node)

    @property
    def cluster_id(self) -> SpiffeId:
        return self.authority.spiffe_id

    def issue(
        self, req: IssueRequest, *, token: str | None, peer: SpiffeId | None
    ) -> tuple[SpiffeId, tuple[x509.Certificate, ...]]:
        """Authorize and sign. Exactly one of `token` / `peer` is the caller's credential.

        Every check runs before the token is spent: the CSR (422), the token (401), what it
        is bound to (403), whether the identity is live (409). The token is spent, atomically
        with the other holders of the token file, only once the certificate is signed.
        Synchronous on purpose: two requests for one node cannot interleave between the
        liveness check and the record of the issued identity."""
        ca_id = self.cluster_id
        wanted = SpiffeId.for_node(ca_id.trust_domain, ca_id.cluster, req.kind, req.node)
        try:
            check_csr(req.csr)
            if token is not None:
                try:
                    cert = self.tokens.redeem(token, lambda g: self._sign_for_token(g, wanted, req))
                except BootstrapTokenRefused as exc:
                    raise _refused("bad_token", str(exc), 401) from None
                auth = "token"
            elif peer is not None:
                if peer != wanted:
                    raise _refused("not_self", f"{peer} may only renew its own identity", 403)
                cert = self._sign(req, wanted)
                self.live.record(wanted, cert.not_valid_after_utc)
                auth = "identity"
            else:
                raise _refused(
                    "no_credential", "a bootstrap token or a client certificate is required", 401
                )
        except CsrRejected as exc:
            raise _refused("bad_csr", str(exc), 422, "csr") from None
        except IssuanceError as exc:
            log.info(
                "identity request refused id=%s status=%s: %s",
                wanted,
                exc.status,
                exc,
                extra={"spiffe_id": str(wanted), "status": exc.status, "error": str(exc)},
            )
            raise
        ISSUED.labels(cluster=ca_id.cluster, kind=req.kind.value, auth=auth).inc()
        log.info(
            "identity issued id=%s auth=%s serial=%x",
            wanted,
            auth,
            cert.serial_number,
            extra={"spiffe_id": str(wanted), "auth": auth, "serial": f"{cert.serial_number:x}"},
        )
        return wanted, (cert, self.authority.cert)

    def _sign_for_token(
        self, grant: TokenGrant, wanted: SpiffeId, req: IssueRequest
    ) -> x509.Certificate:
        """Called with the token file locked: raising here leaves the token unspent."""
        if grant.kind is not req.kind:
            raise _refused(
                "wrong_kind",
                f"this bootstrap token mints only {grant.kind.value} identities, not "
                f"{req.kind.value} ones (a token for that: isthmus token create --kind "
                f"{req.kind.value} --node NAME)",
                403,
                "kind",
            )
        if grant.node is not None and grant.node != req.node:
            raise _refused(
                "wrong_node",
                f"this bootstrap token is bound to node {grant.node}, not {req.node}",
                403,
                "node",
            )
        why = self.live.refusal(wanted, bound=grant.node is not None)
        if why is not None:
            raise _refused("live", f"{wanted} is in use: {why}", 409, "node")
        cert = self._sign(req, wanted)
        # recorded before the token is spent: if that write fails, nothing was handed out
        self.live.record(wanted, cert.not_valid_after_utc)
        return cert

    def _sign(self, req: IssueRequest, wanted: SpiffeId) -> x509.Certificate:
        return sign_csr(self.authority, req.csr, wanted, lifetime=self.lifetime)


def _refused(reason: str, message: str, status: int, field: str | None = None) -> IssuanceError:
    REFUSED.labels(reason=reason).inc()
    return IssuanceError(message, status=status, field=field)


def _error(status: int, message: str, field: str | None = None) -> web.Response:
    body: dict[str, Any] = {"error": message}
    if field is not None:
        body["field"] = field
    return web.json_response(body, status=status)


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else ""


def _peer_identity(request: web.Request, issuer: IdentityIssuer) -> SpiffeId | None:
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None or not ssl_object.getpeercert(binary_form=True):
        return None
    ca_id = issuer.cluster_id
    try:
        return verify_peer(
            ssl_object, issuer.bundle(), ca_id.trust_domain, expected_cluster=ca_id.cluster
        )
    except PeerVerificationError as err:
        peer = request.remote
        record_failure(err, side="server", peer=peer)
        raise IssuanceError(f"client certificate refused: {err.reason}", status=403) from None


def issuance_routes(issuer: IdentityIssuer) -> list[web.RouteDef]:
    async def post_identity(request: web.Request) -> web.Response:
        token = _bearer(request)
        try:
            peer = _peer_identity(request, issuer)
            if token is None and peer is None:
                raise IssuanceError(
                    "a bootstrap token or a client certificate is required", status=401
                )
            if token == "":
                raise IssuanceError("Authorization must be 'Bearer <token>'", status=401)
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                raise IssuanceError("the body is not JSON (or nests too deeply)", status=400) \
                    from None
            req = parse_request(body)
            sid, chain = issuer.issue(req, token=token, peer=None if token else peer)
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"the body exceeds {MAX_BODY} bytes")
        except IssuanceError as exc:
            return _error(exc.status or 500, str(exc), exc.field)
        except PkiError as exc:  # its token or issued-identities file: unreadable, disk full
            log.error("identity issuance unavailable", extra={"error": str(exc)})
            return _error(503, f"this control node cannot issue identities now: {exc}")
        return web.json_response(
            {
                "spiffe_id": str(sid),
                "certificate_chain": certs_pem(chain).decode("ascii"),
                "bundle": issuer.bundle().to_pem().decode("ascii"),
                "expires": chain[0].not_valid_after_utc.isoformat(),
            }
        )

    return [web.post(ROUTE, post_identity)]


def issuance_app(issuer: IdentityIssuer) -> web.Application:
    """The app for the control listener; serve it with
    `credentials.listener_context(require_client_cert=False)` so agents can bootstrap."""
    app = web.Application(client_max_size=MAX_BODY)
    app.add_routes(issuance_routes(issuer))
    return app


# --- client side -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IssuedIdentity:
    identity: Identity
    bundle: TrustBundle


async def request_identity(
    control_addr: str,
    node: str,
    kind: Kind | str,
    key: PrivateKey,
    *,
    bundle: TrustBundle,
    bootstrap_token: str | None = None,
    identity: Identity | None = None,
    trust_domain: str | None = None,
    cluster: str | None = None,
    timeout: float = REQUEST_TIMEOUT,
) -> IssuedIdentity:
    """Ask the cluster's control node (`host:port`) to sign a CSR for `key`.

    Authenticate with `bootstrap_token` (then `trust_domain` and `cluster` say where) or with
    the current `identity` (mTLS). The control node must prove it belongs to that cluster.
    Raises IssuanceError (with the server's status and field) or a TrustError.
    """
    if identity is not None:
        trust_domain, cluster = identity.spiffe_id.trust_domain, identity.spiffe_id.cluster
    if bootstrap_token is None and identity is None:
        raise ValueError("request_identity needs a bootstrap token or a current identity")
    if trust_domain is None or cluster is None:
        raise ValueError("bootstrapping needs the trust domain and the cluster")
    wanted = SpiffeId.for_node(trust_domain, cluster, kind, node)
    csr = make_csr(key, wanted)
    body = {
        "csr": csr.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        "node": node,
        "kind": wanted.kind.value if wanted.kind else "agent",
    }
    payload = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if bootstrap_token is not None and identity is None:
        headers["Authorization"] = f"Bearer {bootstrap_token}"
    ctx = client_context(identity, bundle)
    host, port = _split_addr(control_addr)
    try:
        async with asyncio.timeout(timeout):
            status, answer = await _post(
                host, port, ctx, payload, headers, bundle, trust_domain, cluster, control_addr
            )
    except (OSError, ssl.SSLError, TimeoutError) as exc:
        raise IssuanceError(f"cannot reach control node {control_addr}: {exc}") from None
    try:
        parsed = json.loads(answer)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise IssuanceError(
            f"{control_addr} answered {status} without JSON", status=status
        ) from None
    if status != 200 or not isinstance(parsed, dict):
        msg = parsed.get("error") if isinstance(parsed, dict) else None
        field = parsed.get("field") if isinstance(parsed, dict) else None
        raise IssuanceError(
            f"{control_addr} refused the identity request ({status}): {msg}",
            status=status,
            field=field,
        )
    return _accept_response(parsed, key, wanted, control_addr)


def _split_addr(addr: str) -> tuple[str, int]:
    try:
        return split_host_port(addr)
    except AddressError:
        raise ValueError(f"control address {addr!r} is not HOST:PORT") from None


async def _post(
    host: str,
    port: int,
    ctx: ssl.SSLContext,
    payload: bytes,
    headers: dict[str, str],
    bundle: TrustBundle,
    trust_domain: str,
    cluster: str,
    control_addr: str,
) -> tuple[int, bytes]:
    """One HTTP/1.1 POST over a connection whose server identity is verified *before* the
    request (and its bootstrap token) is sent - an HTTP client library would send first."""
    reader, writer = await asyncio.open_connection(host, port, ssl=ctx)
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        try:
            verify_peer(ssl_object, bundle, trust_domain, expected_cluster=cluster)
        except PeerVerificationError as err:
            record_failure(err, side="client", peer=control_addr)
            raise
        head = [f"POST {ROUTE} HTTP/1.1", f"Host: {control_addr}", "Connection: close"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        head.append(f"Content-Length: {len(payload)}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload)
        await writer.drain()
        return _parse_response(await reader.read(MAX_RESPONSE + 1), control_addr)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


MAX_RESPONSE = 256 * 1024


def _parse_response(raw: bytes, control_addr: str) -> tuple[int, bytes]:
    if len(raw) > MAX_RESPONSE:
        raise IssuanceError(f"{control_addr} sent more than {MAX_RESPONSE} bytes")
    head, sep, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if not sep or len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise IssuanceError(f"{control_addr} sent a malformed HTTP response")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    if fields.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body, control_addr)
    elif "content-length" in fields:
        body = body[: int(fields["content-length"])]
    return int(parts[1]), body


def _dechunk(data: bytes, control_addr: str) -> bytes:
    out, pos = bytearray(), 0
    while True:
        end = data.find(b"\r\n", pos)
        try:
            size = int(data[pos:end].split(b";")[0], 16)
        except ValueError:
            raise IssuanceError(f"{control_addr} sent a malformed chunked body") from None
        if end < 0 or size == 0:
            return bytes(out)
        out += data[end + 2 : end + 2 + size]
        pos = end + 2 + size + 2


def _accept_response(
    payload: dict[str, Any], key: PrivateKey, wanted: SpiffeId, control_addr: str
) -> IssuedIdentity:
    """Check what came back before trusting it: our key, our ID, a chain the bundle accepts."""
    try:
        chain = tuple(x509.load_pem_x509_certificates(str(payload["certificate_chain"]).encode()))
        new_bundle = TrustBundle.from_pem(str(payload["bundle"]).encode())
        identity = Identity(key, chain)
        sid = verify_chain(chain, new_bundle, wanted.trust_domain, expected_cluster=wanted.cluster)
    except (KeyError, ValueError, PkiError) as exc:
        raise IssuanceError(f"{control_addr} sent an unusable identity: {exc}") from None
    except TrustError as exc:
        raise IssuanceError(
            f"{control_addr} sent an identity that does not verify: {exc}"
        ) from None
    if sid != wanted:
        raise IssuanceError(f"{control_addr} issued {sid}, not {wanted}")
    return IssuedIdentity(identity, new_bundle)
