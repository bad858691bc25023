"""Generated code for package ssd.v1: generation_pb2[_grpc] (public API), speculation_pb2[_grpc] (internal)."""
