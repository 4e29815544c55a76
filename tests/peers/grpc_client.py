#!/usr/bin/env python3
"""gRPC test client for the isthmus e2e tests (insecure channel, bytes in and out).

  grpc_client.py TARGET METHOD [--payload P] [--repeat N] [--authority A]
                 [--metadata K=V ...] [--timeout SECONDS]

METHOD is Echo, Stream, Fail or Count (short for /isthmus.Test/METHOD) or a full
/service/method path. One channel for all --repeat calls (so one HTTP/2 connection unless it
breaks). Each call prints one JSON line:

  {"call": i, "code": "OK", "details": "...", "payload": "...", "messages": [...],
   "initial": {...}, "trailing": {...}}

code is the grpc.StatusCode name (OK, UNAVAILABLE, DEADLINE_EXCEEDED, ...); payload is the
unary response (UTF-8, undecodable bytes replaced) or null on error; messages is the list of
streamed responses (Stream only). Exits 0 once every call has printed, whatever the codes; 2
on bad usage.
"""
import argparse
import json
import sys

import grpc

SHORT = {"Echo", "Stream", "Fail", "Count"}


def text(b):
    return None if b is None else b.decode("utf-8", "replace")


def metadata_dict(md):
    out = {}
    for key, value in md or ():
        out[key] = text(value) if isinstance(value, bytes) else value
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="host:port")
    parser.add_argument("method")
    parser.add_argument("--payload", default="", help="request bytes (UTF-8)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--authority", help=":authority to send instead of TARGET")
    parser.add_argument("--metadata", action="append", default=[], metavar="K=V")
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()

    method = f"/isthmus.Test/{args.method}" if args.method in SHORT else args.method
    metadata = []
    for item in args.metadata:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--metadata wants K=V, got {item!r}")
        metadata.append((key.lower(), value))
    # No proxy from the environment: the tests' traffic stays inside their namespaces.
    options = [("grpc.enable_http_proxy", 0)]
    if args.authority:
        options.append(("grpc.default_authority", args.authority))
    payload = args.payload.encode()
    streaming = method.endswith("/Stream")
    with grpc.insecure_channel(args.target, options=options) as channel:
        if streaming:
            stub = channel.unary_stream(method)
        else:
            stub = channel.unary_unary(method)
        for i in range(args.repeat):
            line = {"call": i, "payload": None, "messages": []}
            try:
                if streaming:
                    call = stub(payload, metadata=metadata, timeout=args.timeout)
                    for message in call:
                        line["messages"].append(text(message))
                else:
                    response, call = stub.with_call(
                        payload, metadata=metadata, timeout=args.timeout
                    )
                    line["payload"] = text(response)
            except grpc.RpcError as error:
                call = error
            line["code"] = call.code().name
            line["details"] = call.details()
            line["initial"] = metadata_dict(call.initial_metadata())
            line["trailing"] = metadata_dict(call.trailing_metadata())
            print(json.dumps(line, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
