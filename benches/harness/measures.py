"""The measures: latency at fixed rates, max throughput, TCP bulk, memory, reload.
Each returns plain data (lists of samples) that report.py turns into tables."""

import json
import os
import socket
import threading
import time

from . import load
from . import topology as T
from . import upstream
from .ns import (proc_allowed_cpus, proc_cpu_seconds, proc_pss_bytes, proc_rss_bytes,
                 proc_unique_bytes)


class Plan:
    """What to run; `smoke()` and `full()` are the two presets, flags override."""

    def __init__(self, **kw):
        self.rounds = 3
        self.rates = [500, 1000, 2000]
        self.conns = [4, 16, 64]
        # (rate, conns) cells: the rate sweep at 16 connections plus the connection sweep at
        # 1000 rps (the full 3x3 grid is --grid full).
        self.cells = None
        self.duration = 6
        self.warmup = 1
        self.maxrps_duration = 5
        self.maxrps_conns = 64
        self.bulk_bytes = 2 << 30
        self.memory = True
        self.routes = [1000, 10000]
        self.idle_conns = [1000, 10000]
        self.reload = True
        self.reload_rounds = 3
        # The h2 workload (h2load, prior knowledge): many streams on few connections. A fixed
        # rate (h2load --rps per connection) for latency and CPU per request, and max
        # throughput; the same durations as the HTTP/1.1 cells.
        self.h2_rate = 1000
        self.h2_conns = 4
        self.h2_streams = 8
        self.h2_max_streams = 32
        self.__dict__.update(kw)

    def grid(self):
        if self.cells:
            return self.cells
        cells = [(r, 16) for r in self.rates]
        cells += [(1000, c) for c in self.conns if c != 16]
        return cells

    @staticmethod
    def smoke():
        return Plan(rounds=1, cells=[(500, 16)], duration=2, warmup=0, maxrps_duration=2,
                    bulk_bytes=64 << 20, routes=[1000], idle_conns=[200], reload_rounds=1,
                    h2_rate=500)

    @staticmethod
    def full():
        return Plan()


class Results:
    def __init__(self):
        self.latency = {}  # (contender, rate, conns) -> [Sample]
        self.maxrps = {}  # contender -> [Sample]
        self.bulk = {}  # contender -> [dict]
        self.memory = {}  # contender -> dict
        self.reload = []  # [dict]
        self.failures = []  # (contender, what, message)
        self.backends = {}  # contender -> {pod: backend}
        self.contenders = []  # [(name, description, group)]
        self.skipped = []  # [(name, why)]
        self.cpu_notes = {}  # contender -> why its CPU placement is not one core per proxy
        self.configs = {}  # peer -> the config file it ran with (as written)
        self.h2 = {}  # (contender, "rate" | "max") -> [Sample]
        # (contender, what) -> [{"requests": generator's count, "conns", "counted": {pod: n}}]:
        # istio_requests_total deltas over each load run of an isthmus contender
        self.counts = {}
        self.notes = []  # findings that do not invalidate a run (listed under Validity)
        # contender -> what its server sidecar did against the declared mode (row marked ‡)
        self.mode_notes = {}

    def add(self, table, key, value):
        table.setdefault(key, []).append(value)


def run_load(ctx, c, rate, conns, duration, closed_loop=False):
    ns = c.client()
    pids = c.proxy_pids()
    if ctx.oha and not closed_loop:
        return load.run_oha(ctx.oha, ns, c.url(), rate, conns, duration, pids, ctx.loadgen_cpus)
    return load.run_wrk(ns, c.url(), conns, duration, pids, ctx.loadgen_cpus)


def bulk(ctx, c, nbytes):
    host, port = c.bulk_target()
    pids = c.proxy_pids()
    cpu0 = proc_cpu_seconds(pids)
    out = os.path.join(ctx.work_dir, f"bulk-{c.name}-{time.time_ns()}.json")
    with open(out, "wb") as f:
        p = c.client().spawn("bulk-send", ["python3", upstream.HELPER, "send", host, str(port),
                                           str(nbytes)], cpus=ctx.loadgen_cpus, stdout=f)
    rc, _ = p.wait_rusage(timeout=300)
    cpu = proc_cpu_seconds(pids) - cpu0
    with open(out) as f:
        text = f.read().strip()
    os.unlink(out)
    r = {"problems": []}
    try:
        j = json.loads(text.splitlines()[-1])
    except (ValueError, IndexError):
        r["problems"].append(f"sender failed (rc {rc}): {p.log_tail(5)}")
        return r
    r.update(bytes=j["bytes"], seconds=j["seconds"], gbps=j["bytes"] / j["seconds"] / 1e9,
             proxy_cpu=cpu)
    if j["received"] != j["bytes"]:
        r["problems"].append(f"receiver counted {j['received']} of {j['bytes']} bytes")
    return r


