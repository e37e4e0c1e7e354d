"""A sample backend for the testbed's machines: HTTP/1.1 (keep-alive) on one port, answering
every GET with JSON naming its service, cluster and host, and `/healthz` with `ok`.

It is copied into a machine and run by the machine's own /usr/bin/python3 (Debian's), so it
uses the standard library only and imports nothing from this repository.

    python3 backend.py --port 9080 --service reviews --cluster west --host west-service
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def make_handler(identity: dict[str, object]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the drills' load generator uses it
        server_version = "isthmus-testbed-backend"
        # Headers and body go out in two writes: with Nagle on, every response after the
        # first on a keep-alive connection waits for the client's delayed ACK (~40 ms).
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            if self.path == "/healthz":
                body = b"ok\n"
                ctype = "text/plain"
            else:
                body = json.dumps({**identity, "path": self.path}).encode() + b"\n"
                ctype = "application/json"
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_HEAD(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass  # a request per line in the machine's journal would drown it under load

    return Handler


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", default="0.0.0.0")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--service", required=True)
    p.add_argument("--cluster", default="")
    p.add_argument("--host", default="")
    args = p.parse_args(argv)
    identity = {"service": args.service, "cluster": args.cluster, "host": args.host,
                "port": args.port}
    ThreadingHTTPServer.daemon_threads = True
    server = ThreadingHTTPServer((args.address, args.port), make_handler(identity))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
