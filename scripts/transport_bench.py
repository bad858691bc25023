"""Latency of the inline tensor path for one round's draft probabilities (b x K x vocab).

What a sampled SSD round sends from draft to target: q' for every drafted token. The inline path
is the project's CPU / cross-host default: the codec (ssd_core.wire.codec) turns the tensor into a
protobuf Tensor inside the Speculations message, gRPC carries it, the target decodes it. Measured
here end to end over a real gRPC channel on loopback (a bytes echo: request = the encoded
message, response = empty), plus the codec alone, for several shapes and dtypes. The same-GPU
and NCCL paths need a GPU (issue 8) and are not measured.

    .venv/bin/python scripts/transport_bench.py [--json FILE] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent import futures

import grpc
import torch

from ssd_core.wire.codec import tensor_from_pb, tensor_to_pb
from ssd_protos.ssd.v1 import speculation_pb2

SHAPES = [(1, 7, 4096), (1, 7, 32000), (1, 7, 128256), (8, 7, 32000), (8, 7, 128256)]
METHOD = "/bench.Echo/Send"
MAX_MSG = 512 * 1024 * 1024


def _codec_round_trip(t: torch.Tensor) -> torch.Tensor:
    wire = tensor_to_pb(t).SerializeToString()
    m = speculation_pb2.Tensor()
    m.ParseFromString(wire)
    return tensor_from_pb(m)


def _server() -> tuple[grpc.Server, int]:
    def send(request: bytes, context) -> bytes:
        m = speculation_pb2.Tensor()
        m.ParseFromString(request)
        tensor_from_pb(m)  # the target decodes what arrives
        return b""

    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Send": grpc.unary_unary_rpc_method_handler(send, request_deserializer=None, response_serializer=None)})
    server = grpc.server(futures.ThreadPoolExecutor(2), options=[("grpc.max_receive_message_length", MAX_MSG)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def measure(repeats: int) -> list[dict]:
    server, port = _server()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", MAX_MSG)])
    call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
    rows = []
    try:
        for dtype in (torch.float32, torch.bfloat16):
            for shape in SHAPES:
                t = torch.rand(shape).to(dtype)
                assert torch.equal(_codec_round_trip(t), t)
                codec, wire = [], []
                for _ in range(repeats):  # the codec alone, back to back (warm buffers)
                    t0 = time.perf_counter()
                    _codec_round_trip(t)
                    codec.append(time.perf_counter() - t0)
                for _ in range(repeats):  # encode + send + receive + decode, as a round does
                    t0 = time.perf_counter()
                    call(tensor_to_pb(t).SerializeToString(), timeout=60)
                    wire.append(time.perf_counter() - t0)
                rows.append({"shape": list(shape), "dtype": str(dtype).removeprefix("torch."),
                             "mbytes": round(t.numel() * t.element_size() / 1e6, 2),
                             "codec_ms": round(1000 * statistics.median(codec), 3),
                             "grpc_loopback_ms": round(1000 * statistics.median(wire), 3)})
    finally:
        channel.close()
        server.stop(None)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default=None)
    parser.add_argument("--malloc", choices=["tuned", "default"], default="tuned",
                        help="tuned: ssd_core.malloc.tune() as the services do; default: glibc's defaults")
    args = parser.parse_args()
    if args.malloc == "tuned":
        from ssd_core.malloc import tune

        tune()
    torch.set_num_threads(1)
    rows = measure(args.repeats)
    print(f"{'b x K x V':>18} {'dtype':>8} {'MB':>7} {'codec ms':>9} {'gRPC loopback ms':>17}")
    for r in rows:
        print(f"{' x '.join(map(str, r['shape'])):>18} {r['dtype']:>8} {r['mbytes']:>7} {r['codec_ms']:>9} "
              f"{r['grpc_loopback_ms']:>17}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "malloc": args.malloc, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
