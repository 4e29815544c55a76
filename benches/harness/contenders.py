"""Contenders: one object per thing in the path between load generator and upstream.

A contender says which pod the load generator runs in, which URL it hits, where TCP bulk
goes, and which processes are "the proxy" (for CPU and RSS). Adding one is one more entry
in `all_contenders()`; see README.md ("Adding a contender").
"""

import os
import time

from . import topology as T
from . import upstream
from .ns import children, ip, nofile_hard  # noqa: F401


class Env:
    """What contenders need from the run: pods, binaries, CPUs, worker count."""

    def __init__(self, topo, bin_dir, work_dir, workers, proxy_cpus, loadgen_cpus=frozenset()):
        self.topo = topo
        self.bin_dir = bin_dir
        self.work_dir = work_dir
        self.workers = workers
        self.proxy_cpus = proxy_cpus
        self.loadgen_cpus = set(loadgen_cpus)

    def sidecar_cpus(self, n):
        """CPU sets for n proxy processes that are all in the path at once (two hops: two
        sidecars). With 1 worker each gets a core of its own: the proxy core first, then the
        next ones, wrapping round to the load generator's core when the machine has no more
        (on 2 cores the second sidecar shares CPU 0 with the load generator and upstream).
        With more workers every sidecar gets every proxy CPU, like any other proxy."""
        if self.workers != 1:
            return [set(self.proxy_cpus) for _ in range(n)]
        ncpu = os.cpu_count() or 1
        first = min(self.proxy_cpus)
        spare = [c for c in range(ncpu) if c not in self.loadgen_cpus and c != first]
        shared = sorted(self.loadgen_cpus) or [0]
        out = [{first}]
        for i in range(n - 1):
            out.append({spare[i]} if i < len(spare)
                       else {shared[(i - len(spare)) % len(shared)]})
        return out


class Contender:
    name = "?"
    description = ""
    group = "?"  # baseline | isthmus | peer-tcp | peer-http | peer-h2
    client_pod = "cli"
    tcp = True  # can carry raw TCP (bulk throughput, idle connections)
    cpu_note = None  # set when this contender could not get a core per proxy process
    # "h1": HTTP/1.1 load (oha/wrk grid, max rps, bulk); "h2": the h2 workload (h2load).
    workload = "h1"
    # True: a failed first request means "this build does not support it" — the contender is
    # skipped with the reason instead of failing the run (isthmus h2, which may not exist yet).
    skip_if_unsupported = False

    def __init__(self):
        self.procs = []

    def unavailable(self):
        """None, or why this contender cannot run on this machine (it is then skipped and
        the results say so)."""
        import shutil
        if self.workload == "h2" and not shutil.which("h2load"):
            return "h2load not installed (Debian: apt-get install nghttp2-client)"
        return None

    def start(self, env):
        self.env = env

    def stop(self):
        for p in reversed(self.procs):
            p.stop()
        self.procs = []

    def target(self):
        """(host, port) the HTTP load goes to."""
        raise NotImplementedError

    def bulk_target(self):
        return None

    def url(self):
        host, port = self.target()
        return f"http://{host}:{port}/"

    def proxy_pids(self):
        pids = []
        for p in self.procs:
            pids.extend(children(p.pid))
        return pids

    def client(self):
        return self.env.topo.pod(self.client_pod)

    def check_alive(self):
        for p in self.procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited:\n{p.log_tail()}")

    def verify(self):
        host, port = self.target()
        if self.workload == "h2":
            from .load import h2_verify
            h2_verify(self.client(), self.url())
        else:
            upstream.verify(self.client(), host, port)

    def request_counts(self):
        """{pod: istio_requests_total summed over its label sets} for proxies that count
        Istio request metrics (isthmus); None for the others."""
        return None


class Unsupported(Exception):
    """A contender whose build cannot serve the workload (see skip_if_unsupported)."""


