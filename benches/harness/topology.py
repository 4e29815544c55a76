"""The pods: four network namespaces on a bridge held in a fifth ("node") namespace.

    cli  10.77.0.10  plain client: direct, explicit proxies (isthmus --explicit, HAProxy, nginx)
    clim 10.77.0.11  meshed client: isthmus-init rules, isthmus sidecar as UID 1337
    srv  10.77.0.20  plain server: the 1 KiB responder (nginx; HTTP/1.1 on :8080, cleartext h2
                     on :8081) and the bulk receiver
    srvm 10.77.0.21  meshed server: the same, plus isthmus-init and an inbound sidecar

Every contender crosses the same bridge once; the proxies run on the client side (as a
sidecar does), so what differs between contenders is only the proxy in the path.
The node namespace treats 10.96.0.0/16 (service VIPs) as local with nothing listening, so a
connection to a VIP that no proxy routes is refused at once instead of hanging.
"""

import os
import sys
import time

from . import upstream

BRIDGE_IP = "10.77.0.1"
PODS = {"cli": "10.77.0.10", "clim": "10.77.0.11", "srv": "10.77.0.20", "srvm": "10.77.0.21"}
MESHED = ("clim", "srvm")
PROXY_UID = 1337
# Service VIPs in the registry the isthmus contenders load.
VIP_ONE = "10.96.0.10"  # endpoint srv  (one hop: client sidecar only)
VIP_TWO = "10.96.0.11"  # endpoint srvm (two hops: client and server sidecars)
VIP_NEW = "10.96.0.99"  # appears only with the reload test's new config
HTTP_PORT = upstream.HTTP_PORT
H2_PORT = upstream.H2_PORT
BULK_PORT = upstream.BULK_PORT


class Topology:
    def __init__(self, registry, bin_dir, log):
        self.registry = registry
        self.bin_dir = bin_dir
        self.log = log
        self.ns = {}
        self.upstreams = {}
        self.receivers = {}

    def build(self, upstream_cpus):
        node = self.registry.netns("node")
        self.ns["node"] = node
        node.exec_ip("link", "add", "br0", "type", "bridge")
        node.exec_ip("addr", "add", f"{BRIDGE_IP}/24", "dev", "br0")
        node.exec_ip("link", "set", "br0", "up")
        node.exec_ip("route", "add", "local", "10.96.0.0/16", "dev", "lo")
        for i, (pod, addr) in enumerate(PODS.items()):
            ns = self.registry.netns(pod)
            self.ns[pod] = ns
            peer = f"v{i}"
            from .ns import ip
            ip("link", "add", "eth0", "netns", ns.name, "type", "veth", "peer", "name", peer,
               "netns", node.name)
            node.exec_ip("link", "set", peer, "master", "br0", "up")
            ns.exec_ip("addr", "add", f"{addr}/24", "dev", "eth0")
            ns.exec_ip("link", "set", "eth0", "up")
            ns.exec_ip("route", "add", "default", "via", BRIDGE_IP)
        for pod in MESHED:
            init = os.path.join(self.bin_dir, "isthmus-init")
            p = self.ns[pod].spawn("isthmus-init", [init])
            rc, _ = p.wait_rusage(timeout=30)
            if rc != 0:
                raise RuntimeError(f"isthmus-init in {pod} failed:\n{p.log_tail()}")
        for pod in ("srv", "srvm"):
            self.upstreams[pod] = upstream.start_responder(self.ns[pod], self.registry.work_dir,
                                                           upstream_cpus)
            self.receivers[pod] = upstream.start_receiver(self.ns[pod], upstream_cpus)
        for pod in ("srv", "srvm"):
            upstream.wait_listening(self.ns[pod], PODS[pod], HTTP_PORT)
            upstream.wait_listening(self.ns[pod], PODS[pod], H2_PORT)
            upstream.wait_listening(self.ns[pod], PODS[pod], BULK_PORT)

    def pod(self, name):
        return self.ns[name]