def counted(results, c, what, run):
    """Runs run() (a load run returning a Sample) and, for a proxy that counts Istio request
    metrics, checks istio_requests_total on every sidecar against the generator's count: an
    HTTP-declared port must count every request, a TCP-declared port none. Where the first
    (client) sidecar — the one the row is about — is in the wrong mode, the run is not what it
    claims and is invalid; where a second (server) sidecar is, the run stands and the row is
    marked ‡ with what that sidecar did (results.mode_notes)."""
    before = c.request_counts()
    s = run()
    if before is None:
        return s
    after = c.request_counts()
    got = {pod: (None if before.get(pod) is None or after.get(pod) is None
                 else after[pod] - before[pod]) for pod in after}
    n = s.get("requests", 0)
    http = getattr(c, "protocol", "TCP") != "TCP"
    results.add(results.counts, (c.name, what), {
        "requests": n, "conns": s.get("conns"), "streams": s.get("streams"), "counted": got,
        "declared": getattr(c, "protocol", "TCP")})
    s["proxy_counted"] = got
    for i, (pod, k) in enumerate(got.items()):
        wrong = None
        if k is None:
            results.notes.append(f"{c.name} {what}: the {pod} sidecar's metrics did not answer")
        elif not http and k:
            wrong = (f"the {pod} sidecar counted {k} HTTP requests on a port declared TCP "
                     "(it parsed HTTP instead of relaying L4)")
        elif http and n and k == 0:
            wrong = (f"the {pod} sidecar counted no request (istio_requests_total unchanged "
                     f"for {n} requests): it relayed TCP, not HTTP")
        if wrong and i == 0:
            s["problems"].append(wrong)
        elif wrong:
            results.mode_notes[c.name] = wrong.split(" (", 1)[0].replace(f" {k} ", " ")
            results.notes.append(f"{c.name} {what}: {wrong}")
        if wrong or k is None or not http:
            continue
        if not n <= k <= n + (s.get("conns") or 0) * (s.get("streams") or 1):
            # The generator does not count requests still in flight when its duration ends;
            # the proxy may (at most one per connection, or per stream for h2).
            results.notes.append(f"{c.name} {what}: the {pod} sidecar counted {k} requests, "
                                 f"the load generator {n}")
    return s


def run_contender_round(ctx, plan, results, c):
    """Starts c, runs every per-round measure on it, stops it."""
    env = ctx.env
    if c.workload == "h2":
        return run_h2_round(ctx, plan, results, c)
    try:
        c.start(env)
        c.verify()
        if c.cpu_note:
            results.cpu_notes[c.name] = c.cpu_note
        if getattr(c, "config_text", None):
            results.configs.setdefault(c.name, c.config_text)
        if isinstance(getattr(c, "backend_seen", None), dict) and c.backend_seen:
            results.backends[c.name] = dict(c.backend_seen)
        if plan.warmup:
            run_load(ctx, c, 1000, 16, plan.warmup)
        for rate, conns in plan.grid():
            s = counted(results, c, f"{rate} rps c={conns}",
                        lambda: run_load(ctx, c, rate, conns, plan.duration))
            c.check_alive()
            results.add(results.latency, (c.name, rate, conns), s)
            ctx.log(f"    {c.name:20} {rate:5} rps c={conns:<3} " + fmt_sample(s))
        cores = len(proc_allowed_cpus(c.proxy_pids())) or 1
        s = counted(results, c, "max rps", lambda: run_load(
            ctx, c, None, plan.maxrps_conns, plan.maxrps_duration, closed_loop=True))
        # Closed loop: the generator is meant to be the limit or near it; note, don't reject.
        s["saturated"] = [p for p in s["problems"] if "saturated" in p]
        s["problems"] = [p for p in s["problems"] if "saturated" not in p]
        # "rps per proxy core" is capacity only if the proxy was (nearly) saturated; otherwise
        # it is the CPU cost per request at whatever load the generator managed. Noted.
        s["proxy_busy"] = s["proxy_cpu"] / s["wall"] / cores if s["wall"] else 0.0
        s["proxy_cores"] = cores
        results.add(results.maxrps, c.name, s)
        ctx.log(f"    {c.name:20} max rps c={plan.maxrps_conns}: {s['rps']:.0f} rps "
                f"proxy cpu {s['proxy_cpu']:.2f}s " + ("OK" if s.valid else str(s["problems"])))
        if c.tcp and c.bulk_target() and plan.bulk_bytes:
            b = bulk(ctx, c, plan.bulk_bytes)
            results.add(results.bulk, c.name, b)
            ctx.log(f"    {c.name:20} bulk: " + (f"{b['gbps']:.2f} GB/s" if "gbps" in b
                                                   else str(b["problems"])))
        c.check_alive()
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
        results.failures.append((c.name, "round", f"{type(e).__name__}: {e}"))
        ctx.log(f"    {c.name}: FAILED: {e}")
    finally:
        c.stop()