class Direct(Contender):
    name = "direct"
    description = "no proxy: client pod → server pod (the limit)"
    group = "baseline"

    def target(self):
        return (T.PODS["srv"], T.HTTP_PORT)

    def bulk_target(self):
        return (T.PODS["srv"], T.BULK_PORT)


class DirectH2(Direct):
    """The h2 workload's limit: h2load straight to the responder's cleartext h2 listener."""
    name = "direct-h2"
    description = "no proxy, HTTP/2 cleartext (prior knowledge) to the responder's h2 listener"
    group = "baseline-h2"
    workload = "h2"
    tcp = False

    def target(self):
        return (T.PODS["srv"], T.H2_PORT)

    def bulk_target(self):
        return None


def registry_yaml(protocol="TCP", extra_services=0, new_route=False, target_port=None):
    """The ServiceEntries isthmus loads. The web port (80) is declared `protocol` (named
    `<protocol>-web`, so name and declaration agree); the bulk port is always TCP.
    extra_services adds N unrelated services (memory and reload tests); new_route adds
    VIP_NEW → srv; target_port: the web port's targetPort (default the HTTP/1.1 responder)."""
    out = []
    for name, vip, ports, endpoint in _registry_entries(protocol, extra_services, new_route,
                                                        target_port):
        out.append(
            f"---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\n"
            f"metadata: {{name: {name}, namespace: bench}}\n"
            f"spec:\n  hosts: [{name}.bench.svc.cluster.local]\n  addresses: [{vip}]\n"
            f"  location: MESH_INTERNAL\n  resolution: STATIC\n  ports:\n"
            + "".join("  - {" + ", ".join(f"{k}: {v}" for k, v in port.items()) + "}\n"
                      for port in ports)
            + f"  endpoints:\n  - {{address: {endpoint}}}\n")
    return "".join(out)


# Big registries are split over several files, as several ConfigMap keys would hold them.
DOCS_PER_FILE = 1000


def registry_files(protocol="TCP", extra_services=0, new_route=False, fmt="yaml",
                   target_port=None):
    """fmt="json": the same documents as one JSON array in registry.json (the controller's
    fast path: isthmus parses JSON an order of magnitude faster than YAML)."""
    if fmt == "json":
        import json
        docs = [{
            "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
            "metadata": {"name": name, "namespace": "bench"},
            "spec": {"hosts": [f"{name}.bench.svc.cluster.local"], "addresses": [vip],
                     "location": "MESH_INTERNAL", "resolution": "STATIC",
                     "ports": ports, "endpoints": [{"address": ep}]},
        } for name, vip, ports, ep in _registry_entries(protocol, extra_services, new_route,
                                                        target_port)]
        return {"registry.json": json.dumps(docs)}
    docs = registry_yaml(protocol, extra_services, new_route, target_port).split("---\n")[1:]
    return {f"registry-{i // DOCS_PER_FILE:03}.yaml":
            "".join("---\n" + d for d in docs[i:i + DOCS_PER_FILE])
            for i in range(0, len(docs), DOCS_PER_FILE)}


def _registry_entries(protocol, extra_services, new_route, target_port=None):
    """(name, vip, ports, endpoint) of every ServiceEntry, in order."""
    web = {"number": 80, "name": f"{protocol.lower()}-web", "protocol": protocol,
           "targetPort": target_port or T.HTTP_PORT}
    bulk = {"number": T.BULK_PORT, "name": "tcp-bulk", "protocol": "TCP"}
    out = [("one", T.VIP_ONE, [web, bulk], T.PODS["srv"]),
           ("two", T.VIP_TWO, [web, bulk], T.PODS["srvm"])]
    if new_route:
        out.append(("new", T.VIP_NEW, [web, bulk], T.PODS["srv"]))
    for i in range(extra_services):
        # 10.100.0.0/16 .. : unique VIPs, endpoints in a range nothing uses.
        vip = f"10.{100 + i // 65536}.{(i // 256) % 256}.{i % 256}"
        ep = f"10.{150 + i // 65536}.{(i // 256) % 256}.{i % 256}"
        out.append((f"svc-{i}", vip,
                    [{"number": 80, "name": "tcp-web", "protocol": "TCP", "targetPort": 8080}], ep))
    return out


