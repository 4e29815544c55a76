"""The upstream every contender reaches: nginx answering every request with the same fixed
1 KiB body, and a TCP bulk receiver (helper.py recv) for throughput."""

import os
import socket
import sys
import time

HTTP_PORT = 8080
# The same responder over cleartext HTTP/2 with prior knowledge (the h2 workload's upstream).
H2_PORT = 8081
BULK_PORT = 9000
BODY_LEN = 1024
BODY = ("isthmusbench" * 100)[:BODY_LEN - 1] + "\n"
HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helper.py")


def nginx_version():
    """(major, minor, patch) of the installed nginx, (0, 0, 0) if unknown."""
    import re
    import subprocess
    try:
        r = subprocess.run(["nginx", "-v"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return (0, 0, 0)
    m = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", r.stdout + r.stderr)
    return tuple(int(x) for x in m.groups()) if m else (0, 0, 0)


def h2c_listen(addr):
    """nginx directives for a cleartext HTTP/2 (prior knowledge) listener on addr: `listen
    ADDR http2;` before nginx 1.25.1, `listen ADDR; http2 on;` from 1.25.1 on (the listen
    parameter is deprecated there)."""
    if nginx_version() >= (1, 25, 1):
        return f"listen {addr} backlog=4096; http2 on;"
    return f"listen {addr} http2 backlog=4096;"


def start_responder(ns, work_dir, cpus):
    prefix = os.path.join(work_dir, f"upstream-{ns.name}")
    os.makedirs(os.path.join(prefix, "logs"), exist_ok=True)
    conf = os.path.join(prefix, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 65536;
pid {prefix}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 30000; multi_accept on; }}
http {{
  access_log off;
  keepalive_requests 100000000;
  keepalive_timeout 600s;
  client_header_timeout 600s;
  server {{
    listen {HTTP_PORT} backlog=4096;
    location / {{
      default_type application/octet-stream;
      return 200 "{BODY}";
    }}
  }}
  server {{
    {h2c_listen(H2_PORT)}
    location / {{
      default_type application/octet-stream;
      return 200 "{BODY}";
    }}
  }}
}}
""")
    return ns.spawn("upstream-nginx", ["nginx", "-p", prefix, "-e", "stderr", "-c", conf],
                    cpus=cpus, nofile=65536)


def start_receiver(ns, cpus):
    return ns.spawn("bulk-recv", [sys.executable, HELPER, "recv", str(BULK_PORT)], cpus=cpus)


def wait_listening(ns, host, port, timeout=10.0, proc=None):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            s = ns.connect((host, port), timeout=0.5)
            s.close()
            return
        except OSError as e:
            last = e
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.log_tail()}")
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {host}:{port} in {ns.name}: {last}")


def http_get(ns, host, port, path="/", timeout=2.0, host_header=None):
    """One HTTP/1.1 GET from inside ns: (status, body bytes)."""
    s = ns.connect((host, port), timeout=timeout)
    try:
        s.settimeout(timeout)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host_header or host}\r\nConnection: close\r\n\r\n"
                  .encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1]) if lines and len(lines[0].split()) > 1 else 0
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower()] = v.strip()
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            out += rest[:size]
            rest = rest[size + 2:]
        body = out
    return status, body


def verify(ns, host, port, path="/"):
    """Raises unless a GET through this path returns 200 and exactly the 1 KiB body."""
    status, body = http_get(ns, host, port, path)
    if status != 200 or body != BODY.encode():
        raise RuntimeError(f"GET http://{host}:{port}{path} from {ns.name}: status {status}, "
                           f"{len(body)} bytes (want 200 and the {BODY_LEN}-byte body)")
