"""Load generators: oha (open loop, fixed rate, coordinated-omission corrected) and wrk
(closed loop; smoke mode without oha, and max throughput). Every response is verified:
status 200 and a body of exactly 1024 bytes."""

import json
import os
import re
import shutil
import subprocess
import tempfile

from .ns import cpu_busy_fraction, cpu_busy_snapshot, proc_cpu_seconds
from .upstream import BODY_LEN

OHA_CACHE = "/var/cache/isthmus-bench"
WRK_LUA = r"""
good = 0
bad = 0
response = function(status, headers, body)
  if status == 200 and #body == %d then good = good + 1 else bad = bad + 1 end
end
local threads = {}
setup = function(thread) table.insert(threads, thread) end
done = function(summary, latency, requests)
  local g, b = 0, 0
  for _, t in ipairs(threads) do g = g + t:get("good"); b = b + t:get("bad") end
  io.write(string.format("VERIFY good=%%d bad=%%d\n", g, b))
  for _, p in ipairs({50, 90, 99, 99.9}) do
    io.write(string.format("PCT %%g %%d\n", p, latency:percentile(p)))
  end
  local e = summary.errors
  io.write(string.format("SUMMARY requests=%%d duration_us=%%d connect=%%d read=%%d write=%%d status=%%d timeout=%%d bytes=%%d\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout, summary.bytes))
end
""" % BODY_LEN


def find_oha():
    for p in (os.path.join(OHA_CACHE, "bin", "oha"), shutil.which("oha")):
        if p and os.path.exists(p):
            return p
    return None


def install_oha(log):
    log(f"oha not found: cargo install --locked oha --root {OHA_CACHE} (several minutes, cached)")
    os.makedirs(OHA_CACHE, exist_ok=True)
    r = subprocess.run(["cargo", "install", "--locked", "oha", "--root", OHA_CACHE])
    if r.returncode != 0:
        raise RuntimeError("cargo install oha failed (use --loadgen wrk to run without it)")
    return find_oha()


def version(argv):
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        out = (r.stdout + r.stderr).strip().splitlines()
        return out[0].strip() if out else "?"
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"


class Sample(dict):
    """One load run: latencies in ms, counts, CPU, and validity problems."""

    @property
    def valid(self):
        return not self["problems"]


def _measure(ns, argv, proxy_pids, loadgen_cpus, duration, name):
    before_cpu = proc_cpu_seconds(proxy_pids)
    before = cpu_busy_snapshot()
    out = tempfile.NamedTemporaryFile(prefix="load-", suffix=".out", delete=False)
    out.close()
    with open(out.name, "wb") as f:
        p = ns.spawn(name, argv, cpus=loadgen_cpus, nofile=65536, stdout=f)
    import time
    t0 = time.monotonic()
    rc, lg_cpu = p.wait_rusage(timeout=duration + 30)
    wall = time.monotonic() - t0
    after = cpu_busy_snapshot()
    proxy_cpu = proc_cpu_seconds(proxy_pids) - before_cpu
    with open(out.name, errors="replace") as f:
        text = f.read()
    os.unlink(out.name)
    lg_core = max(cpu_busy_fraction(before, after, c) for c in loadgen_cpus)
    return rc, text, wall, lg_cpu, lg_core, proxy_cpu, p


def _common_checks(s, rc, proc):
    if rc != 0:
        s["problems"].append(f"load generator exited {rc}: {proc.log_tail(5).strip()}")
    if s["loadgen_cpu"] > 0.90:
        s["problems"].append(f"load generator used {s['loadgen_cpu']:.0%} of its core (saturated)")
    if s["requests"] == 0:
        s["problems"].append("no requests completed")


