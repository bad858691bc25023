"""Generated gRPC/protobuf code for protos/ (do not edit; regenerate with scripts/gen_protos.sh)."""
