"""A fault-injecting HTTP proxy on loopback, in front of the moto server (tests only).

Why a proxy and not mocks: the faults then reach the real client stack (botocore's retry
handler, urllib3's connection pool, the streaming body, our own retries) exactly as a throttled
or flaky S3 would deliver them: a 503 with S3's XML error body, a connection closed without a
response or reset, a slow first byte, a body cut short or without a Content-Length. Tests point boto3 at it with
``AWS_ENDPOINT_URL`` (the :func:`fault_proxy` fixture) and arm faults per test::

    fault_proxy.fail("img.png", 503, "SlowDown", times=7)   # then the real answer
    fault_proxy.count("img.png", "GET")                     # requests that reached the proxy

Faults match a substring of the request target (``/bucket/key?query``) and an optional method;
the first armed fault that matches is used and spends one of its ``times`` (None: forever).
Every request is recorded before any fault applies, so counts include the failed ones.
Bounded: handler sockets time out after a few seconds, every thread is a daemon, and the
fixture stops the server at teardown.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import botocore.retries.standard
import pytest

from vct import storage

# Headers that describe one hop, not the message: never forwarded as they are.
_HOP_HEADERS = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding",
                          "te", "trailer", "upgrade", "expect", "content-length"})
_REASONS = {403: "Forbidden", 404: "Not Found", 500: "Internal Server Error",
            502: "Bad Gateway", 503: "Slow Down", 504: "Gateway Timeout"}
_MESSAGES = {"SlowDown": "Please reduce your request rate.", "AccessDenied": "Access Denied",
             "InternalError": "We encountered an internal error. Please try again."}


@dataclass
class Fault:
    """One armed fault. kind: "status" (answer status/code), "drop" (close without a response),
    "reset" (abort the connection: TCP RST, "connection reset by peer"),
    "drop_after" (forward, then close instead of answering: the server did the work),
    "delay" (wait delay_s, then forward), "chunked" (forward the body chunked, no length),
    "truncate" (forward the headers and half the body, then close: a body cut mid-stream)."""

    kind: str
    match: str
    method: str | None = None
    times: int | None = None
    status: int = 503
    code: str = "SlowDown"
    delay_s: float = 0.0
    used: int = 0

    def applies(self, method: str, target: str) -> bool:
        return (self.match in target and (self.method is None or self.method == method)
                and (self.times is None or self.used < self.times))


class FaultProxy:
    """The proxy server: start(), arm faults, read counts, stop()."""

    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        if parts.hostname != "127.0.0.1":
            raise ValueError(f"upstream must be on loopback, got {upstream}")
        self.upstream = (parts.hostname, parts.port or 80)
        self.requests: list[tuple[str, str]] = []
        self.faults: list[Fault] = []
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle
    def start(self) -> FaultProxy:
        handler = type("Handler", (_Handler,), {"proxy": self})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ------------------------------------------------------------ arming
    def fail(self, match: str, status: int = 503, code: str = "SlowDown", *,
             times: int | None = None, method: str | None = None) -> Fault:
        """Answer ``status`` with an S3 XML error ``code`` (``times`` times; None: always)."""
        return self._arm(Fault("status", match, method, times, status=status, code=code))

    def drop(self, match: str, *, times: int | None = None, method: str | None = None) -> Fault:
        """Read the request, then close the connection without any response."""
        return self._arm(Fault("drop", match, method, times))

    def reset(self, match: str, *, times: int | None = None, method: str | None = None) -> Fault:
        """Read the request, then abort the connection with a TCP reset (SO_LINGER 0)."""
        return self._arm(Fault("reset", match, method, times))

    def drop_after(self, match: str, *, times: int | None = None,
                   method: str | None = None) -> Fault:
        """Forward the request (the server acts on it), then close instead of answering."""
        return self._arm(Fault("drop_after", match, method, times))

    def delay(self, match: str, seconds: float, *, times: int | None = None,
              method: str | None = None) -> Fault:
        """Hold the response back for ``seconds`` (a slow server), then forward it."""
        return self._arm(Fault("delay", match, method, times, delay_s=seconds))

    def chunked(self, match: str, *, times: int | None = None,
                method: str | None = None) -> Fault:
        """Send the real response body with chunked encoding and no Content-Length."""
        return self._arm(Fault("chunked", match, method, times))

    def truncate(self, match: str, *, times: int | None = None,
                 method: str | None = None) -> Fault:
        """Send the real status and headers (full Content-Length) but only half the body."""
        return self._arm(Fault("truncate", match, method, times))

    def clear(self) -> None:
        with self.lock:
            self.faults.clear()

    def count(self, match: str = "", method: str | None = None) -> int:
        """Requests seen whose target contains ``match`` (and with ``method``, if given)."""
        with self.lock:
            return sum(1 for m, t in self.requests
                       if match in t and (method is None or m == method))

    def _arm(self, fault: Fault) -> Fault:
        with self.lock:
            self.faults.append(fault)
        return fault

    def _take(self, method: str, target: str) -> Fault | None:
        """Record the request; the fault that applies to it (spending one use), if any."""
        with self.lock:
            self.requests.append((method, target))
            for fault in self.faults:
                if fault.applies(method, target):
                    fault.used += 1
                    return fault
        return None


class _Handler(BaseHTTPRequestHandler):
    proxy: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive and 100-continue, like S3
    timeout = 5.0  # an idle pooled connection ends its thread after this

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base signature
        pass

    def do_GET(self) -> None:
        self._handle()

    do_PUT = do_POST = do_HEAD = do_DELETE = do_GET

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        body = self._read_body()
        fault = self.proxy._take(self.command, self.path)
        try:
            if fault is not None and fault.kind == "drop":
                self.close_connection = True
                return
            if fault is not None and fault.kind == "reset":
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
                self.close_connection = True
                return
            if fault is not None and fault.kind == "status":
                self._error(fault)
                return
            if fault is not None and fault.kind == "delay":
                time.sleep(fault.delay_s)
            status, reason, headers, data = self._forward(body)
            if fault is not None and fault.kind == "drop_after":
                self.close_connection = True
                return
            kind = fault.kind if fault is not None else ""
            self._respond(status, reason, headers, data, chunked=kind == "chunked",
                          truncate=kind == "truncate")
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a read timeout)
            self.close_connection = True

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self.proxy.upstream, timeout=10)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_HEADERS:
                    conn.putheader(name, value)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.reason, resp.getheaders(), data
        finally:
            conn.close()

    def _respond(self, status: int, reason: str, headers: list[tuple[str, str]], data: bytes,
                 *, chunked: bool = False, truncate: bool = False) -> None:
        self.send_response_only(status, reason)
        length = None
        for name, value in headers:
            if name.lower() == "content-length":
                length = value
            elif name.lower() not in _HOP_HEADERS:
                self.send_header(name, value)
        if self.command == "HEAD":
            self.send_header("Content-Length", length or "0")  # the object's size, no body
            self.end_headers()
            return
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for start in range(0, len(data), 64 * 1024):
                piece = data[start:start + 64 * 1024]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
            return
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if truncate:
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data)

    def _error(self, fault: Fault) -> None:
        """An S3-shaped error: XML body with Code/Message/Resource/RequestId."""
        message = _MESSAGES.get(fault.code, fault.code)
        xml = ('<?xml version="1.0" encoding="UTF-8"?>\n'
               f"<Error><Code>{fault.code}</Code><Message>{message}</Message>"
               f"<Resource>{self.path.split('?')[0]}</Resource>"
               "<RequestId>fault-proxy</RequestId></Error>").encode()
        self.send_response_only(fault.status, _REASONS.get(fault.status, "Error"))
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", "fault-proxy")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(xml)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(xml)


@pytest.fixture
def fault_proxy(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """A started proxy in front of moto, with boto3 (via AWS_ENDPOINT_URL) pointed at it.

    Retry counts stay at their defaults (what production gets); only the waits shrink:
    botocore's backoff (up to 1+2+4+8 s for a throttled call) is patched to zero and the
    job-level backoff is set to about a millisecond, so a test of 20 failed requests takes
    well under a second. A fresh client per test also gives botocore a fresh retry quota.
    """
    proxy = FaultProxy(s3_server).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv(storage.ENV_RETRY_BASE, "0.001")
    monkeypatch.setenv(storage.ENV_RETRY_MAX, "0.002")
    monkeypatch.setattr(botocore.retries.standard.ExponentialBackoff, "delay_amount",
                        lambda self, context: 0.0)
    storage.reset_clients()
    try:
        yield proxy
    finally:
        storage.reset_clients()
        proxy.stop()