def run_oha(oha, ns, url, rate, conns, duration, proxy_pids, loadgen_cpus, closed_loop=False):
    argv = [oha, "--no-tui", "--output-format", "json", "-z", f"{int(duration * 1000)}ms", "-c", str(conns),
            "-w"]
    if not closed_loop:
        argv += ["-q", str(rate), "--latency-correction"]
    argv.append(url)
    rc, text, wall, lg_cpu, lg_core, proxy_cpu, proc = _measure(
        ns, argv, proxy_pids, loadgen_cpus, duration, "oha")
    s = Sample(tool="oha", rate=rate, conns=conns, duration=duration, problems=[], wall=wall)
    try:
        j = json.loads(text[text.index("{"):])
    except ValueError:
        s.update(requests=0, ok=0, errors={}, loadgen_cpu=lg_cpu / wall, loadgen_core=lg_core,
                 proxy_cpu=proxy_cpu)
        s["problems"].append(f"oha output unreadable: {text[:300]!r} {proc.log_tail(5)}")
        return s
    summ = j["summary"]
    codes = {str(k): v for k, v in (j.get("statusCodeDistribution") or {}).items()}
    errors = dict(j.get("errorDistribution") or {})
    ok = codes.get("200", 0)
    total = sum(codes.values())
    pct = j.get("latencyPercentiles") or {}
    def ms(key):
        v = pct.get(key)
        return None if v is None else v * 1000.0
    size = summ.get("sizePerRequest")
    s.update(requests=total, ok=ok, errors=errors, codes=codes,
             p50=ms("p50"), p90=ms("p90"), p99=ms("p99"), p999=ms("p99.9"),
             rps=total / wall if wall else 0, achieved_rps=summ.get("requestsPerSec"),
             total_data=summ.get("totalData"), size_per_request=size,
             loadgen_cpu=lg_cpu / wall, loadgen_core=lg_core, proxy_cpu=proxy_cpu)
    _common_checks(s, rc, proc)
    if ok != total:
        s["problems"].append(f"non-200 responses: {codes}")
    if errors:
        s["problems"].append(f"errors: {errors}")
    # Every response's body length: total bytes must be exactly 1024 per response.
    if total and summ.get("totalData") is not None and summ["totalData"] != total * BODY_LEN:
        s["problems"].append(f"body bytes {summ['totalData']} != {total} × {BODY_LEN}")
    if not closed_loop and total < 0.9 * rate * duration:
        s["problems"].append(f"only {total} of {rate * duration} requests sent (rate not held)")
    return s


def run_wrk(ns, url, conns, duration, proxy_pids, loadgen_cpus, threads=1):
    lua = tempfile.NamedTemporaryFile("w", prefix="verify-", suffix=".lua", delete=False)
    lua.write(WRK_LUA)
    lua.close()
    os.chmod(lua.name, 0o644)
    argv = ["wrk", f"-t{threads}", f"-c{max(conns, threads)}", f"-d{max(1, round(duration))}s", "--latency",
            "-s", lua.name, url]
    rc, text, wall, lg_cpu, lg_core, proxy_cpu, proc = _measure(
        ns, argv, proxy_pids, loadgen_cpus, duration, "wrk")
    os.unlink(lua.name)
    s = Sample(tool="wrk", rate=None, conns=conns, duration=duration, problems=[], wall=wall)
    good = bad = 0
    pcts, summ = {}, {}
    for line in text.splitlines():
        if line.startswith("VERIFY"):
            kv = dict(x.split("=") for x in line.split()[1:])
            good, bad = int(kv["good"]), int(kv["bad"])
        elif line.startswith("PCT"):
            _, p, v = line.split()
            pcts[p] = int(v) / 1000.0
        elif line.startswith("SUMMARY"):
            summ = {k: int(v) for k, v in (x.split("=") for x in line.split()[1:])}
    total = summ.get("requests", 0)
    errors = {k: summ[k] for k in ("connect", "read", "write", "status", "timeout")
              if summ.get(k)}
    dur = summ.get("duration_us", 0) / 1e6 or wall
    s.update(requests=total, ok=good, errors=errors, codes={"200-verified": good, "bad": bad},
             p50=pcts.get("50"), p90=pcts.get("90"), p99=pcts.get("99"), p999=pcts.get("99.9"),
             rps=total / dur if dur else 0, loadgen_cpu=lg_cpu / wall, loadgen_core=lg_core,
             proxy_cpu=proxy_cpu)
    _common_checks(s, rc, proc)
    if bad or good != total:
        s["problems"].append(f"{bad} responses failed verification (status 200, {BODY_LEN} B)"
                             f"; {good} of {total} verified")
    if errors:
        s["problems"].append(f"errors: {errors}")
    return s