class ConfigDir:
    """A ConfigMap-style directory (kubelet's ..data symlink swap), like isthmus-ctl writes."""

    def __init__(self, path):
        self.path = path
        self.generation = 0
        os.makedirs(path, exist_ok=True)

    def write(self, files):
        self.generation += 1
        stamp = f"..{time.time_ns()}_{self.generation}"
        data = os.path.join(self.path, stamp)
        os.mkdir(data)
        for name, text in files.items():
            with open(os.path.join(data, name), "w") as f:
                f.write(text)
        tmp = os.path.join(self.path, "..data_tmp")
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(stamp, tmp)
        link = os.path.join(self.path, "..data")
        old = os.readlink(link) if os.path.lexists(link) else None
        t0, t0_wall = time.monotonic(), time.time()
        os.rename(tmp, link)  # the atomic step
        for entry in os.listdir(self.path):
            if not entry.startswith(".") and entry not in files:
                os.unlink(os.path.join(self.path, entry))
        for name in files:
            visible = os.path.join(self.path, name)
            if not os.path.lexists(visible):
                os.symlink(os.path.join("..data", name), visible)
        if old:
            import shutil
            shutil.rmtree(os.path.join(self.path, old), ignore_errors=True)
        return t0, t0_wall


_URING = None


def io_uring_available():
    """None if io_uring_setup works here, else why not (seccomp, io_uring_disabled, kernel)."""
    global _URING
    if _URING is None:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        params = ctypes.create_string_buffer(120)  # struct io_uring_params, zeroed
        fd = libc.syscall(425, 4, params)  # __NR_io_uring_setup (x86_64 and aarch64)
        if fd >= 0:
            os.close(fd)
            _URING = ""
        else:
            e = ctypes.get_errno()
            _URING = f"io_uring_setup: {os.strerror(e)}"
    return _URING or None


