"""Small programs the harness runs inside the pods (stdlib only).

  helper.py recv PORT                 bulk receiver: per connection, read to EOF, reply the
                                      byte count (8 bytes, big endian), close
  helper.py send HOST PORT BYTES      bulk sender: connect, send BYTES, half-close, wait for
                                      the receiver's count; prints JSON {bytes, seconds}
"""

import json
import socket
import sys
import threading
import time

CHUNK = 1 << 20


def recv(port):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(1024)

    def serve(conn):
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        total = 0
        try:
            while True:
                n = conn.recv_into(view)
                if n == 0:
                    break
                total += n
            conn.sendall(total.to_bytes(8, "big"))
        except OSError:
            pass
        finally:
            conn.close()

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def send(host, port, nbytes):
    payload = memoryview(bytes(CHUNK))
    start = time.perf_counter()
    s = socket.create_connection((host, port), timeout=60)
    left = nbytes
    while left > 0:
        n = min(left, CHUNK)
        s.sendall(payload[:n])
        left -= n
    s.shutdown(socket.SHUT_WR)
    got = b""
    while len(got) < 8:
        chunk = s.recv(8 - len(got))
        if not chunk:
            break
        got += chunk
    elapsed = time.perf_counter() - start
    s.close()
    counted = int.from_bytes(got, "big") if len(got) == 8 else -1
    print(json.dumps({"bytes": nbytes, "received": counted, "seconds": elapsed}))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "recv":
        recv(int(sys.argv[2]))
    elif cmd == "send":
        send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit(f"unknown command {cmd}")
