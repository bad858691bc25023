"""The draft-side operations this project replaced, old way vs new way, in one run (one thread).

  sample      torch.multinomial per row (old) vs ssd_core.sampling.sample (inverse CDF)
  saguaro     top F+1 by a full argsort (old) vs ssd_core.sampling.saguaro_reshape (top-k)
  pipe        a pipe round trip of one q' [3, V]: Connection.send (torch's ForkingPickler
              reducers, old) vs ssd_core.proc_speculator's send_message/recv_message

    .venv/bin/python scripts/draft_microbench.py [--rows 8] [--vocab 4096] [--repeats 200] [--json F]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time

import torch

from ssd_core.proc_speculator import recv_message, send_message
from ssd_core.sampling import sample, saguaro_reshape


def _old_sample(probs: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    out = probs.argmax(dim=-1)
    for i, gen in enumerate(gens):
        out[i] = torch.multinomial(probs[i], 1, generator=gen)[0]
    return out


def _old_saguaro(probs: torch.Tensor, fan_out: torch.Tensor, c: float) -> torch.Tensor:
    vocab = probs.shape[-1]
    order = probs.argsort(dim=-1, descending=True)
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(vocab).expand_as(order))
    scaled = torch.where(ranks <= fan_out[:, None], probs * c, probs)
    return scaled / scaled.sum(dim=-1, keepdim=True)


def _echo(conn, mine: bool) -> None:
    while True:
        obj = recv_message(conn) if mine else conn.recv()
        if obj is None:
            break
        send_message(conn, obj) if mine else conn.send(obj)


def _pipe_ms(q: torch.Tensor, mine: bool, repeats: int) -> float:
    a, b = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(target=_echo, args=(b, mine))
    proc.start()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        if mine:
            send_message(a, q)
            recv_message(a)
        else:
            a.send(q)
            a.recv()
        times.append(time.perf_counter() - t0)
    send_message(a, None) if mine else a.send(None)
    proc.join()
    return 1000 * statistics.median(times)


def _ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(args.rows, args.vocab, generator=gen).softmax(-1)
    shared = torch.Generator().manual_seed(1)
    gens = [shared] * args.rows  # one sequence's tree branches share its generator
    fan = torch.full((args.rows,), 2)
    rows = {
        "sample": (_ms(lambda: _old_sample(probs, gens), args.repeats), _ms(lambda: sample(probs, gens), args.repeats)),
        "saguaro": (_ms(lambda: _old_saguaro(probs, fan, 0.5), args.repeats),
                    _ms(lambda: saguaro_reshape(probs, fan, 0.5), args.repeats)),
        "pipe": (_pipe_ms(torch.rand(3, args.vocab), False, args.repeats),
                 _pipe_ms(torch.rand(3, args.vocab), True, args.repeats)),
    }
    print(f"{'operation':<10} {'old ms':>8} {'new ms':>8} {'old/new':>8}   ({args.rows} x {args.vocab}, one thread)")
    for name, (old, new) in rows.items():
        print(f"{name:<10} {old:>8.3f} {new:>8.3f} {old / new:>7.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "rows": args.rows, "vocab": args.vocab,
                       "ms_old_new": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