class Isthmus(Contender):
    """isthmus-proxy in one of its modes.

    mode: one-hop   client sidecar, outbound capture (isthmus-init REDIRECT, SO_ORIGINAL_DST)
          two-hop   client sidecar outbound + server sidecar inbound capture
          explicit  --no-capture --explicit 127.0.0.1:PORT=VIP:80 in the plain client pod
    """

    group = "isthmus"
    EXPLICIT_PORT = 8001
    EXPLICIT_BULK_PORT = 9001

    def __init__(self, name, mode, backend="io-uring", extra_args=(), protocol="TCP",
                 description=None, registry_format="yaml", target_port=None):
        super().__init__()
        self.registry_format = registry_format
        self.name = name
        self.mode = mode
        self.backend = backend
        self.extra_args = list(extra_args)
        # The web port's declared protocol: TCP = L4 relay (the TCP rows), HTTP = HTTP/1.1
        # data path, HTTP2 = the h2 workload. Written into the ServiceEntry (and its name).
        self.protocol = protocol
        self.target_port = target_port
        # Only a TCP-declared port relays raw bytes: HTTP rows carry no bulk stream, and an
        # idle HTTP client connection opens no upstream connection (no idle-conn measure).
        self.tcp = protocol == "TCP"
        self.workload = "h2" if protocol in ("HTTP2", "GRPC") else "h1"
        self.group = {"h2": "isthmus-h2", "h1": "isthmus" if self.tcp else "isthmus-http"}[
            self.workload]
        self.skip_if_unsupported = self.workload == "h2"
        self.client_pod = "cli" if mode == "explicit" else "clim"
        l7 = "" if protocol == "TCP" else f", port declared {protocol}"
        self.description = description or {
            "one-hop": f"client sidecar, outbound REDIRECT capture ({backend}{l7})",
            "two-hop": f"client sidecar + server sidecar, inbound capture too ({backend}{l7})",
            "explicit": f"--no-capture --explicit listener, no iptables ({backend}{l7})",
        }[mode]
        self.config = None
        self.backend_seen = {}
        self.pods = []

    def registry(self, **kw):
        return registry_files(self.protocol, fmt=self.registry_format,
                              target_port=self.target_port, **kw)

    def write_config(self, **kw):
        return self.config.write(self.registry(**kw))

    def proxy_argv(self, extra=()):
        backend = self.backend
        if backend == "io-uring" and io_uring_available():
            # Not available on this machine (e.g. a container's seccomp profile): run on
            # epoll rather than fail; the backend the proxy reports is in the results.
            backend = "epoll"
        return [os.path.join(self.env.bin_dir, "isthmus-proxy"),
                "--config-dir", self.config.path,
                "--io-backend", backend,
                "--workers", str(self.env.workers),
                "--log", "warn",
                *self.extra_args, *extra]

    def start(self, env, config_kw=None):
        super().start(env)
        self.config = ConfigDir(os.path.join(env.work_dir, f"config-{self.name}"))
        self.write_config(**(config_kw or {}))
        pods = {"one-hop": ["clim"], "two-hop": ["clim", "srvm"], "explicit": ["cli"]}[self.mode]
        self.pods = pods
        # Each sidecar of a two-hop path gets its own core (BENCHMARK.md fairness); where that
        # core is the load generator's, the row is marked as a lower bound.
        cpus = env.sidecar_cpus(len(pods))
        self.cpu_note = None
        if len(pods) > 1 and env.workers == 1:
            where = ", ".join(f"{pod} sidecar on CPU {','.join(map(str, sorted(c)))}"
                              for pod, c in zip(pods, cpus))
            shared = [pod for pod, c in zip(pods, cpus) if c & env.loadgen_cpus]
            self.cpu_note = where + (
                f"; the {' and '.join(shared)} sidecar shares its core with the load generator "
                "and the upstream (not enough cores for one each): a lower bound"
                if shared else "")
        for pod, pod_cpus in zip(pods, cpus):
            extra = []
            if self.mode == "explicit":
                extra = ["--no-capture",
                         "--explicit", f"127.0.0.1:{self.EXPLICIT_PORT}={T.VIP_ONE}:80",
                         "--explicit",
                         f"127.0.0.1:{self.EXPLICIT_BULK_PORT}={T.VIP_ONE}:{T.BULK_PORT}"]
            uid = None if self.mode == "explicit" else T.PROXY_UID
            p = env.topo.pod(pod).spawn(f"proxy-{self.name}", self.proxy_argv(extra), uid=uid,
                                        cpus=pod_cpus, nofile=65536)
            self.procs.append(p)
        for pod, p in zip(pods, self.procs):
            self.wait_ready(env.topo.pod(pod), p)
            self.backend_seen[pod] = self.backend_in_use(env.topo.pod(pod))

    def wait_ready(self, ns, proc, timeout=15):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited:\n{proc.log_tail()}")
            try:
                status, _ = upstream.http_get(ns, "127.0.0.1", 15021, "/healthz/ready",
                                              timeout=0.5)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"{proc.name} not ready after {timeout}s:\n{proc.log_tail()}")

    def backend_in_use(self, ns):
        try:
            _, body = upstream.http_get(ns, "127.0.0.1", 15020, "/stats/prometheus")
        except OSError:
            return "?"
        for line in body.decode(errors="replace").splitlines():
            if line.startswith("isthmus_proxy_io_backend{") and line.rstrip().endswith(" 1"):
                return line.split('backend="', 1)[1].split('"', 1)[0]
        return "?"

    def request_counts(self):
        """{pod: istio_requests_total} of every sidecar in the path, summed over label sets
        (both reporters, every response code); None for a sidecar whose admin did not answer."""
        out = {}
        for pod in self.pods:
            try:
                _, body = upstream.http_get(self.env.topo.pod(pod), "127.0.0.1", 15020,
                                            "/stats/prometheus")
            except OSError:
                out[pod] = None
                continue
            n = 0
            for line in body.decode(errors="replace").splitlines():
                if line.startswith("istio_requests_total"):
                    try:
                        n += int(float(line.rsplit(None, 1)[1]))
                    except (ValueError, IndexError):
                        pass
            out[pod] = n
        return out

    def admin_pod(self):
        return self.env.topo.pod(self.client_pod)

    def config_dump(self):
        import json
        _, body = upstream.http_get(self.admin_pod(), "127.0.0.1", 15000, "/config_dump")
        return json.loads(body)

    def target(self):
        if self.mode == "explicit":
            return ("127.0.0.1", self.EXPLICIT_PORT)
        return (T.VIP_TWO if self.mode == "two-hop" else T.VIP_ONE, 80)

    def bulk_target(self):
        if not self.tcp:
            return None
        if self.mode == "explicit":
            return ("127.0.0.1", self.EXPLICIT_BULK_PORT)
        return (T.VIP_TWO if self.mode == "two-hop" else T.VIP_ONE, T.BULK_PORT)