def run_h2_round(ctx, plan, results, c):
    """The h2 workload on c: h2load at a fixed rate (plan.h2_rate over plan.h2_conns
    connections × plan.h2_streams streams), then max throughput (× plan.h2_max_streams)."""
    from .contenders import Unsupported
    env = ctx.env
    try:
        c.start(env)
        try:
            before = c.request_counts()
            c.verify()
            after = c.request_counts()
            if before and after and c.pods and after[c.pods[0]] == before[c.pods[0]]:
                # It answered, but as a TCP relay (the upstream speaks h2 itself): not the
                # proxy's h2 path.
                raise Unsupported("the port declared HTTP2 was relayed as TCP: "
                                  "istio_requests_total unchanged after the h2 requests")
        except Unsupported as e:
            c.check_alive()  # a proxy that died on h2 is a failure, not a skip
            if not c.skip_if_unsupported:
                raise RuntimeError(f"h2 verification failed: {e}") from None
            why = f"not supported by this build ({e})"
            c.unsupported = why
            results.skipped.append((c.name, why))
            results.contenders = [x for x in results.contenders if x[0] != c.name]
            ctx.log(f"    SKIPPED {c.name}: {why}")
            return
        if getattr(c, "config_text", None):
            results.configs.setdefault(c.name, c.config_text)
        if isinstance(getattr(c, "backend_seen", None), dict) and c.backend_seen:
            results.backends[c.name] = dict(c.backend_seen)
        ns, url, pids = c.client(), c.url(), c.proxy_pids()
        if plan.warmup:
            load.run_h2load(ns, url, plan.h2_conns, plan.h2_streams, plan.warmup, pids,
                            ctx.loadgen_cpus, rps=plan.h2_rate)
        s = counted(results, c, "h2 rate", lambda: load.run_h2load(
            ns, url, plan.h2_conns, plan.h2_streams, plan.duration, pids, ctx.loadgen_cpus,
            rps=plan.h2_rate))
        c.check_alive()
        results.add(results.h2, (c.name, "rate"), s)
        ctx.log(f"    {c.name:20} h2 {plan.h2_rate} rps {plan.h2_conns}×{plan.h2_streams} "
                + fmt_sample(s))
        s = counted(results, c, "h2 max", lambda: load.run_h2load(
            ns, url, plan.h2_conns, plan.h2_max_streams, plan.maxrps_duration, pids,
            ctx.loadgen_cpus))
        s["saturated"] = [p for p in s["problems"] if "saturated" in p]
        s["problems"] = [p for p in s["problems"] if "saturated" not in p]
        cores = len(proc_allowed_cpus(pids)) or 1
        s["proxy_busy"] = s["proxy_cpu"] / s["wall"] / cores if s["wall"] else 0.0
        c.check_alive()
        results.add(results.h2, (c.name, "max"), s)
        ctx.log(f"    {c.name:20} h2 max {plan.h2_conns}×{plan.h2_max_streams}: "
                f"{s['rps']:.0f} rps proxy cpu {s['proxy_cpu']:.2f}s "
                + ("OK" if s.valid else str(s["problems"])))
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
        results.failures.append((c.name, "h2 round", f"{type(e).__name__}: {e}"))
        ctx.log(f"    {c.name}: FAILED: {e}")
    finally:
        c.stop()


