"""TLS material for the stand-in: a CA of Consul's own (not the federation's: Consul has its
own PKI), a server certificate for the stand-in's IP address, and a client certificate."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class ConsulTls:
    ca_file: str
    cert_file: str  # the client's
    key_file: str
    server: ssl.SSLContext  # requires a client certificate from the CA


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str,
          issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool = False,
          ip: str | None = None) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ip is not None:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate | None, key: ec.EllipticCurvePrivateKey | None
           ) -> str:
    data = b""
    if cert is not None:
        data += cert.public_bytes(serialization.Encoding.PEM)
    if key is not None:
        data += key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    path.write_bytes(data)
    path.chmod(0o600)
    return str(path)


def make_tls(directory: Path, host: str) -> ConsulTls:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("consul-standin-ca", ca_key, "consul-standin-ca", ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _cert("server.dc1.consul", server_key, "consul-standin-ca", ca_key, ip=host)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _cert("isthmus", client_key, "consul-standin-ca", ca_key)
    ca_file = _write(directory / "consul-ca.pem", ca, None)
    server_file = _write(directory / "server.pem", server, server_key)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca_file)
    ctx.load_cert_chain(server_file)
    ctx.verify_mode = ssl.CERT_REQUIRED  # Consul's verify_incoming
    return ConsulTls(ca_file, _write(directory / "client.pem", client, None),
                     _write(directory / "client.key", None, client_key), ctx)
