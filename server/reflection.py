"""Server reflection in both its versions: ``grpc.reflection.v1`` (what current grpcurl, grpc_cli,
Postman and gRPC's other languages speak) and ``grpc.reflection.v1alpha``.

grpcio-reflection serves only v1alpha (1.85, the pinned version, like every release so far:
grpc/grpc#38576). The two versions are one protocol under two package names: their messages are
the same field for field, number for number, so the same bytes decode as either. So the one
v1alpha servicer answers both, registered under each name, and the v1 file descriptor (the v1alpha
one under the v1 name) joins the descriptor pool, so that reflection can describe its v1 service
too. Once grpcio-reflection ships ``grpc_reflection.v1``, this module can give way to it."""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import _async, reflection_pb2

V1ALPHA = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name
V1 = "grpc.reflection.v1.ServerReflection"
SERVICE_NAMES = (V1, V1ALPHA)
_METHOD = "ServerReflectionInfo"


def _add_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    """grpc/reflection/v1/reflection.proto in ``pool``: the v1alpha file under the v1 package."""
    v1_file = "grpc/reflection/v1/reflection.proto"
    try:
        pool.FindFileByName(v1_file)
        return  # already there (a library registered the real one)
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = reflection_pb2.DESCRIPTOR.package, V1.rpartition(".")[0]
    proto.name, proto.package = v1_file, new
    proto.ClearField("options")

    def rename(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
        for message in messages:
            for field in message.field:
                if field.HasField("type_name"):  # (setting it on a scalar field would make the file invalid)
                    field.type_name = field.type_name.replace(f".{old}.", f".{new}.")
            rename(message.nested_type)

    rename(proto.message_type)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(f".{old}.", f".{new}.")
            method.output_type = method.output_type.replace(f".{old}.", f".{new}.")
    pool.Add(proto)


def enable(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection, both versions, for ``service_names`` (the two reflection services are added)."""
    _add_v1_descriptor(descriptor_pool.Default())
    servicer = _async.ReflectionServicer((*service_names, *SERVICE_NAMES))
    for service in SERVICE_NAMES:
        handlers = {
            _METHOD: grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        server.add_registered_method_handlers(service, handlers)
