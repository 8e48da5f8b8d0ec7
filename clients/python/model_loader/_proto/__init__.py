"""Generated code for ``proto/modelloader/v1/model_loader.proto`` (run ``regen.sh`` to refresh).

``model_loader_pb2`` needs only protobuf; ``model_loader_pb2_grpc`` also needs grpcio, so it is
imported by ``model_loader.load`` alone.
"""
