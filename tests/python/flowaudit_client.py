#!/usr/bin/env python3
"""An independent flowaudit.v1 client for the integration tests.

Generates Python code from proto/flowaudit/v1/flowaudit.proto with
grpcio-tools at run time (so it follows the .proto, not the agent's Rust
code), then talks to an agent over its Unix socket or TCP address:

  flowaudit_client.py --server unix:///path.sock tail [--follow] [--number N]
        [--port P]... [--event CONNECT]... [--verdict V]... [--from-label SEL]...
        [--expect N] [--idle 2] [--deadline 60]
  flowaudit_client.py --server ADDR status
  flowaudit_client.py --server ADDR reflect

`tail` prints one JSON object per response ({"flow": {...}} or
{"lost_events": {...}}, proto field names, enums by name) and stops after
`--expect` responses plus `--idle` seconds without more (to catch extra
flows), or at `--deadline`. Exit status 0 on success, 2 on RPC errors.
"""

import argparse
import importlib
import importlib.resources
import json
import os
import shutil
import sys
import tempfile
import threading
import time

import grpc
from google.protobuf.json_format import MessageToDict
from grpc_tools import protoc

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PROTO_DIR = os.path.join(ROOT, "proto")


def generate():
    """Compiles the .proto into a temp dir and imports the modules."""
    out = tempfile.mkdtemp(prefix="flowaudit-pb-")
    try:
        return compile_and_import(out)
    finally:
        # Both modules are loaded by now: the files are not needed again,
        # and a client stopped by a signal would never remove them later.
        shutil.rmtree(out, ignore_errors=True)


def compile_and_import(out):
    """protoc into `out`, then the two generated modules imported from it."""
    wkt = str(importlib.resources.files("grpc_tools") / "_proto")
    rc = protoc.main([
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{wkt}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        "flowaudit/v1/flowaudit.proto",
    ])
    if rc != 0:
        sys.exit(f"protoc failed ({rc}) on {PROTO_DIR}/flowaudit/v1/flowaudit.proto")
    sys.path.insert(0, out)
    pb = importlib.import_module("flowaudit.v1.flowaudit_pb2")
    pb_grpc = importlib.import_module("flowaudit.v1.flowaudit_pb2_grpc")
    return pb, pb_grpc


def channel(server):
    # grpc-python understands unix:///abs/path itself; HOST:PORT as is.
    return grpc.insecure_channel(server)


def to_dict(msg):
    return MessageToDict(msg, preserving_proto_field_name=True)


def enum_values(pb, enum_name, prefix, values):
    enum = getattr(pb, enum_name)
    return [enum.Value(f"{prefix}_{v.upper()}") for v in values]


def tail(args, pb, pb_grpc):
    flt = pb.FlowFilter(
        port=args.port,
        event=enum_values(pb, "EventKind", "EVENT_KIND", args.event),
        verdict=enum_values(pb, "Verdict", "VERDICT", args.verdict),
        source_label=args.from_label,
        destination_label=args.to_label,
        namespace=args.namespace,
    )
    empty = flt == pb.FlowFilter()
    req = pb.GetFlowsRequest(number=args.number, follow=args.follow,
                             allow=[] if empty else [flt])
    stub = pb_grpc.FlowAuditStub(channel(args.server))
    call = stub.GetFlows(req)
    seen = 0
    last = [time.monotonic()]
    done = threading.Event()
    deadline = time.monotonic() + args.deadline

    def watchdog():
        # Cancels the call once enough came and the stream went quiet, or at the deadline.
        while not done.is_set():
            now = time.monotonic()
            if now > deadline or (args.expect is not None and seen >= args.expect
                                  and now - last[0] > args.idle):
                call.cancel()
                return
            time.sleep(0.05)

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        for resp in call:
            which = resp.WhichOneof("response")
            print(json.dumps({which: to_dict(getattr(resp, which)),
                              "node_name": resp.node_name}), flush=True)
            seen += 1
            last[0] = time.monotonic()
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.CANCELLED:
            print(f"GetFlows failed: {e.code()} {e.details()}", file=sys.stderr)
            return 2
    finally:
        done.set()
    return 0


def status(args, pb, pb_grpc):
    stub = pb_grpc.FlowAuditStub(channel(args.server))
    print(json.dumps(to_dict(stub.ServerStatus(pb.ServerStatusRequest(), timeout=10))))
    return 0


def reflect(args, pb, pb_grpc):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    stub = reflection_pb2_grpc.ServerReflectionStub(channel(args.server))
    reqs = [reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="flowaudit.v1.FlowAudit")]
    out = {"services": [], "files": []}
    for resp in stub.ServerReflectionInfo(iter(reqs), timeout=10):
        if resp.HasField("list_services_response"):
            out["services"] = [s.name for s in resp.list_services_response.service]
        if resp.HasField("file_descriptor_response"):
            from google.protobuf import descriptor_pb2
            for raw in resp.file_descriptor_response.file_descriptor_proto:
                fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
                out["files"].append(fd.name)
    print(json.dumps(out))
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", required=True)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tail")
    t.add_argument("--follow", action="store_true")
    t.add_argument("--number", type=int, default=0)
    t.add_argument("--port", type=int, action="append", default=[])
    t.add_argument("--event", action="append", default=[])
    t.add_argument("--verdict", action="append", default=[])
    t.add_argument("--from-label", action="append", default=[])
    t.add_argument("--to-label", action="append", default=[])
    t.add_argument("--namespace", action="append", default=[])
    t.add_argument("--expect", type=int)
    t.add_argument("--idle", type=float, default=2.0)
    t.add_argument("--deadline", type=float, default=60.0)
    sub.add_parser("status")
    sub.add_parser("reflect")
    args = p.parse_args()
    pb, pb_grpc = generate()
    return {"tail": tail, "status": status, "reflect": reflect}[args.cmd](args, pb, pb_grpc)


if __name__ == "__main__":
    sys.exit(main())
