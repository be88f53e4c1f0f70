"""``lstmd``: the command-line client."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lstmd.v1 import lstmd_pb2, lstmd_pb2_grpc

DEFAULT_TARGET = "localhost:50051"


def _health(args: argparse.Namespace) -> int:
    with grpc.insecure_channel(args.target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as e:
            print(f"{args.target}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _models(args: argparse.Namespace) -> int:
    with grpc.insecure_channel(args.target) as channel:
        try:
            reply = lstmd_pb2_grpc.LstmdStub(channel).ListModels(lstmd_pb2.ListModelsRequest(), timeout=args.timeout)
        except grpc.RpcError as e:
            print(f"{args.target}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    for m in reply.models:
        print(f"{m.name}:{m.version} vocab={m.vocab_size} layers={m.num_layers} hidden={m.hidden_size}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lstmd", description="Talk to an lstmd server.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help in [("health", _health, "ask the gRPC health service"), ("models", _models, "list models")]:
        p = sub.add_parser(name, help=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("--target", default=DEFAULT_TARGET, help="server address host:port")
        p.add_argument("--timeout", type=float, default=5.0, help="deadline in seconds")
        if name == "health":
            p.add_argument("--service", default="", help="service name ('' = the whole server)")
        p.set_defaults(func=func)
    args = parser.parse_args(argv)
    return int(args.func(args))
