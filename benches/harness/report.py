"""Results → markdown tables, targets, and a hand-written SVG of latency percentiles."""

import html
import statistics

HEADLINE = (1000, 16)
PROXY_SATURATED = 0.8  # max-rps runs below this proxy CPU busy fraction are noted
PCTS = [("p50", "p50"), ("p90", "p90"), ("p99", "p99"), ("p999", "p99.9")]


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def mmm(xs, fmt="{:.3f}"):
    """'median [min–max]' of the values."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "—"
    m = statistics.median(xs)
    if len(xs) == 1:
        return fmt.format(m)
    return f"{fmt.format(m)} [{fmt.format(min(xs))}–{fmt.format(max(xs))}]"


def f(v, fmt="{:.3f}", none="—"):
    return none if v is None else fmt.format(v)


def valid(samples):
    return [s for s in samples if s.valid]


class Summary:
    """Derived numbers (medians over valid rounds) shared by the tables and the targets."""

    def __init__(self, results):
        self.r = results
        # HTTP/1.1 rows (latency grid, max rps, bulk) and h2-workload rows (h2load).
        self.names = [c[0] for c in results.contenders if not c[2].endswith("h2")]
        self.h2_names = [c[0] for c in results.contenders if c[2].endswith("h2")]
        self.notes = getattr(results, "cpu_notes", {}) or {}
        self.mode_notes = getattr(results, "mode_notes", {}) or {}

    def label(self, name):
        """Row label: a contender that could not get one core per proxy process is marked †
        (a lower bound; the note under the table says why); one whose server sidecar ran in
        another mode than the port declares is marked ‡."""
        return (name + (" †" if name in self.notes else "")
                + (" ‡" if name in self.mode_notes else ""))

    def footnote(self):
        return ("".join(f"\n† {n}: {why}." for n, why in self.notes.items())
                + "".join(f"\n‡ {n}: {why} (the row is not the declared mode on that hop)."
                          for n, why in self.mode_notes.items()))

    def lat(self, name, cell, key):
        return med([s.get(key) for s in valid(self.r.latency.get((name,) + cell, []))])

    def added(self, name, cell, key):
        a, d = self.lat(name, cell, key), self.lat("direct", cell, key)
        return None if a is None or d is None else a - d

    def cpu_per_req(self, name, cell=None):
        """Proxy CPU seconds per request at a fixed rate (median over valid rounds)."""
        cell = cell or HEADLINE
        xs = [s["proxy_cpu"] / s["requests"] for s in valid(self.r.latency.get((name,) + cell, []))
              if s["requests"]]
        return med(xs)

    def rps_per_core(self, name):
        xs = [s["requests"] / s["proxy_cpu"] for s in valid(self.r.maxrps.get(name, []))
              if s["proxy_cpu"] > 0]
        return med(xs)

    def maxrps(self, name):
        return med([s["rps"] for s in valid(self.r.maxrps.get(name, []))])

    def bulk(self, name):
        return med([b.get("gbps") for b in self.r.bulk.get(name, []) if not b["problems"]])

    def mem(self, name):
        return self.r.memory.get(name) or {}

    def idle_pss(self, name):
        return self.mem(name).get("idle")

    def h2_samples(self, name, what):
        return valid(getattr(self.r, "h2", {}).get((name, what), []))

    def h2_lat(self, name, key):
        return med([s.get(key) for s in self.h2_samples(name, "rate")])

    def h2_added(self, name, key):
        a, d = self.h2_lat(name, key), self.h2_lat("direct-h2", key)
        return None if a is None or d is None else a - d

    def h2_cpu_per_req(self, name):
        return med([s["proxy_cpu"] / s["requests"] for s in self.h2_samples(name, "rate")
                    if s["requests"]])

    def h2_rps_per_core(self, name):
        return med([s["requests"] / s["proxy_cpu"] for s in self.h2_samples(name, "max")
                    if s["proxy_cpu"] > 0])

    def h2_rps(self, name):
        return med([s["rps"] for s in self.h2_samples(name, "max")])


def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def targets(S):
    """[(target, value text, met?, miss text)] per issue 3 item 5."""
    out = []
    hap = "haproxy-tcp"

    def row(what, value, met, miss):
        out.append((what, value, met, miss))

    for name in ("isthmus-explicit", "isthmus-1hop"):
        r = ratio(S.cpu_per_req(name), S.cpu_per_req(hap))
        row(f"CPU/request ≤ 0.8× HAProxy tcp ({name}, {HEADLINE[0]} rps c={HEADLINE[1]})",
            f(r, "{:.2f}×"), r is not None and r <= 0.8,
            "" if r is None or r <= 0.8 else f"{(r / 0.8 - 1) * 100:.0f}% over the target")
    for name in ("isthmus-explicit", "isthmus-1hop"):
        r = ratio(S.rps_per_core(name), S.rps_per_core(hap))
        row(f"rps per proxy core ≥ 1.1× HAProxy tcp ({name})", f(r, "{:.2f}×"),
            r is not None and r >= 1.1,
            "" if r is None or r >= 1.1 else f"{(1 - r / 1.1) * 100:.0f}% short of the target")
    a = S.added("isthmus-2hop", HEADLINE, "p99")
    row(f"two-hop added p99 at {HEADLINE[0]} rps c={HEADLINE[1]} ≤ 0.1 ms"
        + (f" ({S.label('isthmus-2hop')[len('isthmus-2hop '):]})"
           if S.label("isthmus-2hop") != "isthmus-2hop" else ""), f(a, "{:+.3f} ms"),
        a is not None and a <= 0.1, "" if a is None or a <= 0.1 else f"{a - 0.1:.3f} ms over")
    for name in ("isthmus-1hop", "isthmus-2hop"):
        r = ratio(S.bulk(name), S.bulk("direct"))
        row(f"TCP bulk ≥ 0.8× direct ({S.label(name)})", f(r, "{:.2f}×"), r is not None and r >= 0.8,
            "" if r is None or r >= 0.8 else f"{(1 - r / 0.8) * 100:.0f}% short")
    # Issue 3 states the memory targets in RSS: judged on RSS (for one process it is the
    # stricter of the two; the memory table's headline is PSS).
    m = S.mem("isthmus-explicit")
    idle = m.get("idle_rss", m.get("idle"))
    row("idle RSS ≤ 5 MB", f(idle and idle / 1e6, "{:.2f} MB"), idle is not None and idle <= 5e6,
        "" if idle is None or idle <= 5e6 else f"{(idle - 5e6) / 1e6:.2f} MB over")
    per_route = route_slope(m, "routes_rss" if "routes_rss" in m else "routes")
    row("≤ 1 KB per route (RSS)", f(per_route, "{:.0f} B"),
        per_route is not None and per_route <= 1024,
        "" if per_route is None or per_route <= 1024 else f"{per_route / 1024:.1f}× the target")
    per_conn = conn_slope(m, "conns_rss" if "conns_rss" in m else "conns")
    row("≤ 10 KB per idle connection (RSS)", f(per_conn, "{:.0f} B"),
        per_conn is not None and per_conn <= 10240,
        "" if per_conn is None or per_conn <= 10240 else f"{per_conn / 10240:.1f}× the target")
    rl = [x for x in S.r.reload if not x.get("debounce")]
    if not rl:
        row("10k-route reload ≤ 100 ms, zero errors (default flags)", "—", False, "")
        return out
    times = [x["answer_ms"] for x in rl]
    errs = sum(reload_errors(x) for x in rl)
    worst = None if not times or None in times else max(times)
    row("10k-route reload ≤ 100 ms, zero errors (default flags)",
        f"{f(med(times), '{:.0f}')} ms median, worst {f(worst, '{:.0f}')} ms, {errs} errors",
        worst is not None and worst <= 100 and errs == 0,
        "" if worst is not None and worst <= 100 and errs == 0 else
        (f"worst {worst - 100:.0f} ms over" if worst is not None and worst > 100 else "")
        + (f"; {errs} errors" if errs else "") + ("never answered" if worst is None else ""))
    return out


# The HTTP rows judged against HAProxy mode http (issue 7 item 8), and the TCP rows against
# the baseline run. "No worse" allows 5%: the same-run ratios of the TCP rows moved by up to
# ±4% between the quiet full runs so far (e.g. isthmus-1hop CPU/request vs HAProxy tcp 1.08×,
# 1.12×), so a stricter test would call noise a regression.
HTTP_REF = "haproxy-http"
HTTP_ROWS = ("isthmus-http-1hop", "isthmus-http-explicit", "isthmus-http-2hop")
TCP_ROWS = ("isthmus-1hop", "isthmus-explicit", "isthmus-2hop")
NO_WORSE = 0.05


def http_targets(S, baseline=None):
    """[(target, value text, met?, miss text)] per issue 7 item 8."""
    out = []
    rows = [n for n in HTTP_ROWS if n in S.names]
    for name in rows:
        r = ratio(S.rps_per_core(name), S.rps_per_core(HTTP_REF))
        out.append((f"rps per proxy core ≥ 1.1× HAProxy http ({S.label(name)})", f(r, "{:.2f}×"),
                    r is not None and r >= 1.1,
                    "" if r is None or r >= 1.1 else f"{(1 - r / 1.1) * 100:.0f}% short"))
    for name in rows:
        r = ratio(S.cpu_per_req(name), S.cpu_per_req(HTTP_REF))
        out.append((f"CPU/request at {HEADLINE[0]} rps c={HEADLINE[1]} ≤ 0.8× HAProxy http "
                    f"({S.label(name)})", f(r, "{:.2f}×"), r is not None and r <= 0.8,
                    "" if r is None or r <= 0.8 else f"{(r / 0.8 - 1) * 100:.0f}% over"))
    ref = S.added(HTTP_REF, HEADLINE, "p99")
    for name in rows:
        a = S.added(name, HEADLINE, "p99")
        d = None if a is None or ref is None else a - ref
        out.append((f"added p99 at {HEADLINE[0]} rps c={HEADLINE[1]} ≤ HAProxy http's "
                    f"({f(ref, '{:+.3f}')} ms) ({S.label(name)})", f(a, "{:+.3f} ms"),
                    d is not None and d <= 0, "" if d is None or d <= 0 else f"{d:.3f} ms over"))
    if baseline is None:
        out.append(("TCP-mode ratios no worse than the baseline run", "—", False,
                    "no baseline results"))
        return out
    B = Summary(baseline)
    checks = [
        ("CPU/request vs HAProxy tcp", lambda X, n: ratio(X.cpu_per_req(n), X.cpu_per_req(
            "haproxy-tcp")), False),
        ("rps per proxy core vs HAProxy tcp", lambda X, n: ratio(X.rps_per_core(n),
                                                                 X.rps_per_core("haproxy-tcp")),
         True),
        ("bulk vs direct", lambda X, n: ratio(X.bulk(n), X.bulk("direct")), True),
    ]
    for what, fn, higher_better in checks:
        for name in TCP_ROWS:
            if name not in S.names:
                continue
            now, then = fn(S, name), fn(B, name)
            if now is None or then is None:
                out.append((f"TCP {what} no worse than {baseline.stem} ({name})",
                            f(now, "{:.2f}×"), False, "not measured in both runs"))
                continue
            ok = now >= then * (1 - NO_WORSE) if higher_better else now <= then * (1 + NO_WORSE)
            change = (now / then - 1) * 100
            out.append((f"TCP {what} no worse than {baseline.stem} ({S.label(name)})",
                        f"{now:.2f}× (was {then:.2f}×, {change:+.0f}%)", ok,
                        "" if ok else f"{abs(change):.0f}% {'lower' if higher_better else 'higher'}"
                        f" (tolerance {NO_WORSE:.0%})"))
    return out


def load_baseline(path):
    """An earlier run's results JSON as a Results-like object Summary can read."""
    import json
    import os
    from .load import Sample
    with open(path) as fh:
        j = json.load(fh)

    class R:
        pass
    b = R()
    b.stem = os.path.splitext(os.path.basename(path))[0]
    b.latency = {(x["contender"], x["rate"], x["conns"]): [Sample(s) for s in x["samples"]]
                 for x in j["latency"]}
    b.maxrps = {k: [Sample(s) for s in v] for k, v in j["maxrps"].items()}
    b.bulk = j.get("bulk", {})
    b.memory = j.get("memory", {})
    b.cpu_notes = j.get("cpu_notes", {})
    names = [c[0] for c in j.get("contenders") or []] or list(
        dict.fromkeys(k[0] for k in b.latency))
    b.contenders = [(n, "", "") for n in names]
    return b


