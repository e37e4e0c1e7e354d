"""The ClientHello parser against real clients (ssl module, openssl s_client, curl) and fuzz."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import ClientHelloError
from gateway.proto.clienthello import (
    MAX_CLIENT_HELLO,
    MAX_RECORD,
    MAX_RECORDS,
    NEED_MORE,
    ClientHello,
    ClientHelloParser,
    Rejected,
    RejectReason,
    parse_client_hello,
)

SNI = "http.reviews.default.east.mesh.example.org"


def python_client_hello(server_name: str | None, alpn: list[str] | None = None) -> bytes:
    """The first flight of Python's own TLS client, captured through memory BIOs."""
    ctx = ssl.create_default_context()
    if server_name is None:
        ctx.check_hostname = False
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def _u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def _ext(ext_type: int, data: bytes) -> bytes:
    return _u16(ext_type) + _u16(len(data)) + data


def sni_ext(*names: bytes, name_type: int = 0) -> bytes:
    entries = b"".join(bytes([name_type]) + _u16(len(n)) + n for n in names)
    return _ext(0, _u16(len(entries)) + entries)


def build_hello(extensions: list[bytes] | None, record_size: int = MAX_RECORD) -> bytes:
    """A hand-built ClientHello (TLS 1.3 shape) split into records of `record_size` bytes."""
    body = b"\x03\x03" + bytes(32) + b"\x00" + _u16(2) + b"\x13\x01" + b"\x01\x00"
    if extensions is not None:
        exts = b"".join(extensions)
        body += _u16(len(exts)) + exts
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    out = b""
    for i in range(0, len(handshake), record_size):
        frag = handshake[i : i + record_size]
        out += b"\x16\x03\x01" + _u16(len(frag)) + frag
    return out


def feed_in_chunks(data: bytes, sizes: list[int]) -> object:
    parser = ClientHelloParser()
    pos = 0
    result: object = NEED_MORE
    for size in [*sizes, len(data)]:
        if pos >= len(data):
            break
        result = parser.feed(data[pos : pos + max(1, size)])
        pos += max(1, size)
        if result is not NEED_MORE:
            break
    return result


# --- real clients -------------------------------------------------------------------------


def test_python_client_hello_with_alpn() -> None:
    data = python_client_hello(SNI, ["h2", "http/1.1"])
    result = parse_client_hello(data)
    assert isinstance(result, ClientHello)
    assert result.server_name == SNI
    assert result.alpn == (b"h2", b"http/1.1")
    assert result.offers_tls13
    assert result.length == len(data)


def test_python_client_hello_byte_by_byte() -> None:
    data = python_client_hello(SNI)
    parser = ClientHelloParser()
    results = [parser.feed(data[i : i + 1]) for i in range(len(data))]
    assert all(r is NEED_MORE for r in results[:-1])
    assert isinstance(results[-1], ClientHello)
    assert results[-1].server_name == SNI
    assert results[-1].alpn == ()
    with pytest.raises(ClientHelloError):
        parser.feed(b"\x16")


def test_python_client_hello_without_sni_is_rejected() -> None:
    result = parse_client_hello(python_client_hello(None))
    assert isinstance(result, Rejected)
    assert result.reason is RejectReason.NO_SNI


def test_upper_case_sni_is_lowered() -> None:
    data = python_client_hello("HTTP.Reviews.default.EAST.mesh.example.org")
    result = parse_client_hello(data)
    assert isinstance(result, ClientHello)
    assert result.server_name == SNI


def _capture_from(cmd: list[str], stdin: bytes = b"") -> tuple[bytes, object]:
    """Run an outside client against a loopback listener; return what it sent and the verdict."""
    with socket.socket() as srv:
        srv.bind(("127.0.41.1", 0))
        srv.listen(1)
        srv.settimeout(10)
        port = srv.getsockname()[1]
        argv = [a.replace("{port}", str(port)) for a in cmd]
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(10)
                parser = ClientHelloParser()
                seen = b""
                result: object = NEED_MORE
                while result is NEED_MORE:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    seen += chunk
                    result = parser.feed(chunk)
        finally:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.kill()
            proc.wait(timeout=10)
    return seen, result


needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")


@needs_openssl
def test_openssl_s_client_hello() -> None:
    _, result = _capture_from(
        [
            "openssl", "s_client", "-connect", "127.0.41.1:{port}",
            "-servername", SNI, "-alpn", "h2,http/1.1",
        ]
    )  # fmt: skip
    assert isinstance(result, ClientHello)
    assert result.server_name == SNI
    assert result.alpn == (b"h2", b"http/1.1")
    assert result.offers_tls13


@needs_openssl
def test_openssl_s_client_tls12_only() -> None:
    _, result = _capture_from(
        ["openssl", "s_client", "-connect", "127.0.41.1:{port}", "-servername", SNI, "-tls1_2"]
    )
    assert isinstance(result, ClientHello)
    assert result.server_name == SNI
    assert not result.offers_tls13


