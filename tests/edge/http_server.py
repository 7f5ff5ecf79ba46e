"""A static HTTP/1.1 file server on 127.0.0.1 for tests, with attacks switchable at runtime.

It behaves like a plain nginx in front of a folder (keep-alive, Content-Length, a strong
ETag answered with 304), and can turn hostile for a path prefix:

- ``endless``: a 200 without Content-Length whose body never ends (until the client hangs up);
- ``slow``: the file's headers, then its body at one byte per second;
- ``replace``: other bytes in place of the file;
- ``status``: a bare status code.

Every request is logged with the bytes it cost on the wire, so tests measure what a device
really sends and receives, not what the client believes.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_CHUNK = b"\0" * 65536


@dataclass
class Hit:
    """One request as the server saw it."""

    path: str
    status: int
    bytes_in: int  # request line + headers
    bytes_out: int  # status line + headers + body actually written


class _CountingWriter:
    """The connection's writer, counting what goes out; holds a response back while `held` is a list."""

    def __init__(self, raw):
        self.raw, self.count, self.held = raw, 0, None

    def write(self, data):
        self.count += len(data)
        if self.held is None:
            return self.raw.write(data)
        self.held.append(bytes(data))
        return len(data)

    def release(self):
        held, self.held = self.held, None
        if held:
            self.raw.write(b"".join(held))

    def __getattr__(self, name):
        return getattr(self.raw, name)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # idle keep-alive connections end on their own
    server: StaticServer

    def setup(self):
        super().setup()
        self.server.connections += 1
        self.wfile = _CountingWriter(self.wfile)

    def log_message(self, *args):
        pass

    def do_GET(self):
        # The response is held back until the request is logged, so a client that has its
        # answer always finds it in the log.
        started, self.wfile.held = self.wfile.count, []
        path = unquote(urlsplit(self.path).path)
        status = self._answer(path)
        bytes_in = len(self.raw_requestline) + sum(len(f"{k}: {v}\r\n") for k, v in self.headers.items()) + 2
        self.server.log.append(Hit(path, status, bytes_in, self.wfile.count - started))
        self.wfile.release()

    def _answer(self, path: str) -> int:
        mode, arg = self.server.attack_for(path)
        if mode == "status":
            return self._send(arg, b"")
        if mode == "endless":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            return self._drip(_CHUNK, path, forever=True)
        if mode == "replace":
            body = arg
        else:
            file = (self.server.root / path.lstrip("/")).resolve()
            if not file.is_relative_to(self.server.root) or not file.is_file():
                return self._send(404, b"not found\n")
            body = file.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest() + '"'
        if etag in [tag.strip() for tag in self.headers.get("If-None-Match", "").split(",")]:
            self.send_response(304)
            self.send_header("ETag", etag)
            self.end_headers()
            return 304
        if mode == "slow":
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            return self._drip(body, path, forever=False)
        return self._send(200, body, etag)

    def _send(self, status: int, body: bytes, etag: str | None = None) -> int:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if etag:
            self.send_header("ETag", etag)
        self.end_headers()
        self.wfile.write(body)
        return status

    def _drip(self, body: bytes, path: str, *, forever: bool) -> int:
        """Write `body` (over and over if `forever`, else byte by byte each second) until the client leaves."""
        sent = 0
        try:
            self.wfile.release()
            while not self.server.stopping.is_set() and (forever or sent < len(body)):
                if forever:
                    self.wfile.write(body)
                    sent += len(body)
                else:
                    self.wfile.write(body[sent : sent + 1])
                    self.wfile.flush()
                    sent += 1
                    self.server.stopping.wait(1.0)
        except OSError:
            self.close_connection = True
            self.server.cut.append((path, sent))
            self.server.client_left.set()
        return 200


class StaticServer(ThreadingHTTPServer):
    """Serves `root` on 127.0.0.1 (a free port) from a background thread until `stop()`.

    Use as a context manager or call `stop()`. `log` holds one `Hit` per request (hostile
    bodies once they end), `connections` counts TCP connections, `cut` holds the (path, bytes
    sent) of hostile bodies the client hung up on, and `client_left` is set then.
    """

    daemon_threads = True
    block_on_close = False

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = Path(root).resolve()
        self.log: list[Hit] = []
        self.connections = 0
        self.cut: list[tuple[str, int]] = []
        self.client_left = threading.Event()
        self.stopping = threading.Event()
        self._attacks: dict[str, tuple[str, object]] = {}
        self.url = f"http://127.0.0.1:{self.server_port}"
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    @property
    def count(self) -> int:
        """Requests answered so far."""
        return len(self.log)

    @property
    def paths(self) -> list[str]:
        """Request paths in order."""
        return [hit.path for hit in self.log]

    def attack(self, prefix: str, mode: str, arg: object = None) -> None:
        """Answer paths starting with `prefix` with `mode` (endless, slow, replace or status)."""
        if mode not in ("endless", "slow", "replace", "status"):
            raise ValueError(f"unknown attack mode {mode!r}")
        self._attacks[prefix] = (mode, arg)

    def calm(self) -> None:
        """Stop every attack."""
        self._attacks.clear()

    def attack_for(self, path: str) -> tuple[str | None, object]:
        for prefix, attack in self._attacks.items():
            if path.startswith(prefix):
                return attack
        return None, None

    def stop(self) -> None:
        """Stop serving and release the port."""
        self.stopping.set()
        self.shutdown()
        self.server_close()
        self._thread.join(5)

    def __enter__(self) -> StaticServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