def route_slope(m, key="routes"):
    r = m.get(key) or {}
    ks = sorted(r)
    if len(ks) < 2 or r[ks[-1]] is None or r[ks[-2]] is None:
        return None
    return (r[ks[-1]] - r[ks[-2]]) / (ks[-1] - ks[-2]) if ks[-1] != ks[-2] else None


def conn_slope(m, key="conns"):
    c = m.get(key) or {}
    ks = sorted(c)
    if len(ks) < 2 or c[ks[-1]] is None or c[ks[0]] is None:
        return None
    return (c[ks[-1]] - c[ks[0]]) / (ks[-1] - ks[0])


def reload_errors(x):
    s = x.get("sample")
    if not s:
        return 1
    return (s["requests"] - s["ok"]) + sum((s.get("errors") or {}).values())


def markdown(results, meta, plan, svg_name, profiles=(), baseline=None):
    S = Summary(results)
    L = []
    w = L.append
    w(f"# isthmus benchmark — {meta['date']}\n")
    w(f"Mode: **{meta['mode']}**. Load generator: **{meta['loadgen']}**"
      + ("" if meta["loadgen"].startswith("oha") else
         " (closed loop: latencies are NOT corrected for coordinated omission)") + ".\n")
    w("## Machine and versions\n")
    for k, v in meta["machine"].items():
        w(f"- {k}: {v}")
    w("")
    w(f"Plan: {plan.rounds} round(s), contenders interleaved and rotated each round; "
      f"{plan.duration} s per fixed-rate cell (after {plan.warmup} s warm-up), cells "
      f"(rps, connections) {plan.grid()}; max rps: closed loop, {plan.maxrps_conns} connections, "
      f"{plan.maxrps_duration} s; bulk {plan.bulk_bytes / 2**20:.0f} MiB per transfer. "
      f"CPU pinning: load generator and upstream on CPU {meta['loadgen_cpus']}, proxies on CPU "
      f"{meta['proxy_cpus']}; {meta['workers']} proxy worker(s) for every proxy"
      + (f"; where a path has two proxy processes (two hops) each gets its own core: "
         + "; ".join(f"{n}: {why}" for n, why in S.notes.items()) if S.notes else "")
      + ". "
      "Values are median [min–max] over valid rounds; runs with errors are listed below and "
      "never averaged in.\n")

    w("## Conditions\n")
    if meta.get("note"):
        w(meta["note"] + "\n")
    if meta.get("loadavg"):
        (a1, a5, a15), (b1, b5, b15) = meta["loadavg"]
        w(f"Load average (1/5/15 min) on this {meta['machine'].get('nproc', '?')}-CPU machine: "
          f"{a1:.1f}/{a5:.1f}/{a15:.1f} at the start of the run, {b1:.1f}/{b5:.1f}/{b15:.1f} "
          "at the end (the harness's own processes included; well above the CPU count means "
          "other work competed for the cores).\n")

    w("## Validity\n")
    bad = []
    for (name, rate, conns), ss in results.latency.items():
        for s in ss:
            if not s.valid:
                bad.append(f"{name} {rate} rps c={conns}: {'; '.join(s['problems'])}")
    for name, ss in results.maxrps.items():
        for s in ss:
            if not s.valid:
                bad.append(f"{name} max rps: {'; '.join(s['problems'])}")
    for name, bs in results.bulk.items():
        for b in bs:
            if b["problems"]:
                bad.append(f"{name} bulk: {'; '.join(b['problems'])}")
    for (name, what), ss in results.h2.items():
        for s in ss:
            if not s.valid:
                bad.append(f"{name} h2 {what}: {'; '.join(s['problems'])}")
    for name, what, msg in results.failures:
        bad.append(f"{name} ({what}) failed: {msg}")
    total = (sum(len(v) for v in results.latency.values())
             + sum(len(v) for v in results.maxrps.values())
             + sum(len(v) for v in results.h2.values()))
    if bad:
        w(f"**{len(bad)} problem(s)** (of {total} load runs):\n")
        for b in bad:
            w(f"- {b}")
    else:
        w(f"All {total} load runs valid: every response 200 with the 1024-byte body, no errors, "
          "load generator below 90% of its core at fixed rates; every isthmus client sidecar "
          "ran in the mode its port declares (istio_requests_total: HTTP counted every request, "
          "TCP none).")
    if results.notes:
        w("\nNotes (findings that do not invalidate a run):\n")
        for n in dict.fromkeys(results.notes):
            w(f"- {n}")
    sat = [f"{n}" for n, ss in results.maxrps.items() if any(s.get("saturated") for s in ss)]
    if sat:
        w(f"\nMax-rps runs where the load generator's core was saturated (expected for a closed "
          f"loop on 2 cores; read *rps per proxy core* instead of raw max rps): {', '.join(sat)}.")
    h2max = {n: ss for (n, what), ss in results.h2.items() if what == "max"}
    idle = [(n, med([s["proxy_busy"] for s in valid(ss)]), med([s.get("loadgen_core")
             for s in valid(ss)])) for n, ss in list(results.maxrps.items()) + list(h2max.items())
            if not n.startswith("direct") and valid(ss) and all("proxy_busy" in s for s in ss)]
    idle = [(n, b, g) for n, b, g in idle if b is not None and b < PROXY_SATURATED]
    if idle:
        w(f"\n**Proxy not saturated** in the max-rps runs of: "
          + ", ".join(f"{n} ({b:.0%} of its core{'s' if n in S.notes else ''} busy; generator's "
                      f"core {f(g, '{:.0%}')} busy)" for n, b, g in idle)
          + f" (median over valid rounds; saturated = ≥ {PROXY_SATURATED:.0%}). For these, *rps "
          "per proxy core* is the CPU cost per request at the load the generator could offer, "
          "not the proxy's capacity.")
    if results.backends:
        w("\nI/O backend each isthmus proxy reported (`isthmus_proxy_io_backend`): "
          + ", ".join(f"{n}: {'/'.join(sorted(set(b.values())))}"
                      for n, b in results.backends.items()) + ".")
    w("")

    w("## Contenders\n")
    w("| contender | what |")
    w("|---|---|")
    for name, desc, _ in results.contenders:
        w(f"| {name} | {desc} |")
    for name, why in results.skipped:
        w(f"| {name} | **skipped**: {why} |")
    w("")

    w("## Targets (issue 3 item 5)\n")
    w("| target | measured | met? | miss |")
    w("|---|---|---|---|")
    for what, value, met, miss in targets(S):
        state = "n/a (not measured)" if value in ("—", None) else ("yes" if met else "**no**")
        w(f"| {what} | {value} | {state} | {miss} |")
    w("")

    w("## Targets (issue 7 item 8: HTTP mode)\n")
    w("Same-run ratios against HAProxy `mode http` (`haproxy-http`); the TCP rows against "
      + (f"the baseline run [{baseline.stem}]({baseline.stem}.md) (its own same-run ratios; "
         f"\"no worse\" allows {NO_WORSE:.0%}, the run-to-run spread of these ratios so far)"
         if baseline is not None else "no baseline (none given or found)") + ".\n")
    w("| target | measured | met? | miss |")
    w("|---|---|---|---|")
    for what, value, met, miss in http_targets(S, baseline):
        state = "n/a (not measured)" if value in ("—", None) else ("yes" if met else "**no**")
        w(f"| {what} | {value} | {state} | {miss} |")
    w("" + ("\n" + S.footnote().lstrip("\n") + "\n"
            if any(n in S.notes or n in S.mode_notes for n in HTTP_ROWS + TCP_ROWS) else ""))

    w(f"## HTTP: ratios against HAProxy mode http ({HEADLINE[0]} rps, {HEADLINE[1]} "
      "connections)\n")
    w("| contender | rps per proxy core | × haproxy-http | CPU µs/request | × haproxy-http | "
      "added p50 | added p99 | added p99 − haproxy-http's | idle PSS | × haproxy-http |")
    w("|---|---|---|---|---|---|---|---|---|---|")
    ref_p99 = S.added(HTTP_REF, HEADLINE, "p99")
    for name in S.names:
        if name == "direct":
            continue
        cpr, rpc, pss = S.cpu_per_req(name), S.rps_per_core(name), S.idle_pss(name)
        a99 = S.added(name, HEADLINE, "p99")
        w(f"| {S.label(name)} | {f(rpc, '{:.0f}')} | "
          f"{f(ratio(rpc, S.rps_per_core(HTTP_REF)), '{:.2f}×')} | "
          f"{f(cpr and cpr * 1e6, '{:.1f}')} | {f(ratio(cpr, S.cpu_per_req(HTTP_REF)), '{:.2f}×')} | "
          f"{f(S.added(name, HEADLINE, 'p50'), '{:+.3f}')} | {f(a99, '{:+.3f}')} | "
          f"{f(None if a99 is None or ref_p99 is None else a99 - ref_p99, '{:+.3f}')} | "
          f"{f(pss and pss / 1e6, '{:.2f} MB')} | {f(ratio(pss, S.idle_pss(HTTP_REF)), '{:.2f}×')} |")
    w("\nrps per proxy core: max-rps run (closed loop, requests ÷ proxy CPU seconds); CPU per "
      f"request and added latency (ms, over direct) at {HEADLINE[0]} rps × {HEADLINE[1]} "
      "connections; idle PSS right after start (isthmus: measured on the explicit-listener "
      "process — capture and explicit run the same binary, one process; TCP rows: the TCP "
      "config, HTTP rows: the HTTP config). Rows whose port is declared TCP are L4 relays, "
      "shown for reference." + S.footnote() + "\n")
    w(http_mode_check(results))

    w(f"## Ratios at {HEADLINE[0]} rps, {HEADLINE[1]} connections\n")
    w("| contender | p50 | p99 | added p50 | added p90 | added p99 | added p99.9 | p99 vs HAProxy tcp | CPU/req vs HAProxy tcp | vCPU per 1000 rps |")
    w("|---|---|---|---|---|---|---|---|---|---|")
    for name in S.names:
        cpr = S.cpu_per_req(name)
        w(f"| {S.label(name)} | {f(S.lat(name, HEADLINE, 'p50'))} | {f(S.lat(name, HEADLINE, 'p99'))} | "
          + " | ".join(f(S.added(name, HEADLINE, k), "{:+.3f}") for k, _ in PCTS)
          + f" | {f(ratio(S.lat(name, HEADLINE, 'p99'), S.lat('haproxy-tcp', HEADLINE, 'p99')), '{:.2f}×')}"
          + f" | {f(ratio(cpr, S.cpu_per_req('haproxy-tcp')), '{:.2f}×')}"
          + f" | {f(cpr and cpr * 1000, '{:.3f}')} |")
    w("\nLatencies in ms; *added* = contender median − direct median. vCPU per 1000 rps = "
      "proxy CPU seconds (utime+stime of every proxy process, from /proc/PID/stat; both "
      "sidecars for two hops) ÷ requests × 1000. Published anchors, not measured here "
      "(istio.io performance-and-scalability): Istio sidecar 0.20–0.5, ztunnel 0.06."
      + S.footnote() + "\n")

    w("## Latency at fixed rate (open loop)\n")
    for cell in plan.grid():
        w(f"### {cell[0]} rps, {cell[1]} connections\n" if meta["loadgen"] == "oha" else
          f"### {cell[1]} connections (wrk closed loop: the {cell[0]} rps rate is not applied)\n")
        w("| contender | p50 ms | p90 ms | p99 ms | p99.9 ms | added p99 | valid runs |")
        w("|---|---|---|---|---|---|---|")
        for name in S.names:
            ss = results.latency.get((name,) + cell, [])
            vs = valid(ss)
            w(f"| {S.label(name)} | " + " | ".join(mmm([s.get(k) for s in vs]) for k, _ in PCTS)
              + f" | {f(S.added(name, cell, 'p99'), '{:+.3f}')} | {len(vs)}/{len(ss)} |")
        w("\n" + S.footnote().lstrip("\n") + "\n" if S.notes or S.mode_notes else "")

    w("## Throughput and CPU\n")
    w("| contender | max rps (closed loop) | proxy CPU busy at max | rps per proxy core | vs HAProxy tcp | bulk GB/s | bulk vs direct | proxy CPU s per GB |")
    w("|---|---|---|---|---|---|---|---|")
    for name in S.names:
        ms = valid(results.maxrps.get(name, []))
        busy = med([s["proxy_cpu"] / s["wall"] for s in ms]) if ms else None
        bs = [b for b in results.bulk.get(name, []) if not b["problems"]]
        cpu_gb = med([b["proxy_cpu"] / (b["bytes"] / 1e9) for b in bs]) if bs else None
        rpc = S.rps_per_core(name)
        w(f"| {S.label(name)} | {mmm([s['rps'] for s in ms], '{:.0f}')} | "
          f"{f(busy, '{:.0%}') if name != 'direct' else '—'} | "
          f"{f(rpc, '{:.0f}') if name != 'direct' else '—'} | "
          f"{f(ratio(rpc, S.rps_per_core('haproxy-tcp')), '{:.2f}×')} | "
          f"{mmm([b['gbps'] for b in bs], '{:.2f}')} | "
          f"{f(ratio(S.bulk(name), S.bulk('direct')), '{:.2f}×')} | "
          f"{f(cpu_gb, '{:.3f}') if name != 'direct' else '—'} |")
    w("\nrps per proxy core = requests ÷ proxy CPU seconds in the max-rps run (the proxy is "
      "pinned to one CPU; on 2 cores the closed-loop generator and upstream share the other, so "
      "raw max rps is generator-bound for fast proxies). Bulk: one TCP stream, Python sender → "
      "Python receiver, byte count checked." + S.footnote() + "\n")

    w(h2_table(S, results, plan))
    w("## Memory (PSS from /proc/PID/smaps_rollup, summed over all processes of the proxy)\n")
    w("| contender | idle | " + " | ".join(f"{n} idle conns" for n in plan.idle_conns)
      + " | per idle conn | " + " | ".join(f"+{n} services" for n in plan.routes)
      + " | per route |")
    w("|---|---|" + "---|" * (len(plan.idle_conns) + 1 + len(plan.routes) + 1))
    mems = [(name, S.mem(name)) for name in S.names if S.mem(name)]

    def mb(v):
        return f(v and v / 1e6, "{:.2f} MB")
    for name, m in mems:
        conns, routes = m.get("conns") or {}, m.get("routes") or {}
        w(f"| {name} | {mb(m.get('idle'))} | "
          + " | ".join(mb(conns.get(n)) for n in plan.idle_conns)
          + f" | {f(conn_slope(m), '{:.0f} B')} | "
          + " | ".join(mb(routes.get(n)) for n in plan.routes)
          + f" | {f(route_slope(m), '{:.0f} B')} |")
    w("\nPSS (proportional set size) charges a page shared by k processes 1/k to each, so a "
      "proxy made of several processes (nginx: master + workers) is not charged twice for the "
      "pages they share. It also splits pages shared with processes outside the proxy (libc "
      "with everything; nginx's binary and libraries with the upstream nginx processes), which "
      "lowers a peer's PSS a little more than its own sharing would — the cross-check below "
      "counts every physical page of the proxy's processes once, whatever else maps it. Slopes: "
      "per idle connection = (memory at the most connections − memory before any) ÷ count (each "
      "held connection also opens one to the upstream; HTTP proxies open none for an idle "
      "client, so they show idle memory only); per route = difference between the two largest "
      "route counts ÷ their difference (one ServiceEntry = one VIP, one port, one endpoint). "
      "Published anchors, not measured here (sources in BENCHMARK.md): Envoy ≈ 42 KB per "
      "cluster, ≈ 1.4 KB per host; Istio sidecar 40–60 MB; linkerd2-proxy 17–26 MB.\n")
    w("Cross-check of the same moments: PSS, *unique* (distinct physical pages of the proxy's "
      "processes, from /proc/PID/pagemap: shared pages counted once, however many processes "
      "map them) and RSS (VmRSS summed over the processes: shared pages counted once per "
      "process).\n")
    w("| contender | processes | idle PSS | idle unique | idle RSS | per idle conn PSS | "
      "per idle conn unique | per idle conn RSS |")
    w("|---|---|---|---|---|---|---|---|")
    for name, m in mems:
        w(f"| {name} | {m.get('nprocs', '—')} | {mb(m.get('idle'))} | "
          f"{mb(m.get('idle_unique'))} | {mb(m.get('idle_rss'))} | "
          f"{f(conn_slope(m), '{:.0f} B')} | {f(conn_slope(m, 'conns_unique'), '{:.0f} B')} | "
          f"{f(conn_slope(m, 'conns_rss'), '{:.0f} B')} |")
    w("")

    if results.reload:
        w("## Reload under 1000 rps\n")
        w("| proxy flags | services in new config | new route answers after (ms) | "
          "proxy swapped snapshot at (ms, its own timestamp) | errors during swap | p99 during swap (ms) | "
          "p99.9 during swap | valid |")
        w("|---|---|---|---|---|---|---|---|")
        for x in results.reload:
            s = x.get("sample") or {}
            w(f"| {x.get('debounce') or 'defaults (debounce 100 ms)'} | {x['extra_services'] + 3} | "
              f"{f(x['answer_ms'], '{:.1f}', 'never')} | {f(x.get('swap_ms'), '{:.1f}', '?')} | "
              f"{reload_errors(x)} | {f(s.get('p99'))} | {f(s.get('p999'))} | "
              f"{'yes' if s and s.valid else 'no: ' + '; '.join(s.get('problems', ['no sample']))} |")
        w("\nTime zero is the atomic rename of `..data` (kubelet's ConfigMap update); the load "
          "(oha 1000 rps, 16 connections, 4 s window containing the swap) runs against an "
          "existing route the whole time; a second client polls the new VIP every ms.\n")

    if profiles:
        w("## Profiles (why targets are missed)\n")
        w("`perf record -g` of the proxy under closed-loop load (c=64); the top of "
          "`perf report --no-children --sort dso,symbol` for each:\n")
        for name, path in profiles:
            w(f"- {name}: [{path}]({path})")
        w("")
    configs = getattr(results, "configs", {}) or {}
    if configs:
        w("## Peer configurations\n")
        w("Exactly as each peer ran (generated by benches/harness/contenders.py, where every "
          "directive is explained with the documentation it follows; `<work>` is the run's "
          "temporary directory):\n")
        for name, text in configs.items():
            if meta.get("work_dir"):
                text = text.replace(meta["work_dir"], "<work>")
            w(f"{name}:\n\n```\n{text.rstrip()}\n```\n")
    w(f"## Plot\n\n![latency percentiles]({svg_name})\n")
    w("## How to reproduce\n")
    w(f"`{meta['command']}` (as root). See benches/README.md.\n")
    return "\n".join(L)