@needs_openssl
def test_openssl_s_client_without_sni() -> None:
    _, result = _capture_from(
        ["openssl", "s_client", "-connect", "127.0.41.1:{port}", "-noservername"]
    )
    assert isinstance(result, Rejected)
    assert result.reason is RejectReason.NO_SNI


@needs_curl
def test_curl_https_hello() -> None:
    _, result = _capture_from(
        [
            "curl", "-sk", "--max-time", "10", "--resolve", f"{SNI}:{{port}}:127.0.41.1",
            f"https://{SNI}:{{port}}/",
        ]
    )  # fmt: skip
    assert isinstance(result, ClientHello)
    assert result.server_name == SNI


@needs_curl
def test_curl_plaintext_http_on_tls_port() -> None:
    seen, result = _capture_from(["curl", "-s", "--max-time", "10", "http://127.0.41.1:{port}/"])
    assert seen.startswith(b"GET ")
    assert isinstance(result, Rejected)
    assert result.reason is RejectReason.PLAINTEXT


# --- hand-built edge cases ----------------------------------------------------------------


def test_fragmented_over_records() -> None:
    data = build_hello([sni_ext(SNI.encode())], record_size=7)
    result = parse_client_hello(data)
    assert isinstance(result, ClientHello)
    assert result.server_name == SNI


def _second_record_type(content_type: int) -> bytes:
    """A hello in 20-byte records whose second record has another content type."""
    data = bytearray(build_hello([sni_ext(b"a.org")], record_size=20))
    data[25] = content_type
    return bytes(data)


def _trailing_in_record() -> bytes:
    """A one-record hello whose record carries two more bytes after the handshake message."""
    data = build_hello([sni_ext(b"a.org")]) + b"\x00\x00"
    return data[:3] + _u16(len(data) - 5) + data[5:]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", RejectReason.PLAINTEXT),
        (b"PRI * HTTP/2.0\r\n", RejectReason.PLAINTEXT),
        (b"\x80\x2e\x01\x03\x01", RejectReason.NOT_TLS),  # SSLv2-style hello
        (b"\x00\x00\x00\x00\x00", RejectReason.NOT_TLS),
        (b"\x15\x03\x03\x00\x02\x02\x28", RejectReason.NOT_TLS),  # an alert
        (b"\x16\x02\x00", RejectReason.NOT_TLS),
        (b"\x16\x03\x01\x40\x01", RejectReason.RECORD_TOO_LARGE),
        (b"\x16\x03\x01\x00\x00", RejectReason.MALFORMED),
        (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", RejectReason.NOT_CLIENT_HELLO),
        (b"\x16\x03\x01\x00\x04\x01\xff\xff\xff", RejectReason.TOO_LARGE),
        (build_hello(None), RejectReason.NO_SNI),
        (build_hello([]), RejectReason.NO_SNI),
        (build_hello([sni_ext(b"a.example", b"b.example")]), RejectReason.MULTIPLE_SNI),
        (build_hello([sni_ext(b"a" * 64 + b".example")]), RejectReason.BAD_SNI),
        (build_hello([sni_ext(b".".join([b"a" * 60] * 5))]), RejectReason.BAD_SNI),
        (build_hello([sni_ext(b"")]), RejectReason.BAD_SNI),
        (build_hello([sni_ext(b"ex ample.org")]), RejectReason.BAD_SNI),
        (build_hello([sni_ext(b"example.org.")]), RejectReason.BAD_SNI),
        (build_hello([sni_ext(b"ex\xffample.org")]), RejectReason.BAD_SNI),
        (build_hello([sni_ext(b"opaque", name_type=7)]), RejectReason.NO_SNI),
        (build_hello([sni_ext(b"a.org"), sni_ext(b"a.org")]), RejectReason.MALFORMED),
        (build_hello([sni_ext(b"a.org"), _ext(16, _u16(0))]), RejectReason.MALFORMED),
        (build_hello([sni_ext(b"a.org"), _ext(43, b"\x03\x03\x04")]), RejectReason.MALFORMED),
        (_second_record_type(23), RejectReason.MALFORMED),
        (_trailing_in_record(), RejectReason.MALFORMED),
    ],
)
def test_rejections(data: bytes, reason: RejectReason) -> None:
    result = feed_in_chunks(data, [3, 1, 5])
    assert isinstance(result, Rejected), result
    assert result.reason is reason
    assert parse_client_hello(data) == result


def test_unknown_name_type_beside_host_name() -> None:
    ext = _ext(
        0, _u16(3 + 6 + 3 + 5) + b"\x07" + _u16(6) + b"opaque" + b"\x00" + _u16(5) + b"a.org"
    )
    result = parse_client_hello(build_hello([ext]))
    assert isinstance(result, ClientHello)
    assert result.server_name == "a.org"