# ---------------------------------------------------------------- h2 (h2load)

H2_SUMMARY = {
    "requests": re.compile(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                           r"(\d+) failed, (\d+) errored, (\d+) timeout"),
    "codes": re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx"),
    "traffic": re.compile(r"traffic: .*?\((\d+)\) total, .*?\((\d+)\) headers.*?\((\d+)\) data"),
    "finished": re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s"),
}


def parse_h2load(text):
    """h2load's summary → {total, started, done, succeeded, failed, errored, timeout, 2xx, 3xx,
    4xx, 5xx, data_bytes, header_bytes, seconds}; {} if there is none."""
    out = {}
    m = H2_SUMMARY["requests"].search(text)
    if not m:
        return out
    out.update(zip(("total", "started", "done", "succeeded", "failed", "errored", "timeout"),
                   map(int, m.groups())))
    m = H2_SUMMARY["codes"].search(text)
    if m:
        out.update(zip(("2xx", "3xx", "4xx", "5xx"), map(int, m.groups())))
    m = H2_SUMMARY["traffic"].search(text)
    if m:
        out["total_bytes"], out["header_bytes"], out["data_bytes"] = map(int, m.groups())
    m = H2_SUMMARY["finished"].search(text)
    if m:
        out["seconds"] = float(m.group(1)) / (1000.0 if m.group(2) == "ms" else 1.0)
    return out


def h2_preface_probe(ns, host, port, timeout=2.0):
    """What the listener does with an HTTP/2 prior-knowledge preface: None if it answers with
    a SETTINGS frame (it speaks h2), else why not (connection refused, answered HTTP/1.x,
    closed, no answer)."""
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    try:
        s = ns.connect((host, port), timeout=timeout)
    except ConnectionRefusedError:
        return "connection refused"
    except OSError as e:
        return f"connect failed: {e}"
    try:
        s.settimeout(timeout)
        s.sendall(preface)
        data = b""
        while len(data) < 9:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        return "protocol error: connection reset after the h2 preface"
    except OSError as e:
        return f"protocol error: no answer to the h2 preface ({e})"
    finally:
        s.close()
    if len(data) >= 9 and data[3] == 0x04:
        return None
    if data.startswith(b"HTTP/"):
        return ("protocol error: answered the h2 preface with HTTP/1.x ("
                + data.split(b"\r\n", 1)[0].decode(errors="replace") + ")")
    if not data:
        return "protocol error: connection closed after the h2 preface"
    return f"protocol error: answered the h2 preface with {data[:16]!r}"


def h2_verify(ns, url, n=4):
    """Raises Unsupported unless n requests over one h2 connection (prior knowledge) all
    succeed with a 2xx status and the 1 KiB body. The reason says what went wrong."""
    from urllib.parse import urlsplit
    from .contenders import Unsupported
    u = urlsplit(url)
    why = h2_preface_probe(ns, u.hostname, u.port)
    if why:
        raise Unsupported(why)
    out = tempfile.NamedTemporaryFile(prefix="h2verify-", suffix=".out", delete=False)
    out.close()
    with open(out.name, "wb") as f:
        p = ns.spawn("h2load-verify", ["h2load", "-n", str(n), "-c", "1", "-m", "2", url],
                     stdout=f)
    p.wait_rusage(timeout=20)
    with open(out.name, errors="replace") as f:
        text = f.read()
    os.unlink(out.name)
    summ = parse_h2load(text)
    if (summ.get("succeeded") != n or summ.get("2xx") != n
            or summ.get("data_bytes") != n * BODY_LEN):
        lines = [x for x in text.splitlines() if x.startswith(("requests:", "status codes:"))]
        raise Unsupported(f"h2 requests failed: {'; '.join(lines) or repr(text[-300:])}; "
                          f"{summ.get('data_bytes', 0)} body bytes for {n} requests")