def http_mode_check(results):
    """The istio_requests_total check: what each isthmus sidecar counted against the load
    generator, summed over every load run of the contender."""
    if not results.counts:
        return ""
    L = ["## Did the sidecars run in the declared mode?\n",
         "After every load run of an isthmus row the harness reads `istio_requests_total` "
         "(summed over label sets) from each sidecar's `/stats/prometheus` and compares the "
         "increase with the requests the load generator completed. An HTTP-declared port must "
         "count every request (the generator does not count requests still in flight when its "
         "duration ends, so a sidecar may count up to one more per connection, or per stream "
         "for h2); a TCP-declared port must count none. Sums over every run:\n",
         "| contender | declared | sidecar | runs | generator's requests | sidecar counted | "
         "counted − generator | verdict |", "|---|---|---|---|---|---|---|---|"]
    per = {}
    for (name, what), runs in results.counts.items():
        for r in runs:
            for pod, k in r["counted"].items():
                x = per.setdefault((name, pod), {"runs": 0, "gen": 0, "got": 0, "missing": 0,
                                                 "slack": 0, "declared": r["declared"]})
                x["runs"] += 1
                x["gen"] += r["requests"]
                x["slack"] += (r.get("conns") or 0) * (r.get("streams") or 1)
                if k is None:
                    x["missing"] += 1
                else:
                    x["got"] += k
    for (name, pod), x in per.items():
        http = x["declared"] != "TCP"
        if http:
            ok = x["gen"] <= x["got"] <= x["gen"] + x["slack"]
            verdict = ("HTTP mode: every request counted" if ok else
                       "**counted none: relayed TCP**" if x["got"] == 0 else
                       "**counts differ**")
        else:
            ok = x["got"] == 0
            verdict = "L4 relay: no request counted" if ok else "**counted HTTP requests**"
        L.append(f"| {name} | {x['declared']} | {pod} | {x['runs']}"
                 + (f" ({x['missing']} unreadable)" if x["missing"] else "")
                 + f" | {x['gen']} | {x['got']} | "
                 + (f"{x['got'] - x['gen']:+d}" if http else "—") + f" | {verdict} |")
    return "\n".join(L) + "\n"


