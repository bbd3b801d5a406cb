#!/usr/bin/env python3
"""A stock grpcio client for tests/tests/stock_clients.rs: what a user types,
`grpc.insecure_channel(target)` with no options, then server reflection,
ServerStatus and GetFlows (last flows, no follow) with requests and
responses left as raw protobuf bytes (no generated code).

  stock_client.py unix:///path/to.sock

Prints the services one a line, then "status-bytes N" and
"getflows-responses N". Exit status 1 on any RPC error, with it on stderr.
"""

import sys

import grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: stock_client.py unix:///path/to.sock")
    channel = grpc.insecure_channel(sys.argv[1])
    try:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="*")
        for response in stub.ServerReflectionInfo(iter([request]), timeout=20):
            for service in response.list_services_response.service:
                print(service.name)
        status = channel.unary_unary("/flowaudit.v1.FlowAudit/ServerStatus")(b"", timeout=20)
        print(f"status-bytes {len(status)}")
        flows = channel.unary_stream("/flowaudit.v1.FlowAudit/GetFlows")(b"", timeout=20)
        print(f"getflows-responses {sum(1 for _ in flows)}")
    except grpc.RpcError as e:
        print(f"RPC failed: {e.code()} {e.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