def _percentile(sorted_xs, p):
    if not sorted_xs:
        return None
    k = min(len(sorted_xs) - 1, max(0, int(round(p / 100.0 * len(sorted_xs) + 0.5)) - 1))
    return sorted_xs[k]


def run_h2load(ns, url, clients, streams, duration, proxy_pids, loadgen_cpus, rps=None):
    """h2load -t1 -c CLIENTS -m STREAMS -D DURATION [--rps RPS/CLIENTS]: many streams on few
    connections. With rps, each client sends at RPS/CLIENTS requests per second and every
    request is logged (--log-file: status, µs to the end of the response) for percentiles and
    the exact status of each; without, max throughput (no log: it would cost the generator's
    core). Verified: no failed/errored/timed-out request, every one 2xx (200 with the log),
    and data bytes = 1024 × responses."""
    log_path = None
    argv = ["h2load", "-t", "1", "-c", str(clients), "-m", str(streams),
            "-D", str(max(1, round(duration)))]
    if rps:
        per = max(1, round(rps / clients))
        argv += ["--rps", str(per)]
        log = tempfile.NamedTemporaryFile(prefix="h2load-", suffix=".tsv", delete=False)
        log.close()
        log_path = log.name
        argv += ["--log-file", log_path]
    argv.append(url)
    rc, text, wall, lg_cpu, lg_core, proxy_cpu, proc = _measure(
        ns, argv, proxy_pids, loadgen_cpus, duration, "h2load")
    summ = parse_h2load(text)
    s = Sample(tool="h2load", rate=rps, conns=clients, streams=streams, duration=duration,
               problems=[], wall=wall, summary=summ)
    done = summ.get("done", 0)
    lat = []
    codes = {}
    if log_path:
        try:
            with open(log_path) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 3:
                        codes[parts[1]] = codes.get(parts[1], 0) + 1
                        lat.append(int(parts[2]) / 1000.0)
        finally:
            os.unlink(log_path)
    lat.sort()
    secs = summ.get("seconds") or wall
    s.update(requests=done, ok=summ.get("succeeded", 0),
             errors={k: summ[k] for k in ("failed", "errored", "timeout") if summ.get(k)},
             codes=codes or {"2xx": summ.get("2xx", 0)},
             p50=_percentile(lat, 50), p90=_percentile(lat, 90), p99=_percentile(lat, 99),
             p999=_percentile(lat, 99.9), rps=done / secs if secs else 0,
             loadgen_cpu=lg_cpu / wall, loadgen_core=lg_core, proxy_cpu=proxy_cpu)
    _common_checks(s, rc, proc)
    if not summ:
        s["problems"].append(f"h2load output unreadable: {text[-300:]!r}")
        return s
    if s["errors"]:
        s["problems"].append(f"h2load: {s['errors']}")
    # A response whose head arrived before the end but whose body did not counts as 2xx, not
    # as done: 2xx may exceed done by the requests in flight.
    if (summ.get("succeeded") != done
            or not done <= summ.get("2xx", 0) <= summ.get("started", done)):
        s["problems"].append(f"{summ.get('2xx')} 2xx, {summ.get('succeeded')} succeeded of "
                             f"{done} responses")
    if log_path and (codes.get("200", 0) != len(lat) or len(lat) != done):
        s["problems"].append(f"logged statuses {codes} for {done} responses")
    # Body bytes: exactly 1024 per response, plus at most the partial bodies of the requests
    # still in flight when the duration ended.
    extra = summ.get("data_bytes", 0) - done * BODY_LEN
    in_flight = summ.get("started", 0) - done
    if extra < 0 or extra >= max(1, in_flight) * BODY_LEN:
        s["problems"].append(f"data bytes {summ.get('data_bytes')} != {done} × {BODY_LEN}"
                             f" (+ < {in_flight} partial)")
    if rps and done < 0.9 * rps * duration:
        s["problems"].append(f"only {done} of {rps * duration:.0f} requests (rate not held)")
    return s
