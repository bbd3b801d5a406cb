#!/usr/bin/env python3
"""Records what a stock grpcio client sends on a Unix socket, for the unit
tests of agent/src/export/h2_authority.rs: the connection preface, SETTINGS
and the HEADERS of two concurrent calls (the second one refers to the first
one's dynamic-table entries). A stand-in server answers SETTINGS and nothing
else, so the calls wait until the recording ends.

  python3 agent/src/export/testdata/record_grpcio_h2.py \
      agent/src/export/testdata/grpcio-two-calls.h2
"""

import os
import socket
import subprocess
import sys
import tempfile
import time

CLIENT = r"""
import sys, grpc
ch = grpc.insecure_channel(sys.argv[1])
m = ch.unary_unary("/flowaudit.v1.FlowAudit/ServerStatus")
calls = [m.future(b"", timeout=30) for _ in range(2)]
for c in calls:
    try:
        c.result()
    except grpc.RpcError:
        pass
"""


def main():
    out = sys.argv[1]
    path = os.path.join(tempfile.mkdtemp(), "rec.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    client = subprocess.Popen([sys.executable, "-c", CLIENT, "unix://" + path])
    conn, _ = srv.accept()
    # Empty SETTINGS, then ACK the client's.
    conn.sendall(bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
    conn.sendall(bytes([0, 0, 0, 4, 1, 0, 0, 0, 0]))
    conn.settimeout(0.2)
    data = b""
    end = time.monotonic() + 2
    while time.monotonic() < end:
        try:
            chunk = conn.recv(65536)
        except socket.timeout:
            continue
        if not chunk:
            break
        data += chunk
    client.kill()
    client.wait()
    with open(out, "wb") as f:
        f.write(data)
    print(f"{len(data)} bytes -> {out}")


if __name__ == "__main__":
    main()