def fmt_sample(s):
    def f(v):
        return "-" if v is None else f"{v:.3f}"
    base = (f"p50 {f(s.get('p50'))} p90 {f(s.get('p90'))} p99 {f(s.get('p99'))} "
            f"p99.9 {f(s.get('p999'))} ms, {s['requests']} req, gen cpu {s['loadgen_cpu']:.0%}")
    return base + ("" if s.valid else f"  INVALID: {'; '.join(s['problems'])}")


# ---------------------------------------------------------------- memory

def _established(pid, port):
    """Established TCP connections with local port `port` in pid's namespace."""
    n = 0
    hexport = f":{port:04X}"
    for path in (f"/proc/{pid}/net/tcp", f"/proc/{pid}/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[1].endswith(hexport) and parts[3] == "01":
                        n += 1
        except OSError:
            pass
    return n


def _settle_mem(pids, wait=0.3):
    """{"pss", "rss", "unique"} in bytes over pids, after letting the proxy settle. PSS is the
    headline (shared pages split between the processes sharing them); RSS (summed) and unique
    (each physical page of the proxy's processes once) are cross-checks."""
    time.sleep(wait)
    return {"pss": proc_pss_bytes(pids), "rss": proc_rss_bytes(pids),
            "unique": proc_unique_bytes(pids)}


def _mb(v):
    return "?" if v is None else f"{v / 1e6:.2f} MB"


def _fmt_mem(x):
    return f"PSS {_mb(x['pss'])}, unique {_mb(x['unique'])}, RSS {_mb(x['rss'])}"


def hold_connections(ctx, c, counts, log):
    """Opens idle connections through c in steps; returns {count: _settle_mem()}."""
    ns = c.client()
    host, port = c.target()
    up_pid = ctx.env.topo.upstreams["srv" if c.name != "isthmus-2hop" else "srvm"].pid
    base_up = _established(up_pid, T.HTTP_PORT)
    socks = []
    out = {0: _settle_mem(c.proxy_pids())}
    try:
        for target in counts:
            def open_more(n):
                made = []
                for i in range(n):
                    s = socket.socket()
                    s.settimeout(5)
                    s.connect((host, port))
                    made.append(s)
                    if i % 200 == 199:
                        time.sleep(0.01)  # let the proxy drain its accept queue
                return made
            socks += ns.run(open_more, target - len(socks))
            deadline = time.time() + 20
            while time.time() < deadline:
                if _established(up_pid, T.HTTP_PORT) - base_up >= target:
                    break
                time.sleep(0.05)
            else:
                raise RuntimeError(f"only {_established(up_pid, T.HTTP_PORT) - base_up} of "
                                   f"{target} connections reached the upstream")
            c.check_alive()
            out[target] = _settle_mem(c.proxy_pids(), 0.5)
            log(f"    {c.name:20} {target} idle connections: {_fmt_mem(out[target])}")
    finally:
        for s in socks:
            s.close()
    return out


def _split(by_key):
    """{k: {"pss", "rss", "unique"}} -> ({k: pss}, {k: rss}, {k: unique})."""
    return tuple({k: v[m] for k, v in by_key.items()} for m in ("pss", "rss", "unique"))


def memory(ctx, plan, results, contenders):
    """PSS (headline), RSS and unique memory of every proxy: idle, with idle connections held
    (TCP proxies), with extra routes (isthmus). m["idle"], m["conns"], m["routes"] are PSS; the
    same keys with an "_rss" / "_unique" suffix hold RSS / unique pages."""
    from .contenders import Isthmus
    for c in contenders:
        if c.group == "baseline" or c.workload != "h1":
            continue
        if isinstance(c, Isthmus) and c.mode != "explicit":
            continue  # capture and explicit share the same process; one is enough
        m = {}
        try:
            c.start(ctx.env)
            x = _settle_mem(c.proxy_pids(), 0.5)
            m["idle"], m["idle_rss"], m["idle_unique"] = x["pss"], x["rss"], x["unique"]
            m["nprocs"] = len(c.proxy_pids())
            c.verify()
            if c.tcp:
                # An HTTP proxy opens no upstream connection for an idle client connection, so
                # idle connections are held only through the TCP proxies.
                m["conns"], m["conns_rss"], m["conns_unique"] = _split(
                    hold_connections(ctx, c, plan.idle_conns, ctx.log))
            c.stop()
            if isinstance(c, Isthmus) and c.tcp:
                # Routes are measured once, on the TCP config (the extra services are TCP).
                routes = {}
                for n in [0] + list(plan.routes):
                    c.start(ctx.env, config_kw={"extra_services": n})
                    dump = c.config_dump()
                    c.verify()
                    routes[n] = _settle_mem(c.proxy_pids(), 0.5)
                    m.setdefault("versions", {})[n] = dump.get("version")
                    ctx.log(f"    {c.name:20} {n} extra services: {_fmt_mem(routes[n])}")
                    c.stop()
                m["routes"], m["routes_rss"], m["routes_unique"] = _split(routes)
            ctx.log(f"    {c.name:20} idle: {_fmt_mem(x)}")
        except Exception as e:  # noqa: BLE001
            results.failures.append((c.name, "memory", f"{type(e).__name__}: {e}"))
            ctx.log(f"    {c.name}: memory FAILED: {e}")
        finally:
            c.stop()
        results.memory[c.name] = m


# ---------------------------------------------------------------- reload

def reload_once(ctx, plan, c, extra_services, duration=4.0, swap_at=1.5):
    """Under 1000 rps to VIP_ONE, swaps in a config with extra_services services plus a new
    route (VIP_NEW); measures when the new route answers and what the traffic saw."""
    c.start(ctx.env)
    try:
        c.verify()
        ns = c.client()
        old_version = c.config_dump().get("version")
        state = {"answer": None, "version": None, "attempts": 0, "stop": False}

        def poll_route():
            while not state["stop"] and state["answer"] is None:
                state["attempts"] += 1
                try:
                    s = socket.create_connection((T.VIP_NEW, 80), timeout=0.2)
                    s.settimeout(0.2)
                    s.sendall(b"GET / HTTP/1.1\r\nHost: new\r\nConnection: close\r\n\r\n")
                    data = b""
                    while True:
                        chunk = s.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    s.close()
                    if data.startswith(b"HTTP/1.1 200") and data.endswith(
                            upstream.BODY.encode()):
                        state["answer"] = time.monotonic()
                        return
                except OSError:
                    pass
                time.sleep(0.001)

        def poll_version():
            # Prometheus endpoint, not config_dump: cheap to serve, so polling it does not
            # slow the proxy down; the proxy stamps the swap itself
            # (isthmus_config_last_reload_success_timestamp_seconds).
            while not state["stop"] and state["version"] is None:
                try:
                    s = socket.create_connection(("127.0.0.1", 15020), timeout=0.5)
                    s.sendall(b"GET /stats/prometheus HTTP/1.1\r\nHost: a\r\n"
                              b"Connection: close\r\n\r\n")
                    data = b""
                    while True:
                        chunk = s.recv(1 << 20)
                        if not chunk:
                            break
                        data += chunk
                    s.close()
                    text = data.decode(errors="replace")
                    version = stamp = None
                    for line in text.splitlines():
                        if line.startswith("isthmus_config_version{"):
                            version = line.split('version="', 1)[1].split('"', 1)[0]
                        elif line.startswith(
                                "isthmus_config_last_reload_success_timestamp_seconds "):
                            stamp = float(line.split()[1])
                    if version and version != old_version:
                        state["version"] = time.monotonic()
                        state["stamp"] = stamp
                        return
                except (OSError, ValueError, IndexError):
                    pass
                time.sleep(0.002)

        result = {}

        def traffic():
            result["sample"] = run_load(ctx, c, 1000, 16, duration)

        t = threading.Thread(target=traffic, daemon=True)
        t.start()
        time.sleep(swap_at)
        # The new config is written the kubelet way; t0 is the atomic rename.
        t0, t0_wall = c.write_config(extra_services=extra_services, new_route=True)
        threads = [ns.thread(poll_route), ns.thread(poll_version)]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (state["answer"] is None
                                               or state["version"] is None):
            time.sleep(0.005)
        state["stop"] = True
        t.join(duration + 40)
        for th in threads:
            th.join(2)
        s = result.get("sample")
        c.check_alive()
        r = {
            "extra_services": extra_services,
            "answer_ms": None if state["answer"] is None else (state["answer"] - t0) * 1000,
            "version_ms": None if state["version"] is None else (state["version"] - t0) * 1000,
            "swap_ms": None if state.get("stamp") is None else (state["stamp"] - t0_wall) * 1000,
            "sample": s,
            "debounce": " ".join(
                [f"{a} {c.extra_args[i + 1]}" for i, a in enumerate(c.extra_args)
                 if a == "--config-debounce-ms"]
                + ([f"registry as {c.registry_format.upper()}"]
                   if getattr(c, "registry_format", "yaml") != "yaml" else [])) or None,
        }
        return r
    finally:
        c.stop()


def reload(ctx, plan, results, variants):
    for rnd in range(plan.reload_rounds):
        for c in variants:
            try:
                r = reload_once(ctx, plan, c, max(plan.routes))
                r["contender"] = c.name
                results.reload.append(r)
                s = r["sample"]
                ctx.log(f"    {c.name:28} new route answers after "
                        f"{_f(r['answer_ms'])} ms (proxy swapped at {_f(r['swap_ms'])} ms); "
                        f"traffic: " + fmt_sample(s))
            except Exception as e:  # noqa: BLE001
                results.failures.append((c.name, "reload", f"{type(e).__name__}: {e}"))
                ctx.log(f"    {c.name}: reload FAILED: {e}")


def _f(v):
    return "never" if v is None else f"{v:.1f}"


# ---------------------------------------------------------------- profiles

def profile(ctx, plan, c, out_path, seconds=4):
    """perf record -g of c's proxy processes under closed-loop load; writes the top of
    `perf report` to out_path (flat, by symbol) and the same profile with children (the
    inclusive cost of each frame, so the HTTP path's own functions show above the syscalls
    they end in). Returns the path, or None if perf is unavailable."""
    import shutil
    import subprocess
    if not shutil.which("perf"):
        return None
    c.start(ctx.env)
    try:
        c.verify()
        pids = ",".join(str(p) for p in c.proxy_pids())
        data = os.path.join(ctx.work_dir, f"perf-{c.name}.data")
        result = {}
        t = threading.Thread(target=lambda: result.update(
            s=run_load(ctx, c, None, plan.maxrps_conns, seconds + 2, closed_loop=True)),
            daemon=True)
        t.start()
        time.sleep(1)
        rec = subprocess.run(["perf", "record", "-F", "1999", "-g", "-p", pids, "-o", data, "--",
                              "sleep", str(seconds)], capture_output=True, text=True)
        t.join(seconds + 40)
        if rec.returncode != 0:
            with open(out_path, "w") as f:
                f.write(f"perf record failed: {rec.stderr}\n")
            return out_path
        def report(*args):
            r = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children",
                                "-g", "none", *args], capture_output=True, text=True)
            return "\n".join(line.rstrip(" -") for line in r.stdout.splitlines()
                             if line.strip() and not line.startswith("#"))
        try:
            exe = os.path.basename(os.readlink(f"/proc/{c.proxy_pids()[0]}/exe"))
        except (OSError, IndexError):
            exe = None
        s = result.get("s") or {}
        with open(out_path, "w") as f:
            f.write(f"# perf profile of {c.name} ({c.description}), closed loop "
                    f"c={plan.maxrps_conns}, {seconds} s; "
                    f"{s.get('rps', 0):.0f} rps, proxy CPU {s.get('proxy_cpu', 0):.2f} s\n")
            f.write(report("--sort", "dso,symbol", "--percent-limit", "1") + "\n")
            f.write("\n# by binary (kernel, the proxy, libc, ...)\n")
            f.write(report("--sort", "dso", "--percent-limit", "0.5") + "\n")
            if exe:
                # The proxy's own code (share of all samples): what its user space spends on.
                f.write(f"\n# user space of {exe} only (percent of all samples, ≥ 0.2%)\n")
                f.write(report("--sort", "symbol", "--dsos", exe, "--percent-limit", "0.2")
                        + "\n")
        return out_path
    finally:
        c.stop()
