"""
The fault suite: what the proxy does when its upstream, its clients or its own process fail.

Every case injects one fault and then checks the invariants of L{tests.helpers.invariants}: no
client takes a wrong body for a whole one, nothing unverified is stored, the index reopens with
nothing to repair, the next request succeeds once the fault is gone, and the upstream is asked
for nothing outside its catalogue.

- C{test_upstream.py}: a misbehaving upstream (reset at an offset, wrong bytes of the right
  length, a short body then a clean close, a stall after N bytes, headers never sent, a 5xx for
  one path, a redirect off the allow-list, 100 KiB/s), in memory on a L{Clock}, and the faults
  that need real sockets and real time on loopback.
- C{test_clients.py}: hostile clients of a proxy listening on loopback (slowloris heads, huge
  headers, pipelining, garbage TLS, plain HTTP, absolute URIs, CONNECT, traversal encodings).
- C{test_process.py}: the proxy killed with SIGKILL at seeded random points during 20
  downloads, and a cache on a full file system (a small tmpfs; root only).
- C{test_property.py}: generated request paths and headers fed to both faces.

Narrower tests elsewhere assert more about some of these faults, and are not repeated here:
C{tests/test_request_path.py} (the log line of a corrupt body, the idle timeout of a stalled
body, the allow-list agent), C{tests/test_offline_path.py} (what a lost connection or a 5xx
does to the upstream's health, the per-file backoff), C{tests/test_channel.py} and
C{tests/test_slowloris.py} (the deadlines and limits of client connections),
C{tests/test_listen.py} (the plain-HTTP answer),
C{tests/test_crash_recovery.py} (SIGKILL of a writer of the store and index) and
C{tests/test_process.py} (SIGKILL of a proxy with three clients of one held download).
"""
