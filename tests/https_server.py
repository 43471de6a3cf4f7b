"""An HTTPS server (twisted.web) on loopback for tests: MTA-STS policy hosts and TLS-RPT
report endpoints.

GET answers with ``files[(host, path)]`` as ``text/plain`` (the Host header names the
host, without its port), 404 otherwise; ``redirects[(host, path)]`` answers 301 to that
URL instead; ``stalls`` holds the (host, path) whose answer starts and never ends.
POST bodies are recorded (``posts``: host, path, content type, body). One
certificate serves every host: issue it with all their names.

In-process::

    server = HTTPSServer(cert, key); port = server.listen()
    server.files[("mta-sts.x.test", "/.well-known/mta-sts.txt")] = "version: STSv1\\n..."

As a subprocess (files from a directory: ``<dir>/<host>/<path>``; POST bodies written to
``<dir>/posts/<n>.json``)::

    python tests/https_server.py --port-file F --root DIR --tls-cert C --tls-key K
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys

from twisted.web import resource, server


class _Site(resource.Resource):
    isLeaf = True

    def __init__(self, owner: HTTPSServer) -> None:
        super().__init__()
        self.owner = owner

    def _key(self, request) -> tuple[str, str]:
        host = (request.getHeader("host") or "").rsplit(":", 1)[0].lower()
        return host, request.path.decode("ascii", "replace")

    def render_GET(self, request):
        key = self._key(request)
        self.owner.gets.append(key)
        if key in self.owner.stalls:
            request.setHeader("content-type", "text/plain")
            request.write(b"version: STSv1\r\n")
            return server.NOT_DONE_YET
        if key in self.owner.redirects:
            request.setResponseCode(301)
            request.setHeader("location", self.owner.redirects[key])
            return b""
        body = self.owner.body(*key)
        if body is None:
            request.setResponseCode(404)
            return b"not found\n"
        request.setHeader("content-type", "text/plain")
        return body

    def render_POST(self, request):
        host, path = self._key(request)
        self.owner.record_post(host, path, request.getHeader("content-type") or "",
                               request.content.read())
        return b""


class HTTPSServer:
    def __init__(self, cert: str, key: str, root: str | None = None, reactor=None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from mailrelay.tls import server_options

        self.options = server_options(cert, key, False, "https.test")
        self.root = root
        self.files: dict[tuple[str, str], bytes | str] = {}
        self.redirects: dict[tuple[str, str], str] = {}
        self.stalls: set[tuple[str, str]] = set()
        self.gets: list[tuple[str, str]] = []
        self.posts: list[dict] = []
        self._port = None

    def body(self, host: str, path: str) -> bytes | None:
        found = self.files.get((host, path))
        if found is None and self.root and ".." not in path and "/" not in host:
            try:
                with open(os.path.join(self.root, host, path.lstrip("/")), "rb") as f:
                    found = f.read()
            except OSError:
                return None
        return found.encode() if isinstance(found, str) else found

    def record_post(self, host: str, path: str, kind: str, body: bytes) -> None:
        post = {"host": host, "path": path, "content_type": kind,
                "body": base64.b64encode(body).decode()}
        self.posts.append(post)
        if self.root:
            directory = os.path.join(self.root, "posts")
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, f"{len(self.posts)}.json"), "w") as f:
                json.dump(post, f)

    def listen(self, port: int = 0, interface: str = "127.0.0.1") -> int:
        site = server.Site(_Site(self))
        site.noisy = False
        self._port = self.reactor.listenSSL(port, site, self.options, interface=interface)
        return self._port.getHost().port

    def stop(self):
        return self._port.stopListening()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--tls-cert", required=True)
    parser.add_argument("--tls-key", required=True)
    parser.add_argument("--interface", default="127.0.0.1")
    args = parser.parse_args(argv)
    from twisted.internet import reactor

    https = HTTPSServer(args.tls_cert, args.tls_key, args.root, reactor)
    port = https.listen(0, args.interface)
    with open(args.port_file + ".tmp", "w") as f:
        f.write(f"{port}\n")
    os.rename(args.port_file + ".tmp", args.port_file)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