def h2_table(S, results, plan):
    if not S.h2_names and not any(n for n, _ in results.skipped if "h2" in n):
        return ""
    L = ["## h2 workload (h2load, HTTP/2 cleartext, prior knowledge)\n",
         f"`h2load -t1 -c {plan.h2_conns} -m {plan.h2_streams} --rps "
         f"{plan.h2_rate // plan.h2_conns}` ({plan.h2_rate} rps over {plan.h2_conns} connections "
         f"× {plan.h2_streams} streams, {plan.duration} s, every request logged: percentiles "
         "from the log, each status 200, body bytes = 1024 × responses; h2load paces requests "
         "per connection but does not correct coordinated omission), then max throughput "
         f"`-c {plan.h2_conns} -m {plan.h2_max_streams}` for {plan.maxrps_duration} s. direct-h2: "
         "the responder's own h2 listener; haproxy-h2: h2 in and h2 to the responder; nginx-h2: "
         "h2 in, HTTP/1.1 keep-alive to the responder (nginx proxies no h2 upstream); isthmus: "
         "port declared HTTP2 (h2 to the responder).\n",
         "| contender | p50 ms | p90 ms | p99 ms | p99.9 ms | added p99 | CPU µs/request | × "
         "haproxy-h2 | max rps | proxy CPU busy at max | rps per proxy core | × haproxy-h2 | "
         "valid runs |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in S.h2_names:
        rate_ss = results.h2.get((name, "rate"), [])
        max_ss = results.h2.get((name, "max"), [])
        vs = valid(rate_ss)
        cpr, rpc = S.h2_cpu_per_req(name), S.h2_rps_per_core(name)
        busy = med([s["proxy_cpu"] / s["wall"] for s in valid(max_ss) if s["wall"]])
        base = name == "direct-h2"
        L.append(f"| {name} | " + " | ".join(mmm([s.get(k) for s in vs]) for k, _ in PCTS)
                 + f" | {f(S.h2_added(name, 'p99'), '{:+.3f}')} | "
                 f"{'—' if base else f(cpr and cpr * 1e6, '{:.1f}')} | "
                 f"{'—' if base else f(ratio(cpr, S.h2_cpu_per_req('haproxy-h2')), '{:.2f}×')} | "
                 f"{mmm([s['rps'] for s in valid(max_ss)], '{:.0f}')} | "
                 f"{'—' if base else f(busy, '{:.0%}')} | {'—' if base else f(rpc, '{:.0f}')} | "
                 f"{f(ratio(rpc, S.h2_rps_per_core('haproxy-h2')), '{:.2f}×')} | "
                 f"{len(vs) + len(valid(max_ss))}/{len(rate_ss) + len(max_ss)} |")
    for name, why in results.skipped:
        if "h2" in name:
            L.append(f"| {name} | skipped: {why} |" + " |" * 11)
    return "\n".join(L) + "\n"


COLORS = ["#222222", "#1f77b4", "#6baed6", "#08519c", "#17becf", "#d62728", "#2ca02c",
          "#ff9896", "#98df8a", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#7f7f7f"]


def svg(results, plan, title):
    """One panel per (rate, connections) cell: latency (log scale) at p50/p90/p99/p99.9 for
    every contender (median of valid rounds)."""
    import math
    S = Summary(results)
    cells = plan.grid()
    names = S.names
    pw, ph = 420, 300
    cols = min(3, len(cells))
    rows = math.ceil(len(cells) / cols)
    legend_h = 20 * math.ceil(len(names) / 3) + 20
    W, H = cols * pw + 20, rows * ph + 60 + legend_h
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="11">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="15">'
           f'{html.escape(title)}</text>']
    vals = [S.lat(n, c, k) for n in names for c in cells for k, _ in PCTS]
    vals = [v for v in vals if v and v > 0]
    if not vals:
        vals = [0.01, 1]
    lo = 10 ** math.floor(math.log10(min(vals)))
    hi = 10 ** math.ceil(math.log10(max(vals)))
    for i, cell in enumerate(cells):
        ox, oy = 10 + (i % cols) * pw, 40 + (i // cols) * ph
        x0, x1, y0, y1 = ox + 55, ox + pw - 20, oy + 30, oy + ph - 40
        out.append(f'<text x="{(x0 + x1) / 2}" y="{oy + 18}" text-anchor="middle" '
                   f'font-size="13">{cell[0]} rps, {cell[1]} connections</text>')
        out.append(f'<rect x="{x0}" y="{y0}" width="{x1 - x0}" height="{y1 - y0}" '
                   f'fill="none" stroke="#999"/>')

        def ypos(v):
            return y1 - (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * (y1 - y0)
        d = lo
        while d <= hi * 1.0001:
            for m in (1, 2, 5):
                v = d * m
                if v > hi * 1.0001:
                    break
                y = ypos(v)
                out.append(f'<line x1="{x0}" x2="{x1}" y1="{y:.1f}" y2="{y:.1f}" '
                           f'stroke="{"#ddd" if m == 1 else "#f2f2f2"}"/>')
                if m == 1 or (hi / lo) <= 100:
                    out.append(f'<text x="{x0 - 4}" y="{y + 4:.1f}" text-anchor="end">'
                               f'{v:g}</text>')
            d *= 10
        out.append(f'<text x="{ox + 14}" y="{(y0 + y1) / 2}" text-anchor="middle" '
                   f'transform="rotate(-90 {ox + 14} {(y0 + y1) / 2})">latency (ms, log)</text>')
        xs = [x0 + (x1 - x0) * (j + 0.5) / len(PCTS) for j in range(len(PCTS))]
        for x, (_, label) in zip(xs, PCTS):
            out.append(f'<text x="{x:.1f}" y="{y1 + 16}" text-anchor="middle">{label}</text>')
        for n_i, name in enumerate(names):
            color = COLORS[n_i % len(COLORS)]
            pts = [(x, S.lat(name, cell, k)) for x, (k, _) in zip(xs, PCTS)]
            pts = [(x, ypos(v)) for x, v in pts if v and v > 0]
            if len(pts) >= 2:
                out.append('<polyline fill="none" stroke-width="1.8" stroke="' + color
                           + '" points="' + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')
            for x, y in pts:
                out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{color}"/>')
    ly = 40 + rows * ph + 10
    for n_i, name in enumerate(names):
        lx = 20 + (n_i % 3) * (W - 40) / 3
        yy = ly + (n_i // 3) * 20
        color = COLORS[n_i % len(COLORS)]
        out.append(f'<line x1="{lx:.0f}" x2="{lx + 24:.0f}" y1="{yy}" y2="{yy}" stroke="{color}" '
                   f'stroke-width="3"/>')
        out.append(f'<text x="{lx + 30:.0f}" y="{yy + 4}">{html.escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out)
