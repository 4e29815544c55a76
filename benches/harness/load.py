"""Load generators: oha (open loop, fixed rate, coordinated-omission corrected) and wrk
(closed loop; smoke mode without oha, and max throughput). Every response is verified:
status 200 and a body of exactly 1024 bytes."""

import json
import os
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
