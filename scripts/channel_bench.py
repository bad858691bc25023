"""Latency of one sampled round's q' (b x K x vocab, float32): the gloo tensor channel vs inline.

inline: what a Session carries without a channel: the codec encodes the tensor into a protobuf
Tensor, a real gRPC call on loopback carries it, the target decodes it (the echo server of
scripts/transport_bench.py). gloo: the session channel itself (ssd_core/wire/channel.py
PairChannel, draft rank 0 -> target rank 1 over TCP on loopback): the draft's send plus the
target's recv of the same tensor, the pair set up once as a session does. The two run
interleaved, shape by shape, repeat by repeat (this machine's speed drifts); medians and the
gloo / inline ratio from the same run. Both ends are threads of this process (gloo and gRPC
release the GIL while they move bytes).

    .venv/bin/python scripts/channel_bench.py [--json FILE] [--repeats N] [--shapes 1x7x32000,8x7x32000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import grpc
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transport_bench import MAX_MSG, METHOD, _server  # noqa: E402

from ssd_core.wire.channel import GLOO, PairChannel  # noqa: E402
from ssd_core.wire.codec import tensor_to_pb  # noqa: E402

DEFAULT_SHAPES = "1x7x32000,8x7x32000"


def _pair() -> tuple[PairChannel, PairChannel]:
    draft = PairChannel.serve(GLOO, "127.0.0.1", torch.device("cpu"))
    target = PairChannel.join(GLOO, draft.setup_pb(), torch.device("cpu"))
    if not (draft.ready(30) and target.ready(30)):
        raise RuntimeError(f"gloo pair did not come up: {draft.error or target.error}")
    return draft, target


def measure(shapes: list[tuple[int, int, int]], repeats: int) -> list[dict]:
    server, port = _server()
    grpc_channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", MAX_MSG)])
    call = grpc_channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
    draft, target = _pair()
    rows = []
    try:
        for b, k, v in shapes:
            q = torch.rand(b * k, v)
            inline, gloo = [], []
            for i in range(repeats + 1):  # the first of each is a warm-up
                t0 = time.perf_counter()
                call(tensor_to_pb(q).SerializeToString(), timeout=60)
                t1 = time.perf_counter()
                got = {}
                t2 = time.perf_counter()
                header = draft.send(q)
                reader = threading.Thread(target=lambda: got.update(t=target.recv(header, v)))
                reader.start()
                reader.join()
                t3 = time.perf_counter()
                if i == 0:
                    assert torch.equal(got["t"], q)
                    continue
                inline.append((t1 - t0) * 1e3)
                gloo.append((t3 - t2) * 1e3)
            mi, mg = statistics.median(inline), statistics.median(gloo)
            rows.append({"shape": [b, k, v], "bytes": q.numel() * 4, "inline_ms": round(mi, 3), "gloo_ms": round(mg, 3),
                         "gloo_over_inline": round(mg / mi, 3), "repeats": repeats})
            print(f"{b}x{k}x{v} fp32 ({q.numel() * 4 / 1e6:.1f} MB): inline {mi:.2f} ms, gloo {mg:.2f} ms "
                  f"(gloo/inline {mg / mi:.2f}x)")
    finally:
        draft.close()
        target.close()
        grpc_channel.close()
        server.stop(None)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--shapes", default=DEFAULT_SHAPES)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    rows = measure(shapes, args.repeats)
    if args.json:
        from ssd_bench.provenance import provenance

        out = {"rows": rows, "provenance": provenance(" ".join(sys.argv))}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
