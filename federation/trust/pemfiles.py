"""PEM files: private keys are created 0600 (never chmod-ed after the fact) and never
overwritten unless `force`; replacements are atomic so a reader sees the old or the new file.

Durable too: the file is fsynced before it is renamed into place, and the directory after, so a
power cut cannot bring back the old file (for the bootstrap-token file: a spent token)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from discovery.statefiles import fsync_dir
from federation.trust.bundle import TrustBundle
from federation.trust.ca import CertificateAuthority, Identity, PrivateKey
from federation.trust.errors import KeyExists, PkiError

KEY_MODE = 0o600
CERT_MODE = 0o644


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def certs_pem(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def write_file(path: Path, data: bytes, mode: int, *, force: bool = False) -> None:
    """Write `data` to `path`, created with `mode`. Without `force` an existing file is an
    error; with it the file is replaced atomically (temp file + rename in the same directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not force:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            raise KeyExists(f"{path} exists; pass --force to replace it") from None
        _write_all(fd, data)
        fsync_dir(path.parent)
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        _write_all(fd, data)
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the rename is durable only once the directory is
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _write_all(fd: int, data: bytes) -> None:
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_key(path: Path, key: PrivateKey, *, force: bool = False) -> None:
    write_file(path, key_pem(key), KEY_MODE, force=force)


def write_certs(path: Path, certs: Sequence[x509.Certificate], *, force: bool = False) -> None:
    write_file(path, certs_pem(certs), CERT_MODE, force=force)


def write_bundle(path: Path, bundle: TrustBundle) -> None:
    # The bundle is public and is meant to change (root rotation): always replace atomically.
    write_file(path, bundle.to_pem(), CERT_MODE, force=True)


def write_identity(cert_path: Path, key_path: Path, identity: Identity, *, force: bool) -> None:
    """Key first: if the key cannot be written the certificate is left untouched."""
    write_key(key_path, identity.key, force=force)
    write_certs(cert_path, identity.chain, force=force)


def write_csr(path: Path, csr: x509.CertificateSigningRequest) -> None:
    # A CSR is public (a public key and a signature): replaced atomically like the bundle.
    write_file(path, csr.public_bytes(serialization.Encoding.PEM), CERT_MODE, force=True)


def load_csr(path: Path) -> x509.CertificateSigningRequest:
    data = _read(path, "certificate signing request")
    try:
        return x509.load_pem_x509_csr(data)
    except ValueError:
        raise PkiError(f"{path} holds no PEM certificate signing request") from None


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise PkiError(f"cannot read {what} {path}: {exc.strerror}") from None


def load_certs(path: Path) -> list[x509.Certificate]:
    data = _read(path, "certificate file")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise PkiError(f"{path} holds no PEM certificate") from None
    return certs


def load_key(path: Path) -> PrivateKey:
    data = _read(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{path} is not an ECDSA key")
    return key


def load_bundle(path: Path) -> TrustBundle:
    return TrustBundle.from_pem(_read(path, "trust bundle"))


def load_ca(cert_path: Path, key_path: Path) -> CertificateAuthority:
    return CertificateAuthority(load_certs(cert_path)[0], load_key(key_path))


def load_identity(cert_path: Path, key_path: Path) -> Identity:
    return Identity(load_key(key_path), tuple(load_certs(cert_path)))
