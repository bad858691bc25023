"""Generated code for the `ssd` proto packages; import as `from ssd_protos.ssd.v1 import generation_pb2`."""
