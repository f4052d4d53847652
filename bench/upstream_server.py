"""The benchmark's upstream: one process serving a simplestreams tree over TLS on 127.0.0.1.

Run by `serve_bench.py`, not by hand:

    python3 bench/upstream_server.py ROOT WORKDIR

It generates a throwaway CA, writes its PEM to WORKDIR/upstream-ca.pem, listens on an
ephemeral 127.0.0.1 port with a certificate for 127.0.0.1 and localhost, writes the port to
WORKDIR/upstream.port (atomically, last) and serves until SIGTERM:

* `/up/...`: the tree under ROOT through the tests' `TreeResource` (the proxy's upstream URL is
  `https://127.0.0.1:PORT/up`);
* `/static/...`: the same tree through `twisted.web.static.File`, the plain Twisted baseline
  that hits through the proxy are compared with.

Every request it answers is appended to WORKDIR/upstream-requests.log as `METHOD PATH`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, cast

# The tests' helpers are the project's own upstream; reuse them rather than a second copy.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from twisted.internet import reactor  # noqa: E402
from twisted.internet.ssl import CertificateOptions  # noqa: E402
from twisted.web.resource import Resource  # noqa: E402
from twisted.web.server import Site  # noqa: E402
from twisted.web.static import File  # noqa: E402

from tests.helpers.certs import make_ca  # noqa: E402
from tests.helpers.upstream import TreeResource  # noqa: E402


def main(root: Path, workdir: Path) -> None:
    ca = make_ca("lxd-image-proxy bench CA")
    cert_pem, key_pem = ca.issue(["127.0.0.1", "localhost"])
    options = CertificateOptions(
        privateKey=cast(Any, serialization.load_pem_private_key(key_pem, password=None)),
        certificate=cast(Any, x509.load_pem_x509_certificate(cert_pem)),
    )
    top = Resource()
    top.putChild(b"up", TreeResource(root))
    top.putChild(b"static", File(str(root)))
    site = Site(top)
    site.displayTracebacks = False
    # Instead of Twisted's access log, one line per request ("METHOD PATH") in
    # WORKDIR/upstream-requests.log: the benchmarks count the upstream GETs of a file from it.
    requests = (workdir / "upstream-requests.log").open("a", buffering=1)

    def log_request(request: Any) -> None:
        requests.write(f"{request.method.decode()} {request.uri.decode()}\n")

    site.log = log_request  # type: ignore[method-assign]
    port = reactor.listenSSL(0, site, options, interface="127.0.0.1")  # type: ignore[attr-defined]
    (workdir / "upstream-ca.pem").write_bytes(ca.cert_pem)
    tmp = workdir / "upstream.port.tmp"
    tmp.write_text(f"{port.getHost().port}\n")
    os.replace(tmp, workdir / "upstream.port")
    reactor.run()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: upstream_server.py ROOT WORKDIR")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
