"""Network namespaces ("pods") and the processes that run in them.

Everything the harness creates is registered here and removed by `Registry.cleanup()`:
processes (by process group, then any straggler found inside one of our namespaces, by pid),
then the namespaces themselves (which takes their links, bridge and iptables rules with them).
Nothing here touches the root namespace's network.
"""

import ctypes
import os
import resource
import signal
import socket
import subprocess
import threading
import time

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
NETNS_DIR = "/var/run/netns"
PREFIX = "isthb"  # every namespace we create is named isthb<pid>-<pod>


def nofile_hard():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 1 << 20 if hard == resource.RLIM_INFINITY else hard


def ip(*args, check=True):
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {r.stderr.strip()}")
    return r


def _setns(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"setns {path}: {os.strerror(e)}")
    finally:
        os.close(fd)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class Proc:
    """A process started by the harness (its own process group)."""

    def __init__(self, name, popen, log_path):
        self.name = name
        self.popen = popen
        self.pid = popen.pid
        self.log_path = log_path
        self.rusage = None

    def alive(self):
        return self.popen.poll() is None

    def log_tail(self, n=20):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout=5.0):
        if self.popen.poll() is not None:
            return
        try:
            os.killpg(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.popen.poll() is not None:
                break
            time.sleep(0.02)
        else:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait()
        # Whatever else is left in the group (e.g. nginx workers).
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def wait_rusage(self, timeout=None):
        """Waits for exit; returns (returncode, cpu seconds user+sys of the process)."""
        deadline = None if timeout is None else time.time() + timeout
        while True:
            pid, status, ru = os.wait4(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.popen.returncode = os.waitstatus_to_exitcode(status)
                self.rusage = ru
                return self.popen.returncode, ru.ru_utime + ru.ru_stime
            if deadline is not None and time.time() > deadline:
                self.stop()
                return self.wait_rusage()
            time.sleep(0.01)


class Netns:
    def __init__(self, registry, name):
        self.registry = registry
        self.name = name
        ip("netns", "del", name, check=False)
        ip("netns", "add", name)
        registry.namespaces.append(self)
        self.exec_ip("link", "set", "lo", "up")

    @property
    def path(self):
        return os.path.join(NETNS_DIR, self.name)

    def inode(self):
        try:
            return os.stat(self.path).st_ino
        except OSError:
            return None

    def exec_ip(self, *args):
        return ip("-n", self.name, *args)

    def spawn(self, name, argv, uid=None, cpus=None, nofile=None, env=None, stdout=None,
              stdin=subprocess.DEVNULL, log_dir=None, cwd=None):
        """Starts argv inside this namespace; dies with the harness (PDEATHSIG)."""
        path = self.path

        def pre():
            _setns(path)
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if nofile:
                hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                n = nofile if hard == resource.RLIM_INFINITY else min(nofile, hard)
                resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))
            if cpus is not None:
                os.sched_setaffinity(0, cpus)
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)

        log_dir = log_dir or self.registry.work_dir
        log_path = os.path.join(log_dir, f"{self.name}-{name}.log")
        log = open(log_path, "ab")
        popen = subprocess.Popen(argv, preexec_fn=pre, start_new_session=True, env=env,
                                 stdout=stdout if stdout is not None else log, stderr=log,
                                 stdin=stdin, cwd=cwd)
        log.close()
        p = Proc(f"{self.name}/{name}", popen, log_path)
        self.registry.procs.append(p)
        return p

    def run(self, fn, *args):
        """Runs fn on a thread that has entered this namespace; returns its result.
        Sockets it creates belong to the namespace and work from any thread afterwards."""
        out = {}

        def body():
            try:
                _setns(self.path)
                out["v"] = fn(*args)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                out["e"] = e

        t = threading.Thread(target=body, daemon=True)
        t.start()
        t.join()
        if "e" in out:
            raise out["e"]
        return out["v"]

    def thread(self, fn, *args):
        """Starts fn on a daemon thread inside this namespace; returns the thread."""

        def body():
            _setns(self.path)
            fn(*args)

        t = threading.Thread(target=body, daemon=True)
        t.start()
        return t

    def connect(self, addr, timeout=2.0):
        return self.run(lambda: socket.create_connection(addr, timeout=timeout))


