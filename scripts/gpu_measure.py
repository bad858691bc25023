"""The GPU check's Python part (scripts/gpu_check.sh): the GPU test tier and issue 15's
measurements on one H100 / H200, written to one JSON with provenance.

    .venv/bin/python scripts/gpu_measure.py --json runs/gpu_check.json [--dry-run] [--skip served]

Measurements (each a median of --repeats after a warm-up, all in this one run):
- verify_step: the lean backend's forward over K+1 = 8 tokens at b = 1 after a 512-token KV, on an
  8B-shaped random bf16 target (Llama-3-8B dims), eager and graphed; beside it the GEMM-chain floor (the same
  weight matrices multiplied in sequence, CUDA-graphed: no attention, norms or Python) and the
  ratio. Likewise a 1B-shaped draft's tree step (32 branches x 1 token).
  Both on the static KV, eager and CUDA-graphed (ssd_core.cuda_graphs: `graphed_ms`, null where
  the device has no graphs).
- q_transfer: one round's q' (1 x 7 x 128256 and 8 x 7 x 128256 fp32) inline (codec + gRPC on
  loopback) vs the CUDA IPC channel (a second process owns the buffer, as a draft does).
- served: AR / SD / SSD tokens/s with target and draft as separate processes on this GPU
  (`--tensor-channel auto`: CUDA IPC), with MPS noted when its control daemon is up.
--dry-run: the same code on the CPU with tiny shapes (gloo in place of CUDA IPC), so the script
is exercised without a GPU; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

SHAPES = {  # name: (hidden, intermediate, layers, heads, kv_heads, vocab)
    "8b": (4096, 14336, 32, 32, 8, 128256),
    "1b": (2048, 8192, 16, 32, 8, 128256),
    "tiny": (64, 128, 2, 4, 2, 512),
}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _median_ms(fn, dev: torch.device, repeats: int) -> float:
    fn()
    _sync(dev)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _model(shape: str, dev: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from ssd_core.lean import LeanCausalLM

    h, i, n, heads, kv, v = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=v, max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device(dev):
        hf = LlamaForCausalLM(cfg).to(dtype).eval()
    return LeanCausalLM.from_hf(hf)


@torch.inference_mode()
def step_vs_floor(shape: str, rows: int, tokens: int, context: int, dev: torch.device, dtype: torch.dtype,
                  repeats: int) -> dict:
    """Lean forward of [rows, tokens] after `context` cached slots on the static KV, eager and
    CUDA-graphed (ssd_core.cuda_graphs), vs the GEMM-chain floor."""
    from ssd_core.static_kv import StaticKV

    lean = _model(shape, dev, dtype)
    os.environ["SSD_CUDA_GRAPHS"] = "1"  # opt-in until this check has passed on a GPU (ssd_core.cuda_graphs)
    caches = {}
    for name in ("eager", "graphed"):
        kv = caches[name] = StaticKV(lean, 0, dev)
        kv.prefill_rows(lean, [[1 + j % 7 for j in range(context + 1)]] * rows)
        if name == "eager":
            kv.graphs = None
    toks = torch.ones(rows, tokens, dtype=torch.long)
    pos = torch.arange(context, context + tokens)[None].expand(rows, tokens)
    branch = torch.arange(rows)[:, None].expand(rows, tokens) if rows > 1 else None

    def run(kv):
        kv.forward(lean, toks, pos, branch)
        kv.keep(torch.full((rows,), context - 1))
        kv.compact()

    def eager():
        run(caches["eager"])

    def graphed():
        run(caches["graphed"])

    eager_ms = _median_ms(eager, dev, repeats)
    x = torch.randn(rows * tokens, lean.hidden, device=dev, dtype=dtype)
    xi = torch.randn(rows * tokens, lean._layers[0].wd.shape[1], device=dev, dtype=dtype)
    mats = [w for lyr in lean._layers for w in (lyr.wqkv, lyr.wo, lyr.wgu, lyr.wd)] + [lean.lm_head.weight]

    def chain():  # every weight matrix read once, as a forward must: the memory-bound floor at small batch
        for w in mats:
            (x if w.shape[1] == x.shape[1] else xi) @ w.t()

    floor_kind = "eager"
    if dev.type == "cuda":
        try:
            graph = torch.cuda.CUDAGraph()
            chain()
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                chain()
            floor = lambda: graph.replay()  # noqa: E731
            floor_kind = "cuda_graph"
        except Exception as exc:  # noqa: BLE001 - recorded: an eager floor is still a floor
            print(f"gpu_measure: graph capture of the GEMM chain failed ({exc}); eager floor", file=sys.stderr)
            floor = chain
    else:
        floor = chain
    floor_ms = _median_ms(floor, dev, repeats)
    graphs = caches["graphed"].graphs
    graphed_ms = _median_ms(graphed, dev, repeats) if graphs is not None else None
    if graphs is None:
        note = "no CUDA graphs on this device"
    else:
        note = "" if graphs.replays else "capture failed (see the log): eager"
    return {"shape": shape, "rows": rows, "tokens": tokens, "context": context, "dtype": str(dtype),
            "eager_ms": round(eager_ms, 3), "gemm_floor_ms": round(floor_ms, 3), "floor_kind": floor_kind,
            "eager_over_floor": round(eager_ms / floor_ms, 3),
            "graphed_ms": None if graphed_ms is None else round(graphed_ms, 3),
            "graphed_over_floor": None if graphed_ms is None else round(graphed_ms / floor_ms, 3),
            "graphed_note": note}


def q_transfer(shapes: list[tuple[int, int, int]], dev: torch.device, repeats: int) -> list[dict]:
    """inline vs CUDA IPC (GPU) or gloo (dry run) for one round's q'."""
    if dev.type != "cuda":
        from channel_bench import measure

        return [dict(r, channel="gloo") for r in measure(shapes, repeats)]
    import grpc

    from ssd_core.wire.channel import CudaIpcChannel
    from ssd_core.wire.codec import tensor_to_pb
    from ssd_protos.ssd.v1 import speculation_pb2 as pb
    from transport_bench import MAX_MSG, METHOD, _server

    server, port = _server()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", MAX_MSG)])
    call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
    rows = []
    for b, k, v in shapes:
        # the owner process (the draft's role) writes q' into its buffer on each line from us
        child = subprocess.Popen([sys.executable, "-c", _IPC_OWNER, str(b * k), str(v)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        setup = pb.ChannelSetup()
        setup.ParseFromString(bytes.fromhex(child.stdout.readline().strip()))
        peer = CudaIpcChannel.join(setup, dev, v)
        q = torch.rand(b * k, v, device=dev)
        header = pb.Tensor(dtype="float32", shape=[b * k, v])
        inline, ipc = [], []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            call(tensor_to_pb(q).SerializeToString(), timeout=60)
            t1 = time.perf_counter()
            child.stdin.write("go\n")
            child.stdin.flush()
            child.stdout.readline()  # the owner wrote and synchronized
            peer.recv(header, v)
            t2 = time.perf_counter()
            if i:
                inline.append((t1 - t0) * 1e3)
                ipc.append((t2 - t1) * 1e3)
        child.stdin.close()
        child.wait(30)
        mi, mc = statistics.median(inline), statistics.median(ipc)
        rows.append({"shape": [b, k, v], "channel": "cuda_ipc", "inline_ms": round(mi, 3), "cuda_ipc_ms": round(mc, 3),
                     "cuda_ipc_over_inline": round(mc / mi, 3), "repeats": repeats,
                     "note": "cuda_ipc_ms includes the owner's write + stream sync and a pipe round trip"})
    channel.close()
    server.stop(None)
    return rows


_IPC_OWNER = """
import sys, torch
from ssd_core.wire.channel import CudaIpcChannel
rows, vocab = int(sys.argv[1]), int(sys.argv[2])
ch = CudaIpcChannel.serve(torch.device("cuda"), vocab)
q = torch.rand(rows, vocab, device="cuda")
print(ch.setup_pb().SerializeToString().hex(), flush=True)
for line in sys.stdin:
    ch.send(q)
    print("ok", flush=True)