# Peer tuning. A peer that loses because it was misconfigured proves nothing (BENCHMARK.md,
# "Fairness"), so HAProxy and nginx are set up the way their own documentation advises for the
# job, with buffers comparable to isthmus's relay buffers: isthmus starts each direction of a
# relayed connection at 2 KiB and doubles it whenever a read fills it, up to 256 KiB
# (proxy/src/relay.rs, INITIAL_BUFFER / MAX_BUFFER).
PEER_TCP_BUFFER = 256 * 1024
# HTTP mode: HAProxy's manual says to keep tune.bufsize at its 16 KiB default ("strongly
# recommended not to change this from the default value"); nginx's proxy buffers are sized
# the same so the two HTTP peers hold a whole 1 KiB response in one buffer.
PEER_HTTP_BUFFER = 16 * 1024
# HAProxy pipes for kernel splicing: a spliced stream uses one pipe (2 fds) per direction.
# "maxpipes" defaults to maxconn/4; a fixed small pool leaves the fd budget to maxconn (the
# idle-connection measure needs ~2 fds per held connection under a hard limit of 20000 here),
# and the manual notes that too few pipes only fall back to recv/send.
HAPROXY_MAXPIPES = 256

_VV = {}


def _version_text(argv):
    if argv[0] not in _VV:
        import subprocess
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            _VV[argv[0]] = r.stdout + r.stderr
        except (OSError, subprocess.TimeoutExpired):
            _VV[argv[0]] = ""
    return _VV[argv[0]]


def haproxy_has_splice():
    """`haproxy -vv` lists +LINUX_SPLICE when kernel splicing was built in."""
    return "+LINUX_SPLICE" in _version_text(["haproxy", "-vv"])


