"""A tiny stdlib stand-in for the scoring server, for db/ tests and bench/bench_db.py.

Speaks the same `/invocations` text/csv contract as serve/: one reply line per
input line, in order; score = ((user_id * 31 + product_id) % 97) / 97; an empty
line (NULL) for a negative id or a row that is not two integers. It counts
requests and rows so tests can check batching.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def expected_score(user_id: int, product_id: int) -> float | None:
    if user_id < 0 or product_id < 0:
        return None
    return ((user_id * 31 + product_id) % 97) / 97


def _score_line(line: bytes) -> bytes:
    parts = line.split(b",")
    try:
        user_id, product_id = int(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        return b""
    score = expected_score(user_id, product_id)
    return b"" if score is None else repr(score).encode()


class ScoringServer:
    """Start with `with ScoringServer() as srv:`; srv.url and the counts srv.requests,
    srv.connections, srv.rows."""

    def __init__(self, *, status: int = 200, drop_every: int = 0, hang_up_every: int = 0) -> None:
        self.status = status
        # Close the connection after every Nth reply without saying so (as an idle
        # keep-alive timeout does): the client finds out on its next request.
        self.drop_every = drop_every
        # Close the connection on every Nth request instead of replying (a server that
        # went away mid-request).
        self.hang_up_every = hang_up_every
        self.requests = 0
        self.connections = 0  # TCP connections accepted
        self.rows = 0
        self.batch_sizes: list[int] = []
        self.target_models: list[str | None] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            wbufsize = 1 << 16  # headers and body in one packet: no Nagle/delayed-ACK stall

            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def setup(self) -> None:
                super().setup()
                with server._lock:
                    server.connections += 1

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                lines = body.split(b"\n")
                if lines and lines[-1] == b"":
                    lines.pop()
                with server._lock:
                    server.requests += 1
                    server.rows += len(lines)
                    server.batch_sizes.append(len(lines))
                    server.target_models.append(self.headers.get("X-Amzn-SageMaker-Target-Model"))
                    drop = server.drop_every and server.requests % server.drop_every == 0
                    hang_up = server.hang_up_every and server.requests % server.hang_up_every == 0
                if hang_up:
                    self.close_connection = True
                    return
                if server.status != 200:
                    reply = b"model exploded\n"
                else:
                    reply = b"".join(_score_line(line) + b"\n" for line in lines)
                self.send_response(server.status)
                self.send_header("Content-Type", "text/csv")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                if drop:
                    self.close_connection = True
                self.wfile.write(reply)

        return Handler

    def __enter__(self) -> ScoringServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