"""


def served(dev: str, dry_run: bool, log_dir: Path, max_tokens: int) -> dict:
    """AR / SD / SSD through `ssd serve target` + `ssd serve draft` as two processes on one device."""
    from client import Client
    from ssd_cli.local_services import Services
    from ssd_train.train_pair import default_pair_dirs

    target_dir, draft_dir = default_pair_dirs()
    mps = Path("/tmp/nvidia-mps").exists() or bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY"))
    log_dir.mkdir(parents=True, exist_ok=True)
    # the draft holds the pair's token (identity shared@127.0.0.1), so the target trusts its q'
    services = Services(log_dir, env={"SSD_AUTH_TOKEN": secrets.token_hex(16)})
    out = {"device": dev, "mps": mps, "max_tokens": max_tokens, "modes": {}}
    try:
        t_addr = services.start_target("target", target_dir, "--device", dev, "--planner", "table",
                                       "--tensor-channel", "auto", "--trusted-draft", "shared@127.0.0.1")
        services.start_draft("draft", draft_dir, [t_addr], "--device", dev)
        services.wait_all(240)
        with Client(t_addr, timeout=300) as c:
            for mode in ("ar", "sd", "ssd"):
                c.generate("def f(x):", max_tokens=8, mode=mode, ignore_eos=True, temperature=1.0, seed=0)  # warm-up
                t0 = time.perf_counter()
                r = c.generate("def fibonacci(n):\n", max_tokens=max_tokens, mode=mode, ignore_eos=True,
                               temperature=1.0, seed=1)  # sampled: q' travels (over the channel)
                dt = time.perf_counter() - t0
                out["modes"][mode] = {"tokens_per_s": round(len(r.token_ids) / dt, 2),
                                      "mean_accepted_length": r.stats.mean_accepted_length,
                                      "predicted_tokens_per_s": None}
    finally:
        services.stop_all()
    text = services.log("target")
    out["tensor_channel"] = next((ln.split("tensor channel: ", 1)[1] for ln in text.splitlines()
                                  if "tensor channel: " in ln), "none logged")
    out["prediction_note"] = "the performance model's prediction needs the planner's measured costs; not wired here"
    return out


def gpu_tier(dry_run: bool, timeout_s: int) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs", "-p", "no:cacheprovider"]
    try:
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
        tail = (r.stdout + r.stderr)[-3000:]
        return {"command": " ".join(cmd), "returncode": r.returncode, "tail": tail}
    except subprocess.TimeoutExpired:
        return {"command": " ".join(cmd), "returncode": None, "tail": f"timed out after {timeout_s}s"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: exercise the script, no real figures")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--skip", default="", help="comma list of tier,verify,transfer,served")
    p.add_argument("--tier-timeout-s", type=int, default=200)
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_measure: no CUDA device; use --dry-run to exercise the script on the CPU", file=sys.stderr)
        return 1
    dev = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    big, small = ("tiny", "tiny") if args.dry_run else ("8b", "1b")
    vocab = SHAPES[big][5]
    from ssd_bench.provenance import provenance

    report: dict = {"dry_run": args.dry_run, "provenance": provenance(" ".join(sys.argv)),
                    "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"}
    t0 = time.monotonic()
    if "tier" not in skip:
        report["gpu_tier"] = gpu_tier(args.dry_run, args.tier_timeout_s)
    if "verify" not in skip:
        report["verify_step"] = step_vs_floor(big, 1, 8, 512 if not args.dry_run else 32, dev, dtype, args.repeats)
        torch.cuda.empty_cache() if dev.type == "cuda" else None
        report["tree_step"] = step_vs_floor(small, 32, 1, 512 if not args.dry_run else 32, dev, dtype, args.repeats)
    if "transfer" not in skip:
        report["q_transfer"] = q_transfer([(1, 7, vocab), (8, 7, vocab)], dev, args.repeats)
    if "served" not in skip:
        log_dir = args.json.parent / "gpu_check_logs"
        report["served"] = served(str(dev), args.dry_run, log_dir, 16 if args.dry_run else 128)
    report["wall_s"] = round(time.monotonic() - t0, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k not in ("provenance", "gpu_tier")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