class HAProxy(Contender):
    """HAProxy (Debian package), explicit proxy in the client pod; mode tcp or http.

    Directives (HAProxy 2.6 configuration manual, /usr/share/doc/haproxy/configuration.txt.gz):
      global  nbthread N          one thread per worker, the same worker count as every proxy
      global  maxconn M           enough for the idle-connection measure (each held connection
                                  is one frontend connection), under the fd hard limit
      global  maxpipes P          pipes for splicing (see HAPROXY_MAXPIPES)
      global  tune.bufsize B      tcp: 256 KiB, isthmus's largest relay buffer; http: the 16 KiB
                                  default the manual recommends keeping
      global  tune.maxrewrite 1024  "generally wise to set it to about 1024" (reserved header
                                  rewrite space; it also caps the first read at bufsize-1024)
      tcp:    kernel splice(2) between the sockets, only if `haproxy -vv` shows +LINUX_SPLICE:
              web listener (1 KiB request/response): option splice-auto, which splices only
                                  where HAProxy's heuristics see a fast stream
              bulk listener: option splice-request + option splice-response, which splice
                                  "whenever possible". Measured here (HAProxy 2.6.12, strace):
                                  splice-auto never engaged on a 512 MiB stream (0 splice calls,
                                  all recvfrom/sendto), forced splicing cut HAProxy's CPU per GB
                                  by ~40%, and forced splicing of 1 KiB exchanges cost ~12% more
                                  CPU per request than splice-auto; so each listener gets the
                                  option that is best for its traffic, as an operator would.
      http:   option http-keep-alive, http-reuse always  keep-alive on both sides; idle server
                                  connections are shared, so the upstream sees reused
                                  connections (the path never breaks them: one local upstream)
              (no `option forwardfor`, no `log`: HAProxy adds no header and logs nothing
                                  unless told to, like the other proxies here)
      h2:     mode http as above; `bind ... proto h2` (the frontend speaks cleartext HTTP/2
                                  with prior knowledge, as h2load does) and `server ... proto
                                  h2` to the responder's h2 listener: HTTP/2 on both sides, as
                                  an isthmus port declared HTTP2 does; streams of every client
                                  connection are multiplexed over the reused server
                                  connections (http-reuse always). tune.h2.max-concurrent-
                                  streams stays at its default (100): above the workload's
                                  streams per connection
    """

    PORTS = {"tcp": 8002, "http": 8012, "h2": 8022}

    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.name = f"haproxy-{mode}"
        self.group = {"tcp": "peer-tcp", "http": "peer-http", "h2": "peer-h2"}[mode]
        self.workload = "h2" if mode == "h2" else "h1"
        self.tcp = mode == "tcp"
        self.port = self.PORTS[mode]
        self.splice = self.tcp and haproxy_has_splice()
        tuning = (f"tune.bufsize {PEER_TCP_BUFFER // 1024}k"
                  + (", option splice-auto (web), splice-request/response (bulk)" if self.splice
                     else ", no splice (not built in)")
                  if self.tcp else
                  f"tune.bufsize {PEER_HTTP_BUFFER // 1024}k, http-reuse always"
                  + (", h2 (prior knowledge) in and h2 to the upstream" if mode == "h2" else ""))
        self.description = (f"HAProxy mode {'tcp' if self.tcp else 'http'}, explicit listener, "
                            f"same single route; {tuning}")

    def config(self, env):
        srv = T.PODS["srv"]
        http = self.mode != "tcp"
        h2 = self.mode == "h2"
        maxconn = max(1000, min(60000, (nofile_hard() - 2 * HAPROXY_MAXPIPES - 500) // 2))
        bufsize = PEER_HTTP_BUFFER if http else PEER_TCP_BUFFER
        lines = [
            "global",
            f"  nbthread {env.workers}",
            f"  maxconn {maxconn}",
            f"  maxpipes {HAPROXY_MAXPIPES}",
            f"  tune.bufsize {bufsize}",
            "  tune.maxrewrite 1024",
            "defaults",
            f"  mode {'http' if http else 'tcp'}",
            "  timeout connect 5s",
            "  timeout client 600s",
            "  timeout server 600s",
        ]
        if http:
            lines += ["  option http-keep-alive", "  http-reuse always"]
        lines += ["frontend web", f"  bind 127.0.0.1:{self.port}" + (" proto h2" if h2 else ""),
                  "  default_backend web"]
        if self.splice:
            lines += ["  option splice-auto"]
        lines += ["backend web", f"  server s1 {srv}:{T.H2_PORT} proto h2" if h2 else
                  f"  server s1 {srv}:{T.HTTP_PORT}"]
        if not http:
            lines += ["frontend bulk", f"  bind 127.0.0.1:{self.port + 1000}",
                      "  default_backend bulk"]
            if self.splice:
                lines += ["  option splice-request", "  option splice-response"]
            lines += ["backend bulk", f"  server s1 {srv}:{T.BULK_PORT}"]
        return "\n".join(lines) + "\n"

    def start(self, env):
        super().start(env)
        d = os.path.join(env.work_dir, self.name)
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, "haproxy.cfg")
        self.config_text = self.config(env)
        with open(path, "w") as f:
            f.write(self.config_text)
        p = env.topo.pod("cli").spawn(self.name, ["haproxy", "-db", "-f", path],
                                      cpus=env.proxy_cpus, nofile=200000)
        self.procs.append(p)
        upstream.wait_listening(env.topo.pod("cli"), "127.0.0.1", self.port, proc=p)

    def target(self):
        return ("127.0.0.1", self.port)

    def bulk_target(self):
        return ("127.0.0.1", self.port + 1000) if self.tcp else None


class Nginx(Contender):
    """nginx (Debian package), explicit proxy in the client pod; stream or http.

    Directives (nginx.org/en/docs: ngx_core_module, ngx_stream_core_module,
    ngx_stream_proxy_module, ngx_http_proxy_module, ngx_http_upstream_module):
      worker_processes N          the same worker count as every proxy
      worker_connections          30000, or the fd hard limit if lower: a relayed connection
                                  is two nginx connections; covers the idle-connection measure
      worker_rlimit_nofile        the fd hard limit (nginx cannot raise it further)
      stream: proxy_buffer_size 256k  "the buffer used for reading data from the proxied
                                  server" and from the client (default 16k): isthmus's largest
                                  relay buffer. nginx allocates both when a connection is set
                                  up, whatever it carries.
      stream: tcp_nodelay on      (the default since 1.9.4, set explicitly)
      http:   upstream { keepalive 256; keepalive_requests; keepalive_timeout }
              proxy_http_version 1.1; proxy_set_header Connection ""  the documented recipe for
                                  keep-alive to the upstream
      http:   proxy_buffer_size 16k; proxy_buffers 8 16k  header and body buffers (default one
                                  page each): a whole response fits the first one
      http:   tcp_nodelay on; keepalive_requests/keepalive_timeout to the client
              (access_log off: nginx logs every request by default, the others log nothing)
      h2:     the http setup above with a cleartext HTTP/2 listener (`listen ... http2;`, from
                                  nginx 1.25.1 `http2 on;`; prior knowledge, as h2load does);
                                  nginx's proxy module speaks only HTTP/1.x to upstreams, so
                                  it proxies h2 → HTTP/1.1 keep-alive (the same upstream block)
                                  (keepalive_requests also bounds requests per h2 connection
                                  since 1.19.7; http2_max_concurrent_streams stays 128)
    """

    PORTS = {"stream": 8003, "http": 8013, "h2": 8023}

    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.name = f"nginx-{mode}"
        self.group = {"stream": "peer-tcp", "http": "peer-http", "h2": "peer-h2"}[mode]
        self.workload = "h2" if mode == "h2" else "h1"
        self.tcp = mode == "stream"
        self.port = self.PORTS[mode]
        tuning = (f"proxy_buffer_size {PEER_TCP_BUFFER // 1024}k" if self.tcp else
                  f"upstream keepalive, proxy_buffer_size {PEER_HTTP_BUFFER // 1024}k"
                  + ("; h2 in, HTTP/1.1 to the upstream (nginx proxies no h2 upstream)"
                     if mode == "h2" else ""))
        self.description = (f"nginx {'stream' if self.tcp else 'http'} proxy, explicit listener, "
                            f"same single route; {tuning}")

    STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"

    def load_module(self):
        """The stream module is dynamic in Debian's nginx (package libnginx-mod-stream)."""
        if self.mode != "stream":
            return ""
        if "--with-stream=dynamic" in _version_text(["nginx", "-V"]):
            return f"load_module {self.STREAM_MODULE};\n"
        return ""

    def unavailable(self):
        why = super().unavailable()
        if why:
            return why
        if self.load_module() and not os.path.exists(self.STREAM_MODULE):
            return (f"nginx stream module not installed ({self.STREAM_MODULE}; Debian: "
                    "apt-get install libnginx-mod-stream)")
        return None

    def config(self, env, d):
        srv = T.PODS["srv"]
        if self.mode == "stream":
            buf = f"{PEER_TCP_BUFFER // 1024}k"
            body = f"""stream {{
  tcp_nodelay on;
  proxy_buffer_size {buf};
  server {{ listen 127.0.0.1:{self.port} backlog=4096; proxy_pass {srv}:{T.HTTP_PORT}; }}
  server {{ listen 127.0.0.1:{self.port + 1000}; proxy_pass {srv}:{T.BULK_PORT}; proxy_half_close on; }}
}}"""
        else:
            buf = f"{PEER_HTTP_BUFFER // 1024}k"
            body = f"""http {{
  access_log off;
  tcp_nodelay on;
  keepalive_requests 100000000;
  keepalive_timeout 600s;
  upstream web {{
    server {srv}:{T.HTTP_PORT};
    keepalive 256;
    keepalive_requests 100000000;
    keepalive_timeout 600s;
  }}
  server {{
    {upstream.h2c_listen(f"127.0.0.1:{self.port}") if self.mode == "h2" else
     f"listen 127.0.0.1:{self.port} backlog=4096;"}
    location / {{
      proxy_pass http://web;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffer_size {buf};
      proxy_buffers 8 {buf};
    }}
  }}
}}"""
        return self.load_module() + f"""daemon off;
master_process on;
worker_processes {env.workers};
worker_rlimit_nofile {min(65536, nofile_hard())};
pid {d}/nginx.pid;
error_log stderr warn;
events {{ worker_connections {min(30000, nofile_hard())}; }}
{body}
"""

    def start(self, env):
        super().start(env)
        d = os.path.join(env.work_dir, self.name)
        os.makedirs(os.path.join(d, "logs"), exist_ok=True)
        conf = os.path.join(d, "nginx.conf")
        self.config_text = self.config(env, d)
        with open(conf, "w") as f:
            f.write(self.config_text)
        p = env.topo.pod("cli").spawn(self.name, ["nginx", "-p", d, "-e", "stderr", "-c", conf],
                                      cpus=env.proxy_cpus, nofile=65536)
        self.procs.append(p)
        upstream.wait_listening(env.topo.pod("cli"), "127.0.0.1", self.port, proc=p)

    def target(self):
        return ("127.0.0.1", self.port)

    def bulk_target(self):
        return ("127.0.0.1", self.port + 1000) if self.tcp else None


def all_contenders():
    """Every contender, in run order. Add new isthmus modes (HTTP, mTLS) here.

    The TCP rows declare the web port `protocol: TCP` (name `tcp-web`): the sidecar relays it
    as L4 (and the harness checks it counted no HTTP request). The HTTP rows declare it
    `protocol: HTTP` (`http-web`): the sidecar parses HTTP/1.1, routes per request, pools
    upstream connections and counts istio_requests_total (checked against the load
    generator's count). The h2 rows run the h2 workload (h2load) instead of the HTTP/1.1 grid."""
    return [
        Direct(),
        Isthmus("isthmus-1hop", "one-hop", "io-uring", protocol="TCP"),
        Isthmus("isthmus-1hop-epoll", "one-hop", "epoll", protocol="TCP"),
        Isthmus("isthmus-2hop", "two-hop", "io-uring", protocol="TCP"),
        Isthmus("isthmus-explicit", "explicit", "io-uring", protocol="TCP"),
        HAProxy("tcp"),
        Nginx("stream"),
        Isthmus("isthmus-http-1hop", "one-hop", "io-uring", protocol="HTTP"),
        Isthmus("isthmus-http-2hop", "two-hop", "io-uring", protocol="HTTP"),
        Isthmus("isthmus-http-explicit", "explicit", "io-uring", protocol="HTTP"),
        HAProxy("http"),
        Nginx("http"),
        DirectH2(),
        Isthmus("isthmus-h2-1hop", "one-hop", "io-uring", protocol="HTTP2",
                target_port=T.H2_PORT),
        HAProxy("h2"),
        Nginx("h2"),
    ]
