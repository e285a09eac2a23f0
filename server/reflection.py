"""gRPC server reflection under both of its names: ``grpc.reflection.v1`` and ``grpc.reflection.v1alpha``.

Current reflection clients (grpcurl, grpcui, Postman, grpc-js tools) ask for
``v1`` first; grpcio-reflection implements only ``v1alpha``. The two protocols
are the same messages with the same field numbers under another package name, so
``v1`` is served by the same servicer with the same (de)serializers. So that
reflection can describe ``v1`` itself, its file descriptor (``v1alpha``'s with the
package renamed) is added to the descriptor pool once.
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2

V1ALPHA_SERVICE = reflection.SERVICE_NAME  # "grpc.reflection.v1alpha.ServerReflection"
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE = f"{V1_PACKAGE}.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _register_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    try:
        pool.FindFileByName(_V1_FILE)
        return  # registered already (by us, or by a grpcio-reflection that ships v1)
    except KeyError:
        pass
    v1alpha = descriptor_pb2.FileDescriptorProto.FromString(v1alpha_pb2.DESCRIPTOR.serialized_pb)
    old_package = f".{v1alpha.package}."
    v1alpha.name, v1alpha.package = _V1_FILE, V1_PACKAGE
    v1alpha.options.Clear()
    for message in v1alpha.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(old_package, f".{V1_PACKAGE}.")
    for service in v1alpha.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old_package, f".{V1_PACKAGE}.")
            method.output_type = method.output_type.replace(old_package, f".{V1_PACKAGE}.")
    pool.Add(v1alpha)


def enable_reflection(service_names, server: grpc.aio.Server) -> None:
    """Serve reflection v1 and v1alpha on a grpc.aio ``server`` for ``service_names`` (and both reflections)."""
    _register_v1_descriptor(descriptor_pool.Default())
    names = (*service_names, V1_SERVICE, V1ALPHA_SERVICE)
    servicer = reflection.aio.ReflectionServicer(names)
    for service in (V1_SERVICE, V1ALPHA_SERVICE):
        handler = grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=v1alpha_pb2.ServerReflectionRequest.FromString,
            response_serializer=v1alpha_pb2.ServerReflectionResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {"ServerReflectionInfo": handler}),)
        )