def test_too_large_is_refused_before_it_arrives() -> None:
    padding = _ext(21, bytes(MAX_CLIENT_HELLO))
    data = build_hello([sni_ext(b"a.org"), padding])
    parser = ClientHelloParser()
    # The handshake header says how long the message is: refuse after the first record.
    result = parser.feed(data[: 5 + MAX_RECORD])
    assert isinstance(result, Rejected)
    assert result.reason is RejectReason.TOO_LARGE


def test_just_under_the_limit_is_accepted() -> None:
    base = len(build_hello([sni_ext(b"a.org"), _ext(21, b"")], record_size=1 << 20)) - 5
    padding = _ext(21, bytes(MAX_CLIENT_HELLO - base))
    data = build_hello([sni_ext(b"a.org"), padding])
    result = parse_client_hello(data)
    assert isinstance(result, ClientHello), result
    assert result.length == len(data)


def test_too_many_records() -> None:
    data = build_hello([sni_ext(b"a.org"), _ext(21, bytes(200))], record_size=4)
    result = parse_client_hello(data)
    assert isinstance(result, Rejected)
    assert result.reason is RejectReason.TOO_LARGE


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ClientHelloError):
        ClientHelloParser(max_size=10)


# --- fuzz ---------------------------------------------------------------------------------

# Enough input to force a verdict: every record full, the most records allowed, and one more.
BOUND = MAX_RECORDS * (5 + MAX_RECORD) + 1
REAL = python_client_hello(SNI, ["h2"])


def _feed_all(data: bytes, cuts: list[int]) -> object:
    parser = ClientHelloParser()
    result: object = NEED_MORE
    pos = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        if cut <= pos:
            continue
        result = parser.feed(data[pos:cut])
        pos = cut
        if result is not NEED_MORE:
            with pytest.raises(ClientHelloError):
                parser.feed(b"x")
            break
    return result


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048), st.lists(st.integers(0, 2048), max_size=8))
def test_fuzz_garbage(data: bytes, cuts: list[int]) -> None:
    result = _feed_all(data, cuts)
    assert result is NEED_MORE or isinstance(result, ClientHello | Rejected)
    # Splitting never changes the verdict.
    assert result == parse_client_hello(data)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, len(REAL) - 1), st.integers(0, 255)), max_size=6),
    st.integers(0, len(REAL)),
    st.lists(st.integers(0, len(REAL)), max_size=6),
)
def test_fuzz_mutated_real_hello(flips: list[tuple[int, int]], cut: int, cuts: list[int]) -> None:
    data = bytearray(REAL)
    for index, value in flips:
        data[index] = value
    data = data[:cut] if cut else data
    result = _feed_all(bytes(data), cuts)
    assert result is NEED_MORE or isinstance(result, ClientHello | Rejected)
    if isinstance(result, ClientHello):
        assert len(result.server_name) <= 253


@settings(max_examples=30, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.integers(1, 4096))
def test_bounded_input_forces_a_verdict(seed: bytes, chunk: int) -> None:
    # A handshake-looking stream that never completes: the parser must give up by BOUND bytes.
    stream = (b"\x16\x03\x01\x40\x00" + (seed * (MAX_RECORD // len(seed) + 1))[:MAX_RECORD]) * (
        MAX_RECORDS + 1
    )
    parser = ClientHelloParser()
    fed = 0
    result: object = NEED_MORE
    while result is NEED_MORE and fed < len(stream):
        result = parser.feed(stream[fed : fed + chunk])
        fed += chunk
    assert isinstance(result, Rejected)
    assert fed <= BOUND + chunk


host_label = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?\Z")


@settings(max_examples=200, deadline=None)
@given(st.lists(host_label, min_size=1, max_size=8), st.integers(1, 300))
def test_any_valid_host_name_round_trips(labels: list[str], record_size: int) -> None:
    host = ".".join(labels)
    result = parse_client_hello(build_hello([sni_ext(host.encode())], record_size=record_size))
    if record_size * MAX_RECORDS < 60 + len(host):
        return  # split over more records than allowed; refused, covered above
    assert isinstance(result, ClientHello), result
    assert result.server_name == host


def test_largest_hello_one_byte_at_a_time() -> None:
    # The worst split of the largest allowed input; linear work keeps this quick.
    data = build_hello([sni_ext(b"a.org"), _ext(21, bytes(MAX_CLIENT_HELLO - 100))])
    parser = ClientHelloParser()
    results = [parser.feed(data[i : i + 1]) for i in range(len(data))]
    assert all(r is NEED_MORE for r in results[:-1])
    assert isinstance(results[-1], ClientHello)


@pytest.mark.parametrize("name", [b"example.org\n", b"example\n.org", b"\nexample.org"])
def test_a_newline_in_a_label_is_bad_sni(name: bytes) -> None:
    result = parse_client_hello(build_hello([sni_ext(name)]))
    assert isinstance(result, Rejected) and result.reason is RejectReason.BAD_SNI, result