class Registry:
    """Owns everything created; `cleanup()` removes it all and reports whether it succeeded."""

    def __init__(self, work_dir):
        self.work_dir = work_dir
        self.namespaces = []
        self.procs = []
        self.prefix = f"{PREFIX}{os.getpid()}-"
        self._cleaned = False

    def netns(self, pod):
        return Netns(self, self.prefix + pod)

    @staticmethod
    def remove_stale():
        """Namespaces left by a harness run that was killed (its pid is gone)."""
        try:
            names = os.listdir(NETNS_DIR)
        except OSError:
            return []
        removed = []
        for name in names:
            if not name.startswith(PREFIX) or "-" not in name:
                continue
            pid = name[len(PREFIX):].split("-", 1)[0]
            if not pid.isdigit() or _pid_alive(int(pid)):
                continue
            _kill_in_namespaces({os.stat(os.path.join(NETNS_DIR, name)).st_ino})
            ip("netns", "del", name, check=False)
            removed.append(name)
        return removed

    def cleanup(self):
        """Returns a list of problems (empty = everything removed)."""
        if self._cleaned:
            return []
        self._cleaned = True
        problems = []
        for p in reversed(self.procs):
            try:
                p.stop(timeout=3)
            except Exception as e:  # noqa: BLE001
                problems.append(f"stopping {p.name}: {e}")
        inodes = {ns.inode() for ns in self.namespaces} - {None}
        _kill_in_namespaces(inodes)
        for ns in reversed(self.namespaces):
            r = ip("netns", "del", ns.name, check=False)
            if r.returncode != 0 and os.path.exists(ns.path):
                problems.append(f"ip netns del {ns.name}: {r.stderr.strip()}")
        time.sleep(0.05)
        for ns in self.namespaces:
            if os.path.exists(ns.path):
                problems.append(f"namespace {ns.name} still exists")
        left = _pids_in_namespaces(inodes)
        if left:
            problems.append(f"processes still running in our namespaces: {sorted(left)}")
        return problems


def _pids_in_namespaces(inodes):
    pids = set()
    if not inodes:
        return pids
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            if os.stat(f"/proc/{d}/ns/net").st_ino in inodes:
                pids.add(int(d))
        except OSError:
            pass
    return pids


def _kill_in_namespaces(inodes):
    for _ in range(3):
        pids = _pids_in_namespaces(inodes)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def proc_cpu_seconds(pids):
    """utime+stime of the given processes (and their threads), in seconds."""
    tck = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
        except (OSError, IndexError, ValueError):
            pass
    return total / tck


def _sum_kb_field(pids, path, field):
    """Sum over pids of the first `field` line ("VmRSS:", "Pss:") of /proc/PID/<path>, in
    bytes (the kernel reports kB)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/{path}") as f:
                for line in f:
                    if line.startswith(field):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


def proc_rss_bytes(pids):
    return _sum_kb_field(pids, "status", "VmRSS:")


def proc_pss_bytes(pids):
    """Proportional set size summed over the given processes (Pss in /proc/PID/smaps_rollup):
    a page shared by k processes counts 1/k in each, so a proxy made of several processes
    (nginx master + workers) is not charged twice for the pages they share, and shared
    libraries count only the share this proxy maps."""
    return _sum_kb_field(pids, "smaps_rollup", "Pss:")


def proc_unique_bytes(pids):
    """Physical memory held by the given processes with every page counted once: the distinct
    page frames (from /proc/PID/pagemap; needs root) of all their resident pages, plus their
    swapped-out pages. Unlike PSS it does not depend on what else runs on the machine (a page
    the proxy shares with an unrelated process counts whole), and unlike summed RSS it counts
    a page shared between the proxy's own processes once. None if frame numbers are hidden."""
    import array
    page = os.sysconf("SC_PAGE_SIZE")
    frames, swapped = set(), 0
    for pid in pids:
        try:
            ranges = []
            with open(f"/proc/{pid}/smaps") as f:
                cur = None
                for line in f:
                    head = line.split(None, 1)[0]
                    if "-" in head and not head.endswith(":"):
                        a, b = head.split("-")
                        cur = (int(a, 16), int(b, 16))
                    elif head in ("Rss:", "Swap:") and cur and int(line.split()[1]) > 0:
                        ranges.append(cur)
                        cur = None
            fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
        except OSError:
            continue
        try:
            for a, b in ranges:
                n = (b - a) // page
                entries = array.array("Q")
                entries.frombytes(os.pread(fd, n * 8, (a // page) * 8))
                for e in entries:
                    if e >> 63:  # present
                        pfn = e & ((1 << 55) - 1)
                        if pfn == 0:
                            return None  # frame numbers hidden (no CAP_SYS_ADMIN)
                        frames.add(pfn)
                    elif (e >> 62) & 1:  # swapped
                        swapped += 1
        except OSError:
            pass
        finally:
            os.close(fd)
    return (len(frames) + swapped) * page


def children(pid):
    """pid and all its descendants."""
    by_parent = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            by_parent.setdefault(ppid, []).append(int(d))
        except (OSError, ValueError, IndexError):
            pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(by_parent.get(p, []))
    return out


def proc_allowed_cpus(pids):
    """The union of the CPUs the given processes may run on (Cpus_allowed_list)."""
    cpus = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("Cpus_allowed_list:"):
                        for part in line.split(":", 1)[1].strip().split(","):
                            a, _, b = part.partition("-")
                            cpus.update(range(int(a), int(b or a) + 1))
                        break
        except (OSError, ValueError):
            pass
    return cpus


def cpu_busy_snapshot():
    """Per-CPU (busy, total) jiffies from /proc/stat."""
    snap = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                parts = line.split()
                vals = list(map(int, parts[1:]))
                idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
                snap[int(parts[0][3:])] = (sum(vals) - idle, sum(vals))
    return snap


def cpu_busy_fraction(before, after, cpu):
    b0, t0 = before.get(cpu, (0, 0))
    b1, t1 = after.get(cpu, (0, 0))
    return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0
