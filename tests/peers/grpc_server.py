#!/usr/bin/env python3
"""gRPC test peer for the isthmus e2e tests: grpc_server.py NAME PORT [--host HOST]

No protoc: generic handlers with identity (bytes) serializers, so requests and responses are
raw bytes. Prints READY on stdout once listening (the harness's readiness signal).

  /isthmus.Test/Echo    unary: answers the request bytes.
  /isthmus.Test/Stream  server-streaming: the request is a decimal N; answers N messages
                        b"0", b"1", ... b"N-1".
  /isthmus.Test/Fail    unary: UNAVAILABLE for the first N calls per key, then OK b"ok".
                        Key and N from metadata x-fail-key (default "default") and
                        x-fail-count (default 1); trailing metadata x-attempt: K (1-based).
  /isthmus.Test/Count   unary: JSON {"total": N, "methods": {...}, "keys": {...}} of the calls
                        seen (Count itself not counted); a request of b"reset" zeroes
                        everything (the Fail attempts too) after answering.

Every call gets initial and trailing metadata x-served-by: NAME, except a failing Fail
attempt: that one is trailers-only (status and trailing metadata in the one HEADERS frame, as a
server's early error is), which is what a proxy's gRPC retry acts on (Envoy retries
`unavailable` on the response head only). Any other method is UNIMPLEMENTED (grpcio's own
answer).
"""
import argparse
import json
import sys
import threading
from concurrent import futures

import grpc

SERVICE = "isthmus.Test"


class Peer:
    def __init__(self, name):
        self.name = name
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        self.total = 0
        self.methods = {}
        self.keys = {}
        self.attempts = {}

    def seen(self, method, context, key=None, initial=True):
        with self.lock:
            self.total += 1
            self.methods[method] = self.methods.get(method, 0) + 1
            if key is not None:
                self.keys[key] = self.keys.get(key, 0) + 1
        served = (("x-served-by", self.name),)
        if initial:
            context.send_initial_metadata(served)
        context.set_trailing_metadata(served)

    def echo(self, request, context):
        self.seen("Echo", context)
        return request

    def stream(self, request, context):
        self.seen("Stream", context)
        try:
            n = int(request or b"0")
        except ValueError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Stream wants a decimal count")
        for i in range(n):
            yield str(i).encode()

    def fail(self, request, context):
        metadata = dict(context.invocation_metadata())
        key = metadata.get("x-fail-key", "default")
        try:
            count = int(metadata.get("x-fail-count", "1"))
        except ValueError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "x-fail-count is not a number")
        with self.lock:
            attempt = self.attempts[key] = self.attempts.get(key, 0) + 1
        self.seen("Fail", context, key, initial=attempt > count)
        context.set_trailing_metadata(
            (("x-served-by", self.name), ("x-attempt", str(attempt)))
        )
        if attempt <= count:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"attempt {attempt} of {count} fails")
        return b"ok"

    def count(self, request, context):
        served = (("x-served-by", self.name),)
        context.send_initial_metadata(served)
        context.set_trailing_metadata(served)
        with self.lock:
            out = json.dumps(
                {"total": self.total, "methods": self.methods, "keys": self.keys},
                sort_keys=True,
            ).encode()
            if request == b"reset":
                self.reset()
        return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("port", type=int)
    parser.add_argument("--host", default="[::]", help="address to bind (default [::])")
    args = parser.parse_args()

    peer = Peer(args.name)
    ident = dict(request_deserializer=None, response_serializer=None)
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(peer.echo, **ident),
        "Stream": grpc.unary_stream_rpc_method_handler(peer.stream, **ident),
        "Fail": grpc.unary_unary_rpc_method_handler(peer.fail, **ident),
        "Count": grpc.unary_unary_rpc_method_handler(peer.count, **ident),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    address = f"{args.host}:{args.port}"
    if server.add_insecure_port(address) == 0:
        print(f"grpc_server: cannot listen on {address}", file=sys.stderr)
        return 1
    server.start()
    print("READY", flush=True)
    server.wait_for_termination()
    return 0


if __name__ == "__main__":
    sys.exit(main())
